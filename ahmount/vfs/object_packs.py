"""Small whole objects kept in pack files instead of one data file each.

A data loader's first epoch over a small-file dataset keeps thousands of objects of a few
KiB, arriving in batches (:mod:`ahmount.vfs.sibling_fetch`). One file per object costs a
file creation each, and creating a file is the dearest thing the cache does with a small
object: 20 us on tmpfs, 270-450 us on this VM's ext4 (without a journal, every creation
scans the inode bitmap past recently freed inodes: ``find_inode_bit``/``recently_deleted``
were a fifth of the daemon's CPU in a cold shuffled read of 10,000 x 4 KiB files). Here a
batch costs one ``pwritev`` at the end of a pack and one index transaction.

Layout: ``ROOT/<name>.pack`` holds object bytes back to back; ``ROOT/index`` (diskcache)
maps each packed object's sha256 to ``(pack name, offset, size)``. Only the process that
made a pack appends to it, holding an exclusive ``flock`` on it while it does (until it
rolls over to a new pack at :data:`PACK_BYTES`, or ends): nobody evicts or sweeps a pack
being written. Bytes are written before the index names them, so a crash leaves at most an
unnamed tail; a power cut can leave index rows naming bytes that never reached the disk, so
every process checks an object's sha256 at its first read of it from a pack (a mismatch
drops the row, and the object is fetched again).

Eviction removes whole packs, least recently read first (a pack's mtime is touched at most
every ``LRU_RESOLUTION`` seconds of reads, so other processes see its age). Readers need no
lease: a process reading a pack keeps it open, and the bytes of an unlinked file stay
readable through an open descriptor; it closes the packs that left the index at its next
:meth:`ObjectPacks.rescan`.

The maps here belong to the trio thread; :meth:`ObjectPacks.append` runs in worker threads
(one at a time, under a lock) and touches only the current pack and the index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
import trio

from ahmount.vfs.disk_index import all_rows, set_rows
from ahmount.vfs.file_io import (
    load_into_memory,
    pread_unstalled,
    pwritev_all,
    removal_lock,
    still_linked_at,
)

log = logging.getLogger("ahmount.cache")

#: The largest object kept in a pack (the batches of small files carry up to 256 KiB each).
PACK_OBJECT = 256 << 10
#: A pack is closed to new objects once it holds this many bytes: the unit of eviction.
PACK_BYTES = 32 << 20
#: How stale a pack's last-read time (its mtime) may be.
LRU_RESOLUTION = 60.0

#: Starts background work by name (the session supervisor's ``spawn``).
Spawn = Callable[[str, Callable[[], Awaitable[Any]]], None]
#: Where a packed object is: (pack name, offset, size).
Place = tuple[str, int, int]


def _as_place(raw: object) -> Place | None:
    """An index row as a :data:`Place`; None for anything else (a row of another version)."""
    return raw if isinstance(raw, tuple) and len(raw) == 3 else None


@dataclass
class Pack:
    name: str
    shas: set[str] = field(default_factory=set)
    last_used: float = 0.0
    fd: int | None = None  # O_RDONLY, opened at the first read from it
    #: This process asked the kernel to bring the whole pack into memory.
    loading: bool = False


@dataclass
class _Writer:
    """This process's current pack: appended under an exclusive flock."""

    name: str
    fd: int
    end: int


class ObjectPacks:
    """The packs under ``root``, shared by every process of the object cache there."""

    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir = str(root)
        self._index = diskcache.Cache(str(root / "index"), eviction_policy="none",
                                      cull_limit=0)
        self._where: dict[str, Place] = {}
        self._packs: dict[str, Pack] = {}
        #: Objects whose bytes this process has checked (or written) since it started.
        self._verified: set[str] = set()
        self._lock = threading.Lock()  # appends run in worker threads
        self._writer: _Writer | None = None
        #: Packs this process evicted: an append that was under way then kept nothing.
        self._evicted: set[str] = set()
        self.mismatches = 0
        #: How background work is started (the session's supervisor); none: packs are not
        #: brought into memory ahead of their reads.
        self.spawn: Spawn | None = None
        #: Reads that waited for the disk (in a worker thread): the page cache had dropped
        #: their bytes.
        self.disk_reads = 0

    def _path(self, name: str) -> str:
        return f"{self._dir}/{name}.pack"

    # -- what is where (the trio thread) -----------------------------------------------------

    def rescan(self) -> None:
        """Re-read the shared index (other processes add and evict packs). Packs no longer
        named are closed."""
        where: dict[str, Place] = {}
        packs: dict[str, Pack] = {}
        for sha, raw in all_rows(self._index):
            place = _as_place(raw)
            if place is None:
                continue
            name = place[0]
            pack = packs.get(name)
            if pack is None:
                known = self._packs.get(name)
                pack = packs[name] = Pack(name, fd=known.fd if known else None,
                                          last_used=known.last_used if known else 0.0)
            pack.shas.add(sha)
            where[sha] = place
        for name, pack in self._packs.items():
            if name not in packs and pack.fd is not None:
                os.close(pack.fd)
        for pack in packs.values():
            if not pack.last_used:
                try:
                    pack.last_used = os.stat(self._path(pack.name)).st_mtime
                except FileNotFoundError:
                    pack.last_used = 0.0  # a stale row: its reads find no file, and drop it
        self._where, self._packs = where, packs

    def _pack_files(self) -> list[os.DirEntry[str]]:
        return [entry for entry in os.scandir(self._dir) if entry.name.endswith(".pack")]

    def disk_bytes(self) -> int:
        """The bytes of every pack file: what the packs hold on disk (objects, and the bytes
        of any no row names any more), as the cache's ledger counts them."""
        total = 0
        for entry in self._pack_files():
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total

    def sweep(self) -> int:
        """Remove packs the index names nothing in (a crashed writer's, or all of whose
        objects were packed again elsewhere), unless a live writer holds one; the bytes that
        freed."""
        freed = 0
        for entry in self._pack_files():
            name = entry.name.removesuffix(".pack")
            if name not in self._packs:
                freed += self._remove_file(name) or 0
        return freed

    def has(self, sha: str, size: int) -> bool:
        place = self._where.get(sha)
        return place is not None and place[2] == size

    def count(self) -> int:
        return len(self._where)

    def _find(self, sha: str, size: int) -> Place | None:
        """Where the object is, asking the shared index if this process has not seen it
        packed (another process may have packed it since)."""
        place = self._where.get(sha)
        if place is None:
            place = _as_place(self._index.get(sha))
            if place is None:
                return None
            self._learn(sha, place)
        return place if place[2] == size else None

    def _learn(self, sha: str, place: Place) -> None:
        self._where[sha] = place
        pack = self._packs.get(place[0])
        if pack is None:
            pack = self._packs[place[0]] = Pack(place[0], last_used=time.time())
        pack.shas.add(sha)

    async def read(self, sha: str, size: int, offset: int, end: int) -> bytes | None:
        """Bytes ``[offset, end)`` of the object if it is packed (and true: the first read
        of it in this process checks its hash), else None. A read that must wait for the
        disk waits in a worker thread (:func:`pread_unstalled`)."""
        if size > PACK_OBJECT:
            return None
        place = self._find(sha, size)
        if place is None:
            return None
        name, at, _ = place
        pack = self._packs[name]
        if pack.fd is None:
            try:
                pack.fd = os.open(self._path(name), os.O_RDONLY)
            except FileNotFoundError:  # evicted by another process
                self._forget(sha, place, drop_row=True)
                return None
        now = time.time()
        if now - pack.last_used > LRU_RESOLUTION:
            pack.last_used = now
            with contextlib.suppress(OSError):
                os.utime(pack.fd)
        if sha in self._verified:
            data, waited = await pread_unstalled(pack.fd, end - offset, at + offset)
            checked = len(data) == end - offset
        else:
            data, waited = await pread_unstalled(pack.fd, size, at)
            checked = len(data) == size and hashlib.sha256(data).hexdigest() == sha
            if checked:
                self._verified.add(sha)
                data = data[offset:end]
        if waited:
            self.disk_reads += 1
            self._load(pack)
        if checked:
            return data
        self.mismatches += 1
        log.warning("cache pack %s: object %s is not what its hash says (a write lost to a "
                    "power cut?); fetching it again", name, sha[:12])
        self._forget(sha, place, drop_row=True)
        return None

    def _load(self, pack: Pack) -> None:
        """Bring ``pack`` into memory in the background (once per process), its first read
        having waited for the disk: a pack holds a batch of one directory's small files (or
        a dataset's), what a loader reads all of, and each of their reads in shuffled order
        would otherwise wait for the disk by itself (a new mount on a kept cache: a second
        epoch after a restart). 8 loader workers over 10,000 x 4 KiB on a kept cache:
        3,490 -> 8,149 files/s (medians of 4 alternated rounds)."""
        if pack.loading or self.spawn is None:
            return
        pack.loading = True
        path = self._path(pack.name)
        self.spawn(f"loading of cache pack {pack.name}",
                   lambda: trio.to_thread.run_sync(load_into_memory, path))

    def _forget(self, sha: str, place: Place, drop_row: bool) -> None:
        if self._where.get(sha) == place:
            del self._where[sha]
        pack = self._packs.get(place[0])
        if pack is not None and sha in pack.shas:
            pack.shas.discard(sha)
        self._verified.discard(sha)
        if drop_row:
            with self._index.transact():
                if self._index.get(sha) == place:
                    self._index.delete(sha)

    # -- keeping (worker threads) ------------------------------------------------------------

    def append(self, objects: list[tuple[str, bytes]]
               ) -> tuple[list[tuple[str, Place]], int, OSError | None]:
        """Write ``objects`` (each checked against its sha256 by the caller) to the end of
        this process's pack, then name them in the index: in a worker thread. Returns what
        was kept, how many bytes the pack file grew by (a write cut short by a full disk
        leaves part of it), and the error that kept the rest out."""
        if not objects:
            return [], 0, None
        with self._lock:
            writer: _Writer | None = None
            start = 0
            try:
                writer = self._writable()
                start = at = writer.end
                placed: list[tuple[str, Place]] = []
                for sha, data in objects:
                    placed.append((sha, (writer.name, at, len(data))))
                    at += len(data)
                try:
                    pwritev_all(writer.fd, [data for _, data in objects], writer.end)
                finally:
                    writer.end = max(writer.end, os.fstat(writer.fd).st_size)
                set_rows(self._index, placed)
            except OSError as exc:
                return [], (writer.end - start if writer is not None else 0), exc
            if writer.end >= PACK_BYTES:
                self._close_writer()
            return placed, writer.end - start, None

    def _writable(self) -> _Writer:
        """The current pack, made (and locked) if there is none."""
        if self._writer is not None:
            return self._writer
        while True:
            name = f"{int(time.time())}-{secrets.token_hex(6)}"
            path = self._path(name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if still_linked_at(fd, path):  # not swept between its creation and the lock
                self._writer = _Writer(name, fd, 0)
                return self._writer
            os.close(fd)

    def _close_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer.fd)  # the lock goes with it
            self._writer = None

    def kept(self, placed: list[tuple[str, Place]]) -> None:
        """Record what :meth:`append` kept (the trio thread): those objects are true, but for
        the ones lost to an eviction of their pack meanwhile (the eviction counted their
        bytes freed with the pack file's)."""
        lost = [(sha, place) for sha, place in placed if place[0] in self._evicted]
        if lost:
            with self._index.transact():
                for sha, place in lost:
                    if self._index.get(sha) == place:
                        self._index.delete(sha)
        for sha, place in placed:
            if place[0] in self._evicted:
                continue
            old = self._where.get(sha)
            if old is not None and old != place:
                self._forget(sha, old, drop_row=False)
            self._learn(sha, place)
            self._verified.add(sha)

    # -- eviction (the trio thread) ----------------------------------------------------------

    def ages(self) -> list[tuple[float, str]]:
        """(last read, name) of every pack holding objects."""
        return [(p.last_used, p.name) for p in self._packs.values() if p.shas]

    def evict(self, name: str) -> int | None:
        """Remove a pack and its objects; the bytes that freed (its file's size), or None
        while another process writes to it. Its readers keep reading what they have open."""
        pack = self._packs.get(name)
        if pack is None:
            return 0
        writer = self._writer  # an append only ever starts a new pack, never this one
        if writer is not None and writer.name == name:
            with self._lock:  # after the append under way, if any
                if self._writer is writer:
                    self._close_writer()
        freed = self._remove_file(name)
        if freed is None:
            return None
        with self._index.transact():
            for sha in pack.shas:
                place = self._index.get(sha)
                if isinstance(place, tuple) and place[0] == name:
                    self._index.delete(sha)
        for sha in pack.shas:
            if self._where.get(sha, ("",))[0] == name:
                del self._where[sha]
                self._verified.discard(sha)
        del self._packs[name]
        self._evicted.add(name)
        if pack.fd is not None:
            os.close(pack.fd)
        return freed

    def _remove_file(self, name: str) -> int | None:
        """Unlink a pack unless a writer holds its lock; the bytes that freed (0 if another
        remover took it first), None if a writer holds it."""
        path = self._path(name)
        with removal_lock(path) as state:
            if state == "busy":
                return None
            if state != "held":
                return 0
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                return 0
            return size

    def drop_all(self) -> tuple[int, int]:
        """Evict every pack nobody writes to; how many objects and bytes that dropped."""
        dropped = freed = 0
        for name in list(self._packs):
            count = len(self._packs[name].shas)
            nbytes = self.evict(name)
            if nbytes is not None:
                dropped += count
                freed += nbytes
        return dropped, freed

    def close(self) -> None:
        with self._lock:
            self._close_writer()
        for pack in self._packs.values():
            if pack.fd is not None:
                os.close(pack.fd)
                pack.fd = None
        self._index.close()
