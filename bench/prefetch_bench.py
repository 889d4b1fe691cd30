"""Warm-up: a training job's first epoch, with and without ``ah prefetch``, against local disk.

The first epoch is a shuffled read of 10,000 small files of a tag, and a read of a 1 GiB
file, through a mount of ah-server on 127.0.0.1: once straight from a cold cache, once after
``ah prefetch`` of the tag (its own time printed too), and from local disk with the page
cache dropped. Figures are times, and each a ratio to local disk (lower is better).

Usage: python bench/prefetch_bench.py [--files 10000] [--gib 1]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import bench_dir, hub_mount, served_hub, upload_tree
from bench.mount_bench import drop_caches, read_all
from tests.conftest import MountProcess, command


def shuffled_read(paths: list[Path]) -> float:
    order = list(paths)
    random.Random(7).shuffle(order)
    start = time.perf_counter()
    for p in order:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    with bench_dir() as root:
        local = root / "local"
        names = []
        for i in range(args.files):
            p = local / "small" / f"d{i // 500:03d}" / f"{i:05d}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(4096))
            names.append(p.relative_to(local))
        big = local / "big.bin"
        with big.open("wb") as f:
            for _ in range(int(args.gib * 1024)):
                f.write(os.urandom(1 << 20))
        names_big = big.relative_to(local)
        with served_hub(root) as (server, key):
            mounts: list[MountProcess] = []
            try:
                upload_tree(server, key, local, "dataset/bench/train", root / "fs-cache")
                from bench.fsspec_bench import _tag

                _tag(server.url, key, "train")
                results = {}
                drop_caches()
                results["local"] = (shuffled_read([local / n for n in names]),
                                    read_all(big))
                for label, warm in (("cold cache", False), ("after ah prefetch", True)):
                    m = hub_mount(server, key, root / f"mnt-{warm}", root / f"cache-{warm}",
                                  "--cache-size", "8G")
                    mounts.append(m)
                    tag = m.mountpoint / "dataset/bench/train/v1"
                    if warm:
                        start = time.perf_counter()
                        subprocess.run([command("ah"), "prefetch", str(tag), "--jobs", "16"],
                                       check=True, capture_output=True)
                        print(f"ah prefetch of the tag: {time.perf_counter() - start:.1f} s")
                    drop_caches()
                    results[label] = (shuffled_read([tag / n for n in names]),
                                      read_all(tag / names_big))
                base_small, base_big = results["local"]
                for label, (small, big_s) in results.items():
                    print(f"{label:<20} shuffled {args.files} small files {small:6.2f} s "
                          f"({small / base_small:5.2f}x local), {args.gib:g} GiB file "
                          f"{big_s:6.2f} s ({big_s / base_big:5.2f}x local)")
            finally:
                for m in mounts:
                    m.stop()


if __name__ == "__main__":
    main()
