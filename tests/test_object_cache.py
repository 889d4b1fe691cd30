"""Unit tests of the block cache's write helpers (the cache itself is tested through real
mounts in test_mount_read.py)."""

from __future__ import annotations

import os
from pathlib import Path

from ahmount.vfs.object_cache import _pwritev_all, _split


def test_split_cuts_at_most_one_buffer_without_copying() -> None:
    buffers: list[bytes | memoryview] = [b"abc", b"defg", b"hi"]
    head, rest = _split(buffers, 5)
    assert b"".join(bytes(b) for b in head) == b"abcde"
    assert b"".join(bytes(b) for b in rest) == b"fghi"
    assert isinstance(head[-1], memoryview)
    head, rest = _split(buffers, 7)
    assert (b"".join(bytes(b) for b in head), rest[0]) == (b"abcdefg", b"hi")
    head, rest = _split(buffers, 9)
    assert rest == [] and b"".join(bytes(b) for b in head) == b"abcdefghi"
    head, rest = _split(buffers, 0)
    assert head == [] and b"".join(bytes(b) for b in rest) == b"abcdefghi"


def test_pwritev_all_writes_every_buffer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        chunks = [bytes([i % 256]) * 100 for i in range(1500)]  # more than IOV_MAX
        _pwritev_all(fd, list(chunks), 10)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:10] == bytes(10) and data[10:] == b"".join(chunks)
