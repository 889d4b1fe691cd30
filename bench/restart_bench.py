"""A remount of a 100,000-object tag: what it asks the hub for, and how long a full listing
takes, first mount vs remount (listings persist in the cache; the change feed replays what
changed since). Figures: requests by endpoint (from ah-server's /metrics) and `find` times.

Usage: python bench/restart_bench.py [--objects 100000]
Needs /dev/fuse.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from bench.harness import bench_dir, served_hub
from tests.conftest import MountProcess, wait_until
from tests.test_ahfs import requests_seen


def timed_find(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(["find", str(root), "-type", "f"], check=True, capture_output=True)
    return time.perf_counter() - start, len(out.stdout.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with bench_dir() as root, served_hub(root) as (server, key):
        async def fill() -> None:
            async with HubClient(server.url, api_key=key) as hub:
                folder = FolderAddr("bench", "dataset", "big")
                await hub.create_folder(folder)
                addr = AssetAddr(folder, "d")
                await hub.create_asset(addr)
                blob = root / "blob"
                blob.write_bytes(b"x")
                sha = hashlib.sha256(b"x").hexdigest()
                await hub.upload_file(blob, sha, 1)
                entries = [ObjectEntry(f"d{i // 1000:03d}/{i:06d}.txt", sha, 1, 1.0)
                           for i in range(args.objects)]
                for start in range(0, len(entries), 50_000):
                    await hub.commit(addr, "main", "fill",
                                     adds=entries[start:start + 50_000])
                await hub.create_tag(addr, "v1", "main")

        trio.run(fill)
        mount_args = ("--hub", server.url, "--api-key", key, "--cache-dir",
                      str(root / "cache"))
        figures = []
        point = root / "mnt"
        for label in ("first mount", "remount"):
            before = requests_seen(server)
            m = MountProcess(point, *mount_args).start()
            wait_until(lambda m=m: m.control("status")["changes"] == "live",
                       what="the feed")
            seconds, count = timed_find(point / "dataset/big/d/v1")
            asked = requests_seen(server) - before
            m.stop()
            figures.append((label, seconds, count, asked))
        for label, seconds, count, asked in figures:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(asked.items()) if v)
            print(f"{label:<12} find of {count} objects {seconds:6.2f} s; requests: {shown}")


if __name__ == "__main__":
    main()
