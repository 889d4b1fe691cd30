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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.ahfs import AhFileSystem
from bench.mount_bench import drop_caches, read_all
from tests.conftest import HubProcess, MountProcess, command


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
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
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
        server = HubProcess(root / "server")
        key = server.add_user("bench")
        server.start()
        mounts: list[MountProcess] = []
        try:
            fs = AhFileSystem(hub=server.url, api_key=key, cache_dir=str(root / "fs-cache"))
            fs.makedirs("dataset/bench/train")
            fs.put(str(local) + "/", "dataset/bench/train/", recursive=True)
            from bench.fsspec_bench import _tag

            _tag(server.url, key, "train")
            results = {}
            drop_caches()
            results["local"] = (shuffled_read([local / n for n in names]),
                                _timed_read(big))
            for label, warm in (("cold cache", False), ("after ah prefetch", True)):
                m = MountProcess(root / f"mnt-{warm}", "--hub", server.url, "--api-key", key,
                                 "--cache-dir", str(root / f"cache-{warm}"),
                                 "--cache-size", "8G").start()
                mounts.append(m)
                tag = m.mountpoint / "dataset/bench/train/v1"
                if warm:
                    start = time.perf_counter()
                    subprocess.run([command("ah"), "prefetch", str(tag), "--jobs", "16"],
                                   check=True, capture_output=True)
                    print(f"ah prefetch of the tag: {time.perf_counter() - start:.1f} s")
                drop_caches()
                results[label] = (shuffled_read([tag / n for n in names]),
                                  _timed_read(tag / names_big))
            base_small, base_big = results["local"]
            for label, (small, big_s) in results.items():
                print(f"{label:<20} shuffled {args.files} small files {small:6.2f} s "
                      f"({small / base_small:5.2f}x local), {args.gib:g} GiB file "
                      f"{big_s:6.2f} s ({big_s / base_big:5.2f}x local)")
        finally:
            for m in mounts:
                m.stop()
            server.stop()
            shutil.rmtree(root / "home", ignore_errors=True)


def _timed_read(path: Path) -> float:
    return read_all(path)


if __name__ == "__main__":
    main()
