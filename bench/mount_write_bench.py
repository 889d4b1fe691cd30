"""Mount write-path benchmark: every figure a ratio to the same work on local disk.

- 1,000 files of 4 KiB written into a branch, then ``sync`` (durable on this machine's disk:
  the mount's queue files and queue database are flushed like the local files are), vs the
  same files written to a local directory, then ``sync``; three rounds, medians; ``ah sync``
  (their bytes uploaded to the hub) is timed too;
- the same small-file workload on ``bench/minimal_fs.py`` (a pyfuse3 file system that does no
  work): the floor under any trio + pyfuse3 daemon;
- one 256 MiB file written sequentially then ``sync``, vs local; five rounds, median, the
  write alone shown as well (page-cache speed: these VMs make first-touched memory slow, which
  swings single runs by 10x either way, hence the rounds);
- ``ah commit`` of the 3 x 1,000 queued files, vs the time it took to write them;
- a re-commit of an unchanged 1 GiB file (written again with the same bytes): bytes uploaded.

Usage: python bench/mount_write_bench.py [--files 1000] [--big-mib 256] [--same-gib 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def start_minimal_fs(mountpoint: Path) -> subprocess.Popen[bytes]:
    """The do-nothing pyfuse3 file system, mounted at ``mountpoint``."""
    mountpoint.mkdir()
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "minimal_fs.py"),
                                str(mountpoint)])
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench/minimal_fs.py did not mount")
        time.sleep(0.05)
    return process


def timed_sync() -> float:
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def big_rounds(mount: MountProcess, local: Path, mounted: Path, mib: int,
               rounds: int) -> tuple[list[float], ...]:
    """Write times and write+sync times of both sides, alternating, ``rounds`` times; each
    round starts once upload-ahead of the previous one is done, as on a quiet machine."""
    local_write: list[float] = []
    local_total: list[float] = []
    mount_write: list[float] = []
    mount_total: list[float] = []
    for _ in range(rounds):
        for path, writes, totals in ((local, local_write, local_total),
                                     (mounted, mount_write, mount_total)):
            idle(mount)
            timed_sync()  # no unrelated dirty pages in the next sync
            took = write_big(path, mib)
            writes.append(took)
            totals.append(took + timed_sync())
    return local_write, local_total, mount_write, mount_total


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
        for name in ("model/bench", "model/bench/m", "model/bench/m:w"):
            subprocess.run([command("ah"), "-q", "create", name], check=True)
        mount = MountProcess(root / "mnt").start()
        floor_point = root / "nothing"
        floor = start_minimal_fs(floor_point)
        try:
            branch = mount.mountpoint / "model/bench/m/w"
            data = os.urandom(4096)
            small: dict[str, list[float]] = {"local": [], "local+sync": [], "mount": [],
                                             "mount+sync": [], "floor": [], "floor+sync": []}
            for i in range(3):
                for side, where in (("local", root / f"local-small-{i}"),
                                    ("mount", branch / f"small-{i}"),
                                    ("floor", floor_point / f"small-{i}")):
                    idle(mount)
                    timed_sync()  # no unrelated dirty pages in the next sync
                    took = write_files(where, args.files, data)
                    small[side].append(took)
                    small[side + "+sync"].append(took + timed_sync())
            local_write, local_small, mount_write, mount_small, floor_small = (
                statistics.median(small[k]) for k in ("local", "local+sync", "mount",
                                                      "mount+sync", "floor+sync"))
            ah_sync = ah("sync", cwd=branch)
            commit_small = ah("commit", "-m", "small files", cwd=branch)
            commit_ratio = commit_small / sum(small["mount"])

            big = big_rounds(mount, root / "local-big.bin", branch / "big.bin", args.big_mib, 5)
            local_big_write, local_big, mount_big_write, mount_big = map(statistics.median, big)
            ah("commit", "-m", "big", cwd=branch)

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

            print(f"{args.files} files of 4 KiB, write + sync: {mount_small:.2f}s vs local "
                  f"{local_small:.2f}s -> {mount_small / local_small:.1f}x local (target <= 5x; "
                  f"medians of 3); write alone {mount_write:.2f}s vs {local_write:.3f}s; "
                  f"ah sync of all {3 * args.files} (bytes to the hub) {ah_sync:.2f}s")
            print(f"  floor: a pyfuse3 file system that does nothing (bench/minimal_fs.py) takes "
                  f"{floor_small:.2f}s = {floor_small / local_small:.1f}x local; the mount is "
                  f"{mount_small / floor_small:.1f}x that floor")
            print(f"sequential write of {args.big_mib} MiB + sync: "
                  f"{local_big / mount_big:.2f}x local speed (target >= 0.4x); write alone "
                  f"{local_big_write / mount_big_write:.2f}x (medians of 5: mount "
                  f"{mount_big:.2f}s / {mount_big_write:.2f}s, local {local_big:.2f}s / "
                  f"{local_big_write:.2f}s)")
            print(f"ah commit of the {3 * args.files} queued files: {commit_small:.2f}s = "
                  f"{commit_ratio:.2f}x the time to write them (target <= 2x)")
            print(f"re-commit of an unchanged {args.same_gib:.0f} GiB file: {recommit:.2f}s, "
                  f"{uploaded} bytes uploaded (must be 0)")
        finally:
            mount.stop()
            subprocess.run(["fusermount3", "-u", str(floor_point)], check=False)
            floor.wait(timeout=30)


if __name__ == "__main__":
    main()
