"""What the small-file batch policy (``vfs/sibling_fetch.py``) costs the daemon's event loop
over a whole first epoch of a large dataset, in process and without a hub: every cold open
of a loader in shuffled order, for layouts a loader meets (a directory per sample, class
directories of 1,000, one flat directory). The cache is a stand-in that only remembers what
was claimed; the fetches themselves are not run.

The baseline, in the same run, is one walk of the listing (every entry of every directory
looked at once): a policy that costs a small multiple of it grows with the dataset, not
with its square. The batches per 10,000 files are printed too (a batch is a hub request).

Usage: python bench/batch_policy_bench.py [--files 200000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.hub.models import ObjectEntry
from ahmount.vfs.handles import HubSource
from ahmount.vfs.sibling_fetch import SiblingFetcher


@dataclass
class ClaimingCache:
    """What the policy asks of the object cache: claims are remembered, nothing arrives."""

    claimed: set[str]

    def is_complete(self, sha: str, size: int) -> bool:
        return False

    def in_flight(self, sha: str) -> bool:
        return sha in self.claimed

    def claim(self, objects: list[tuple[str, int]]) -> list[str]:
        new = [sha for sha, _ in objects if sha not in self.claimed]
        self.claimed.update(new)
        return new

    def note_cold_open(self, sha: str) -> None:
        pass


def listing(files: int, per_dir: int) -> dict[str, dict[str, ObjectEntry | None]]:
    dirs: dict[str, dict[str, ObjectEntry | None]] = {}
    for i in range(files):
        directory = f"d{i // per_dir:07d}"
        path = f"{directory}/{i:08d}.jpg"
        dirs.setdefault(directory, {})[path] = ObjectEntry(path, f"{i:064x}", 4096, 0.0)
    return dirs


def epoch(dirs: dict[str, dict[str, ObjectEntry | None]]) -> tuple[float, int]:
    """Seconds of every cold open of a shuffled epoch, and the batches it started."""
    cache = ClaimingCache(set())
    batches = 0

    def spawn(name: str, work: Any) -> None:
        nonlocal batches
        batches += 1

    fetcher = SiblingFetcher(cache, spawn)  # type: ignore[arg-type]
    index = SimpleNamespace(dirs=dirs)
    entries = [e for entries in dirs.values() for e in entries.values() if e is not None]
    random.Random(1).shuffle(entries)
    start = time.perf_counter()
    for entry in entries:
        if entry.sha256 in cache.claimed:
            continue  # its batch is on its way: the open waits for it, starting nothing
        node = SimpleNamespace(index=index, queued=None, entry=entry)
        source = HubSource(None, None, "commit", entry.path, entry.sha256,  # type: ignore
                           entry.size)
        fetcher.opened(node, source)  # type: ignore[arg-type]
    return time.perf_counter() - start, batches


def walk(dirs: dict[str, dict[str, ObjectEntry | None]]) -> float:
    start = time.perf_counter()
    seen = 0
    for entries in dirs.values():
        for entry in entries.values():
            seen += entry is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    args = parser.parse_args()
    print(f"a shuffled first epoch of {args.files:,} small files: the batch policy's time in "
          "the event loop")
    for name, per_dir in (("a directory per sample", 1), ("directories of 1,000", 1000),
                          ("one directory", args.files)):
        dirs = listing(args.files, per_dir)
        seconds, batches = epoch(dirs)
        once = walk(dirs)
        print(f"  {name:<24} {seconds:7.2f} s = {seconds / once:6.0f}x one walk of the "
              f"listing ({once * 1e3:.0f} ms); {batches / args.files * 10_000:.0f} batches "
              "per 10,000 files")


if __name__ == "__main__":
    main()
