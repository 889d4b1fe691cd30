"""Unit tests of the block cache's write helpers and its record of what is present (the cache
itself is tested in test_shared_cache.py and through real mounts in test_mount_read.py)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ahmount.vfs.object_cache import BLOCK, PAGE, Record, _pwritev_all, _split


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


@given(size=st.integers(0, 5 * BLOCK + 1),
       steps=st.lists(st.tuples(st.booleans(), st.integers(0, 5 * BLOCK), st.integers(0, 3))))
def test_counting_a_change_by_its_blocks_matches_counting_everything(
        size: int, steps: list[tuple[bool, int, int]]) -> None:
    """Pages and whole blocks added in any order: what :meth:`Record.add_pages` says it
    added, and :meth:`Record.bytes_in` of every block, agree with a walk of the whole
    record (:meth:`Record.bytes_present`), which is what the ledger must hold."""
    record = Record(size)
    pages_total = max(-(-size // PAGE), 1)
    for whole_block, at, extra in steps:
        before = record.bytes_present()
        if whole_block:
            record.blocks |= 1 << min(at // BLOCK, record.block_count() - 1)
            record.pages.pop(at // BLOCK, None)
        else:
            first = min(at // PAGE, pages_total - 1)
            added = record.add_pages(first, min(first + extra, pages_total - 1))
            assert added == record.bytes_present() - before
        assert record.bytes_in(range(record.block_count())) == record.bytes_present()
