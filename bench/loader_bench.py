"""Data loaders over small files: a shuffled read (open, read, close each) of a dataset by
1, 2, 4 and 8 worker processes, as a PyTorch ``DataLoader`` with ``num_workers`` does it,
cold (page cache dropped, every mount fresh with an empty cache) and warm (the same mount
again). Files per second, on the same data, in one run, against:

- local disk (the ceiling), sshfs over an sshd on 127.0.0.1, rclone mount
  ``--vfs-cache-mode full`` over ``rclone serve webdav`` (:mod:`bench.peers`);
- ahmount: a mount of ``ah-server`` on 127.0.0.1, the dataset on the branch ``main``; and
  the same mounted ``--read-only`` ("ahmount ro", as a training job would);
- the do-nothing pyfuse3 floor (``bench/minimal_fs.py``, the files written into it first,
  its reads answering zeros): what any trio + pyfuse3 daemon pays per file; and the same
  waiting for ``/dev/fuse`` as ah-mount does ("floor, poll": ``--ready-first``).

Data sets: ``--files`` x 4 KiB in 100 directories (default 10,000, the issue's), and
``--large`` x 1 MiB (default 200). Each figure is printed with its ratio to sshfs.

Usage: python bench/loader_bench.py [--files 10000] [--large 200] [--workers 1,2,4,8]
       [--peers sshfs,rclone]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.harness import bench_dir, hub_mount, served_hub, upload_tree
from bench.mount_bench import drop_caches
from bench.mount_write_bench import copy_into, start_minimal_fs


def _read_files(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def loader(paths: list[Path], workers: int) -> float:
    """Files per second of ``workers`` processes reading ``paths`` in one shuffled order,
    each worker taking every ``workers``-th file (a sampler's split)."""
    order = [str(p) for p in paths]
    random.Random(7).shuffle(order)
    shares = [order[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    procs = [context.Process(target=_read_files, args=(share,)) for share in shares]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a loader worker failed ({proc.exitcode})")
    return len(paths) / (time.perf_counter() - start)


def make_dataset(root: Path, files: int, large: int) -> dict[str, list[Path]]:
    sets: dict[str, list[Path]] = {"small": [], "large": []}
    for i in range(files):
        p = root / "small" / f"d{i * 100 // max(files, 1):03d}" / f"{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(4096))
        sets["small"].append(p.relative_to(root))
    for i in range(large):
        p = root / "large" / f"{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1 << 20))
        sets["large"].append(p.relative_to(root))
    return sets


Opener = Callable[[int], contextlib.AbstractContextManager[Path]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--peers", default="sshfs,rclone")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    wanted = peers.wanted(args.peers)
    with bench_dir() as root:
        local = root / "local"
        sets = make_dataset(local, args.files, args.large)
        with served_hub(root) as (server, key):
            upload_tree(server, key, local, "dataset/bench/train", root / "fs-cache")
            rounds = iter(range(1_000_000))

            @contextlib.contextmanager
            def local_disk(_: int) -> Iterator[Path]:
                yield local

            def ahmount(*extra: str) -> Opener:
                @contextlib.contextmanager
                def opened(n: int) -> Iterator[Path]:
                    m = hub_mount(server, key, root / f"ah-mnt-{n}", root / f"ah-cache-{n}",
                                  *extra)
                    try:
                        yield m.mountpoint / "dataset/bench/train/main"
                    finally:
                        m.stop()
                return opened

            def peer(name: str) -> Opener:
                mount = peers.MOUNTS[name]

                @contextlib.contextmanager
                def opened(n: int) -> Iterator[Path]:
                    with mount(local, root / f"{name}-{n}") as point:
                        yield point
                return opened

            def floor(*extra: str) -> Opener:
                @contextlib.contextmanager
                def opened(n: int) -> Iterator[Path]:
                    point = root / f"floor-{n}"
                    process = start_minimal_fs(point, *extra)
                    try:
                        for kind_paths in sets.values():
                            copy_into(point, local, kind_paths)
                        yield point
                    finally:
                        peers.unmount(point)
                        process.wait(timeout=30)
                return opened

            targets: dict[str, Opener] = {"local": local_disk, "pyfuse3 floor": floor(),
                                          "floor, poll": floor("--ready-first"),
                                          "ahmount": ahmount(),
                                          "ahmount ro": ahmount("--read-only")}
            targets |= {name: peer(name) for name in wanted}
            results: dict[tuple[str, str, str, int], float] = {}
            for name, opener in targets.items():
                for workers in counts:
                    with opener(next(rounds)) as base:
                        for kind, paths in sets.items():
                            if not paths:
                                continue
                            drop_caches()
                            results[(name, kind, "cold", workers)] = loader(
                                [base / p for p in paths], workers)
                            results[(name, kind, "warm", workers)] = loader(
                                [base / p for p in paths], workers)
            _report(results, targets, sets, counts, args)


def _report(results: dict[tuple[str, str, str, int], float], targets: dict[str, Opener],
            sets: dict[str, list[Path]], counts: list[int], args: argparse.Namespace) -> None:
    base = "sshfs" if "sshfs" in targets else "local"
    for kind, paths in sets.items():
        if not paths:
            continue
        size = "4 KiB" if kind == "small" else "1 MiB"
        print(f"\n{len(paths)} x {size}, shuffled, files/s (ratio to {base})")
        print(f"{'':<14}" + "".join(f"{f'{t} {w}w':>22}" for t in ("cold", "warm")
                                   for w in counts))
        for name in targets:
            cells = []
            for temp in ("cold", "warm"):
                for w in counts:
                    value = results[(name, kind, temp, w)]
                    ratio = value / results[(base, kind, temp, w)]
                    cells.append(f"{value:>12,.0f} ({ratio:5.2f}x)")
            print(f"{name:<14}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
