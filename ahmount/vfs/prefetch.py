"""Warm-up: fetch files, directories or whole refs into the block cache before a job reads
them (``ah prefetch``), so that a first epoch reads at warm speed.

A job walks the tree under each path (a branch shows its queued edits, which are local
already and skipped), refuses at once if what it found cannot all be in the cache together
(it says both numbers), and then fetches in the background under the session's supervisor:
small objects many to a request (the hub's batch read, each checked against its sha256),
large ones by block runs, ``jobs`` requests at a time. Its progress is a :class:`Job`,
kept until the session ends. Objects already complete in the cache cost nothing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio

from ahmount.client.files import read_batch
from ahmount.errors import InvalidArgument
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.vfs.core import VFS
from ahmount.vfs.handles import HubSource, read_source
from ahmount.vfs.layout import Key
from ahmount.vfs.object_cache import BLOCK
from ahmount.vfs.supervisor import EXPECTED
from ahmount.vfs.tree import Node
from ahmount.wording import human_size, plural

log = logging.getLogger("ahmount.vfs")

SMALL = 1 << 20
BATCH_FILES = 500
MAX_JOBS = 64


@dataclass
class Job:
    id: int
    files: int
    bytes: int
    done_files: int = 0
    done_bytes: int = 0
    failed: int = 0
    state: str = "running"  # running, done, failed
    errors: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {"id": self.id, "files": self.files, "bytes": self.bytes,
                "done_files": self.done_files, "done_bytes": self.done_bytes,
                "failed": self.failed, "state": self.state, "errors": self.errors[:10]}


class Prefetcher:
    def __init__(self, vfs: VFS, spawn: Callable[[str, Callable[[], Awaitable[Any]]], None]
                 ) -> None:
        self._vfs = vfs
        self._spawn = spawn
        self._ids = itertools.count(1)
        self.jobs: dict[int, Job] = {}

    async def start(self, keys: list[Key], jobs: int = 8) -> Job:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= MAX_JOBS:
            raise InvalidArgument(f"jobs {jobs!r} must be an integer from 1 to {MAX_JOBS}")
        if not keys:
            raise InvalidArgument("prefetch needs at least one path")
        found: dict[str, HubSource] = {}
        for key in keys:
            await self._walk(await self._vfs.tree.node(key), found)
        sources = list(found.values())
        total = sum(s.size for s in sources)
        cache = self._vfs.cache
        if total > cache.max_bytes:
            raise InvalidArgument(
                f"the {plural(len(sources), 'file')} to prefetch hold {human_size(total)}, more "
                f"than the cache's {human_size(cache.max_bytes)}: prefetch less, or mount with "
                "a larger --cache-size")
        job = Job(next(self._ids), len(sources), total)
        self.jobs[job.id] = job
        self._spawn(f"prefetch {job.id}", lambda: self._run(job, sources, jobs))
        return job

    async def _walk(self, node: Node, found: dict[str, HubSource]) -> None:
        if not node.is_dir:
            if node.entry is not None and node.resolved is not None and \
                    (node.queued is None or node.queued.local is None):
                source = read_source(self._vfs.view, node)
                found.setdefault(source.sha256, source)
            return
        if node.loc.ref is None:
            raise InvalidArgument(f"{node.loc.api_path() or '/'} is above a branch or tag: "
                                  "prefetch a ref, a directory or a file")
        for name in await self._vfs.tree.children(node):
            await self._walk(await self._vfs.tree.node((*node.loc.key, name)), found)

    async def _run(self, job: Job, sources: list[HubSource], jobs: int) -> None:
        cache = self._vfs.cache
        limit = trio.CapacityLimiter(jobs)
        todo = [s for s in sources if not cache.is_complete(s.sha256, s.size)]
        for s in sources:
            if s not in todo:
                self._done(job, s.size)
        groups: dict[tuple[AssetAddr, str], list[HubSource]] = {}
        large: list[HubSource] = []
        for s in todo:
            if s.size <= SMALL:
                groups.setdefault((s.asset, s.commit_id), []).append(s)
            else:
                large.append(s)

        async def fetch_large(source: HubSource) -> None:
            async with limit:
                try:
                    await cache.ensure(source, 0, max(0, source.size - 1) // BLOCK)
                    self._done(job, source.size)
                except EXPECTED as exc:
                    self._failed(job, source.path, exc)

        async def fetch_group(addr: AssetAddr, commit: str, group: list[HubSource]) -> None:
            async with limit:
                entries = [ObjectEntry(s.path, s.sha256, s.size, 0.0) for s in group]
                try:
                    kept: list[tuple[str, bytes]] = []
                    async with aclosing(read_batch(self._vfs.view.hub, addr, commit,
                                                   entries)) as objects:
                        async for entry, data in objects:
                            kept.append((entry.sha256, data))
                    await cache.store(kept)
                    for s in group:
                        self._done(job, s.size)
                except EXPECTED as exc:
                    for s in group:
                        self._failed(job, s.path, exc)

        async with trio.open_nursery() as nursery:
            for s in large:
                nursery.start_soon(fetch_large, s)
            for (addr, commit), group in groups.items():
                for start in range(0, len(group), BATCH_FILES):
                    nursery.start_soon(fetch_group, addr, commit,
                                       group[start:start + BATCH_FILES])
        job.state = "failed" if job.failed else "done"
        log.info("prefetch %d: %s, %s, %d failed", job.id, plural(job.files, "file"),
                 human_size(job.bytes), job.failed)

    @staticmethod
    def _done(job: Job, size: int) -> None:
        job.done_files += 1
        job.done_bytes += size

    @staticmethod
    def _failed(job: Job, path: str, exc: BaseException) -> None:
        job.failed += 1
        job.errors.append(f"{path}: {exc}")

