"""What the small-file batch policy (``vfs/sibling_fetch.py``) costs the daemon's event loop
over a whole first epoch of a large dataset, in process and without a hub: every cold open
of a loader in shuffled order, for layouts a loader meets (a directory per sample, class
directories of 1,000, one flat directory). The cache is a stand-in that only remembers what
was claimed (``tests/test_batch_policy.py``, whose model test runs the same epochs); the
fetches themselves are not run.

The baseline, in the same run, is one walk of the listing (every entry of every directory
looked at once): a policy that costs a small multiple of it grows with the dataset, not
with its square. The batches per 10,000 files are printed too (a batch is a hub request).

Usage: python bench/batch_policy_bench.py [--files 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_batch_policy import Listing, epoch, listing


def walk(dirs: Listing) -> float:
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
        start = time.perf_counter()
        _, batches = epoch(dirs)
        seconds = time.perf_counter() - start
        once = walk(dirs)
        print(f"  {name:<24} {seconds:7.2f} s = {seconds / once:6.0f}x one walk of the "
              f"listing ({once * 1e3:.0f} ms); {batches / args.files * 10_000:.0f} batches "
              "per 10,000 files")


if __name__ == "__main__":
    main()
