"""sha256 of local files: many small files per worker-thread hand-off, several hand-offs in
parallel, and the results remembered (:class:`HashCache`) so an unchanged file is never read
twice.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from ahmount.client.files import hash_file
from ahmount.config import dirs
from ahmount.content_types import content_type_of
from ahmount.hub.models import ObjectEntry
from ahmount.nurseries import open_nursery
from ahmount.transfer.plan import LocalFile

PARALLEL_HASHES = 4
T = TypeVar("T")


async def run_stoppable(work: Callable[[Callable[[], bool]], T],
                        limiter: trio.CapacityLimiter | None = None) -> T:
    """``work(stop)`` in a worker thread, which the caller's cancellation (Ctrl-C, an
    unmount) does not wait for: the thread is left to end at its next ``stop()`` check,
    its result unused."""
    stopped = threading.Event()
    try:
        return await trio.to_thread.run_sync(work, stopped.is_set, limiter=limiter,
                                             abandon_on_cancel=True)
    except BaseException:
        stopped.set()
        raise


class HashCache:
    """sha256 of local files, remembered by (path, size, mtime, inode) in a diskcache, so that
    re-committing an unchanged 5 GiB file neither uploads nor re-reads it."""

    def __init__(self) -> None:
        from ahmount.disposable_cache import open_index

        self._cache = open_index(dirs().cache / "file-hashes", "the file hash cache",
                                 size_limit=64 << 20)

    @staticmethod
    def _key(path: Path) -> tuple[str, os.stat_result]:
        st = path.stat()
        return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}", st

    def lookup(self, paths: Sequence[Path]) -> list[tuple[str, os.stat_result, str | None]]:
        """``(key, stat, cached sha256 or None)`` for each path, in one transaction."""
        out: list[tuple[str, os.stat_result, str | None]] = []
        with self._cache.transact():
            for path in paths:
                key, st = self._key(path)
                cached = self._cache.get(key)
                out.append((key, st, cached if isinstance(cached, str) else None))
        return out

    def store(self, items: Sequence[tuple[str, str]]) -> None:
        """Remember ``(key, sha256)`` pairs, in one transaction."""
        with self._cache.transact():
            for key, sha in items:
                self._cache.set(key, sha)

    def close(self) -> None:
        self._cache.close()


async def hash_files(files: list[LocalFile]) -> list[ObjectEntry]:
    """Entries (sha256, size, mtime, content type) of local files: hashes remembered from
    earlier runs are looked up in one go; the rest are hashed in parallel worker threads, many
    small files per hand-off."""
    hashes = HashCache()
    try:
        found = await trio.to_thread.run_sync(hashes.lookup, [f.local for f in files])
        shas: list[str | None] = [cached for _, _, cached in found]
        todo = [i for i, sha in enumerate(shas) if sha is None]
        groups: list[list[int]] = []
        size = 0
        for i in todo:  # about 64 MiB or 256 files per hand-off
            if not groups or len(groups[-1]) >= 256 or size > (64 << 20):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += found[i][1].st_size
        limiter = trio.CapacityLimiter(PARALLEL_HASHES)

        async def hash_group(group: list[int]) -> None:
            def work(stop: Callable[[], bool]) -> list[str]:
                return [hash_file(files[i].local, stop)[0] for i in group]

            for i, sha in zip(group, await run_stoppable(work, limiter), strict=True):
                shas[i] = sha

        async with open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(hash_group, group)
        # Remember only hashes of files that did not change while they were read.
        fresh = [(found[i][0], str(shas[i])) for i in todo
                 if files[i].local.stat().st_mtime_ns == found[i][1].st_mtime_ns]
        await trio.to_thread.run_sync(hashes.store, fresh)
    finally:
        hashes.close()
    return [
        ObjectEntry(f.target, str(sha), st.st_size, st.st_mtime,
                    content_type_of(f.target),
                    stat.S_IMODE(st.st_mode) & 0o777)
        for f, (_, st, _), sha in zip(files, found, shas, strict=True)
    ]
