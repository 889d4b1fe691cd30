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
  waiting for ``/dev/fuse`` as ah-mount does ("floor, poll": ``--ready-first``);
- "ahmount, kept cache": a new mount on the cache a previous one filled, with the page
  cache dropped ("cold"): a second epoch in a new job, or after a restart. Every byte is on
  local disk and none in memory;
- for the 1 MiB files, the hub alone ("hub, GET each"): the same workers asking
  ``ah-server`` for each file with one GET (``http.client``, the body read into a buffer and
  its sha256 checked), no FUSE and no cache. That is the ceiling of any reader that fetches
  these files one request each, as the mount does (small files travel in batches instead);
  and "plane, GET each": the same through each file's read URL, which an ``ah-server`` with
  a local blob directory serves on its data plane with ``sendfile``, as the mount reads.

Data sets: ``--files`` x 4 KiB in ``--dirs`` directories (default 10,000 in 100, the
issue's; ``--dirs 10`` is a class directory of 1,000 images each), and
``--large`` x 1 MiB (default 200). Each figure is printed with its ratio to sshfs, and then
what it cost: the CPU time of the whole machine per file (busy time of every process and the
kernel during the run, divided by the files read), and for ahmount the part of it spent in
the daemon and in ``ah-server``. On 2 cores, files/s can be at most 2,000 / (ms per file).

Usage: python bench/loader_bench.py [--files 10000] [--dirs 100] [--large 200]
       [--workers 1,2,4,8] [--peers sshfs,rclone]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import multiprocessing
import os
import random
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.harness import (
    bench_dir,
    hub_mount,
    machine_busy,
    peak_rss_mib,
    process_cpu,
    report_peak_rss,
    served_hub,
    upload_tree,
)
from bench.mount_bench import drop_caches
from bench.mount_write_bench import copy_into, start_minimal_fs


def _read_files(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


HUB_ALONE = "hub, GET each"
PLANE_ALONE = "plane, GET each"
KEPT = "ahmount, kept cache"


def _fetch(origin: str, key: str, targets: list[str]) -> None:
    """One GET per target (a path and query) from ``origin`` on one connection, each body
    read into a buffer and hashed: the least a reader that fetches each file whole must do.
    ``key``: the API key, or "" for read URLs (their signature is the key)."""
    url = urllib.parse.urlsplit(origin)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    buffer = memoryview(bytearray(1 << 20))
    try:
        for target in targets:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"GET {target}: {response.status} "
                                   f"{response.read()[:200]!r}")
            digest = hashlib.sha256()
            while n := response.readinto(buffer):
                digest.update(buffer[:n])
            want = response.getheader("x-ah-sha256") or \
                (response.getheader("etag") or "").strip('"')
            if digest.hexdigest() != want:
                raise RuntimeError(f"GET {target}: the body does not hash to its sha256")
    finally:
        conn.close()


def hub_loader(files_url: str, key: str, paths: list[Path], workers: int) -> float:
    """:func:`loader`'s order and split, each file fetched through its path on the hub's
    API by :func:`_fetch` instead of read through a mount."""
    prefix = urllib.parse.urlsplit(files_url).path
    return _split_run(_fetch, [f"{prefix}/{urllib.parse.quote(str(p))}" for p in paths],
                      workers, files_url, key)


def plane_urls(objects_url: str, key: str, paths: list[Path]) -> list[str]:
    """The read URL of each of ``paths`` (objects of the ref listed at ``objects_url``), in
    order, as a listing that asks for them gives them: on the data plane when the hub has
    one."""
    found: dict[str, str] = {}
    after = ""
    while True:
        page = httpx.get(objects_url, params={"read_urls_over": 0, "limit": 10_000,
                                              "after": after},
                         headers={"authorization": f"Bearer {key}"}, timeout=60).json()
        found |= {o["path"]: o["read_url"] for o in page["objects"] if "read_url" in o}
        after = page["next_after"]
        if not after:
            return [urllib.parse.urljoin(objects_url, found[str(p)]) for p in paths]


def plane_loader(urls: list[str], workers: int) -> float:
    """:func:`loader`'s order and split, each file fetched through its read URL by
    :func:`_fetch`: the hub's data plane with no FUSE and no cache."""
    targets = [urllib.parse.urlsplit(u)._replace(scheme="", netloc="").geturl() for u in urls]
    return _split_run(_fetch, targets, workers, urls[0], "")


def loader(paths: list[Path], workers: int) -> float:
    """Files per second of ``workers`` processes reading ``paths`` in one shuffled order,
    each worker taking every ``workers``-th file (a sampler's split)."""
    return _split_run(_read_files, [str(p) for p in paths], workers)


def _split_run(work: Callable[..., None], order: list[str], workers: int,
               *args: str) -> float:
    """Files per second of ``workers`` processes each running ``work(*args, share)`` on
    every ``workers``-th item of ``order`` shuffled."""
    order = list(order)
    random.Random(7).shuffle(order)
    shares = [order[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    procs = [context.Process(target=work, args=(*args, share)) for share in shares]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a loader worker failed ({proc.exitcode})")
    return len(order) / (time.perf_counter() - start)


def make_dataset(root: Path, files: int, large: int, dirs: int = 100
                 ) -> dict[str, list[Path]]:
    sets: dict[str, list[Path]] = {"small": [], "large": []}
    for i in range(files):
        p = root / "small" / f"d{i * dirs // max(files, 1):03d}" / f"{i:05d}.bin"
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
#: (target, data set, cold or warm, workers)
Key = tuple[str, str, str, int]


class Costs:
    """What each run cost, in CPU milliseconds per file: the machine's, and named processes'
    (the mount daemon, ``ah-server``) while they are known."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.per_file: dict[Key, dict[str, float]] = {}

    def measure(self, key: Key, files: int, run: Callable[[], float]) -> float:
        """``run()`` (files per second), its costs recorded under ``key``."""
        pids = dict(self.pids)
        before = {name: process_cpu(pid) for name, pid in pids.items()}
        busy = machine_busy()
        rate = run()
        spent = {"machine": machine_busy() - busy}
        spent |= {name: process_cpu(pid) - before[name] for name, pid in pids.items()}
        self.per_file[key] = {name: seconds * 1000 / files for name, seconds in spent.items()}
        return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--dirs", type=int, default=100,
                        help="directories the small files are spread over")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--peers", default="sshfs,rclone")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    wanted = peers.wanted(args.peers)
    with bench_dir() as root:
        local = root / "local"
        sets = make_dataset(local, args.files, args.large, args.dirs)
        with served_hub(root) as (server, key):
            upload_tree(server, key, local, "dataset/bench/train", root / "fs-cache")
            rounds = iter(range(1_000_000))
            costs = Costs()
            assert server.proc is not None
            server_pid = server.proc.pid

            @contextlib.contextmanager
            def local_disk(_: int) -> Iterator[Path]:
                yield local

            caches: list[Path] = []

            peaks: dict[str, float] = {}

            def ahmount(name: str, *extra: str, kept: bool = False) -> Opener:
                @contextlib.contextmanager
                def opened(n: int) -> Iterator[Path]:
                    if not kept:
                        caches.append(root / f"ah-cache-{n}")
                    m = hub_mount(server, key, root / f"ah-mnt-{n}", caches[-1], *extra)
                    assert m.pid is not None
                    costs.pids = {"daemon": m.pid, "server": server_pid}
                    try:
                        yield m.mountpoint / "dataset/bench/train/main"
                    finally:
                        costs.pids = {}
                        peaks[name] = max(peaks.get(name, 0.0), peak_rss_mib(m.pid))
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
                                          "ahmount": ahmount("ahmount"),
                                          "ahmount ro": ahmount("ahmount ro", "--read-only"),
                                          KEPT: ahmount(KEPT, kept=True)}
            targets |= {name: peer(name) for name in wanted}
            results: dict[Key, float] = {}
            for name, opener in targets.items():
                for workers in counts:
                    with opener(next(rounds)) as base:
                        for kind, paths in sets.items():
                            if not paths:
                                continue
                            drop_caches()
                            for temp in ("cold", "warm"):
                                results[(name, kind, temp, workers)] = costs.measure(
                                    (name, kind, temp, workers), len(paths),
                                    functools.partial(loader, [base / p for p in paths],
                                                      workers))
            files_url = f"{server.url}/api/v1/assets/bench/dataset/bench/train/refs/main/files"
            costs.pids = {"server": server_pid}
            for workers in counts:
                if sets["large"]:
                    drop_caches()
                    for temp in ("cold", "warm"):
                        results[(HUB_ALONE, "large", temp, workers)] = costs.measure(
                            (HUB_ALONE, "large", temp, workers), len(sets["large"]),
                            functools.partial(hub_loader, files_url, key, sets["large"],
                                              workers))
            if sets["large"]:
                urls = plane_urls(files_url.removesuffix("/files") + "/objects", key,
                                  sets["large"])
                for workers in counts:
                    drop_caches()
                    for temp in ("cold", "warm"):
                        results[(PLANE_ALONE, "large", temp, workers)] = costs.measure(
                            (PLANE_ALONE, "large", temp, workers), len(sets["large"]),
                            functools.partial(plane_loader, urls, workers))
            _report(results, [*targets, HUB_ALONE, PLANE_ALONE], sets, counts)
            _report_costs(costs, [*targets, HUB_ALONE, PLANE_ALONE], sets, counts)
            print()
            report_peak_rss(peaks)


def _report(results: dict[Key, float], targets: list[str], sets: dict[str, list[Path]],
            counts: list[int]) -> None:
    base = "sshfs" if "sshfs" in targets else "local"

    def cell(key: Key) -> str:
        value = results[key]
        return f"{value:>12,.0f} ({value / results[(base, *key[1:])]:5.2f}x)"

    _tables(f"shuffled, files/s (ratio to {base})", results, cell, targets, sets, counts)


def _report_costs(costs: Costs, targets: list[str], sets: dict[str, list[Path]],
                  counts: list[int]) -> None:
    def cell(key: Key) -> str:
        spent = costs.per_file[key]
        parts = "+".join(f"{spent[p]:.2f}" for p in ("daemon", "server") if p in spent)
        return f"{spent['machine']:.2f}" + (f" ({parts})" if parts else "")

    _tables("CPU ms per file, the whole machine (for ahmount: daemon + ah-server of it)",
            costs.per_file, cell, targets, sets, counts)


def _tables(title: str, measured: Mapping[Key, object], cell: Callable[[Key], str],
            targets: list[str], sets: dict[str, list[Path]], counts: list[int]) -> None:
    """A table per data set: a row per target that was ``measured`` on it (the hub alone is
    measured for the 1 MiB files only), a column per cold/warm and worker count."""
    for kind, paths in sets.items():
        if not paths:
            continue
        size = "4 KiB" if kind == "small" else "1 MiB"
        print(f"\n{len(paths)} x {size}, {title}")
        print(f"{'':<16}" + "".join(f"{f'{t} {w}w':>22}" for t in ("cold", "warm")
                                   for w in counts))
        for name in targets:
            if (name, kind, "cold", counts[0]) not in measured:
                continue
            print(f"{name:<16}" + "".join(f"{cell((name, kind, temp, w)):>22}"
                                         for temp in ("cold", "warm") for w in counts))

if __name__ == "__main__":
    main()
