"""Open files of the tree and the registry that knows them.

* :class:`ReadHandle`: an object of the hub opened for reading, pinned to the bytes it
  opened (one commit, one path, one hash) whatever the branch does meanwhile, with its own
  read-ahead window.
* :class:`WriteHandle`: a queued file of a branch, read and written through its local bytes
  in the change queue's directory.
* :class:`Handles`: every open handle. Write handles of a path follow it through renames
  and are *orphaned* when it is unlinked or replaced: an orphan keeps working on its bytes
  alone and nothing it does reaches the queue any more (POSIX unlink semantics).

Handles live on the trio thread only; nothing here is shared with worker threads.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ahmount.hub.models import AssetAddr
from ahmount.vfs.hub_view import HubView
from ahmount.vfs.object_cache import BLOCK, ObjectCache
from ahmount.vfs.tree import Node

READAHEAD_START = 2 * BLOCK
READAHEAD_MAX = 128 * BLOCK  # reached after 128 MiB read in order (the window doubles)


@dataclass
class HubSource:
    """An object's bytes at one commit: what a read handle pins."""

    view: HubView
    asset: AssetAddr
    commit_id: str
    path: str
    sha256: str
    size: int

    @asynccontextmanager
    async def fetch(self, start: int, end: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.view.open_object(self.asset, self.commit_id, self.path,
                                         start, end, self.sha256) as response:
            yield response.aiter_bytes()

    @property
    def reads_directly(self) -> bool:
        return self.view.hub.reads_directly

    def read_into(self, start: int, end: int, buffer: memoryview,
                  consume: Callable[[memoryview, int], bool]) -> int:
        return self.view.hub.read_into(self.asset, self.commit_id, self.path, start, end,
                                       buffer, consume, self.sha256)


@dataclass(eq=False)  # handles are compared (and hashed) by identity
class ReadHandle:
    source: HubSource
    mode: int = 0o444  # the permission bits the file showed when opened (fstat after unlink)
    immutable: bool = False  # in a tag or commit: its bytes can never change under the path
    next_offset: int = 0
    window: int = READAHEAD_START
    prefetched_to: int = 0

    async def read(self, cache: ObjectCache, off: int, size: int) -> bytes:
        source = self.source
        # A kernel sends several reads of one stream at once (as many as its read-ahead
        # holds), slightly out of order: a read near the stream's front, or inside what this
        # handle has already asked to prefetch, counts as sequential. "Near" is two blocks,
        # the mount's 1 MiB kernel read-ahead and then some: a wider margin (tried: 8 MiB,
        # for a 4 MiB read-ahead) takes random readers of mid-size objects for streams.
        front = max(self.prefetched_to, self.next_offset + 2 * BLOCK)
        sequential = self.next_offset - 2 * BLOCK <= off <= front
        if not sequential:
            self.window = READAHEAD_START
            self.prefetched_to = off
        elif off > 0:
            self.window = min(self.window * 2, READAHEAD_MAX)
        # A random reader fetches pages, not blocks: a 4 KiB read at a random offset of a
        # large object waits for 64 KiB, not 1 MiB (or two, when it straddles blocks).
        data = await (cache.read(source, off, size) if sequential or source.size <= BLOCK
                      else cache.read_pages(source, off, size))
        end = off + len(data)
        self.next_offset = max(self.next_offset, end) if sequential else end
        if sequential and self.next_offset < source.size:
            # Read ahead in large runs (one ranged request each), refilled whenever less than
            # half a window lies ahead: few requests, many bytes in flight, bounded memory
            # (blocks stream to the cache file as they arrive).
            target = min(self.next_offset + self.window, source.size)
            start = max(self.prefetched_to, self.next_offset)
            if target - start >= self.window // 2 or target == source.size > start:
                cache.prefetch(source, start // BLOCK, (target - 1) // BLOCK)
                self.prefetched_to = target
        return data


@dataclass(eq=False)
class WriteHandle:
    """An open queued file of a branch: reads and writes go to its local bytes."""

    branch: str
    path: str
    fd: int
    dirty: bool = False  # written since the queue last recorded its size
    written: bool = False  # written at all through this handle
    mtime: float | None = None  # set while dirty; recorded with the size
    may_write: bool = True  # opened for writing (a commit snapshots such files by copy)
    mode: int = 0o644  # the file's permission bits when opened (fstat after unlink)
    copied_seq: int | None = None  # this open copied a head object into the queue as seq
    orphaned: bool = False  # its name was unlinked or replaced: the open file lives on alone
    mid_change: bool = False  # written since the writer last flushed or fsynced: a commit
    #                           leaves the file queued rather than take it half-written
    shown: Node | None = None  # what the file was last shown as (see VFS.writer_mtime)
    unwritten: int = 0  # bytes written since the last start_writeout
    #: Why a write (or fsync) through this handle failed, once one did: the file's bytes are
    #: incomplete (see :meth:`VFS._write_failed`).
    failed: str | None = None
    failed_shown: bool = False  # the front end made what it shows of the file follow

    def mark_written(self) -> None:
        self.dirty = self.written = self.mid_change = True


Handle = ReadHandle | WriteHandle


@dataclass
class HandleStat:
    """What ``fstat`` of an open handle shows (its name may be gone)."""

    size: int
    mode: int
    mtime_ns: int | None


class Handles:
    """The open file handles of one session."""

    def __init__(self) -> None:
        self._open: set[Handle] = set()

    def add(self, handle: Handle) -> Handle:
        self._open.add(handle)
        return handle

    def discard(self, handle: Handle) -> None:
        self._open.discard(handle)

    def __contains__(self, handle: object) -> bool:
        return handle in self._open

    def __len__(self) -> int:
        return len(self._open)

    def writers(self, branch: str, path: str | None = None) -> list[WriteHandle]:
        """Open write handles of queued files of ``branch`` (at ``path``, if given) that
        still have a name."""
        return [h for h in self._open if isinstance(h, WriteHandle) and not h.orphaned and
                h.branch == branch and (path is None or h.path == path)]

    def orphan(self, branch: str, path: str | None = None) -> None:
        """The file at ``path`` lost its name (unlink, or a rename over it); without a
        ``path``, every file of the branch did (its queued changes were set aside)."""
        for handle in self.writers(branch, path):
            handle.orphaned = True

    def rehome(self, branch: str, old: str, new: str) -> None:
        """Open handles follow their file (or directory) to its new path."""
        for handle in self.writers(branch):
            if handle.path == old:
                handle.path = new
            elif handle.path.startswith(old + "/"):
                handle.path = new + handle.path[len(old):]

    def rebranch(self, old: str, new: str) -> None:
        """Open handles follow their branches when a folder or an asset is renamed (branch
        keys starting with ``old`` now start with ``new``)."""
        for handle in self._open:
            if isinstance(handle, WriteHandle) and handle.branch.startswith(old):
                handle.branch = new + handle.branch[len(old):]

    def dirty(self, branch: str, path: str) -> WriteHandle | None:
        """An open handle with writes the queue has not recorded yet, if any."""
        return next((h for h in self.writers(branch, path) if h.dirty), None)

    def being_written(self, branch: str, path: str) -> bool:
        """True if an open handle wrote to (or truncated, or created) ``path`` since its last
        flush or fsync: its bytes are in the middle of a change the writer has not finished."""
        return any(h.mid_change for h in self.writers(branch, path))

    def open_for_writing(self, branch: str, path: str) -> bool:
        """True if a handle that may write ``path`` of ``branch`` is open."""
        return any(h.may_write for h in self.writers(branch, path))


def handle_stat(handle: Handle) -> HandleStat:
    """``fstat`` of an open handle, from what it holds."""
    if isinstance(handle, WriteHandle):
        st = os.fstat(handle.fd)
        return HandleStat(st.st_size, handle.mode, st.st_mtime_ns)
    return HandleStat(handle.source.size, handle.mode, None)


def read_source(view: HubView, node: Node) -> HubSource:
    """Where the bytes of a file node are read from: its commit and path, or for a queued
    reference (a moved or re-timed head object) where it came from."""
    assert node.entry is not None and node.resolved is not None
    commit_id, path = node.resolved.commit_id, node.entry.path
    if node.queued is not None:
        commit_id, path = node.queued.origin_parts()
    return HubSource(view, node.loc.asset_addr, commit_id, path, node.sha256, node.entry.size)
