"""Mount write-path benchmark, against local disk, the do-nothing pyfuse3 floor
(``bench/minimal_fs.py``) and the peers sshfs and rclone mount on 127.0.0.1
(``bench/peers.py``), all in the same run:

- 1,000 files of 4 KiB written into a branch, then ``sync`` (durable on this machine's disk:
  the mount's queue files and queue database are flushed like the local files are); the same
  into each other target; medians of ``--rounds``; ``ah sync`` (their bytes uploaded to the
  hub) is timed too;
- one 256 MiB file written sequentially then ``sync`` into each, each from an emptied page
  cache (these VMs make first-touched memory slow, which swings single runs, hence the
  rounds); and the floor of a mount that keeps the bytes it is given (the do-nothing floor
  and then local disk, one after the other);
- ``ah commit`` of the queued small files;
- a re-commit of an unchanged 1 GiB file (written again with the same bytes): bytes uploaded.

Usage: python bench/mount_write_bench.py [--files 1000] [--big-mib 256] [--same-gib 1]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.harness import bench_dir, peak_rss_mib, report_peak_rss
from bench.mount_bench import drop_caches
from tests.conftest import MountProcess, command


def write_files(root: Path, count: int, data: bytes) -> float:
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        (root / f"f{i:05d}.bin").write_bytes(data)
    return time.perf_counter() - start


def write_big(path: Path, mib: int) -> float:
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with path.open("wb") as handle:
        for _ in range(mib):
            handle.write(block)
    return time.perf_counter() - start


def start_minimal_fs(mountpoint: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The do-nothing pyfuse3 file system, mounted at ``mountpoint`` (``extra``: its
    options, such as ``--read-from FILE``)."""
    mountpoint.mkdir()
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "minimal_fs.py"),
                                str(mountpoint), *extra])
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench/minimal_fs.py did not mount")
        time.sleep(0.05)
    return process


def copy_into(point: Path, local: Path, files: list[Path]) -> None:
    """Write ``files`` (paths relative to ``local``) into the mount at ``point``: how the
    do-nothing floor gets the names and sizes it then lists and reads."""
    for rel in files:
        (point / rel).parent.mkdir(parents=True, exist_ok=True)
        (point / rel).write_bytes((local / rel).read_bytes())


def round_trip_us(path: Path, count: int = 3000) -> float:
    """Microseconds per FUSE request that libfuse answers itself (an ioctl on an open file,
    ENOSYS in C without reaching Python): what a request costs a mount before any handler,
    the part of each small file's requests no handler work of ours can remove."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for _ in range(count):
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        return (time.perf_counter() - start) / count * 1e6
    finally:
        os.close(fd)


def timed_sync() -> float:
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def idle(mount: MountProcess) -> None:
    """Wait until the mount's upload-ahead has nothing left to do."""
    time.sleep(0.6)
    while mount.control("stats")["uploading"]:
        time.sleep(0.1)


def ah(*args: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([command("ah"), "-q", *args], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--same-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="sshfs,rclone")
    args = parser.parse_args()
    wanted = peers.wanted(args.peers)
    with bench_dir() as root, contextlib.ExitStack() as stack:
        for name in ("model/bench", "model/bench/m", "model/bench/m:w"):
            subprocess.run([command("ah"), "-q", "create", name], check=True)
        mount = MountProcess(root / "mnt").start()
        stack.callback(mount.stop)
        floor_point = root / "nothing"
        floor = start_minimal_fs(floor_point)
        stack.callback(floor.wait, 30)
        stack.callback(peers.unmount, floor_point)
        branch = mount.mountpoint / "model/bench/m/w"
        (root / "local").mkdir()
        targets = {"local": root / "local", "pyfuse3 floor": floor_point, "ahmount": branch}
        for name in wanted:
            served = root / f"{name}-served"
            served.mkdir()
            targets[name] = stack.enter_context(peers.MOUNTS[name](served, root / f"{name}-work"))
        data = os.urandom(4096)
        small: dict[str, list[float]] = {t: [] for t in targets}
        big: dict[str, list[float]] = {t: [] for t in targets}
        ops_before: dict[str, int] = mount.control("stats")["fuse_ops"]
        for i in range(args.rounds):
            for name, where in targets.items():
                idle(mount)
                timed_sync()  # no unrelated dirty pages in the next sync
                small[name].append(write_files(where / f"small-{i}", args.files, data)
                                   + timed_sync())
        ops_after: dict[str, int] = mount.control("stats")["fuse_ops"]
        per_file = {op: (n - ops_before.get(op, 0)) / (args.rounds * args.files)
                    for op, n in ops_after.items()
                    if n - ops_before.get(op, 0) >= args.rounds * args.files / 2}
        trips = {name: statistics.median(round_trip_us(targets[name] / "small-0/f00000.bin")
                                         for _ in range(3))
                 for name in ("pyfuse3 floor", "ahmount")}
        for i in range(args.rounds):
            for name, where in targets.items():
                idle(mount)
                # Each target starts from the same memory: the page cache the one before it
                # filled (hundreds of MiB) would otherwise be reclaimed during its write,
                # which on these VMs costs more than the write (a target that keeps its
                # bytes, as ahmount's queue and rclone's cache do, pays it twice).
                drop_caches()
                big[name].append(write_big(where / f"big-{i}.bin", args.big_mib)
                                 + timed_sync())
        ah_sync = ah("sync", cwd=branch)
        commit_small = ah("commit", "-m", "small files", cwd=branch)

        same = root / "same.bin"
        with same.open("wb") as handle:
            for _ in range(int(args.same_gib * 1024)):
                handle.write(os.urandom(1 << 20))
        shutil.copyfile(same, branch / "same.bin")
        ah("commit", "-m", "same v1", cwd=branch)
        idle(mount)
        before = mount.control("stats")["bytes_uploaded"]
        shutil.copyfile(same, branch / "same.bin")  # the same bytes again
        recommit = ah("commit", "-m", "same v2", cwd=branch)
        idle(mount)
        uploaded = mount.control("stats")["bytes_uploaded"] - before

        base = "sshfs" if "sshfs" in targets else "local"
        print(f"medians of {args.rounds}; ratios: time to sshfs's for the small files (lower "
              f"is better), speed to rclone's / the floor's for the large one (higher is "
              f"better)")
        print(f"{'':<14}{f'{args.files} x 4 KiB + sync':>34}{f'{args.big_mib} MiB + sync':>40}")
        for name in targets:
            s_time = statistics.median(small[name])
            b_time = statistics.median(big[name])
            speed = args.big_mib / b_time
            vs_rclone = (f"{speed / (args.big_mib / statistics.median(big['rclone'])):.2f}x "
                         "rclone, ") if "rclone" in big else ""
            vs_floor = speed / (args.big_mib / statistics.median(big["pyfuse3 floor"]))
            print(f"{name:<14}{s_time:>10.3f} s ({s_time / statistics.median(small[base]):5.2f}x "
                  f"{base}){'':>5}{speed:>8.0f} MiB/s ({vs_rclone}{vs_floor:.2f}x floor)")
        # A mount that keeps what it is given (ahmount's queue, rclone's cache) writes each
        # byte through FUSE and then to local disk: its floor is the two in a row.
        small_floor = statistics.median(small["pyfuse3 floor"]) + \
            statistics.median(small["local"])
        big_floor = statistics.median(big["pyfuse3 floor"]) + statistics.median(big["local"])
        print(f"floor of a mount that keeps the bytes (pyfuse3 floor, then local disk): "
              f"small files {small_floor:.3f} s (ahmount "
              f"{statistics.median(small['ahmount']) / small_floor:.2f}x it), "
              f"{args.big_mib / big_floor:,.0f} MiB/s (ahmount "
              f"{big_floor / statistics.median(big['ahmount']):.2f}x it)")
        print("handler calls per small file in ahmount: " + ", ".join(
            f"{op} {n:.2f}" for op, n in sorted(per_file.items())) + " (and an ioctl, which "
            "libfuse answers: Python's open asks whether the file is a terminal)")
        print(f"a request libfuse answers itself: pyfuse3 floor {trips['pyfuse3 floor']:.0f} "
              f"us, ahmount {trips['ahmount']:.0f} us per round trip")
        print(f"ah sync of the {args.rounds * args.files} small files (bytes to the hub) "
              f"{ah_sync:.2f}s; ah commit of them {commit_small:.2f}s")
        print(f"re-commit of an unchanged {args.same_gib:.0f} GiB file: {recommit:.2f}s, "
              f"{uploaded} bytes uploaded (must be 0)")
        assert mount.pid is not None
        report_peak_rss({"ahmount": peak_rss_mib(mount.pid)})


if __name__ == "__main__":
    main()
