"""The local disk cache of object bytes, shared by content hash across refs, and by every
process of a user on a hub (mounts and ``ah://`` file systems).

Objects are cached in blocks of :data:`BLOCK` bytes in sparse files ``ROOT/data/ab/<sha256>``;
a diskcache index records, per object, its size, which blocks are present and whether the
whole object was verified against its sha256. See ``docs/cache.md`` for who touches what,
what survives a crash, and the protocol between processes. In short:

* A process uses an object under a *lease*: a shared ``flock`` on its data file. Removing a
  file (eviction, sweep) takes the exclusive lock without waiting, so nobody removes what
  another process reads or writes. A lease's first holder re-reads the object's record.
* Only the owning trio thread mutates this process's records; file I/O runs in worker
  threads. A block is written to its file *before* the index says it is present, and the
  index is written under a lease, so the index can only under-report blocks.
* Concurrent readers of a block in one process wait for the one download in flight.
* The cache never holds more than ``max_bytes``, all processes together: bytes are charged to
  the shared :class:`~ahmount.vfs.cache_ledger.CacheLedger` before they are written,
  evicting whole objects in least-recently-used order until they fit, and credited when
  removed; leased objects are never evicted. When nothing can be evicted, a read is served
  straight from the hub, uncached.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import diskcache
import trio

from ahmount.client.files import hash_file
from ahmount.disposable_cache import clear_if_damaged
from ahmount.errors import ChecksumMismatch
from ahmount.transfer.hashes import run_stoppable
from ahmount.vfs.cache_ledger import CacheLedger
from ahmount.vfs.disk_index import all_rows, data_version, set_rows
from ahmount.vfs.file_io import pread_unstalled, removal_lock
from ahmount.vfs.file_io import pwritev_all as _pwritev_all
from ahmount.vfs.file_io import split_buffers as _split
from ahmount.vfs.object_packs import PACK_OBJECT, ObjectPacks
from ahmount.vfs.supervisor import EXPECTED

log = logging.getLogger("ahmount.cache")

BLOCK = 1 << 20
#: Objects up to this size are verified before their last read is answered; larger ones in
#: the background once complete (a corrupt one is then dropped and logged).
VERIFY_INLINE = 64 << 20
#: The unit random reads fetch and keep (a block is 16 of them): a 4 KiB read at a random
#: offset should not wait for a whole block.
PAGE = 64 << 10
PAGES_PER_BLOCK = BLOCK // PAGE
INDEX_FLUSH_SECONDS = 1.0
#: How stale an object's last-use time may be (saving it costs an index write).
LRU_RESOLUTION = 60.0
#: How often a full cache re-reads the shared index before evicting (other processes'
#: objects count against the same bound).
RESCAN_SECONDS = 5.0
#: Longest run of blocks fetched by one request: a long read-ahead becomes several requests
#: in flight at once (up to the fetch limit), which keeps a remote hub's pipe full. Each
#: request costs the hub an authentication, a ref resolution and an object lookup: 64 MiB
#: runs read 1 GiB from ah-server at 540-720 MiB/s here, 8 MiB runs at 350-580.
RUN_BLOCKS = 64
#: Bytes gathered before one write to the cache file (fewer thread hand-offs).
WRITE_BATCH = 4 * BLOCK
#: The shortest run read straight into a buffer in a worker thread, when the source can
#: (an HTTP hub: :mod:`ahmount.client.direct_reads`); shorter ones stream through httpx on
#: the trio thread, where a small file's one round trip waits for no thread hand-off. One
#: block: 200 x 1 MiB files shuffled read 5-10% faster with them read directly than with
#: only runs of two blocks and more (same runs, 1 and 8 workers).
DIRECT_MIN = BLOCK
#: Random misses of one object after which the rest of it is fetched behind the reader
#: (as Alluxio caches a whole block asynchronously on a partial read): each miss waits a
#: round trip to the hub, a whole object streams at hundreds of MiB/s, and once it is here
#: every read is local. Only objects up to FILL_SHARE of the cache are filled, so a few
#: reads of a huge file never evict everything else.
FILL_AFTER = 16
FILL_SHARE = 4  # at most 1/FILL_SHARE of the cache's bound
#: Blocks per request of a fill, so that a read waiting for a block being filled waits for
#: one run at most.
FILL_RUN = 16
#: Runs of a fill in flight at once. The reads still missing meanwhile compete with them,
#: and a fill that ends sooner leaves more of them local: 2,000 random 4 KiB reads of a cold
#: 1 GiB object through ah-server, alternated mounts, 707-1,269 IOPS with one (median of 6:
#: ~1,020), 1,089-1,676 with three (median 1,577 of 3), 752-1,365 with four.
FILL_STREAMS = 3
#: Bytes of objects kept from batch reads (:meth:`ObjectCache.store`) also held in memory
#: until their first read reaches their end: that read, usually a loader's only one of a
#: small file, then costs no lease (a file open, a lock, an index read) and no pread,
#: which were a fifth of the trio thread's time in a cold shuffled read of 4 KiB files.
FRESH_BYTES = 32 << 20
#: Objects remembered as opened cold until their first read (an open never read is
#: forgotten, the oldest first).
COLD_OPENS = 4096


class Source(Protocol):
    """Where an object's bytes come from (the hub, for one commit and path)."""

    sha256: str
    size: int

    def fetch(self, start: int, end: int) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Bytes ``[start, end)`` as an async iterator of chunks."""

    @property
    def reads_directly(self) -> bool:
        """True when :meth:`read_into` works (long runs are then read through it)."""

    def read_into(self, start: int, end: int, buffer: memoryview,
                  consume: Callable[[memoryview, int], bool]) -> int:
        """Bytes ``[start, end)`` read into ``buffer``, blocking (in a worker thread): each
        filled buffer is handed to ``consume`` with its offset from ``start``; reading stops
        early when it returns False. Returns the bytes read."""


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

    #: Pages (:data:`PAGE`) of blocks that are not here whole, fetched by random reads:
    #: block index -> bitmap of its pages. Saved and merged like the blocks.
    pages: dict[int, int] = field(default_factory=dict)

    def merge_pages(self, other: dict[int, int]) -> None:
        """Take pages another process recorded (then whole blocks are promoted)."""
        for index, bitmap in other.items():
            if not self.has(index):
                self.pages[index] = self.pages.get(index, 0) | bitmap
        self._promote(set(other))

    def _promote(self, indexes: set[int]) -> None:
        pages_total = -(-self.size // PAGE)
        for index in indexes:
            in_block = min(PAGES_PER_BLOCK, pages_total - index * PAGES_PER_BLOCK)
            if index in self.pages and (self.has(index) or
                                        self.pages[index] == (1 << in_block) - 1):
                del self.pages[index]
                self.blocks |= 1 << index

    def bytes_present(self) -> int:
        total = self.blocks.bit_count() * BLOCK
        last = self.block_count() - 1
        if self.has(last):
            total -= self.block_count() * BLOCK - max(self.size, 0)
        for index, bitmap in self.pages.items():
            if not self.has(index):
                total += bitmap.bit_count() * PAGE
        return max(total, 0)

    def bytes_in(self, indexes: range | set[int]) -> int:
        """:meth:`bytes_present` of blocks ``indexes`` alone: what a change to them adds is
        counted without a walk of every page (a random reader's miss walked them all)."""
        total = 0
        for index in indexes:
            if self.has(index):
                total += max(min(BLOCK, self.size - index * BLOCK), 0)
            else:
                total += self.pages.get(index, 0).bit_count() * PAGE
        return total

    def has_page(self, page: int) -> bool:
        index = page // PAGES_PER_BLOCK
        return self.has(index) or bool(self.pages.get(index, 0) >> (page % PAGES_PER_BLOCK) & 1)

    def add_pages(self, first: int, last: int) -> int:
        """Pages ``first..last`` are in the data file; a block whose every page is here
        becomes a whole block. Returns how many bytes that adds to :meth:`bytes_present`."""
        touched = range(first // PAGES_PER_BLOCK, last // PAGES_PER_BLOCK + 1)
        before = self.bytes_in(touched)
        for page in range(first, last + 1):
            index = page // PAGES_PER_BLOCK
            if not self.has(index):
                self.pages[index] = self.pages.get(index, 0) | 1 << (page % PAGES_PER_BLOCK)
        self._promote(set(touched))
        return self.bytes_in(touched) - before


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_fetched: int = 0
    uncached_reads: int = 0
    fills: int = 0  # objects whose fetch behind a random reader began
    disk_reads: int = 0  # reads of data files that waited for the disk (in a worker thread)


class _NoSpace(Exception):
    pass


def object_indexes(root: Path) -> list[Path]:
    """The diskcache indexes of an object cache at ``root`` (its records, its packs')."""
    return [root / "index", root / "packs" / "index"]


class ObjectCache:
    """Block cache of objects by sha256, bounded by ``max_bytes`` on disk, shared by every
    process that opens the same directory (mounts and ``ah://`` file systems of one user).

    Run :meth:`run_flusher` in a nursery; close with :meth:`close`. See ``docs/cache.md`` for
    the protocol between processes (leases: a shared ``flock`` on an object's data file).
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        # Its indexes describe its data and packs: one a power loss damaged takes them all.
        clear_if_damaged(root, object_indexes(root), "the object cache")
        self.root = root
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._data = root / "data"
        self._data.mkdir(parents=True, exist_ok=True)
        self._data_dir = str(self._data)  # joined as a str on the hot paths (see _file)
        # The cache evicts by its own rules (leases, the byte bound): diskcache's own culling
        # would measure the database's volume at every record saved (three more queries per
        # small file read cold) to enforce a bound nobody set.
        self._index = diskcache.Cache(str(object_indexes(root)[0]), eviction_policy="none",
                                      cull_limit=0)
        #: What this process knows of each object. Authoritative only for leased objects;
        #: for the others a hint (LRU order, bytes used), re-read from the index at lease.
        self._records: dict[str, Record] = {}
        self._dirty: set[str] = set()
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._pins: Counter[str] = Counter()
        #: Pinned objects that have been read: they hold one lease until unpinned.
        self._pin_leases: set[str] = set()
        self._leases: Counter[str] = Counter()
        self._lease_fds: dict[str, int] = {}  # O_RDWR, flock(LOCK_SH) held: reads and writes
        #: The index's :func:`data_version` when a leased object's record was last read from
        #: it: while it stands, no other process has written a record since, and a miss has
        #: nothing to learn (reading and merging the record of a large object's scattered
        #: pages cost a random miss more the longer its reader ran).
        self._read_at: dict[str, int] = {}
        self._verifying: set[str] = set()
        self._rescanned = 0.0
        self._fetch_limit = trio.CapacityLimiter(8)
        #: Buffers of :data:`WRITE_BATCH` bytes for direct reads (one per run in flight).
        self._buffers: list[bytearray] = []
        #: The largest object a random reader gets filled (:meth:`fill`); None: a
        #: :data:`FILL_SHARE` of the bound, 0: none (``ah-mount --fill-random``).
        self.fill_limit: int | None = None
        #: Random misses per object not (yet) filled, and the objects being filled.
        self._random_misses: Counter[str] = Counter()
        self._filling: set[str] = set()
        #: Objects just stored (hash-checked), by sha256, oldest first (:data:`FRESH_BYTES`).
        self._fresh: OrderedDict[str, bytes] = OrderedDict()
        #: Objects whose fetch a reader's open started (:meth:`note_cold_open`).
        self._cold_opens: OrderedDict[str, bool] = OrderedDict()
        self._fresh_bytes = 0
        #: Small whole objects from batch reads, many to a file (:mod:`.object_packs`).
        self._packs = ObjectPacks(root / "packs")  # its index: the second of object_indexes
        self._rescan()
        #: What every process on this directory holds together (``--cache-size`` bounds it).
        self.ledger = CacheLedger(root, max_bytes, self._measure)
        self._load()

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        self.ledger.credit(self._packs.sweep())
        # A smaller --cache-size than the last process had: brought under it now.
        with contextlib.suppress(_NoSpace):
            self._reserve("", 0)
        for stray in self._data.glob("*/*"):
            if stray.name not in self._records:
                self._remove_if_unused(stray.name, only_unrecorded=True)
        log.info("cache at %s: %d objects, %.1f MiB of %.1f MiB", self.root,
                 len(self._records), self.used_bytes() / (1 << 20), self.max_bytes / (1 << 20))

    def _measure(self) -> int:
        """The bytes the cache holds as the index and the packs say (just rescanned): what
        the ledger is set to by a process that has the directory to itself."""
        return sum(r.bytes_present() for r in self._records.values()) + \
            self._packs.disk_bytes()

    def _rescan(self) -> None:
        """Refresh what this process knows of unleased objects from the shared index (other
        processes add and evict them), and the bytes used."""
        fresh: dict[str, Record] = {}
        for sha, raw in all_rows(self._index):
            record = _from_raw(raw)
            if record is not None:
                fresh[sha] = record
        for sha in self._leases:
            if sha in self._records:
                fresh[sha] = self._records[sha]
        self._records = fresh
        self._packs.rescan()
        self._rescanned = time.monotonic()

    def _learn(self, sha: str, record: Record) -> None:
        """Take the blocks other processes recorded for a leased object (they are in the same
        file: evicting it needs our lock), unless none has written to the index since we
        last read its record."""
        version = data_version(self._index)  # before the read: a write after it is seen next
        if self._read_at.get(sha) == version:
            return
        self._read_at[sha] = version
        known = _from_raw(self._index.get(sha))
        if known is not None and known.size == record.size and (
                known.blocks & ~record.blocks or known.pages):
            self._absorb(record, known)

    def _absorb(self, record: Record, known: Record) -> None:
        """OR another process's record of the same object into ours (blocks, pages,
        verification): bytes that process counted in the ledger when it wrote them."""
        record.blocks |= known.blocks
        record.merge_pages(known.pages)
        record.verified = record.verified or known.verified

    def _merge(self, sha: str, record: Record) -> None:
        """Add what this process learned of a leased object to the shared index: blocks and
        verification only ever grow under a lease (evictions need the exclusive lock)."""
        with self._index.transact():
            known = _from_raw(self._index.get(sha))
            if known is not None and known.size == record.size:
                self._absorb(record, known)
                record.last_used = max(record.last_used, known.last_used)
            self._index.set(sha, _to_raw(record))

    def flush_index(self) -> None:
        """Write changed records of leased objects to the shared index (their blocks are on
        disk already). A record is changed only under a lease, and saved before the lease
        ends, so nothing unleased is ever dirty here."""
        for sha in list(self._dirty):
            record = self._records.get(sha)
            if record is not None and sha in self._leases:
                self._merge(sha, record)
            self._dirty.discard(sha)

    async def run_flusher(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(INDEX_FLUSH_SECONDS)
            if self._dirty:
                self._save_index()

    def _save_index(self) -> None:
        """``flush_index`` where a failure (a full disk) must not end the mount: logged, and
        what was not written stays marked for the next try."""
        try:
            self.flush_index()
        except Exception as exc:
            log.warning("cache index not saved: %s", exc)

    def close(self) -> None:
        self._save_index()
        for sha in list(self._lease_fds):
            self._leases.pop(sha, None)
            os.close(self._lease_fds.pop(sha))
        self._index.close()
        self._packs.close()
        self.ledger.close()

    # -- leases ------------------------------------------------------------------------------

    def _acquire(self, sha: str) -> None:
        """Lease the object: hold a shared lock on its data file (made if missing), so that no
        process removes the file or its record until :meth:`_release`. The first lease
        re-reads the record from the index (another process may have added or evicted)."""
        self._leases[sha] += 1
        if self._leases[sha] > 1:
            return
        try:
            fd, stat = _open_locked(self._file(sha))
            self._lease_fds[sha] = fd
            self._dirty.discard(sha)
            self._records.pop(sha, None)
            self._read_at[sha] = data_version(self._index)
            record = _from_raw(self._index.get(sha))
            if record is not None:
                if stat.st_size < min(record.size, record.blocks.bit_length() * BLOCK):
                    # Blocks the file does not hold (a write lost to a power cut): they are
                    # fetched again.
                    record.blocks &= (1 << (stat.st_size // BLOCK)) - 1
                    record.verified = False
                record.pages = _pages_within(record, stat.st_size)
                self._records[sha] = record
        except BaseException:
            self._leases[sha] -= 1
            if not self._leases[sha]:
                del self._leases[sha]
                self._read_at.pop(sha, None)
            raise

    def _release(self, sha: str) -> None:
        self._leases[sha] -= 1
        if self._leases[sha] > 0:
            return
        del self._leases[sha]
        fd = self._lease_fds.pop(sha, None)
        self._read_at.pop(sha, None)
        try:
            record = self._records.get(sha)
            if sha in self._dirty and record is not None:
                try:
                    self._merge(sha, record)
                except Exception as exc:  # a full disk: the blocks are fetched again later
                    log.warning("cache record of %s not saved: %s", sha[:12], exc)
                self._dirty.discard(sha)
        finally:
            if fd is not None:
                os.close(fd)
        if record is None or not (record.blocks or record.pages):
            self._drop(sha)  # nothing of it here (a failed read, a failed hash): no file

    @asynccontextmanager
    async def _leased(self, sha: str) -> AsyncIterator[int]:
        self._acquire(sha)
        try:
            yield self._lease_fds[sha]
        finally:
            self._release(sha)

    def _remove_if_unused(self, sha: str, only_unrecorded: bool = False) -> bool:
        """Delete the object's file and record if no process leases it (an exclusive lock
        taken without waiting), crediting the ledger with the bytes its record (complete:
        records are saved before their lease ends) says it held. False if it is in use."""
        if sha in self._leases:
            return False
        path = self._file(sha)
        with removal_lock(path) as state:
            if state == "missing" and not only_unrecorded:
                self._delete_record(sha)
            if state != "held":
                # "gone": another remover unlinked the file we opened, and the path (and the
                # record) may belong to a new file some process leases now.
                return state != "busy"
            if only_unrecorded and self._index.get(sha) is not None:
                return False  # recorded meanwhile by the process that wrote it
            self._delete_record(sha)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True

    def _delete_record(self, sha: str) -> None:
        """Remove an object's record from the index (its file is gone or going, under the
        removal lock), crediting the ledger with its bytes."""
        with self._index.transact():
            record = _from_raw(self._index.get(sha))
            self._index.delete(sha)
        if record is not None:
            self.ledger.credit(record.bytes_present())

    # -- bookkeeping -------------------------------------------------------------------------

    def _path(self, sha: str) -> Path:
        return Path(self._file(sha))

    def _file(self, sha: str) -> str:
        """Where the object's data file is, as a str: leases are taken per small file
        read, and pathlib's joining cost more than the open and the lock."""
        return f"{self._data_dir}/{sha[:2]}/{sha}"

    def used_bytes(self) -> int:
        """The bytes the cache holds, counting every process that shares it."""
        return self.ledger.used()

    def object_count(self) -> int:
        """Objects with at least one block here."""
        return sum(1 for r in self._records.values() if r.blocks or r.pages) + \
            self._packs.count()

    def disk_reads(self) -> int:
        """Reads that waited for the disk (in a worker thread), of data files and packs."""
        return self.stats.disk_reads + self._packs.disk_reads

    def pin(self, sha: str) -> None:
        """Keep the object from eviction (by any process) while a handle has it open, from
        the handle's first read on: an open whose reads the kernel's page cache answers (a
        warm file) costs no lease, no file open and no index read."""
        self._pins[sha] += 1

    def _hold_pin(self, sha: str) -> None:
        """A pinned object is being read: lease it until it is unpinned."""
        if sha in self._pins and sha not in self._pin_leases:
            self._acquire(sha)
            self._pin_leases.add(sha)

    def unpin(self, sha: str) -> None:
        self._pins[sha] -= 1
        if self._pins[sha] <= 0:
            del self._pins[sha]
            if sha in self._pin_leases:
                self._pin_leases.discard(sha)
                self._release(sha)

    def _record(self, sha: str, size: int) -> Record:
        """The object's record, made (and to be saved) if there is none of this size. One
        that exists is returned as it is: a read marks it used at LRU_RESOLUTION, and an
        index write per read of a small file would cost more than the read."""
        record = self._records.get(sha)
        if record is not None and record.size == size:
            return record
        record = Record(size)
        self._records[sha] = record
        record.last_used = time.time()
        self._dirty.add(sha)
        return record

    def _reserve(self, sha: str, nbytes: int) -> None:
        """Charge the ledger ``nbytes`` about to be written, making room if they do not fit:
        evicting least-recently-used objects that no process uses (a fresh look at the shared
        index first, at most every RESCAN_SECONDS, to see the other processes' objects)."""
        if self.ledger.charge(nbytes):
            return
        if time.monotonic() - self._rescanned > RESCAN_SECONDS:
            self._rescan()
        candidates = sorted(
            [(r.last_used, s, False) for s, r in self._records.items()
             if s != sha and s not in self._leases and (r.blocks or r.pages)] +
            [(used, name, True) for used, name in self._packs.ages()]
        )
        for _, victim, is_pack in candidates:
            if is_pack:
                freed = self._packs.evict(victim)
                if freed is None:
                    continue  # another process writes to it
                self.ledger.credit(freed)
            elif not self._drop(victim):
                continue
            self.stats.evictions += 1
            if self.ledger.charge(nbytes):
                return
        raise _NoSpace()

    def _drop(self, sha: str) -> bool:
        """Evict one object, unless some process uses it."""
        if not self._remove_if_unused(sha):
            return False
        self._records.pop(sha, None)
        self._dirty.discard(sha)
        return True

    def _forget_blocks(self, sha: str, record: Record) -> None:
        """A leased object that failed its hash: no block of it counts as present any more
        (its file stays, for the other processes that have it open; fetches overwrite it)."""
        self.ledger.credit(record.bytes_present())
        record.blocks = 0
        record.pages.clear()
        record.verified = False
        self._dirty.discard(sha)
        with self._index.transact():
            self._index.set(sha, _to_raw(record))

    def drop_all(self) -> int:
        """Drop every object no process uses now; returns how many."""
        self._rescan()
        self._fresh.clear()
        self._fresh_bytes = 0
        packed, freed = self._packs.drop_all()
        self.ledger.credit(freed)
        return packed + sum(self._drop(sha) for sha in list(self._records)
                            if sha not in self._leases)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, source: Source, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the object, fetched into the cache if needed."""
        end = min(offset + size, source.size)
        if offset >= end:
            return b""
        if source.size <= PACK_OBJECT:
            # Claimed by a batch (it goes to a pack, where the block path would not look),
            # or fetched by another reader: wait, then look.
            claim = self._inflight.get((source.sha256, 0))
            if claim is not None:
                await claim.wait()
        else:
            claim = None
        here = await self._read_unleased(source, offset, end, waited=claim is not None)
        if here is not None:
            return here
        self._hold_pin(source.sha256)
        try:
            return await self._read(source, offset, end)
        except ChecksumMismatch:
            self._drop(source.sha256)  # our lease is gone; unless another reader has it open
            raise

    async def read_if_here(self, source: Source) -> bytes | None:
        """All of a small object (a pack's size at most) when its bytes are here already, in
        memory or in a pack, else None: nothing is asked of the hub, nothing waits for a
        fetch in flight. What a front end with its own page cache can fill it with at open,
        so that the reads after it ask nothing (see ``AssetFS.open``)."""
        if not 0 < source.size <= PACK_OBJECT or (source.sha256, 0) in self._inflight:
            return None
        return await self._read_unleased(source, 0, source.size, waited=False)

    async def _read_unleased(self, source: Source, offset: int, end: int,
                             waited: bool) -> bytes | None:
        """Bytes ``[offset, end)`` of an object kept in memory from a batch (forgotten there
        once read to its end) or in a pack, counted as a hit (a miss if the reader
        ``waited`` for its fetch); None for one in a data file or not here."""
        sha = source.sha256
        fresh = self._fresh.get(sha)
        if fresh is not None and len(fresh) == source.size:
            if end == source.size:
                self._forget_fresh(sha)
            self._count_hit(sha, waited)
            return fresh[offset:end]
        record = self._records.get(sha)
        # A data file holding it whole answers without asking the pack index (a query per
        # read of a small file that was fetched by itself).
        packed = None if record is not None and record.size == source.size and \
            record.complete() else await self._packs.read(sha, source.size, offset, end)
        if packed is not None:  # no lease: a pack's readers keep it open (object_packs)
            self._count_hit(sha, waited)
        return packed

    def note_cold_open(self, sha: str) -> None:
        """An open of the object started its fetch (in a batch): its first read is a miss,
        even when the bytes arrived before the read asked."""
        self._cold_opens[sha] = True
        while len(self._cold_opens) > COLD_OPENS:
            self._cold_opens.popitem(last=False)

    def _count_hit(self, sha: str, waited: bool) -> None:
        """A read answered from memory or a pack: a miss if it waited for the fetch, or if
        its open started the fetch."""
        if self._cold_opens.pop(sha, False) or waited:
            self.stats.misses += 1
        else:
            self.stats.hits += 1

    async def _read(self, source: Source, offset: int, end: int) -> bytes:
        first, last = offset // BLOCK, (end - 1) // BLOCK
        sha = source.sha256
        async with self._leased(sha) as fd:
            try:
                fetched = await self.ensure(source, first, last)
            except _NoSpace:
                self.stats.uncached_reads += 1
                return await self._read_uncached(source, offset, end)
            record = self._records.get(sha)
            if record is None or not all(record.has(b) for b in range(first, last + 1)):
                self.stats.uncached_reads += 1  # forgotten meanwhile (a failed hash)
                return await self._read_uncached(source, offset, end)
            if fetched:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
            now = time.time()
            if now - record.last_used > LRU_RESOLUTION:
                record.last_used = now
                self._dirty.add(sha)
            if record.complete() and not record.verified:
                await self._verify(sha, record, inline=source.size <= VERIFY_INLINE)
            return await self._pread(fd, end - offset, offset)

    async def read_pages(self, source: Source, offset: int, size: int) -> bytes:
        """:meth:`read` for a random reader: what is missing of ``[offset, offset+size)`` is
        fetched by :data:`PAGE`, in one request for the run of missing pages, and kept (a
        block whose pages are all here counts as whole). Whole blocks that are here, or
        being fetched, are read as :meth:`read` reads them."""
        end = min(offset + size, source.size)
        if offset >= end:
            return b""
        sha = source.sha256
        first, last = offset // BLOCK, (end - 1) // BLOCK
        if any((sha, b) in self._inflight for b in range(first, last + 1)):
            return await self._read_pages_aside(source, offset, end)
        self._hold_pin(sha)
        async with self._leased(sha) as fd:
            record = self._record(sha, source.size)
            if not all(record.has(b) for b in range(first, last + 1)):
                self._learn(sha, record)
            if all(record.has(b) for b in range(first, last + 1)):
                return await self.read(source, offset, size)
            missing = [p for p in range(offset // PAGE, (end - 1) // PAGE + 1)
                       if not record.has_page(p)]
            if missing:
                start, stop = missing[0] * PAGE, min((missing[-1] + 1) * PAGE, source.size)
                data: bytes | bytearray
                if source.reads_directly:
                    data, kept = await self._fetch_pages_directly(source, record, fd, start,
                                                                  stop)
                else:
                    data = fetched = await self._read_uncached(source, start, stop)
                    try:
                        kept, _ = await self._write_counted(sha, record, fd, [fetched], start,
                                                            len(data))
                    except _NoSpace:
                        self.stats.uncached_reads += 1
                        kept = False
                self.stats.misses += 1
                self._missed_randomly(source)
                if not kept:  # no room, a full disk, or evicted meanwhile: not kept
                    if start <= offset and end <= stop:
                        return bytes(data[offset - start:end - start])
                    return await self._read_uncached(source, offset, end)
                added = record.add_pages(missing[0], missing[-1])
                # Pages already here inside the fetched run were charged twice above.
                self.ledger.credit(len(data) - added)
                self._dirty.add(sha)
                if record.complete() and not record.verified:
                    await self._verify(sha, record, inline=source.size <= VERIFY_INLINE)
            else:
                self.stats.hits += 1
            return await self._pread(fd, end - offset, offset)

    async def _read_pages_aside(self, source: Source, offset: int, end: int) -> bytes:
        """A random read of blocks being fetched whole (a fill's run, another reader's):
        its pages asked for on their own and not kept (the blocks will hold them). Waiting
        for the run instead waited until the run's piece holding them (:data:`WRITE_BATCH`)
        was written: the time a 4 MiB piece takes at the hub's rate, 40 ms at 100 MB/s,
        for 4-5% of a random reader's reads while a fill runs. (On this VM both took ~9 ms:
        the fill's own reads of the hub's disk hold up any other read of it.)"""
        start, stop = offset // PAGE * PAGE, min(-(-end // PAGE) * PAGE, source.size)
        data: bytes | bytearray
        if source.reads_directly:
            data = bytearray(stop - start)
            await trio.to_thread.run_sync(_read_whole, source, start, stop, data)
            self.stats.bytes_fetched += stop - start
        else:
            data = await self._read_uncached(source, start, stop)
        self.stats.misses += 1
        return bytes(data[offset - start:end - start])

    async def _pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read a data file's bytes: in the event loop when they are in memory (just written,
        or read before: a pread of a FUSE-sized piece costs less than a thread hand-off),
        in a worker thread when they must come from the disk."""
        data, waited = await pread_unstalled(fd, size, offset)
        self.stats.disk_reads += waited
        return data

    async def _fetch_pages_directly(self, source: Source, record: Record, fd: int,
                                    start: int, stop: int) -> tuple[bytearray, bool]:
        """A random reader's run of missing pages ``[start, stop)`` fetched and written
        through the lease's ``fd`` in one worker-thread hand-off (``http.client`` into a
        buffer, then ``pwrite``): a miss then costs one hand-off, not an httpx request on
        the trio thread (three times the CPU of ``http.client`` here) and a hand-off to
        write. Returns the bytes and whether they were kept (not: no room, a full disk, or
        evicted meanwhile), as :meth:`_write_counted` tells."""
        sha, size = source.sha256, stop - start
        buffer = bytearray(size)
        try:
            self._reserve(sha, size)  # charged now, before the thread yields control
            reserved = True
        except _NoSpace:
            reserved = False

        def fetch_and_keep() -> OSError | None:
            _read_whole(source, start, stop, buffer)
            if not reserved:
                return None
            try:
                _pwritev_all(fd, [memoryview(buffer)], start)
            except OSError as exc:
                return exc
            return None

        try:
            error = await trio.to_thread.run_sync(fetch_and_keep)
        except BaseException:
            if reserved:
                self.ledger.credit(size)
            raise
        self.stats.bytes_fetched += size
        kept = reserved and error is None and self._records.get(sha) is record
        if reserved and not kept:
            self.ledger.credit(size)
        if error is not None:
            try:
                _raise_if_disk_full(sha, error)
            except _NoSpace:
                reserved = False
            else:
                raise error
        if not reserved:
            self.stats.uncached_reads += 1
        return buffer, kept

    async def read_range(self, source: Source, offset: int, size: int) -> bytes:
        """:meth:`read` for a reader that wants few bytes fetched (an ``ah://`` file reading
        a Parquet column chunk or a tensor): a range of at least a block that starts or ends
        inside a block not here is fetched exactly, in one request, and only the whole blocks
        inside it are kept. Aligned and small ranges take the block path."""
        end = min(offset + size, source.size)
        aligned = offset % BLOCK == 0 and (end % BLOCK == 0 or end == source.size)
        if offset >= end or aligned or end - offset < BLOCK:
            return await self.read(source, offset, size)
        sha = source.sha256
        self._hold_pin(sha)
        async with self._leased(sha) as fd:
            record = self._record(sha, source.size)
            first, last = offset // BLOCK, (end - 1) // BLOCK
            if not all(record.has(b) for b in range(first, last + 1)):
                self._learn(sha, record)
            if all(record.has(b) for b in range(first, last + 1)):
                return await self.read(source, offset, size)
            data = await self._read_uncached(source, offset, end)
            self.stats.misses += 1
            whole_end = last + 1 if end == source.size else end // BLOCK
            index = -(-offset // BLOCK)
            while index < whole_end:
                if record.has(index) or (sha, index) in self._inflight:
                    index += 1
                    continue
                run_end = index
                while run_end < whole_end and not record.has(run_end) and \
                        (sha, run_end) not in self._inflight:
                    run_end += 1
                lo, hi = index * BLOCK, min(run_end * BLOCK, source.size)
                try:
                    await self._store_blocks(sha, record, fd, index,
                                             [memoryview(data)[lo - offset:hi - offset]],
                                             hi - lo)
                except _NoSpace:
                    break
                index = run_end
            return data

    def is_complete(self, sha: str, size: int) -> bool:
        """True when every block of the object is here (an empty one always is)."""
        if size == 0:
            return True
        record = self._records.get(sha)
        return (record is not None and record.size == size and record.complete()) or \
            self._packs.has(sha, size)

    def claim(self, objects: list[tuple[str, int]]) -> list[str]:
        r"""Mark single-block objects (``(sha256, size)``) as being fetched by the caller, who
        then :meth:`store`\ s them and :meth:`settle`\ s the claims: a reader of one of them
        meanwhile waits for that instead of fetching it too, and fetches it itself if the
        batch failed. Returns the ones claimed: not here and not in flight already."""
        claimed: list[str] = []
        for sha, size in objects:
            if 0 < size <= BLOCK and (sha, 0) not in self._inflight and \
                    not self.is_complete(sha, size):
                self._inflight[(sha, 0)] = trio.Event()
                claimed.append(sha)
        return claimed

    def settle(self, shas: list[str]) -> None:
        """End claims (:meth:`claim`): their readers look again."""
        for sha in shas:
            self._inflight.pop((sha, 0), trio.Event()).set()

    def in_flight(self, sha: str) -> bool:
        """True while the first block of the object is being fetched."""
        return (sha, 0) in self._inflight

    async def store(self, objects: list[tuple[str, bytes]]) -> None:
        """Keep objects fetched whole elsewhere (a batch read), each checked against its hash
        by the caller, as if they had been read through the cache. Those up to
        :data:`PACK_OBJECT` go to a pack (:mod:`.object_packs`: one write and one index
        transaction for all, in one thread hand-off); larger ones get their data files as
        :meth:`_store_files` says. With no room, what does not fit is not kept."""
        self.stats.bytes_fetched += sum(len(data) for _, data in objects)
        for sha, data in objects:
            self._keep_fresh(sha, data)
        wanted: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for sha, data in objects:
            if data and sha not in seen and not self.is_complete(sha, len(data)):
                seen.add(sha)
                wanted.append((sha, data))
        # One charge for the batch when it fits (the usual case), else one per object,
        # making room for each, keeping those before the first that finds none.
        if not self.ledger.charge(sum(len(data) for _, data in wanted)):
            for count, (sha, data) in enumerate(wanted):
                try:
                    self._reserve(sha, len(data))
                except _NoSpace:
                    del wanted[count:]
                    break
        packable = [(sha, data) for sha, data in wanted if len(data) <= PACK_OBJECT]
        if packable:
            await self._store_packed(packable)
        larger = [(sha, data) for sha, data in wanted if len(data) > PACK_OBJECT]
        if larger:
            await self._store_files(larger)

    async def _store_packed(self, objects: list[tuple[str, bytes]]) -> None:
        """Append reserved objects to this process's pack."""
        placed, grown, error = await trio.to_thread.run_sync(self._packs.append, objects)
        # What the pack file grew by stays charged (kept or not, it is on disk until the pack
        # is evicted, which credits the file's size); the rest was never written.
        self.ledger.credit(sum(len(data) for _, data in objects) - grown)
        self._packs.kept(placed)
        if error is not None:
            log.warning("cache disk: %d small objects not kept (%s)", len(objects), error)

    async def _store_files(self, wanted: list[tuple[str, bytes]]) -> None:
        """Give reserved objects a data file each: one thread hand-off (that creates, locks
        and writes the files) and one index transaction for all of them."""
        # The thread's locks become the leases afterwards: a lease taken here first would
        # open each file and read its record on the trio thread, and these records are
        # whole and verified, so the index gets them as they are (one transaction).
        opened, complete, error = await trio.to_thread.run_sync(
            _create_locked, [(self._file(sha), data) for sha, data in wanted])
        leased: list[str] = []
        try:
            for sha, fd in zip((sha for sha, _ in wanted), opened, strict=False):
                self._leases[sha] += 1
                leased.append(sha)
                if self._leases[sha] > 1:
                    os.close(fd)  # leased here already: that lease keeps the file
                else:
                    self._lease_fds[sha] = fd
            written: list[tuple[str, Record]] = []
            for sha, data in wanted[:complete]:
                record = self._record(sha, len(data))
                self.ledger.credit(record.bytes_present())  # charged above as a whole
                record.blocks = (1 << record.block_count()) - 1
                record.verified = True
                written.append((sha, record))
            if error is not None:
                self.ledger.credit(sum(len(data) for _, data in wanted[complete:]))
                log.warning("cache disk: %d of %d objects not kept (%s)",
                            len(wanted) - complete, len(wanted), error)
            # Whole and verified: another process's record of one has nothing to add.
            set_rows(self._index, [(sha, _to_raw(record)) for sha, record in written])
            self._dirty.difference_update(sha for sha, _ in written)
        finally:
            for sha in leased:
                self._release(sha)

    def _keep_fresh(self, sha: str, data: bytes) -> None:
        if sha in self._fresh or len(data) > FRESH_BYTES // 8:
            return
        self._fresh[sha] = data
        self._fresh_bytes += len(data)
        while self._fresh_bytes > FRESH_BYTES:
            self._forget_fresh(next(iter(self._fresh)))

    def _forget_fresh(self, sha: str) -> None:
        self._fresh_bytes -= len(self._fresh.pop(sha))

    async def _read_uncached(self, source: Source, offset: int, end: int) -> bytes:
        parts: list[bytes] = []
        async with source.fetch(offset, end) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                self.stats.bytes_fetched += len(chunk)
        return b"".join(parts)

    async def ensure(self, source: Source, first: int, last: int) -> bool:
        """Make blocks ``first..last`` present; True if anything had to be fetched."""
        async with self._leased(source.sha256) as fd:
            return await self._ensure(source, first, last, fd)

    async def _ensure(self, source: Source, first: int, last: int, fd: int) -> bool:
        sha = source.sha256
        record = self._record(sha, source.size)
        last = min(last, record.block_count() - 1)
        fetched = False
        if not all(record.has(i) for i in range(first, last + 1)):
            self._learn(sha, record)  # another process may have fetched them
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
                        nursery.start_soon(self._fetch_run, source, record, run[0], run[-1],
                                           fd)
            except BaseExceptionGroup as group:
                from ahmount.nurseries import first_error

                raise first_error(group) from group
            for event in wait_for:
                await event.wait()
            record = self._records.get(sha) or self._record(sha, source.size)
        if all(record.has(i) for i in range(first, last + 1)):
            return fetched
        raise OSError(5, f"could not fetch blocks {first}-{last} of blob {sha}")

    async def _fetch_run(self, source: Source, record: Record, first: int, last: int,
                         fd: int) -> None:
        """Fetch blocks ``first..last`` with one ranged request, writing them as they arrive
        (a few blocks per write, so that thread hand-offs stay few) through ``fd``, the
        descriptor of the object's lease."""
        sha = source.sha256
        start, end = first * BLOCK, min((last + 1) * BLOCK, source.size)
        index = first
        # A run that is the whole object (a small file, a file read from its start in one
        # request) is hashed as it is written, in the same thread hand-offs: it arrives
        # verified, and no reader waits for the file to be read back and hashed.
        # (Only where a read would be verified inline anyway: a larger object's reader is
        # answered first and the object checked behind it.)
        hasher = hashlib.sha256() if start == 0 and end == source.size <= VERIFY_INLINE \
            and not record.blocks else None
        try:
            async with self._fetch_limit:
                if source.reads_directly and end - start >= DIRECT_MIN:
                    await self._fetch_run_directly(source, record, first, end, fd, hasher)
                    return
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
                            await self._store_blocks(sha, record, fd, index, take, whole,
                                                     hasher, arrived_end >= end)
                            index += -(-whole // BLOCK)
                            pending_bytes -= whole
                if index <= last:
                    raise OSError(5, f"hub sent a short range for blob {sha}")
        finally:
            for i in range(first, last + 1):
                event = self._inflight.pop((sha, i), None)
                if event is not None:
                    event.set()

    async def _fetch_run_directly(self, source: Source, record: Record, first: int, end: int,
                                  fd: int, hasher: Any) -> None:
        """:meth:`_fetch_run` for a source that reads into buffers in a worker thread
        (:mod:`ahmount.client.direct_reads`): the thread reads each :data:`WRITE_BATCH` of
        the run, writes it through ``fd`` (and feeds ``hasher``), and posts it to the trio
        thread to be marked present, so readers waiting for early blocks of a long run go on
        while the rest arrives. Posting does not wait for the trio thread (busy answering the
        kernel, it would hold the stream up: the hub's sends stall while nobody reads the
        socket); what it finds (evicted meanwhile, a corrupt object) stops the thread at its
        next piece. The run's bytes are reserved before it starts; what was not written when
        it stops (evicted, cancelled, failed) is given back."""
        sha = source.sha256
        start = first * BLOCK
        size = end - start
        self._reserve(sha, size)
        token = trio.lowlevel.current_trio_token()
        marked = posted = processed = 0
        stop = False
        failure: BaseException | None = None
        caught_up: trio.Event | None = None

        def mark(offset: int, length: int, digest: str | None) -> None:  # the trio thread
            nonlocal marked, processed, stop, failure
            try:
                if stop:
                    return
                self.stats.bytes_fetched += length
                if self._records.get(sha) is not record:
                    stop = True  # evicted meanwhile (its file is gone)
                    return
                marked += length
                self._mark_blocks(sha, record, first + offset // BLOCK, length, digest)
            except BaseException as exc:  # a corrupt object: raised by the awaiting task
                failure, stop = exc, True
            finally:
                processed += 1
                if caught_up is not None and processed == posted:
                    caught_up.set()

        def consume(view: memoryview, offset: int) -> bool:  # the worker thread
            nonlocal posted
            trio.from_thread.check_cancelled()  # stop between pieces when the reader left
            if stop:
                return False
            final = offset + len(view) == size
            digest = _pwritev_hashing(fd, [view], start + offset, hasher, final)
            posted += 1
            token.run_sync_soon(mark, offset, len(view), digest)
            return True

        buffer = self._buffers.pop() if self._buffers else bytearray(WRITE_BATCH)
        try:
            await trio.to_thread.run_sync(source.read_into, start, end, memoryview(buffer),
                                          consume)
        except OSError as exc:
            _raise_if_disk_full(sha, exc)
            raise
        finally:
            self._buffers.append(buffer)
            if processed < posted:  # marks still queued: they run next, shielded or not
                caught_up = trio.Event()
                with trio.CancelScope(shield=True):
                    await caught_up.wait()
            # Charged and never marked.
            self.ledger.credit(size - marked)
        if failure is not None:
            raise failure
        if marked < size and self._records.get(sha) is record:
            raise OSError(5, f"hub sent a short range for blob {sha}")

    async def _write_counted(self, sha: str, record: Record, fd: int,
                             buffers: list[bytes | memoryview], offset: int, size: int,
                             hasher: Any = None, final: bool = False
                             ) -> tuple[bool, str | None]:
        """Reserve ``size`` bytes and write ``buffers`` at ``offset`` through the lease's
        ``fd`` in a worker thread (``hasher`` fed in the same hand-off: its digest after the
        ``final`` part), counted in the bytes used for the caller to mark present. False
        when the object was evicted while it was written (then nothing stays counted); no
        room, or a full disk under the cache, raises ``_NoSpace``."""
        self._reserve(sha, size)  # charged now, before the thread yields control
        try:
            digest = await trio.to_thread.run_sync(_pwritev_hashing, fd, buffers, offset,
                                                   hasher, final)
        except BaseException as exc:
            self.ledger.credit(size)
            if isinstance(exc, OSError):
                _raise_if_disk_full(sha, exc)
            raise
        if self._records.get(sha) is not record:
            self.ledger.credit(size)  # evicted while we wrote: the file is gone already
            return False, None
        return True, digest

    async def _store_blocks(self, sha: str, record: Record, fd: int, first: int,
                            buffers: list[bytes | memoryview], size: int,
                            hasher: Any = None, final: bool = False) -> None:
        """Write ``size`` bytes (whole blocks from block ``first``; the object's last block
        may be short), gathered from ``buffers`` without joining them, and mark them present.
        ``hasher`` (the whole object's, fed in order) is updated in the same thread hand-off;
        at the ``final`` write it decides: the object is verified, or none of it is kept."""
        kept, digest = await self._write_counted(sha, record, fd, buffers, first * BLOCK, size,
                                                 hasher, final)
        if kept:
            self._mark_blocks(sha, record, first, size, digest)

    def _mark_blocks(self, sha: str, record: Record, first: int, size: int,
                     digest: str | None) -> None:
        """Blocks of ``size`` bytes from ``first``, written and counted in the bytes used,
        are present (or, when ``digest`` says the whole object arrived corrupted, none of
        it is kept); their waiting readers go on."""
        count = -(-size // BLOCK)
        touched = range(first, first + count)
        before = record.bytes_in(touched)
        record.blocks |= ((1 << count) - 1) << first
        # Pages of these blocks that random reads kept were charged already.
        self.ledger.credit(size - (record.bytes_in(touched) - before))
        for index in range(first, first + count):
            record.pages.pop(index, None)
        self._dirty.add(sha)
        if digest is not None:
            if digest != sha:
                log.error("blob %s arrived hashing to %s; not kept", sha, digest)
                self._forget_blocks(sha, record)
                for index in range(first, first + count):
                    self._inflight.pop((sha, index), trio.Event()).set()
                raise ChecksumMismatch(f"blob {sha} arrived corrupted (hash {digest})")
            if record.complete():
                record.verified = True
        for index in range(first, first + count):
            self._inflight.pop((sha, index), trio.Event()).set()

    async def _verify(self, sha: str, record: Record, inline: bool) -> None:
        if sha in self._verifying:
            return  # one hash of an object at a time; readers do not wait for a background one
        # Marked now, not when the check starts: every read of a whole, unverified object
        # asks for it, and those until a spawned check first runs must not start more (a
        # 1 GiB object read cold was hashed twice over while it was read, 0.6 s each).
        self._verifying.add(sha)

        async def check() -> None:
            try:
                async with self._leased(sha):
                    # Re-read under this lease: the object may have been evicted (and its
                    # record replaced) since the read that asked for the check.
                    current = self._records.get(sha)
                    if current is None or current.size != record.size or \
                            not current.complete():
                        log.info("blob %s was evicted before it was verified", sha)
                        return
                    path = self._path(sha)
                    actual = (await run_stoppable(lambda stop: hash_file(path, stop)))[0]
                    if actual == sha:
                        current.verified = True
                        self._dirty.add(sha)
                        return
                    log.error("cached blob %s hashed to %s; dropped", sha, actual)
                    self._forget_blocks(sha, current)
            finally:
                self._verifying.discard(sha)
            self._drop(sha)  # unless a reader (here or elsewhere) still has it open
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
            try:
                self._spawn(f"verification of {sha[:12]}", check_in_background)
            except BaseException:
                self._verifying.discard(sha)
                raise
        else:
            self._verifying.discard(sha)

    async def copy_to(self, source: Source, dest: Path) -> None:
        """Write the whole object to ``dest`` (copy-on-write of a branch file): through the
        cache when it fits, else streamed from the hub."""
        packed = await self._packs.read(source.sha256, source.size, 0, source.size)
        if packed is not None:
            await trio.to_thread.run_sync(dest.write_bytes, packed)
            return
        try:
            async with self._leased(source.sha256):
                if source.size:
                    await self.ensure(source, 0, (source.size - 1) // BLOCK)
                record = self._records.get(source.sha256)
                if record is None or not record.complete():
                    raise _NoSpace()
                await trio.to_thread.run_sync(shutil.copyfile, self._path(source.sha256),
                                              dest)
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
        self._packs.spawn = spawn

    def prefetch(self, source: Source, first: int, last: int) -> None:
        """Start fetching blocks in the background (read-ahead); errors are only logged."""
        if self._spawn is None:
            return
        self._spawn(f"read-ahead of {source.sha256[:12]}",
                    lambda: self.ensure_quietly(source, first, last))

    async def ensure_quietly(self, source: Source, first: int, last: int) -> None:
        """:meth:`ensure` for work ahead of any reader: no room is no error, and a failure is
        only logged (the read that needs the blocks reports its own)."""
        try:
            await self.ensure(source, first, last)
        except _NoSpace:
            pass
        except EXPECTED as exc:
            log.debug("read-ahead of %s failed: %s", source.sha256, exc)

    def _missed_randomly(self, source: Source) -> None:
        """Count a random reader's miss; at the :data:`FILL_AFTER`-th, an object that fits
        starts filling (:meth:`fill`)."""
        sha = source.sha256
        limit = self.max_bytes // FILL_SHARE if self.fill_limit is None else self.fill_limit
        if sha in self._filling or source.size > limit:
            return
        if len(self._random_misses) > 10_000:  # bounded: forget the counts, not the objects
            self._random_misses.clear()
        self._random_misses[sha] += 1
        if self._random_misses[sha] >= FILL_AFTER:
            del self._random_misses[sha]
            self.fill(source)

    def fill(self, source: Source) -> None:
        """Fetch every block of the object not here yet, in the background, in runs of
        :data:`FILL_RUN` blocks, :data:`FILL_STREAMS` at a time (reads of a block being
        filled wait for it; the others go on fetching pages). Stops quietly, every stream,
        when the cache has no room or a fetch fails; errors are only logged (the reads
        report their own)."""
        sha = source.sha256
        if self._spawn is None or sha in self._filling:
            return
        self._filling.add(sha)
        blocks = -(-source.size // BLOCK)

        runs = iter(range(0, blocks, FILL_RUN))  # shared: each run is taken by one stream
        #: The first stream's failure: it stops the others, and the fill ends with it below.
        failed: list[BaseException] = []
        stops: tuple[type[BaseException], ...] = (ChecksumMismatch, _NoSpace, *EXPECTED)

        async def stream(all_streams: trio.CancelScope) -> None:
            try:
                for first in runs:
                    await self.ensure(source, first, min(first + FILL_RUN, blocks) - 1)
            except stops as exc:
                failed.append(exc)
                all_streams.cancel()

        async def run() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(FILL_STREAMS):
                        nursery.start_soon(stream, nursery.cancel_scope)
                if failed:
                    raise failed[0]
                record = self._records.get(sha)
                if record is not None and record.complete() and not record.verified:
                    # Checked here, behind the readers, so that none of them waits for it.
                    await self._verify(sha, record, inline=True)
            except (ChecksumMismatch, _NoSpace):
                pass  # a corrupt object is dropped and logged (the next reads fetch it again)
            except EXPECTED as exc:
                log.debug("fill of %s stopped: %s", sha, exc)
            finally:
                self._filling.discard(sha)

        log.debug("random reads of %s: filling the rest of its %d bytes", sha, source.size)
        self.stats.fills += 1
        self._spawn(f"fill of {sha[:12]}", run)


def _read_whole(source: Source, start: int, stop: int, buffer: bytearray) -> None:
    """Bytes ``[start, stop)`` of ``source`` read into ``buffer`` (exactly that long), in a
    worker thread; a short answer is an error."""
    got = 0

    def consume(view: memoryview, offset: int) -> bool:
        nonlocal got
        got = offset + len(view)
        return True

    source.read_into(start, stop, memoryview(buffer), consume)
    if got != stop - start:
        raise OSError(5, f"hub sent {got} of {stop - start} bytes of blob {source.sha256}")


def _raise_if_disk_full(sha: str, exc: OSError) -> None:
    """:class:`_NoSpace` for a write that found the disk under the cache full (whatever
    --cache-size says): readers then get their bytes straight from the hub, not an error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.warning("cache disk full writing blob %s: reading without the cache (%s)", sha, exc)
        raise _NoSpace() from exc


def _from_raw(raw: Any) -> Record | None:
    if not isinstance(raw, dict):
        return None
    try:
        pages = {int(k): int(v) for k, v in (raw.get("pages") or {}).items()}
        return Record(int(raw["size"]), int(raw["blocks"]), bool(raw["verified"]),
                      float(raw["last_used"]), pages)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _pages_within(record: Record, file_size: int) -> dict[int, int]:
    """The record's pages that the data file holds all of (a power cut may have lost the
    end of a write: those are fetched again)."""
    kept: dict[int, int] = {}
    for index, bitmap in record.pages.items():
        for bit in range(PAGES_PER_BLOCK):
            page = index * PAGES_PER_BLOCK + bit
            if bitmap >> bit & 1 and min((page + 1) * PAGE, record.size) <= file_size:
                kept[index] = kept.get(index, 0) | 1 << bit
    return kept


def _to_raw(record: Record) -> dict[str, Any]:
    raw: dict[str, Any] = {"size": record.size, "blocks": record.blocks,
                           "verified": record.verified, "last_used": record.last_used}
    if record.pages:
        raw["pages"] = {str(k): v for k, v in record.pages.items()}
    return raw


def _pwritev_hashing(fd: int, buffers: list[bytes | memoryview], offset: int,
                     hasher: Any, final: bool) -> str | None:
    """:func:`pwritev_all`, feeding ``hasher`` too; its digest after the ``final`` part."""
    _pwritev_all(fd, buffers, offset)
    if hasher is None:
        return None
    for buffer in buffers:
        hasher.update(buffer)
    return str(hasher.hexdigest()) if final else None


def _open_locked(path: str) -> tuple[int, os.stat_result]:
    """Open (made if missing) and share-lock an object's data file: a lease's hold on it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # its fan-out directory is not made yet
            os.makedirs(os.path.dirname(path), exist_ok=True)
            continue
        # Exclusive holders (evicting, sweeping) hold it for a few syscalls.
        fcntl.flock(fd, fcntl.LOCK_SH)
        stat = os.fstat(fd)
        if stat.st_nlink > 0:
            return fd, stat
        os.close(fd)  # evicted between open and lock: take the new file


def _create_locked(files: list[tuple[str, bytes]]) -> tuple[list[int], int, OSError | None]:
    """Open, lock (:func:`_open_locked`) and write each whole file, in a worker thread. The
    locked descriptors in order, how many of their files were written whole, and the error
    that stopped it (the files after it are not opened)."""
    fds: list[int] = []
    written = 0
    try:
        for path, data in files:
            fd, _ = _open_locked(path)
            fds.append(fd)
            _pwritev_all(fd, [data], 0)
            written += 1
    except OSError as exc:
        return fds, written, exc
    return fds, written, None


