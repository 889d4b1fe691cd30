"""Opening a kept cache: what a new mount (or ``ah://`` file system) pays before it answers,
for a cache holding ``--objects`` small objects (a dataset's first epoch, batched into
packs), against walking the same pack index key by key (``iterkeys`` and a ``get`` each,
diskcache's own way: how it was read before ``vfs/disk_index.py``), in the same run.

Each opening is a fresh process (the page cache keeps the index's pages between them, as it
would for a remount). Prints seconds and the ratio, and the opening process's peak RSS
(``VmHWM``: a forked child's ``ru_maxrss`` keeps its parent's, and the harness touches all
memory first).

Usage: python bench/cache_start_bench.py [--objects 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.vfs.object_cache import ObjectCache
from bench.harness import bench_dir

OPEN = """
import json, sys, time
import diskcache
from pathlib import Path
from ahmount.vfs.object_cache import ObjectCache
root, how = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
if how == "open":
    cache = ObjectCache(root, 64 << 30)
    count = cache.object_count()
    cache.close()
else:
    with diskcache.Cache(str(root / "packs" / "index")) as index:
        count = sum(1 for key in list(index.iterkeys()) if index.get(key) is not None)
seconds = time.perf_counter() - start
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"seconds": seconds, "count": count,
                  "rss_mib": int(peak[0].split()[1]) / 1024}))
"""


async def fill(root: Path, objects: int) -> None:
    cache = ObjectCache(root, 64 << 30)
    try:
        batch: list[tuple[str, bytes]] = []
        for i in range(objects):
            data = i.to_bytes(8, "big") * 512  # 4 KiB, each different
            batch.append((hashlib.sha256(data).hexdigest(), data))
            if len(batch) == 256:
                await cache.store(batch)
                batch = []
        await cache.store(batch)
    finally:
        cache.close()


def opened(root: Path, how: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", OPEN, str(root), how], check=True,
                         capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with bench_dir() as root:
        trio.run(fill, root / "cache", args.objects)
        opened(root / "cache", "open")  # the index's pages in memory for both
        ours = min((opened(root / "cache", "open") for _ in range(3)),
                   key=lambda r: r["seconds"])
        walk = min((opened(root / "cache", "walk") for _ in range(3)),
                   key=lambda r: r["seconds"])
        assert ours["count"] == walk["count"] == args.objects, (ours, walk)
        print(f"a kept cache of {args.objects:,} small objects (best of 3 fresh processes)")
        print(f"  ObjectCache() opening it    {ours['seconds']:6.2f} s   "
              f"peak RSS {ours['rss_mib']:.0f} MiB")
        print(f"  its pack index key by key   {walk['seconds']:6.2f} s   "
              f"({walk['seconds'] / ours['seconds']:.1f}x the opening)")


if __name__ == "__main__":
    main()
