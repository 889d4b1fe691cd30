"""Small files travel together: opening a small object that is not in the cache fetches it
with the small siblings of its directory that are not cached either, in one batch request
(the hub's batch read, each object checked against its sha256).

A data loader's first epoch opens the files of a small-file dataset in shuffled order; one
request per file costs a round trip and a cache file creation each (about 5 ms through
``ah-server``), and no read-ahead can help a shuffled order. Directories of a dataset are
what a loader reads all of, so the first miss in one brings the rest: a directory of 100
files of 4 KiB costs one request instead of 100, and later opens in it are cache hits. A
reader that opened cold small files in :data:`SPREAD_AFTER` directories of a commit walks a
dataset: its batches then also carry the small files of other directories (up to a batch's
bounds), so a request carries a batch's worth even where directories are small.

Bounded: only objects up to :data:`SMALL_OBJECT`, at most :data:`BATCH_FILES` and
:data:`BATCH_BYTES` per batch, the opened object always first; :data:`PARALLEL_BATCHES` in
flight. A directory larger than a batch (a class directory of 1,000 images) is taken in
directory order from where its last batch stopped, so each of its batches carries new files.
Larger files do not travel together: a loader reading a directory of 1 MiB files
in shuffled order would wait behind megabytes of siblings it does not want yet (measured:
1 MiB batches of 8 were 20% slower than one request per file). Instead, opening a mid-size
object (up to :data:`MID_OBJECT`) that is not cached starts fetching the directory's next
uncached mid-size siblings, each with its own request, at most :data:`MID_AHEAD` at a time
(a cursor per directory walks it once): a one-worker loader of 1 MiB files otherwise waits a
whole request chain per file (about 6 ms here) while the hub and the daemon are mostly idle.
Each object of a batch is *claimed* in the cache (:meth:`ObjectCache.claim`), so a
reader of it waits for the batch rather than fetching it a second time, and fetches it
itself if the batch fails (the failure is logged, never a read error).

Runs on the trio thread; batches run as tasks under the session's supervisor.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio

from ahmount.client.files import read_batch_groups
from ahmount.hub.models import ObjectEntry
from ahmount.vfs.handles import HubSource
from ahmount.vfs.object_cache import BLOCK, ObjectCache
from ahmount.vfs.supervisor import EXPECTED
from ahmount.vfs.tree import Node

log = logging.getLogger("ahmount.vfs")

SMALL_OBJECT = 256 << 10
BATCH_FILES = 256
BATCH_BYTES = 2 << 20
PARALLEL_BATCHES = 8
#: A batch keeps what arrived, and wakes its readers, every this many bytes.
STORE_EVERY = 1 << 20
#: Larger files, up to this size, are fetched ahead (:meth:`SiblingFetcher.opened`), at most
#: MID_AHEAD at once: 200 x 1 MiB shuffled by one worker went from 99-117 to 178 files/s
#: with 6 (16 gained nothing more: the hub and the daemon are then busy on 2 cores).
MID_OBJECT = 4 << 20
MID_AHEAD = 6
#: Directories whose read-ahead cursor is kept.
MID_CURSORS = 64
#: Directories whose batch cursor is kept: a loader over ImageNet's layout walks 1,000 class
#: directories at once. A cursor is a list of the directory's small entries (8 bytes each);
#: one dropped is rebuilt from the listing, and walks past what is here again.
SMALL_CURSORS = 1024
#: A reader that has opened cold small files in this many directories of a commit (a loader
#: walking a dataset) gets the small files of the commit's other directories in its batches
#: too, once its own directory's are all on their way: each request costs the hub a few ms
#: whatever it carries (an authentication, a resolution; 100 one-file batches took 0.43-0.51
#: s from ah-server here), and 10,000 x 4 KiB in 100 directories then travel in 40 batches
#: instead of 100 (0.7 s instead of 1.24-1.31 s straight from the hub).
SPREAD_AFTER = 2
#: Entries of other directories looked at per batch, at most (a huge tree's cost per batch).
SPREAD_SCAN = 8 * BATCH_FILES
#: Commits whose batched directories are remembered.
SPREAD_COMMITS = 16

Spawn = Callable[[str, Callable[[], Awaitable[Any]]], None]


@dataclass
class _CommitBatches:
    """What the batches of one commit have taken."""

    #: The commit's directories in listing order; spreads take them from ``spread_at`` on,
    #: every one before it being all here or on its way.
    names: list[str]
    spread_at: int = 0
    #: Directories whose small files are all here or on their way (spreads skip them).
    batched: set[str] = field(default_factory=set)
    #: Directories small files were opened cold in: from SPREAD_AFTER of them, batches
    #: spread.
    opened_in: set[str] = field(default_factory=set)


class SiblingFetcher:
    """Batches and mid-size read-ahead for the files opened; ``enabled=False`` (``ah-mount
    --siblings off``): only what is opened is fetched."""

    def __init__(self, cache: ObjectCache, spawn: Spawn, enabled: bool = True) -> None:
        self._cache = cache
        self._spawn = spawn
        self.enabled = enabled
        self._limit = trio.CapacityLimiter(PARALLEL_BATCHES)
        self.batches = 0
        self.objects = 0
        self.failures = 0
        #: Mid-size read-ahead: per (commit, directory), its mid-size entries and how far
        #: the read-ahead got; how many fetches of it run now.
        self._cursors: OrderedDict[tuple[str, str], tuple[list[ObjectEntry], int]] = \
            OrderedDict()
        self._ahead = 0
        self.fetched_ahead = 0
        #: Per commit, what its batches have taken (most recent commit last).
        self._commits: OrderedDict[str, _CommitBatches] = OrderedDict()
        #: Per (commit, directory): its small entries, and how far its batches got.
        self._small_cursors: OrderedDict[tuple[str, str], tuple[list[ObjectEntry], int]] = \
            OrderedDict()

    def opened(self, node: Node, source: HubSource) -> None:
        """``node`` (a file of a commit, read from ``source``) was opened for reading."""
        cache = self._cache
        if not self.enabled or node.index is None or \
                cache.is_complete(source.sha256, source.size):
            return
        if node.queued is not None or node.entry is None or node.entry.path != source.path:
            return  # a moved or re-timed queued object: its directory is not its origin's
        if SMALL_OBJECT < source.size <= MID_OBJECT:
            # Not here, or on its way (fetched ahead: a reader is walking the directory).
            self._fetch_ahead(node.index.dirs, source)
            return
        if not 0 < source.size <= SMALL_OBJECT or cache.in_flight(source.sha256):
            return
        parent = source.path.rpartition("/")[0]
        wanted = [ObjectEntry(source.path, source.sha256, source.size, 0.0)]
        dirs = node.index.dirs
        whole, total, _ = self._take(source.commit_id, dirs, parent, wanted, source.size,
                                     skip=source.path)
        taken = self._commits.pop(source.commit_id, None) or _CommitBatches(list(dirs))
        self._commits[source.commit_id] = taken  # most recent last
        if len(self._commits) > SPREAD_COMMITS:
            self._commits.popitem(last=False)
        taken.opened_in.add(parent)
        if whole:
            taken.batched.add(parent)
        if len(taken.opened_in) >= SPREAD_AFTER and len(wanted) < BATCH_FILES:
            total = self._spread(source.commit_id, dirs, taken, wanted, total)
        claimed = set(cache.claim([(e.sha256, e.size) for e in wanted]))
        if source.sha256 in claimed:
            cache.note_cold_open(source.sha256)
        batch = [e for e in wanted if e.sha256 in claimed]
        batch = list({e.sha256: e for e in batch}.values())  # one copy of each content
        if not batch:
            return
        self._spawn(f"batch of {len(batch)} small objects",
                    lambda: self._fetch(source, batch))

    def _take(self, commit_id: str, dirs: dict[str, dict[str, ObjectEntry | None]],
              directory: str, wanted: list[ObjectEntry], total: int, skip: str = ""
              ) -> tuple[bool, int, int]:
        """Add to ``wanted`` (``total`` bytes so far) the small files of ``directory`` that
        are neither here nor on their way, up to a batch, in directory order from where the
        directory's last batch stopped (a cursor per directory: every batch of a directory
        larger than a batch carries new files, and none walks again past those before it).
        Returns whether they now all are here or on their way, the batch's bytes, and how
        many entries were looked at."""
        cache = self._cache
        place = (commit_id, directory)
        found = self._small_cursors.pop(place, None)  # put back last below: most recent
        entries, at = found or ([e for e in dirs.get(directory, {}).values()
                                 if e is not None and 0 < e.size <= SMALL_OBJECT], 0)
        start = at
        while at < len(entries) and len(wanted) < BATCH_FILES:
            entry = entries[at]
            if entry.path == skip or cache.in_flight(entry.sha256) or \
                    cache.is_complete(entry.sha256, entry.size):
                at += 1
                continue
            if total + entry.size > BATCH_BYTES:
                break
            wanted.append(entry)
            total += entry.size
            at += 1
        whole = at == len(entries)
        if not whole:  # a directory all taken is not batched again: no cursor to keep
            if len(self._small_cursors) >= SMALL_CURSORS:
                self._small_cursors.popitem(last=False)
            self._small_cursors[place] = (entries, at)
        return whole, total, at - start

    def _spread(self, commit_id: str, dirs: dict[str, dict[str, ObjectEntry | None]],
                taken: _CommitBatches, wanted: list[ObjectEntry], total: int) -> int:
        """Fill ``wanted`` up to a batch with the small files not here and not on their way
        of directories not taken whole yet (marking those it takes whole); the new total.

        Directories are taken in listing order from a cursor per commit, which moves past
        those all taken: each spread once walked every directory from the first, skipping
        those taken, so a dataset of a directory per sample cost each batch a walk of all of
        them (200,000 directories of one file: 14 s of the event loop over the epoch's
        batches, 36 ms each at the end)."""
        names, at = taken.names, taken.spread_at
        scanned = 0
        for i in range(at, len(names)):
            if len(wanted) >= BATCH_FILES or scanned >= SPREAD_SCAN:
                break
            directory = names[i]
            whole = directory in taken.batched
            if not whole:
                whole, total, looked = self._take(commit_id, dirs, directory, wanted, total)
                scanned += looked
                if whole:
                    taken.batched.add(directory)
            if whole and i == at:
                at = i + 1  # every directory before the cursor is taken
        taken.spread_at = at
        return total

    def _fetch_ahead(self, dirs: dict[str, dict[str, ObjectEntry | None]],
                     source: HubSource) -> None:
        """Start fetching the next uncached mid-size siblings of ``source`` (each whole, in
        the background), until :data:`MID_AHEAD` run."""
        place = (source.commit_id, source.path.rpartition("/")[0])
        found = self._cursors.pop(place, None)  # put back last below: most recent
        if found is None:
            entries = [e for e in dirs.get(place[1], {}).values()
                       if e is not None and SMALL_OBJECT < e.size <= MID_OBJECT]
            found = (entries, 0)
            if len(self._cursors) >= MID_CURSORS:
                self._cursors.popitem(last=False)
        entries, at = found
        cache = self._cache
        while self._ahead < MID_AHEAD and at < len(entries):
            entry = entries[at]
            at += 1
            if entry.path == source.path or cache.in_flight(entry.sha256) or \
                    cache.is_complete(entry.sha256, entry.size):
                continue
            sibling = HubSource(source.view, source.asset, source.commit_id, entry.path,
                                entry.sha256, entry.size)
            self._ahead += 1
            self._spawn(f"read-ahead of sibling {entry.path}", self._whole(sibling))
        self._cursors[place] = (entries, at)

    def _whole(self, source: HubSource) -> Callable[[], Awaitable[None]]:
        async def fetch() -> None:
            try:
                await self._cache.ensure_quietly(source, 0, (source.size - 1) // BLOCK)
                self.fetched_ahead += 1
            finally:
                self._ahead -= 1
        return fetch

    async def _fetch(self, source: HubSource, batch: list[ObjectEntry]) -> None:
        """Fetch ``batch``, keeping (and waking the readers of) what has arrived every
        :data:`STORE_EVERY` bytes, a group at a time: the opened object comes first, alone,
        is kept at once, and its reader goes on while the rest of the batch travels."""
        cache = self._cache
        waiting = [e.sha256 for e in batch]
        try:
            async with self._limit:
                kept: list[tuple[str, bytes]] = []
                kept_bytes = 0
                try:
                    async with aclosing(read_batch_groups(source.view.hub, source.asset,
                                                          source.commit_id, batch)) as groups:
                        async for group in groups:
                            for entry, data in group:
                                kept.append((entry.sha256, data))
                                kept_bytes += len(data)
                            if kept_bytes >= STORE_EVERY or group[0][0] is batch[0]:
                                await self._keep(kept)
                                kept, kept_bytes = [], 0
                except EXPECTED as exc:  # the readers fetch their own; nothing fails
                    self.failures += 1
                    log.info("batch read of %d small objects failed (%s); reading them one by "
                             "one", len(batch), exc)
                await self._keep(kept)
                self.batches += 1
        finally:
            cache.settle(waiting)  # whatever did not arrive: its readers fetch it

    async def _keep(self, objects: list[tuple[str, bytes]]) -> None:
        if objects:
            await self._cache.store(objects)
            self._cache.settle([sha for sha, _ in objects])
            self.objects += len(objects)
