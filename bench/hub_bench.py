"""Hub benchmark: blob throughput over loopback and metadata at 100k objects.

Prints ratios against baselines measured in this same run:
- upload / download of one file through a real ah-server on 127.0.0.1, against ``cp`` of the
  same bytes on local disk (followed by fsync, as the hub also makes its copy durable);
- commit and list times of a 100,000-object dataset, and of small commits on top of it.

Usage: python bench/hub_bench.py [--mib 512] [--objects 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess


def timed_cp(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


async def bench(args: argparse.Namespace, root: Path) -> None:
    server = HubProcess(root / "data")
    key = server.add_user("bench")
    server.start()
    try:
        src = root / "blob.bin"
        with src.open("wb") as handle:
            for _ in range(args.mib):
                handle.write(os.urandom(1 << 20))
        size = src.stat().st_size
        sha, _ = hash_file(src)
        cp_time = timed_cp(src, root / "copy.bin")
        async with HubClient(server.url, api_key=key) as hub:
            folder = FolderAddr("bench", "dataset", "bench")
            await hub.create_folder(folder)
            asset = AssetAddr(folder, "data")
            await hub.create_asset(asset)
            start = time.perf_counter()
            await hub.upload_file(src, sha, size)
            up_time = time.perf_counter() - start
            entry = ObjectEntry("blob.bin", sha, size, 1.0)
            await hub.commit(asset, "main", "blob", adds=[entry])
            drop_page_cache(src)
            start = time.perf_counter()
            await hub.download(asset, "main", entry, root / "down.bin")
            down_time = time.perf_counter() - start
            mib = size / (1 << 20)
            print(f"blob size: {mib:.0f} MiB")
            print(f"cp baseline:   {mib / cp_time:8.1f} MiB/s")
            print(f"upload:        {mib / up_time:8.1f} MiB/s   ratio to cp "
                  f"{cp_time / up_time:.2f}x")
            print(f"download:      {mib / down_time:8.1f} MiB/s   ratio to cp "
                  f"{cp_time / down_time:.2f}x")

            empty = hashlib.sha256(b"").hexdigest()
            (root / "empty").touch()
            await hub.upload_file(root / "empty", empty, 0)
            entries = [ObjectEntry(f"train/{i // 1000:03d}/{i:06d}.png", empty, 0, 1.0)
                       for i in range(args.objects)]
            big = AssetAddr(folder, "many")
            await hub.create_asset(big)
            start = time.perf_counter()
            await hub.commit(big, "main", "100k", adds=entries)
            commit_big = time.perf_counter() - start
            start = time.perf_counter()
            _, listed = await hub.list_objects(big, "main")
            list_all = time.perf_counter() - start
            assert len(listed) == args.objects
            small: list[float] = []
            for i in range(args.small_commits):
                start = time.perf_counter()
                await hub.commit(big, "main", f"small {i}", deletes=[entries[i * 7].path],
                                 adds=[ObjectEntry(f"extra/{i}.png", empty, 0, 1.0)])
                small.append(time.perf_counter() - start)
            start = time.perf_counter()
            page = await hub.list_page(big, "main", prefix="train/050/", limit=1000)
            list_page = time.perf_counter() - start
            assert len(page.objects) == 1000 or args.objects < 51_000
            small_avg = sum(small) / len(small)
            print(f"{args.objects} objects: commit {commit_big:.2f}s, list all {list_all:.2f}s, "
                  f"one 1000-object page {list_page * 1000:.1f} ms")
            print(f"small commit on top (avg of {len(small)}): {small_avg * 1000:.1f} ms, "
                  f"ratio to the 100k commit {small_avg / commit_big:.4f}")
            meta_bytes = sum(p.stat().st_size for p in server.data_dir.glob("meta.db*"))
            print(f"metadata size after {len(small) + 1} commits: {meta_bytes / (1 << 20):.1f} MiB")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--small-commits", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        trio.run(bench, args, Path(tmp))


if __name__ == "__main__":
    main()
