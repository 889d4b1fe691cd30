"""Mount read-path benchmark: every figure a ratio to the same work on local disk, same run.

- cold sequential read of a 1 GiB object not yet cached (embedded hub, and ah-server over
  loopback) vs reading the local file with the page cache dropped; three rounds, medians;
  the server figure also against a raw httpx download of the object (the HTTP stack alone);
- warm sequential read (kernel page cache kept across opens) vs the local file, warm;
- warm random 4 KiB reads (IOPS) vs the local file, warm;
- warm ``stat`` of 10,000 files in a tag, and ``find`` over them, vs a local copy;
- peak daemon RSS while reading a 4 GiB object.

Usage: python bench/mount_bench.py [--gib 1] [--files 10000] [--rss-gib 4]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.embedded import embedded_client
from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess, MountProcess

T = TypeVar("T")

CHUNK = 1 << 20


def drop_caches() -> None:
    """Empty the page cache, after writeback has settled: dirty pages left by the set-up
    would otherwise slow the cold reads that follow (they write the mount's cache)."""
    subprocess.run(["sync"], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        dirty = next(int(line.split()[1]) for line in meminfo if line.startswith("Dirty:"))
        if dirty < 64 * 1024:
            break
        time.sleep(0.5)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(CHUNK):
            pass
    return time.perf_counter() - start


def raw_download(url: str, key: str) -> float:
    """Seconds to stream the object from ah-server with plain httpx, bytes dropped: the HTTP
    stack alone, the ceiling for a mount reading through it."""
    import httpx

    start = time.perf_counter()
    with httpx.stream("GET", url, headers={"authorization": f"Bearer {key}"},
                      timeout=60) as response:
        response.raise_for_status()
        for _ in response.iter_raw(CHUNK):
            pass
    return time.perf_counter() - start


def random_reads(path: Path, count: int, size: int) -> float:
    rng = random.Random(1)
    offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def stat_all(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        os.stat(p)
    return time.perf_counter() - start


def warm_best(measure: Callable[[T], float], target: T) -> float:
    """The best of three timings, after a warm-up run."""
    measure(target)
    return min(measure(target) for _ in range(3))


def timed_find(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["find", str(root)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


async def populate(hub: HubClient, me: str, big: Path, files_dir: Path, sparse: Path) -> None:
    folder = FolderAddr(me, "dataset", "bench")
    await hub.create_folder(folder)
    for name in ("big", "files", "huge"):
        await hub.create_asset(AssetAddr(folder, name))
    sha, size = hash_file(big)
    await hub.upload_file(big, sha, size)
    await hub.commit(AssetAddr(folder, "big"), "main", "big",
                     adds=[ObjectEntry("big.bin", sha, size, 1.0)])
    batch, entries = [], []
    for p in sorted(files_dir.rglob("*.txt")):
        s, n = hash_file(p)
        batch.append((p, s, n))
        entries.append(ObjectEntry(str(p.relative_to(files_dir)), s, n, 1.0))
    for start in range(0, len(batch), 1000):
        await hub.upload_batch(batch[start:start + 1000])
    files = AssetAddr(folder, "files")
    await hub.commit(files, "main", "files", adds=entries)
    await hub.create_tag(files, "v1", "main")
    sha, size = hash_file(sparse)
    await hub.upload_file(sparse, sha, size)
    await hub.commit(AssetAddr(folder, "huge"), "main", "huge",
                     adds=[ObjectEntry("huge.bin", sha, size, 1.0)])


def peak_rss_while(pid: int, work: threading.Thread) -> int:
    peak = 0
    work.start()
    while work.is_alive():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.05)
    work.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rss-gib", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
        big = root / "big.bin"
        size = int(args.gib * (1 << 30))
        with big.open("wb") as handle:
            for _ in range(size // CHUNK):
                handle.write(os.urandom(CHUNK))
        files_dir = root / "files"
        for i in range(args.files):
            d = files_dir / f"d{i // 500:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.txt").write_bytes(b"x" * 100)
        sparse = root / "huge.bin"
        with sparse.open("wb") as handle:
            handle.truncate(int(args.rss_gib * (1 << 30)))
        server = HubProcess(root / "server")
        key = server.add_user("bench")
        server.start()
        me = "root" if os.getuid() == 0 else os.environ.get("USER", "user")

        async def fill() -> None:
            async with embedded_client() as hub:
                await populate(hub, me, big, files_dir, sparse)
            async with HubClient(server.url, api_key=key) as hub:
                await populate(hub, "bench", big, files_dir, sparse)

        trio.run(fill)
        embedded = MountProcess(root / "mnt", "--cache-size", "16G").start()
        remote = MountProcess(root / "mnt-remote", "--hub", server.url, "--api-key", key,
                              "--cache-size", "16G").start()
        try:
            # Cold reads swing by 2-3x from run to run on these VMs (the virtual disk is cached
            # by the host, or not): three rounds of all three, medians compared.
            colds: dict[str, list[float]] = {"local": [], "embedded": [], "ah-server": [],
                                             "raw HTTP": []}
            object_url = (f"{server.url}/api/v1/assets/bench/dataset/bench/big/refs/main/files/"
                          "big.bin")
            for _ in range(3):
                drop_caches()
                colds["local"].append(read_all(big))
                drop_caches()
                colds["raw HTTP"].append(raw_download(object_url, key))
                for label, m in (("embedded", embedded), ("ah-server", remote)):
                    m.control("cache", action="drop")
                    drop_caches()
                    colds[label].append(read_all(m.mountpoint /
                                                 "dataset/bench/big/main/big.bin"))
            local_cold = statistics.median(colds["local"])
            local_warm = min(read_all(big) for _ in range(3))
            results: list[tuple[str, float]] = [
                (f"cold sequential read, {label}", local_cold / statistics.median(colds[label]))
                for label in ("embedded", "ah-server")]
            raw_ratio = statistics.median(colds["raw HTTP"]) / statistics.median(
                colds["ah-server"])
            path = embedded.mountpoint / "dataset/bench/big/main/big.bin"
            warm = min(read_all(path) for _ in range(3))
            results.append(("warm sequential read (kernel cache kept)", local_warm / warm))
            read_all(big)  # both warm: the local file in the page cache, the object likewise
            read_all(path)
            local_iops = random_reads(big, 20000, size)
            mount_iops = random_reads(path, 20000, size)
            results.append(("warm random 4 KiB reads (IOPS)", mount_iops / local_iops))

            local_files = sorted(p for p in files_dir.rglob("*.txt"))
            tag_root = embedded.mountpoint / "dataset/bench/files/v1"
            mount_files = [tag_root / p.relative_to(files_dir) for p in local_files]
            local_stat = warm_best(stat_all, local_files)
            mount_stat = warm_best(stat_all, mount_files)
            results.append((f"warm stat of {len(local_files)} files (time, lower is better)",
                            mount_stat / local_stat))
            local_find = warm_best(timed_find, files_dir)
            mount_find = warm_best(timed_find, tag_root)
            results.append((f"find over {len(local_files)} files (time, lower is better)",
                            mount_find / local_find))
            huge = embedded.mountpoint / "dataset/bench/huge/main/huge.bin"
            assert embedded.pid is not None
            peak = peak_rss_while(embedded.pid, threading.Thread(target=read_all, args=(huge,)))

            mib = size / (1 << 20)
            print(f"local: cold {mib / local_cold:.0f} MiB/s, warm {mib / local_warm:.0f} MiB/s, "
                  f"{local_iops:.0f} IOPS, stat {local_stat * 1000:.0f} ms, "
                  f"find {local_find * 1000:.0f} ms")
            print("cold reads, MiB/s per round: " + "; ".join(
                f"{label} " + ", ".join(f"{mib / t:.0f}" for t in times)
                for label, times in colds.items()))
            for label, ratio in results:
                print(f"{label:<55} {ratio:6.2f}x local")
            print(f"  (ah-server cold read = {raw_ratio:.2f}x a raw httpx download of the same "
                  "object from the same server, bytes dropped)")
            print(f"peak daemon RSS reading a {args.rss_gib:.0f} GiB object: "
                  f"{peak / (1 << 20):.0f} MiB")
            print(f"cache after: {embedded.control('cache')}")
        finally:
            embedded.stop()
            remote.stop()
            server.stop()
            shutil.rmtree(root / "home", ignore_errors=True)


if __name__ == "__main__":
    main()
