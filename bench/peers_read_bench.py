"""Reads and listings against the peers, in one run, on the same data: a 1 GiB file and
10,000 x 4 KiB files in 100 directories, served by

- local disk (page cache dropped for the cold figures),
- ahmount: a mount of ``ah-server`` on 127.0.0.1, the data on the branch ``main``; and the
  same with ``--fill-random off`` ("ah, no fill"): every random read a miss, as for an
  object too large to be filled behind its reader (over a quarter of the cache),
- sshfs over an sshd of our own, and rclone mount ``--vfs-cache-mode full`` over
  ``rclone serve webdav`` (:mod:`bench.peers`), both on 127.0.0.1,

plus a raw httpx download of the same object from the same ``ah-server`` (the HTTP stack
alone). Every cold figure is taken on a fresh mount with an empty cache and the page cache
dropped (the large file's cold reads, and the raw download: the median of three). Figures:
sequential read cold and warm (MiB/s), random 4 KiB reads cold and warm (IOPS; cold also
over a run ten times as long, where a mount that fetches the rest of the object behind a
random reader gets ahead of one that asks its server for every page), ``find``
and ``stat`` of the 10,000 files cold and warm (seconds); each with its ratio to the best
peer. Floors: the pyfuse3 passthrough of the local file for the cold read,
and the do-nothing pyfuse3 file system holding the same names for ``find`` and ``stat``.

Usage: python bench/peers_read_bench.py [--gib 1] [--files 10000] [--random 2000]
       [--peers sshfs,rclone]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.mount.daemon import raise_readahead
from bench import peers
from bench.harness import (
    bench_dir,
    hub_mount,
    peak_rss_mib,
    report_peak_rss,
    served_hub,
    upload_tree,
)
from bench.loader_bench import make_dataset
from bench.mount_bench import drop_caches, random_reads, raw_download, read_all, stat_all
from bench.mount_bench import timed_find as find_all
from bench.mount_write_bench import copy_into, start_minimal_fs

Opener = Callable[[str], contextlib.AbstractContextManager[Path]]
#: (figure, unit, higher is better)
FIGURES = [("seq read cold", "MiB/s", True), ("seq read warm", "MiB/s", True),
           ("random 4 KiB cold", "IOPS", True), ("random cold, 10x", "IOPS", True),
           ("random 4 KiB warm", "IOPS", True),
           ("find cold", "s", False), ("find warm", "s", False),
           ("stat cold", "s", False), ("stat warm", "s", False)]


#: Cold reads of the large file, each on a fresh mount: the figure is their median (single
#: cold runs on this VM swing by 30% and more).
COLD_RUNS = 3
#: The longer cold random run ("random cold, 10x"): ten times ``--random`` reads, once per
#: target. A mount that fetches the rest of an object behind a random reader (ahmount after
#: 16 misses, as Alluxio does) pays off over a run that outlasts that fetch; one that asks
#: its server for every page (sshfs) runs at the same rate however long the run is.
LONG_RANDOM = 10


def measure(files: list[Path], gib: float, count: int,
            fresh: Callable[[], contextlib.AbstractContextManager[Path]]) -> dict[str, float]:
    """Every figure, each cold one on a fresh mount made by ``fresh`` (the large file's:
    the median of :data:`COLD_RUNS`, the warm ones on the first of those mounts)."""
    out: dict[str, float] = {}
    size = int(gib * (1 << 30))
    mib = size / (1 << 20)
    sequential, scattered = [], []
    for run in range(COLD_RUNS):
        with fresh() as point:
            drop_caches()
            sequential.append(mib / read_all(point / "big.bin"))
            if run == 0:
                out["seq read warm"] = mib / min(read_all(point / "big.bin") for _ in range(2))
        with fresh() as point:
            drop_caches()
            scattered.append(random_reads(point / "big.bin", count, size))
            if run == 0:
                random_reads(point / "big.bin", count, size)
                out["random 4 KiB warm"] = random_reads(point / "big.bin", count, size)
    out["seq read cold"] = statistics.median(sequential)
    out["random 4 KiB cold"] = statistics.median(scattered)
    with fresh() as point:
        drop_caches()
        out["random cold, 10x"] = random_reads(point / "big.bin", count * LONG_RANDOM, size)
    with fresh() as point:
        out |= finds(point)
    with fresh() as point:
        out |= stats(point, files)
    return out


def finds(point: Path) -> dict[str, float]:
    """``find`` of the small files, cold (page cache and dentries dropped), then warm."""
    drop_caches()
    return {"find cold": find_all(point / "small"),
            "find warm": min(find_all(point / "small") for _ in range(2))}


def stats(point: Path, files: list[Path]) -> dict[str, float]:
    """``stat`` of each small file, cold, then warm."""
    drop_caches()
    paths = [point / p for p in files]
    return {"stat cold": stat_all(paths), "stat warm": min(stat_all(paths) for _ in range(2))}


def listing_floor(local: Path, files: list[Path], point: Path) -> dict[str, float]:
    """:func:`finds` and :func:`stats` on the do-nothing pyfuse3 floor, the files made in it
    first: what any trio + pyfuse3 daemon pays to list and stat them."""
    process = start_minimal_fs(point)
    try:
        copy_into(point, local, files)
        return finds(point) | stats(point, files)
    finally:
        peers.unmount(point)
        process.wait(30)


NO_FILL = "ah, no fill"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--random", type=int, default=2000)
    parser.add_argument("--peers", default="sshfs,rclone")
    args = parser.parse_args()
    wanted = peers.wanted(args.peers)
    with bench_dir() as root:
        local = root / "local"
        files = make_dataset(local, args.files, 0)["small"]
        with (local / "big.bin").open("wb") as handle:
            for _ in range(int(args.gib * 1024)):
                handle.write(os.urandom(1 << 20))
        rounds = iter(range(1_000_000))
        with served_hub(root) as (server, key):
            upload_tree(server, key, local, "dataset/bench/data", root / "fs-cache")

            @contextlib.contextmanager
            def local_disk() -> Iterator[Path]:
                yield local

            peaks: dict[str, float] = {}

            def ahmount(name: str, *extra: str
                        ) -> Callable[[], contextlib.AbstractContextManager[Path]]:
                @contextlib.contextmanager
                def opened() -> Iterator[Path]:
                    n = next(rounds)
                    m = hub_mount(server, key, root / f"ah-{n}", root / f"ah-cache-{n}",
                                  "--cache-size", "4G", *extra)
                    try:
                        yield m.mountpoint / "dataset/bench/data/main"
                    finally:
                        assert m.pid is not None
                        peaks[name] = max(peaks.get(name, 0.0), peak_rss_mib(m.pid))
                        m.stop()
                        shutil.rmtree(root / f"ah-cache-{n}", ignore_errors=True)
                return opened

            def peer(name: str) -> Callable[[], contextlib.AbstractContextManager[Path]]:
                mount = peers.MOUNTS[name]

                @contextlib.contextmanager
                def opened() -> Iterator[Path]:
                    work = root / f"{name}-{next(rounds)}"
                    with mount(local, work) as point:
                        yield point
                    shutil.rmtree(work, ignore_errors=True)
                return opened

            # "no fill": every random read a miss, as for an object too large to be filled
            # behind its reader (over a quarter of the cache), or with --fill-random off.
            targets = {"local": local_disk, "ahmount": ahmount("ahmount"),
                       NO_FILL: ahmount(NO_FILL, "--fill-random", "off")}
            targets |= {name: peer(name) for name in wanted}
            results = {name: measure(files, args.gib, args.random, opener)
                       for name, opener in targets.items()}
            url = f"{server.url}/api/v1/assets/bench/dataset/bench/data/refs/main/files/big.bin"
            raws = []
            for _ in range(COLD_RUNS):
                drop_caches()
                raws.append(args.gib * 1024 / raw_download(url, key))
            raw = statistics.median(raws)
            floor = args.gib * 1024 / passthrough_read(local / "big.bin", root / "floor")
            _report(results, wanted, raw, floor,
                    listing_floor(local, files, root / "listing-floor"))
            report_peak_rss(peaks)


def passthrough_read(path: Path, point: Path) -> float:
    """Seconds to read ``path`` cold through the pyfuse3 passthrough floor (minimal_fs
    answering each read with a pread of the local file; kernel read-ahead as ah-mount's)."""
    process = start_minimal_fs(point, "--read-from", str(path))
    try:
        raise_readahead(point)
        drop_caches()
        return read_all(point / "data")
    finally:
        peers.unmount(point)
        process.wait(30)


def _report(results: dict[str, dict[str, float]], wanted: list[str], raw: float,
            floor: float, listed: dict[str, float]) -> None:
    names = list(results)
    print(f"{'figure':<20}{'unit':<7}" + "".join(f"{n:>12}" for n in names)
          + "   ahmount vs best peer")
    for figure, unit, higher in FIGURES:
        values = [results[n][figure] for n in names]
        peer_values = [results[p][figure] for p in wanted]
        ours = results["ahmount"][figure]
        if peer_values:
            best = max(peer_values) if higher else min(peer_values)
            ratio = ours / best if higher else best / ours
            note = f"   {ratio:5.2f}x (>1: ahmount ahead)"
        else:
            note = ""
        cells = "".join(f"{v:>12,.0f}" if unit != "s" else f"{v:>12.3f}" for v in values)
        print(f"{figure:<20}{unit:<7}{cells}{note}")
    cold = results["ahmount"]["seq read cold"]
    print(f"raw httpx download of the object from ah-server, cold: {raw:,.0f} MiB/s; the "
          f"mount's cold read is {cold / raw:.2f}x that")
    print(f"pyfuse3 passthrough of the local file, cold: {floor:,.0f} MiB/s; the mount's cold "
          f"read is {cold / floor:.2f}x that (its reads are such a pread, after the transfer)")
    ours = results["ahmount"]
    print("do-nothing pyfuse3 floor, s (the mount's time is that many times it): " + ", ".join(
        f"{figure} {listed[figure]:.3f} ({ours[figure] / listed[figure]:.2f}x)"
        for figure in ("find cold", "find warm", "stat cold", "stat warm")))


if __name__ == "__main__":
    main()
