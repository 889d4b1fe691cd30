"""The mount's local disk cache of object bytes, shared by content hash across refs.

Objects are cached in blocks of :data:`BLOCK` bytes in sparse files ``ROOT/data/ab/<sha256>``;
a diskcache index records, per object, its size, which blocks are present and whether the
whole object was verified against its sha256. See ``docs/cache.md`` for who touches what and
what survives a crash. In short:

* Only the trio thread of the daemon mutates the in-memory records; file I/O runs in worker
  threads. A block is written to its file *before* the record says it is present, and the
  index is flushed to disk lazily, so after a crash the index can only under-report blocks.
* Concurrent readers of a block wait for the one download in flight (:attr:`_inflight`).
* The cache never holds more than ``max_bytes`` of blocks: space is reserved before a block is
  written, evicting whole objects in least-recently-used order; objects with open handles are
  pinned. When nothing can be evicted, a read is served straight from the hub, uncached.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import diskcache
import trio

from ahmount.errors import ChecksumMismatch
from ahmount.vfs.supervisor import EXPECTED

log = logging.getLogger("ahmount.cache")

BLOCK = 1 << 20
#: Objects up to this size are verified before their last read is answered; larger ones in
#: the background once complete (a corrupt one is then dropped and logged).
VERIFY_INLINE = 64 << 20
INDEX_FLUSH_SECONDS = 1.0
#: Longest run of blocks fetched by one request: a long read-ahead becomes several requests
#: in flight at once (up to the fetch limit), which keeps a remote hub's pipe full. Each
#: request costs the hub an authentication, a ref resolution and an object lookup: 64 MiB
#: runs read 1 GiB from ah-server at 540-720 MiB/s here, 8 MiB runs at 350-580.
RUN_BLOCKS = 64
#: Bytes gathered before one write to the cache file (fewer thread hand-offs).
WRITE_BATCH = 4 * BLOCK


class Source(Protocol):
    """Where an object's bytes come from (the hub, for one commit and path)."""

    sha256: str
    size: int

    def fetch(self, start: int, end: int) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Bytes ``[start, end)`` as an async iterator of chunks."""


@dataclass
class Record:
    size: int
    blocks: int = 0  # bit i set: block i is present in the data file
    verified: bool = False
    last_used: float = field(default_factory=time.time)

    def block_count(self) -> int:
        return max(1, -(-self.size // BLOCK))

    def complete(self) -> bool:
        return self.blocks == (1 << self.block_count()) - 1

    def has(self, index: int) -> bool:
        return bool(self.blocks >> index & 1)

    def bytes_present(self) -> int:
        total = self.blocks.bit_count() * BLOCK
        last = self.block_count() - 1
        if self.has(last):
            total -= self.block_count() * BLOCK - max(self.size, 0)
        return max(total, 0)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_fetched: int = 0
    uncached_reads: int = 0


class _NoSpace(Exception):
    pass


class ObjectCache:
    """Block cache of objects by sha256, bounded by ``max_bytes`` on disk.

    Start with :meth:`open` inside a nursery (it runs the index flusher); close with
    :meth:`close`.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._data = root / "data"
        self._data.mkdir(parents=True, exist_ok=True)
        self._index = diskcache.Cache(str(root / "index"))
        self._records: dict[str, Record] = {}
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._pins: Counter[str] = Counter()
        self._verifying: set[str] = set()
        self._fds: dict[str, int] = {}  # read descriptors of pinned objects
        self._used = 0
        self._fetch_limit = trio.CapacityLimiter(8)
        self._load()

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        for sha in list(self._index.iterkeys()):
            raw = self._index.get(sha)
            path = self._path(sha)
            if not isinstance(raw, dict) or not path.exists():
                self._index.delete(sha)
                continue
            record = Record(raw["size"], raw["blocks"], raw["verified"], raw["last_used"])
            if path.stat().st_size < min(record.size, (record.blocks.bit_length()) * BLOCK):
                record.blocks &= (1 << (path.stat().st_size // BLOCK)) - 1
                record.verified = False
            self._records[sha] = record
            self._used += record.bytes_present()
        for stray in self._data.glob("*/*"):
            if stray.name not in self._records:
                stray.unlink(missing_ok=True)
        log.info("cache at %s: %d objects, %.1f MiB of %.1f MiB", self.root,
                 len(self._records), self._used / (1 << 20), self.max_bytes / (1 << 20))

    def flush_index(self) -> None:
        """Write changed records to the on-disk index (blocks are already on disk)."""
        for sha in self._removed:
            self._index.delete(sha)
        self._removed.clear()
        for sha in self._dirty:
            record = self._records.get(sha)
            if record is not None:
                self._index.set(sha, {"size": record.size, "blocks": record.blocks,
                                      "verified": record.verified,
                                      "last_used": record.last_used})
        self._dirty.clear()

    async def run_flusher(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(INDEX_FLUSH_SECONDS)
            if self._dirty or self._removed:
                self._save_index()

    def _save_index(self) -> None:
        """``flush_index`` where a failure (a full disk) must not end the mount: logged, and
        what was not written stays marked for the next try."""
        try:
            self.flush_index()
        except Exception as exc:
            log.warning("cache index not saved: %s", exc)

    def close(self) -> None:
        for sha in list(self._fds):
            self._close_fd(sha)
        self._save_index()
        self._index.close()

    # -- bookkeeping -------------------------------------------------------------------------

    def _path(self, sha: str) -> Path:
        return self._data / sha[:2] / sha

    def used_bytes(self) -> int:
        return self._used

    def object_count(self) -> int:
        return len(self._records)

    def pin(self, sha: str) -> None:
        self._pins[sha] += 1

    def unpin(self, sha: str) -> None:
        self._pins[sha] -= 1
        if self._pins[sha] <= 0:
            del self._pins[sha]
            self._close_fd(sha)

    def _close_fd(self, sha: str) -> None:
        fd = self._fds.pop(sha, None)
        if fd is not None:
            os.close(fd)

    def _record(self, sha: str, size: int) -> Record:
        record = self._records.get(sha)
        if record is None or record.size != size:
            record = Record(size)
            self._records[sha] = record
        record.last_used = time.time()
        self._dirty.add(sha)
        return record

    def _reserve(self, sha: str, nbytes: int) -> None:
        """Make room for ``nbytes`` more, evicting least-recently-used unpinned objects."""
        if self._used + nbytes <= self.max_bytes:
            return
        candidates = sorted(
            (r.last_used, s) for s, r in self._records.items()
            if s != sha and s not in self._pins and r.blocks
        )
        for _, victim in candidates:
            self._drop(victim)
            self.stats.evictions += 1
            if self._used + nbytes <= self.max_bytes:
                return
        raise _NoSpace()

    def _drop(self, sha: str) -> None:
        record = self._records.pop(sha, None)
        if record is not None:
            self._used -= record.bytes_present()
        self._close_fd(sha)
        self._path(sha).unlink(missing_ok=True)
        self._dirty.discard(sha)
        self._removed.add(sha)

    def drop_all(self) -> int:
        """Drop every unpinned object; returns how many."""
        victims = [s for s in self._records if s not in self._pins]
        for sha in victims:
            self._drop(sha)
        return len(victims)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, source: Source, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the object, fetched into the cache if needed."""
        end = min(offset + size, source.size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        try:
            fetched = await self.ensure(source, first, last)
        except _NoSpace:
            self.stats.uncached_reads += 1
            return await self._read_uncached(source, offset, end)
        record = self._records.get(source.sha256)
        if record is None or not all(record.has(b) for b in range(first, last + 1)):
            # Evicted between fetch and read by someone else's reservation: go direct.
            self.stats.uncached_reads += 1
            return await self._read_uncached(source, offset, end)
        if fetched:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        record.last_used = time.time()
        if record.complete() and not record.verified:
            await self._verify(source.sha256, record, inline=source.size <= VERIFY_INLINE)
        # Read in the event loop, without a thread hand-off: the block was just written or is
        # on local disk, and a pread of a FUSE-sized piece costs less than the hand-off.
        fd = self._fds.get(source.sha256)
        if fd is None:
            fd = os.open(self._path(source.sha256), os.O_RDONLY)
            if source.sha256 in self._pins:
                self._fds[source.sha256] = fd
            else:
                try:
                    return os.pread(fd, end - offset, offset)
                finally:
                    os.close(fd)
        return os.pread(fd, end - offset, offset)

    async def _read_uncached(self, source: Source, offset: int, end: int) -> bytes:
        parts: list[bytes] = []
        async with source.fetch(offset, end) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                self.stats.bytes_fetched += len(chunk)
        return b"".join(parts)

    async def ensure(self, source: Source, first: int, last: int) -> bool:
        """Make blocks ``first..last`` present; True if anything had to be fetched."""
        sha = source.sha256
        record = self._record(sha, source.size)
        last = min(last, record.block_count() - 1)
        fetched = False
        for _attempt in range(3):
            wait_for: list[trio.Event] = []
            runs: list[list[int]] = []
            for index in range(first, last + 1):
                if record.has(index):
                    continue
                event = self._inflight.get((sha, index))
                if event is not None:
                    wait_for.append(event)
                elif runs and runs[-1][-1] == index - 1 and len(runs[-1]) < RUN_BLOCKS:
                    runs[-1].append(index)
                else:
                    runs.append([index])
            if not runs and not wait_for:
                return fetched
            fetched = True
            for run in runs:
                for index in run:
                    self._inflight[(sha, index)] = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    for run in runs:
                        nursery.start_soon(self._fetch_run, source, record, run[0], run[-1])
            except BaseExceptionGroup as group:
                from ahmount.nurseries import first_error

                raise first_error(group) from group
            for event in wait_for:
                await event.wait()
            record = self._records.get(sha) or self._record(sha, source.size)
        if all(record.has(i) for i in range(first, last + 1)):
            return fetched
        raise OSError(5, f"could not fetch blocks {first}-{last} of blob {sha}")

    async def _fetch_run(self, source: Source, record: Record, first: int, last: int) -> None:
        """Fetch blocks ``first..last`` with one ranged request, writing them as they arrive
        (a few blocks per write, so that thread hand-offs stay few)."""
        sha = source.sha256
        start, end = first * BLOCK, min((last + 1) * BLOCK, source.size)
        index = first
        try:
            async with self._fetch_limit:
                path = self._path(sha)
                fd = await trio.to_thread.run_sync(_open_for_write, path)
                try:
                    pending: list[bytes | memoryview] = []
                    pending_bytes = 0
                    async with source.fetch(start, end) as chunks:
                        async for chunk in chunks:
                            self.stats.bytes_fetched += len(chunk)
                            pending.append(chunk)
                            pending_bytes += len(chunk)
                            arrived_end = index * BLOCK + pending_bytes
                            if pending_bytes >= WRITE_BATCH or arrived_end >= end:
                                whole = pending_bytes if arrived_end >= end else \
                                    pending_bytes // BLOCK * BLOCK
                                take, pending = _split(pending, whole)
                                await self._store_blocks(sha, record, fd, index, take, whole)
                                index += -(-whole // BLOCK)
                                pending_bytes -= whole
                finally:
                    os.close(fd)
                if index <= last:
                    raise OSError(5, f"hub sent a short range for blob {sha}")
        finally:
            for i in range(first, last + 1):
                event = self._inflight.pop((sha, i), None)
                if event is not None:
                    event.set()

    async def _store_blocks(self, sha: str, record: Record, fd: int, first: int,
                            buffers: list[bytes | memoryview], size: int) -> None:
        """Write ``size`` bytes (whole blocks from block ``first``; the object's last block
        may be short), gathered from ``buffers`` without joining them, and mark them present."""
        self._reserve(sha, size)
        self._used += size  # reserved now, before the thread yields control
        try:
            await trio.to_thread.run_sync(_pwritev_all, fd, buffers, first * BLOCK)
        except BaseException as exc:
            self._used -= size
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The disk under the cache is full (whatever --cache-size says): readers get
                # their bytes straight from the hub instead of an error.
                log.warning("cache disk full writing blob %s: reading without the cache (%s)",
                            sha, exc)
                raise _NoSpace() from exc
            raise
        if self._records.get(sha) is not record:
            self._used -= size  # evicted while we wrote: the file is gone already
            return
        count = -(-size // BLOCK)
        record.blocks |= ((1 << count) - 1) << first
        self._dirty.add(sha)
        for index in range(first, first + count):
            self._inflight.pop((sha, index), trio.Event()).set()

    async def _verify(self, sha: str, record: Record, inline: bool) -> None:
        if sha in self._verifying:
            return  # one hash of an object at a time; readers do not wait for a background one

        async def check() -> None:
            self._verifying.add(sha)
            try:
                actual = await trio.to_thread.run_sync(_hash_file, self._path(sha))
            finally:
                self._verifying.discard(sha)
            if actual == sha:
                record.verified = True
                self._dirty.add(sha)
                return
            log.error("cached blob %s hashed to %s; dropped", sha, actual)
            self._drop(sha)
            raise ChecksumMismatch(f"blob {sha} arrived corrupted (hash {actual})")

        async def check_in_background() -> None:
            # Nobody waits for this one: a corrupt or evicted block is dropped and logged,
            # and the next read fetches it again.
            try:
                await check()
            except ChecksumMismatch:
                pass
            except FileNotFoundError:
                log.info("blob %s was evicted while it was verified", sha)

        if inline:
            await check()
        elif self._spawn is not None:
            self._spawn(f"verification of {sha[:12]}", check_in_background)

    async def copy_to(self, source: Source, dest: Path) -> None:
        """Write the whole object to ``dest`` (copy-on-write of a branch file): through the
        cache when it fits, else streamed from the hub."""
        try:
            if source.size:
                await self.ensure(source, 0, (source.size - 1) // BLOCK)
            record = self._records.get(source.sha256)
            if record is None or not record.complete():
                raise _NoSpace()
            await trio.to_thread.run_sync(shutil.copyfile, self._path(source.sha256), dest)
        except _NoSpace:
            with dest.open("wb") as handle:
                async with source.fetch(0, source.size) as chunks:
                    async for chunk in chunks:
                        self.stats.bytes_fetched += len(chunk)
                        await trio.to_thread.run_sync(handle.write, chunk)

    _spawn: Callable[[str, Callable[[], Any]], None] | None = None

    def set_spawner(self, spawn: Callable[[str, Callable[[], Any]], None]) -> None:
        """How background work (read-ahead, verification) is started, by name: the daemon's
        supervisor (expected failures contained, bugs shut the mount down)."""
        self._spawn = spawn

    def prefetch(self, source: Source, first: int, last: int) -> None:
        """Start fetching blocks in the background (read-ahead); errors are only logged."""
        if self._spawn is None:
            return

        async def run() -> None:
            try:
                await self.ensure(source, first, last)
            except _NoSpace:
                pass
            except EXPECTED as exc:  # the read that needs the blocks reports it
                log.debug("read-ahead of %s failed: %s", source.sha256, exc)

        self._spawn(f"read-ahead of {source.sha256[:12]}", run)


def _split(buffers: list[bytes | memoryview], size: int
           ) -> tuple[list[bytes | memoryview], list[bytes | memoryview]]:
    """The first ``size`` bytes of ``buffers`` and the rest, cutting one buffer at most
    (by memoryview: nothing is copied)."""
    head: list[bytes | memoryview] = []
    taken = 0
    for i, buffer in enumerate(buffers):
        if taken + len(buffer) <= size:
            head.append(buffer)
            taken += len(buffer)
            continue
        cut = size - taken
        view = memoryview(buffer)
        if cut:
            head.append(view[:cut])
        return head, [view[cut:], *buffers[i + 1:]]
    return head, []


def _pwritev_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    """pwritev of every buffer, in batches under IOV_MAX, retrying short writes."""
    for start in range(0, len(buffers), 512):
        batch = buffers[start:start + 512]
        expected = sum(len(b) for b in batch)
        written = os.pwritev(fd, batch, offset)
        if written != expected:  # rare: finish the rest plainly
            rest = b"".join(bytes(b) for b in batch)[written:]
            while rest:
                n = os.pwrite(fd, rest, offset + written)
                written += n
                rest = rest[n:]
        offset += expected


def _open_for_write(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(BLOCK * 4):
            digest.update(chunk)
    return digest.hexdigest()
