"""A dataset of many files: what a mount's memory and listings cost per object.

One commit of ``--files`` objects (default 200,000) in directories of ``--per-dir``
(1,000), served by ``ah-server`` on 127.0.0.1, mounted with an empty cache; then, each
cold (page cache dropped): ``find`` over the commit, ``stat`` of every file, and a
shuffled read of ``--read`` of them by one reader. The same tree of empty files on local
disk, and over sshfs on 127.0.0.1 (:mod:`bench.peers`) when ``--peers sshfs``, is timed
the same way. Printed: each time and its ratio to local disk and to sshfs, the daemon's
memory (RSS, and its anonymous part) after each step, per object listed, how long the
first ``ls`` of the commit's root takes on a new mount (it waits for the whole listing),
and ``ah-server``'s peak memory during the upload and the commit.

The objects share a blob per 50 (only those read have their own bytes): the commit, the
listing and the inodes are what is measured, not an upload of 200,000 blobs.

Usage: python bench/listing_scale_bench.py [--files 200000] [--per-dir 1000]
       [--read 2000] [--peers sshfs]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.transfer.plan import LocalFile
from ahmount.transfer.upload import upload_files
from bench.harness import bench_dir, hub_mount, served_hub
from bench.mount_bench import drop_caches, peak_rss_while, stat_all, timed_find
from bench.peers import sshfs_mount, wanted

SHARED_BLOB_EVERY = 50


def memory(pid: int) -> tuple[float, float]:
    """The process's resident and anonymous memory, MiB."""
    fields = {line.split(":")[0]: int(line.split()[1])
              for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    return fields["Rss"] / 1024, fields["Anonymous"] / 1024


def object_path(i: int, per_dir: int) -> str:
    return f"n{i // per_dir:05d}/{i:07d}.bin"


async def fill(url: str, key: str, blobs: Path, files: int, per_dir: int, read: int) -> None:
    """The commit: objects below ``read`` (and every 50th) with bytes of their own."""
    own = [i for i in range(files) if i < read or i % SHARED_BLOB_EVERY == 0]
    blobs.mkdir()
    for i in own:
        (blobs / str(i)).write_bytes(i.to_bytes(8, "little") * 2)
    async with HubClient(url, api_key=key) as hub:
        folder = FolderAddr("bench", "dataset", "scale")
        await hub.create_folder(folder)
        addr = AssetAddr(folder, "set")
        await hub.create_asset(addr)
        await upload_files(hub, [LocalFile(blobs / str(i), str(i)) for i in own])
        entries = []
        for i in range(files):
            if i < read or i % SHARED_BLOB_EVERY == 0:
                sha, size = hash_file(blobs / str(i))
            entries.append(ObjectEntry(object_path(i, per_dir), sha, size, 1.7e9))
        await hub.commit(addr, "main", "a large dataset", adds=entries)


def local_tree(root: Path, files: int, per_dir: int) -> None:
    for i in range(files):
        if i % per_dir == 0:
            (root / object_path(i, per_dir)).parent.mkdir(parents=True)
        (root / object_path(i, per_dir)).touch()


def read_files(paths: list[Path]) -> float:
    """Seconds to open, read and close each file in turn (one reader)."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            handle.read()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--read", type=int, default=2000)
    parser.add_argument("--peers", default="")
    args = parser.parse_args()
    paths = [object_path(i, args.per_dir) for i in range(args.files)]
    readable = paths[:args.read]
    random.Random(1).shuffle(readable)
    with bench_dir() as root:
        started = time.perf_counter()
        local = root / "local"
        local_tree(local, args.files, args.per_dir)
        with served_hub(root) as (server, key):
            assert server.proc is not None
            filling = threading.Thread(target=trio.run, args=(
                fill, server.url, key, root / "blobs", args.files, args.per_dir, args.read))
            hub_peak = peak_rss_while(server.proc.pid, filling)
            print(f"{args.files:,} objects in directories of {args.per_dir:,}; set up in "
                  f"{time.perf_counter() - started:.0f} s; ah-server's peak RSS during the "
                  f"upload and commit {hub_peak / (1 << 20):,.0f} MiB, "
                  f"{memory(server.proc.pid)[0]:,.0f} MiB after", flush=True)
            # The first answer on a new mount waits for the commit's whole listing.
            first = hub_mount(server, key, root / "first", root / "first-cache")
            try:
                drop_caches()
                started = time.perf_counter()
                os.listdir(first.mountpoint / "dataset/scale/set/main")
                print(f"first ls of the commit's root on a new mount: "
                      f"{time.perf_counter() - started:.2f} s", flush=True)
            finally:
                first.stop()
            results: dict[str, dict[str, float]] = {}
            for name, top in (("local", local),):
                drop_caches()
                results[name] = {"find": timed_find(top),
                                 "stat": stat_all([top / p for p in paths])}
            if "sshfs" in wanted(args.peers):
                with sshfs_mount(local, root / "sshfs") as point:
                    drop_caches()
                    results["sshfs"] = {"find": timed_find(point),
                                        "stat": stat_all([point / p for p in paths])}
            mount = hub_mount(server, key, root / "mnt", root / "cache")
            try:
                top = mount.mountpoint / "dataset/scale/set/main"
                assert mount.pid is not None
                before = memory(mount.pid)
                drop_caches()
                ours = {"find": timed_find(top)}
                after_find = memory(mount.pid)
                ours["stat"] = stat_all([top / p for p in paths])
                after_stat = memory(mount.pid)
                ours["read"] = read_files([top / p for p in readable])
                after_read = memory(mount.pid)
                results["ahmount"] = ours
            finally:
                mount.stop()
    print(f"{'':<12}" + "".join(f"{name:>12}" for name in results) + "   ahmount vs")
    for figure in ("find", "stat"):
        cells = "".join(f"{results[n][figure]:>11.2f}s" for n in results)
        versus = ", ".join(f"{results['ahmount'][figure] / results[n][figure]:.2f}x {n}"
                           for n in results if n != "ahmount")
        print(f"{figure + ' cold':<12}{cells}   {versus} (time: lower is better)")
    print(f"read of {args.read:,} files, shuffled, 1 reader: {ours['read']:.2f} s, "
          f"{args.read / ours['read']:,.0f} files/s")
    print(f"daemon memory, MiB (RSS / anonymous): mounted {before[0]:.0f} / {before[1]:.0f}, "
          f"after find {after_find[0]:.0f} / {after_find[1]:.0f}, after stat "
          f"{after_stat[0]:.0f} / {after_stat[1]:.0f}, after reads "
          f"{after_read[0]:.0f} / {after_read[1]:.0f}")
    grown = (after_stat[0] - before[0]) * (1 << 20) / args.files
    print(f"  {grown:.0f} bytes of RSS per object listed and stat'ed; "
          f"{before[0] + grown * 1_281_167 / (1 << 20):,.0f} MiB projected for ImageNet's "
          "1,281,167 training files")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
