"""File-level helpers of the cache and the queue (``ahmount.vfs.file_io``)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from ahmount.vfs.file_io import _sync_file_range, split_buffers, start_writeout


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
