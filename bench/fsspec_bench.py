"""``ah://`` benchmark against a real ah-server on 127.0.0.1, every figure next to its baseline
from the same run:

- Parquet: 2 of the 20 columns of a >= 500 MiB file (pyarrow's default row groups, no
  compression) read through ``ah://`` with a cold cache: bytes fetched over HTTP vs the bytes
  of those column chunks (the target is <= 1.2x) and vs the file's size; wall time vs the same
  read from local disk (page cache dropped) and through the mount (its cache dropped);
- ``fs.cat`` of 10,000 small files of a tag (batched) vs the mount's ``find | xargs cat`` of
  the same tag, both cold;
- 8 forked DataLoader-style workers reading random files of a tag through one pickled file
  system: aggregate throughput vs one worker doing the same reads.

Usage: python bench/fsspec_bench.py [--mib 512] [--files 10000] [--workers 8]
Needs root (drop_caches) and /dev/fuse (for the mount baselines).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.ahfs import AhFileSystem
from bench.harness import bench_dir, hub_mount, served_hub
from bench.mount_bench import drop_caches

COLUMNS = 20
WANTED = ["c03", "c17"]


def write_parquet(path: Path, mib: int) -> None:
    rows = mib * (1 << 20) // (8 * COLUMNS)
    rng = np.random.default_rng(1)
    writer = None
    step = 1 << 20  # generate a row group's worth at a time: bounded memory
    try:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            table = pa.table({f"c{i:02d}": rng.random(n) for i in range(COLUMNS)})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="none")
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def column_chunk_bytes(path: Path, columns: list[str]) -> int:
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    total = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for name in columns:
            total += group.column(names.index(name)).total_compressed_size
    return total


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def read_columns(source: Any, fs: Any = None) -> None:
    table = pq.read_table(source, columns=WANTED, filesystem=fs)
    assert table.num_columns == 2


def worker(fs: AhFileSystem, paths: list[str], seed: int, count: int, out: Any) -> None:
    rng = random.Random(seed)
    total = 0
    start = time.perf_counter()
    for _ in range(count):
        total += len(fs.cat_file(rng.choice(paths)))
    out.put((total, time.perf_counter() - start))


def run_workers(fs: AhFileSystem, paths: list[str], workers: int,
                count: int) -> tuple[float, float]:
    """Files/s and MiB/s of ``workers`` forked processes, each reading ``count`` random
    files."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(fs, paths, seed, count, queue))
             for seed in range(workers)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    return workers * count / wall, sum(n for n, _ in results) / (1 << 20) / wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--images", type=int, default=800, help="files the workers read")
    parser.add_argument("--image-kib", type=int, default=256)
    args = parser.parse_args()
    with bench_dir() as root, served_hub(root) as (server, key):
        mount = None
        try:
            options = {"hub": server.url, "api_key": key, "cache_dir": str(root / "cache")}
            fs = AhFileSystem(**options)
            table_path = root / "table.parquet"
            write_parquet(table_path, args.mib)
            size = table_path.stat().st_size
            wanted = column_chunk_bytes(table_path, WANTED)
            fs.makedirs("dataset/bench/table")
            fs.put_file(str(table_path), "dataset/bench/table/table.parquet")
            small = root / "small"
            for i in range(args.files):
                d = small / f"d{i // 500:03d}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:05d}.txt").write_bytes(os.urandom(64) + b"\n" * (i % 200))
            fs.makedirs("dataset/bench/files")
            fs.put(str(small) + "/", "dataset/bench/files/", recursive=True)
            images = root / "images"
            images.mkdir()
            for i in range(args.images):
                (images / f"{i:05d}.jpg").write_bytes(os.urandom(args.image_kib << 10))
            fs.makedirs("dataset/bench/images")
            fs.put(str(images) + "/", "dataset/bench/images/", recursive=True)
            _tag(server.url, key, "files")
            _tag(server.url, key, "images")
            mount = hub_mount(server, key, root / "mnt", root / "mount-cache",
                              "--cache-size", "16G")

            # -- Parquet: 2 of 20 columns ---------------------------------------------------
            drop_caches()
            local_s = timed(read_columns, str(table_path))
            cold = AhFileSystem(**{**options, "cache_dir": str(root / "cold-cache")},
                                skip_instance_cache=True)
            cold.info("dataset/bench/table/table.parquet")  # resolve and list: not the read
            before = cold._runtime().cache.stats.bytes_fetched
            ah_s = timed(read_columns, "dataset/bench/table/table.parquet", cold)
            fetched = cold._runtime().cache.stats.bytes_fetched - before
            mount.control("cache", action="drop")
            drop_caches()
            mount_file = mount.mountpoint / "dataset/bench/table/main/table.parquet"
            mount_before = mount.control("stats")["cache"]["bytes_fetched"]
            mount_s = timed(read_columns, str(mount_file))
            mount_fetched = mount.control("stats")["cache"]["bytes_fetched"] - mount_before
            print(f"Parquet {size / (1 << 20):.0f} MiB, {COLUMNS} columns, read {WANTED}: "
                  f"column chunks {wanted / (1 << 20):.1f} MiB")
            print(f"  ah:// fetched {fetched / (1 << 20):.1f} MiB = {fetched / wanted:.2f}x the "
                  f"column chunks (target <= 1.2x), {fetched / size:.3f} of the file")
            print(f"  mount fetched {mount_fetched / (1 << 20):.1f} MiB = "
                  f"{mount_fetched / wanted:.2f}x the column chunks")
            print(f"  wall: local disk (cold) {local_s * 1000:.0f} ms, ah:// (cold) "
                  f"{ah_s * 1000:.0f} ms = {ah_s / local_s:.2f}x local, mount (cold) "
                  f"{mount_s * 1000:.0f} ms = {mount_s / local_s:.2f}x local")

            # -- 10,000 small files ---------------------------------------------------------
            tagged = AhFileSystem(**{**options, "cache_dir": str(root / "cat-cache")},
                                  skip_instance_cache=True)
            paths = tagged.find("dataset/bench/files@v1")
            start = time.perf_counter()
            contents = tagged.cat(paths)
            ah_cat = time.perf_counter() - start
            assert len(contents) == args.files
            mount.control("cache", action="drop")
            drop_caches()
            start = time.perf_counter()
            subprocess.run(f"find {mount.mountpoint}/dataset/bench/files/v1 -type f -print0 | "
                           "xargs -0 cat > /dev/null", shell=True, check=True)
            mount_cat = time.perf_counter() - start
            print(f"cat of {args.files} small files of a tag (cold): ah:// fs.cat "
                  f"{ah_cat:.2f} s, mount find | xargs cat {mount_cat:.2f} s = "
                  f"{mount_cat / ah_cat:.2f}x the time ah:// took")

            # -- forked workers -------------------------------------------------------------
            # DataLoader-style: the parent lists the tag once, forks, and every worker reads
            # random files (each worker its own draw), cold caches for both runs.
            count = max(50, args.images // 2)
            rates = []
            for workers in (1, args.workers):
                reader = AhFileSystem(**{**options, "cache_dir": str(root / f"w{workers}")},
                                      skip_instance_cache=True)
                files = reader.find("dataset/bench/images@v1")
                rates.append(run_workers(reader, files, workers, count))
            (one_files, one_mib), (many_files, many_mib) = rates
            print(f"{args.workers} forked workers reading random {args.image_kib} KiB files of a "
                  f"tag (cold cache): {many_mib:.0f} MiB/s ({many_files:.0f} files/s) vs one "
                  f"worker {one_mib:.0f} MiB/s ({one_files:.0f} files/s) = "
                  f"{many_mib / one_mib:.2f}x "
                  f"({os.cpu_count()} cores, ah-server on the same machine)")
        finally:
            if mount is not None:
                mount.stop()


def _tag(url: str, key: str, asset: str) -> None:
    import trio

    from ahmount.client.hub_client import HubClient
    from ahmount.hub.models import AssetAddr, FolderAddr

    async def tag() -> None:
        async with HubClient(url, api_key=key) as hub:
            await hub.create_tag(AssetAddr(FolderAddr("bench", "dataset", "bench"), asset),
                                 "v1", "main")

    trio.run(tag)


if __name__ == "__main__":
    main()
