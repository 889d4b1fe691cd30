"""File-level helpers of the cache and the queue (``ahmount.vfs.file_io``)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from ahmount.vfs import file_io
from ahmount.vfs.file_io import (
    _sync_file_range,
    cached_pages,
    in_page_cache,
    load_into_memory,
    pread_unstalled,
    split_buffers,
    start_writeout,
)


def evict_from_memory(path: Path) -> None:
    """Let the page cache drop ``path``'s bytes (written out first: dirty pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pages_in_memory(path: Path) -> list[bool]:
    """Which pages of ``path`` the page cache holds (``mincore`` of a mapping no page of
    which is touched: unlike a read, even a ``RWF_NOWAIT`` one, it starts no read-ahead)."""
    size = path.stat().st_size
    count = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    with path.open("rb") as handle, \
            mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            vector = (ctypes.c_ubyte * count)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size),
                            vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return [bool(v & 1) for v in vector]
        finally:
            del start  # the mapping closes only once no buffer of it is exported


def test_a_range_is_in_the_page_cache_once_read_and_not_once_dropped(tmp_path: Path) -> None:
    """Every page of the range is counted, and counting reads nothing in: the answers are
    the same however fast the disk is."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    evict_from_memory(path)
    plain = os.open(path, os.O_RDONLY)
    try:
        if cached_pages(plain, 0, 4096) is None:
            pytest.skip("the kernel has no cachestat (Linux 6.5)")
        os.posix_fadvise(plain, 0, 0, os.POSIX_FADV_RANDOM)  # no read-around either
        assert not any(pages_in_memory(path))
        assert not in_page_cache(plain, 0, 4096)
        assert not any(pages_in_memory(path))  # asking read nothing in
        os.pread(plain, 4096, 0)  # the first page only
        os.pread(plain, 4096, 3 * 4096)  # and the fourth
        assert pages_in_memory(path)[:5] == [True, False, False, True, False]
        assert in_page_cache(plain, 0, 4096) and in_page_cache(plain, 100, 200)
        assert not in_page_cache(plain, 0, 8192)  # its last page is not
        assert not in_page_cache(plain, 8192, 12288)
        assert not in_page_cache(plain, 0, 4 * 4096)  # first and last are, one between not
        assert pages_in_memory(path)[:5] == [True, False, False, True, False]
        assert cached_pages(plain, 100, 4 * 4096 - 1) == 2
        assert in_page_cache(plain, 1 << 20, (1 << 20) + 10)  # past the end: nothing to wait
        os.pread(plain, 4096, (1 << 20) - 4096)  # the last page
        assert in_page_cache(plain, (1 << 20) - 4096, (1 << 20) + 4096)  # partly past it
        assert not in_page_cache(plain, (1 << 20) - 8192, (1 << 20) + 4096)
    finally:
        os.close(plain)


def test_without_cachestat_a_missing_page_is_never_reported_as_present(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe of a kernel before 6.5 starts the read of a page it asks for, and may see
    it arrive: True is then true. What must not happen is True for a page still out."""
    monkeypatch.setattr(file_io, "_cachestat_works", False)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * 4096))
    evict_from_memory(path)
    plain = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(plain, 0, 0, os.POSIX_FADV_RANDOM)
        answers = []
        for page in range(0, 64, 2):
            answers.append(in_page_cache(plain, page * 4096, page * 4096 + 10))
            assert not answers[-1] or pages_in_memory(path)[page]
        assert not all(answers)  # most probes return before the disk does
        os.pread(plain, 4096, 0)
        assert in_page_cache(plain, 0, 4096)
    finally:
        os.close(plain)


async def test_a_read_that_must_wait_for_the_disk_waits_in_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    evict_from_memory(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert await pread_unstalled(fd, 5000, 1 << 20) == (data[1 << 20:(1 << 20) + 5000],
                                                            True)
        assert await pread_unstalled(fd, 5000, 1 << 20) == (data[1 << 20:(1 << 20) + 5000],
                                                            False)
        assert await pread_unstalled(fd, 10, len(data) - 4) == (data[-4:], True)
        assert await pread_unstalled(fd, 0, 0) == (b"", False)
    finally:
        os.close(fd)


async def test_the_caller_may_close_its_descriptor_while_a_disk_read_waits(
        tmp_path: Path) -> None:
    """The read in the thread uses a duplicate: a pack closed by a rescan meanwhile (or a
    number reused by a file opened since) cannot change what it reads."""
    path, other = tmp_path / "f", tmp_path / "other"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    other.write_bytes(bytes(1 << 20))
    evict_from_memory(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    got: list[tuple[bytes, bool]] = []

    async def reader() -> None:
        got.append(await pread_unstalled(fd, 1 << 20, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        os.close(fd)
        reused = os.open(other, os.O_RDONLY)  # most likely the number just freed
    os.close(reused)
    assert got == [(data, True)]


def test_the_writeout_binding_reaches_the_system_call(tmp_path: Path) -> None:
    """``sync_file_range`` through ctypes with 64-bit offsets: a wrong binding would pass
    garbage lengths (EINVAL) or never be found; a bad descriptor is the kernel's EBADF."""
    call = _sync_file_range()
    assert call is not None  # glibc on Linux has it
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(3 << 20), 5 << 30)  # past 4 GiB: offsets must be 64-bit
        assert call(fd, 5 << 30, 3 << 20, 2) == 0
        assert call(fd, 0, -1, 2) == -1 and ctypes.get_errno() == errno.EINVAL
        start_writeout(fd, 5 << 30, 3 << 20)
    finally:
        os.close(fd)
    assert call(fd, 0, 4096, 2) == -1 and ctypes.get_errno() == errno.EBADF
    start_writeout(fd, 0, 4096)  # best effort: a closed descriptor changes nothing


def test_split_buffers_cuts_one_buffer_at_most() -> None:
    head, rest = split_buffers([b"abc", b"defg", b"h"], 5)
    assert b"".join(bytes(b) for b in head) == b"abcde"
    assert b"".join(bytes(b) for b in rest) == b"fgh" and len(rest) == 2


def test_a_whole_file_is_brought_into_memory_past_one_read_ahead(tmp_path: Path) -> None:
    """One ``POSIX_FADV_WILLNEED`` of a whole file reads only the kernel's read-ahead size
    of it (8 MiB of 32 here); piece by piece, all of it."""
    from tests.conftest import wait_until

    path = tmp_path / "f"
    path.write_bytes(os.urandom(32 << 20))
    evict_from_memory(path)
    load_into_memory(str(path))
    wait_until(lambda: all(pages_in_memory(path)), timeout=15, what="every page in memory")
    load_into_memory(str(tmp_path / "gone"))  # advice: a missing file changes nothing
