"""Byte ranges: the one Range header form the API takes (a single ``bytes=`` range, or a
suffix), and blob chunks streamed from a blocking iterator without blocking the loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import anyio
import anyio.to_thread

from ahmount import errors

#: A range up to this size is read in one worker-thread hand-off and sent as one body;
#: larger ones stream (a chunk per hand-off).
WHOLE_BODY = 4 << 20
#: A range of a local blob up to this size is read on the event loop: a page a random reader
#: missed costs less to read than the thread hand-off would (~0.2 ms here).
INLINE_READ = 256 << 10


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is not a single byte range")
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            return max(size - suffix, 0), size
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is malformed") from None
    if start >= size or end <= start:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is outside the {size}-byte object")
    return start, end


def answer_range(header: str | None, size: int,
                 headers: dict[str, str]) -> tuple[int, int, int]:
    """``(status, start, end)`` of a read of a ``size``-byte object with the Range
    ``header``: 200 for the whole, 206 for a range (``Content-Range`` added to ``headers``);
    ``Content-Length`` added either way."""
    byte_range = parse_range(header, size)
    start, end = byte_range or (0, size)
    headers["content-length"] = str(end - start)
    if byte_range is None:
        return 200, start, end
    headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return 206, start, end


async def iterate(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    sentinel = b""
    while True:
        chunk = await anyio.to_thread.run_sync(next, chunks, sentinel)
        if chunk is sentinel or not chunk:
            return
        yield chunk


class Readable(Protocol):
    """A blob or object a caller may read (``ReadableObject``, ``GrantedBlob``)."""

    def read(self, start: int, end: int) -> Iterator[bytes]: ...

    def read_cached(self, start: int, end: int) -> bytes | None: ...


async def whole_body(blob: Readable, start: int, end: int, local: bool) -> bytes:
    """Bytes ``[start, end)`` (at most :data:`WHOLE_BODY`) as one body. From a local store,
    a small range, or one the page cache holds whole, is read on the event loop: a worker
    thread's hand-off costs more than such a read (1 MiB GETs from 8 clients: 2.35 -> 1.7 ms
    of the hub's CPU each). Anything that may wait for a disk or a network goes to a
    worker thread."""
    if local:
        if end - start <= INLINE_READ:
            return b"".join(blob.read(start, end))
        cached = blob.read_cached(start, end)
        if cached is not None:
            return cached
    return await anyio.to_thread.run_sync(lambda: b"".join(blob.read(start, end)))
