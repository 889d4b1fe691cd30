"""File writes and checks shared by the object cache's data files and its packs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Literal

import trio

#: The unit the page cache keeps a file's bytes in.
_PAGE = mmap.PAGESIZE


def split_buffers(buffers: list[bytes | memoryview], size: int
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


def pwritev_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
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


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


#: ``cachestat``'s number on x86-64 and arm64 alike (Linux 6.5; the generic table).
_SYS_CACHESTAT = 451


@functools.cache
def _syscall() -> Callable[..., int] | None:
    """libc's ``syscall``, None where absent."""
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    return call


#: False once ``cachestat`` is known to be missing (a kernel before 6.5) or refused.
_cachestat_works = True


def cached_pages(fd: int, offset: int, end: int) -> int | None:
    """How many pages of ``[offset, end)`` of ``fd`` the page cache holds, by ``cachestat``
    (Linux 6.5): it only counts, so unlike a read, even a ``RWF_NOWAIT`` one, it starts no
    read-ahead of what it looks at. None where the kernel cannot tell."""
    global _cachestat_works
    call = _syscall()
    if not _cachestat_works or call is None:
        return None
    first = offset - offset % _PAGE
    span = _CachestatRange(first, end - first)
    stat = _Cachestat()
    if call(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) == 0:
        return int(stat.nr_cache)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _cachestat_works = False
    return None


def in_page_cache(fd: int, offset: int, end: int) -> bool:
    """Whether reading ``[offset, end)`` of ``fd`` would be answered from memory, without
    waiting for the disk. Every page of the range is counted (``cachestat``, which starts no
    read); then its first and last pages are read one byte each with ``RWF_NOWAIT``, which
    fails rather than wait, for a page present but still being read in (another reader's
    read-ahead) counts as cached and yet would wait. Without ``cachestat`` (before Linux
    6.5) only those two probes are made, and a missing page they ask for is read ahead
    meanwhile: the probe itself may then see it arrive. True where the kernel cannot tell
    (the read itself then reports any error)."""
    if end <= offset:
        return True
    counted = cached_pages(fd, offset, end)
    if counted is not None:
        wanted = -(-end // _PAGE) - offset // _PAGE
        if counted < wanted:
            size = os.fstat(fd).st_size  # pages past the end are never cached
            wanted = max(0, -(-min(end, size) // _PAGE) - offset // _PAGE)
            if counted < wanted:
                return False
    probe = bytearray(1)
    pages = (offset,) if offset // _PAGE == (end - 1) // _PAGE else (offset, end - 1)
    for at in pages:
        try:
            os.preadv(fd, [probe], at, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
    return True


async def pread_unstalled(fd: int, size: int, offset: int) -> tuple[bytes, bool]:
    """``os.pread(fd, size, offset)`` for the trio thread, and whether it waited for the
    disk. In place when the bytes are in memory (the usual case: just written, or read
    before); else in a worker thread, on a duplicate of ``fd`` (the caller may close its own
    meanwhile). A read that waits for the disk in place stops every other request of the
    loop: 8 loader workers over a cache whose pages were dropped then read one at a time,
    at the disk's latency each, instead of 8 at once."""
    if size <= 0 or in_page_cache(fd, offset, offset + size):
        return os.pread(fd, size, offset), False
    copy = os.dup(fd)
    try:
        return await trio.to_thread.run_sync(os.pread, copy, size, offset), True
    finally:
        os.close(copy)


#: The piece of a file :func:`load_into_memory` asks for at a time: the kernel reads at most
#: its read-ahead size (128 KiB by default) of each ``POSIX_FADV_WILLNEED``.
_LOAD_PIECE = 128 << 10


def load_into_memory(path: str) -> None:
    """Ask the kernel to read the whole file at ``path`` into the page cache, without
    waiting for the reads (``POSIX_FADV_WILLNEED`` piece by piece: one advice of a whole
    file reads only its first read-ahead's worth). Blocking for a few ms while the reads
    are queued (7-9 ms for 32 MiB here): call it in a worker thread. A file gone, or any
    other error, changes nothing: it is advice."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, os.fstat(fd).st_size, _LOAD_PIECE):
                os.posix_fadvise(fd, offset, _LOAD_PIECE, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def still_linked_at(fd: int, path: str) -> bool:
    """True if ``fd`` is the file ``path`` names now (not one unlinked, or replaced)."""
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (held.st_ino, held.st_dev) == (named.st_ino, named.st_dev)


Removal = Literal["missing", "busy", "gone", "held"]


@contextlib.contextmanager
def removal_lock(path: str) -> Iterator[Removal]:
    """An exclusive ``flock`` on ``path`` taken without waiting, for removing the file:
    ``"missing"`` (no such file), ``"busy"`` (another holds a lock on it), ``"gone"`` (locked,
    but another remover unlinked it first, and the path may name a new file now: leave it),
    or ``"held"``: locked, and still the file the path names (remove it within the block)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield "missing"
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "busy"
            return
        yield "held" if still_linked_at(fd, path) else "gone"
    finally:
        os.close(fd)


#: sync_file_range(2)'s flag: start writing the range's dirty pages out, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (the standard library has no binding), None where absent."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def start_writeout(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of ``fd`` to its disk, without waiting:
    a large file written through the mount then reaches the disk while it is still being
    written, instead of all at the writer's ``fsync``/``sync``. Best effort: nothing is
    promised about durability (that is still fsync's), and a failure changes nothing."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
