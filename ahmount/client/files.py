"""Files to and from local disk: hashing, downloads written atomically after their hash
checked out (one object per request, or many small ones in one batch stream), and the names
a local file system cannot hold reported as such.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx

from ahmount import errors
from ahmount.client.http import CHUNK, READ_RESUMES, Progress
from ahmount.hub.models import AssetAddr, ObjectEntry

log = logging.getLogger("ahmount.client")

if TYPE_CHECKING:
    from ahmount.client.hub_client import HubClient


class HashingStopped(Exception):
    """A hash was stopped halfway (its caller was cancelled); nothing of it is used."""


def hash_file(path: Path, stop: Callable[[], bool] | None = None) -> tuple[str, int]:
    """``(sha256, size)`` of a local file, read in chunks; :class:`HashingStopped` at the
    first chunk after ``stop()`` says so (a worker thread's hash of a 20 GiB file otherwise
    held Ctrl-C, and a mount's unmount, until its end: minutes)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            if stop is not None and stop():
                raise HashingStopped(f"hashing {path} was stopped")
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def download(hub: HubClient, addr: AssetAddr, ref: str, entry: ObjectEntry,
                   dest: Path, progress: Progress | None = None) -> None:
    """Write an object to ``dest`` atomically (temp file, rename) after checking its
    sha256; on any failure nothing is left under ``dest``."""
    tmp = partial_path(dest)
    digest = hashlib.sha256()
    with local_names(entry.path, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tmp.open("wb") as handle:
                if entry.size >= DIRECT_DOWNLOAD and hub.reads_directly:
                    await anyio.to_thread.run_sync(_download_directly, hub, addr, ref, entry,
                                                   handle, digest, progress)
                elif entry.size:
                    async with hub.open_object(addr, ref, entry.path) as response:
                        async for chunk in response.aiter_bytes(CHUNK):
                            digest.update(chunk)
                            await anyio.to_thread.run_sync(handle.write, chunk)
                            if progress:
                                progress(len(chunk))
            # No fsync: like cp, a download is made visible atomically (rename), and its
            # durability is left to the file system; fsync per file made many small
            # files slow.
            if digest.hexdigest() != entry.sha256:
                raise errors.ChecksumMismatch(
                    f"download of {entry.path!r} hashed to {digest.hexdigest()}, "
                    f"expected {entry.sha256}", path=entry.path,
                )
            os.utime(tmp, (entry.mtime, entry.mtime))
            os.chmod(tmp, entry.mode)  # as committed (git keeps the executable bit too)
            os.replace(tmp, dest)
        except BaseException:
            remove_partial(tmp)
            raise


#: Objects from this size are downloaded by a worker thread reading straight into a buffer
#: (:mod:`direct_reads`), when the hub is behind a socket: no h11 copies on the event loop.
DIRECT_DOWNLOAD = 2 * CHUNK


def _download_directly(hub: HubClient, addr: AssetAddr, ref: str, entry: ObjectEntry,
                       handle: BinaryIO, digest: Any, progress: Progress | None) -> None:
    """The whole object written to ``handle`` and fed to ``digest``, in this worker thread;
    ``progress`` is told on the event loop, and a cancelled caller stops it between pieces."""

    def consume(view: memoryview, offset: int) -> bool:
        anyio.from_thread.check_cancelled()
        handle.write(view)
        digest.update(view)
        if progress:
            anyio.from_thread.run_sync(progress, len(view))
        return True

    hub.read_into(addr, ref, entry.path, 0, entry.size, memoryview(bytearray(4 * CHUNK)),
                  consume)


#: Objects up to this size are hashed on the event loop; larger ones in a worker thread
#: (hashlib lets go of the GIL), so a batch of 1 MiB files does not stall the loop.
HASH_INLINE = 64 << 10


def _sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read_batch(hub: HubClient, addr: AssetAddr, ref: str,
                     entries: Sequence[ObjectEntry]
                     ) -> AsyncGenerator[tuple[ObjectEntry, bytes], None]:
    """Many (small) objects of one commit from one request, each as ``(entry, bytes)`` once
    its sha256 checked out, in the order the hub sends them."""
    groups = read_batch_groups(hub, addr, ref, entries)
    async with contextlib.aclosing(groups) as arriving:
        async for group in arriving:
            for each in group:
                yield each


async def read_batch_groups(hub: HubClient, addr: AssetAddr, ref: str,
                            entries: Sequence[ObjectEntry], grouped: bool = True
                            ) -> AsyncGenerator[list[tuple[ObjectEntry, bytes]], None]:
    """:func:`read_batch` a group at a time, as the hub sends them (the first object alone,
    then the small ones by the hundred): one header to parse and one hand-over per group,
    not per object. A hub that predates groups (or ``grouped=False``) sends a header line
    per object: groups of one.

    An answer that breaks off mid-stream is resumed: the objects not yet sent are asked for
    again (:data:`READ_RESUMES` times), so each object comes exactly once."""
    left = {e.path: e for e in entries}
    resumed = 0
    while True:
        try:
            async with contextlib.aclosing(_batch_groups(hub, addr, ref, left, grouped)) as \
                    groups:
                async for group in groups:
                    yield group
            return
        except _CutShortBatch as exc:
            resumed += 1
            if resumed > READ_RESUMES:
                raise
            delay = hub.http.retry_delay(resumed)
            log.warning("%s; asking for the %d objects not sent in %.1fs", exc, len(left),
                        delay)
            await anyio.sleep(delay)


class _CutShortBatch(errors.HubUnavailable):
    """A batch answer that broke off before its last object (the connection dropped, or
    what came is not what was asked): the objects not yet sent may be asked for again."""


async def _batch_groups(hub: HubClient, addr: AssetAddr, ref: str, left: dict[str, ObjectEntry],
                        grouped: bool) -> AsyncGenerator[list[tuple[ObjectEntry, bytes]], None]:
    """One batch request for the objects of ``left``; each group is taken out of ``left``
    once it checked out, before it is handed on. A failure once the hub has answered is
    :class:`_CutShortBatch`."""
    by_path = dict(left)
    async with hub.open_batch(addr, ref, list(by_path), grouped=grouped) as response:
        grouped = response.headers.get("x-ah-batch") == "grouped"
        chunks = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
        async with contextlib.aclosing(chunks) as raw:
            reader = _StreamReader(raw)
            while left:
                try:
                    headers = _batch_headers(await reader.readline(), grouped, by_path)
                    pieces = await reader.read_each([size for _, size in headers])
                except (errors.HubUnavailable, httpx.TransportError) as exc:
                    raise _CutShortBatch(f"a batch of {addr.at(ref)} broke off: {exc}") \
                        from exc
                group = list(zip([by_path[path] for path, _ in headers], pieces, strict=True))
                for entry, data in group:
                    digest = _sha256_of(data) if len(data) <= HASH_INLINE else \
                        await anyio.to_thread.run_sync(_sha256_of, data)
                    if digest != entry.sha256:
                        raise errors.ChecksumMismatch(
                            f"download of {entry.path!r} did not hash to {entry.sha256}",
                            path=entry.path)
                for entry, _ in group:
                    left.pop(entry.path, None)  # (a hub sending one twice is let be)
                yield group


def _batch_headers(line: bytes, grouped: bool,
                   asked: dict[str, ObjectEntry]) -> list[tuple[str, int]]:
    """``(path, size)`` of each object a header line announces; an answer that is not one
    the request asked for is the hub failing (the caller's reads fetch their own)."""
    try:
        found = json.loads(line)
        items = found if grouped else [found]
        headers = [(str(item["path"]), int(item["size"])) for item in items]
    except (ValueError, TypeError, KeyError) as exc:
        raise errors.HubUnavailable(f"a batch answer has a bad header line ({exc})") from None
    for path, _ in headers:
        if path not in asked:
            raise errors.HubUnavailable(f"a batch answer sent {path!r}, which was not asked for")
    return headers


async def download_batch(hub: HubClient, addr: AssetAddr, ref: str,
                         items: Sequence[tuple[ObjectEntry, Path]],
                         progress: Progress | None = None) -> None:
    """Download many (small) objects of one commit with one request, each written
    atomically to its destination after its sha256 checked out."""
    dests = {e.path: dest for e, dest in items}
    batch = read_batch(hub, addr, ref, [e for e, _ in items])
    async with contextlib.aclosing(batch) as objects:
        async for entry, data in objects:
            await anyio.to_thread.run_sync(write_atomically, dests[entry.path], data,
                                           entry.mtime, entry.mode)
            if progress:
                progress(len(data))


class _StreamReader:
    """Exact reads from a response body (lines and byte counts). A batch packs hundreds of
    objects into one chunk: reads advance a position in the buffer and the consumed front is
    dropped once per chunk, not once per read (that was quadratic)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._pos = 0

    async def _fill(self) -> bool:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return False
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0
        self._buffer += chunk
        return True

    async def readline(self) -> bytes:
        while (end := self._buffer.find(b"\n", self._pos)) < 0:
            if not await self._fill():
                raise _CutShortBatch("batch download ended early")
        line = bytes(self._buffer[self._pos:end])
        self._pos = end + 1
        return line

    async def read_each(self, sizes: list[int]) -> list[bytes]:
        """The next ``sum(sizes)`` bytes, cut into one piece per size (one copy each)."""
        total = sum(sizes)
        while len(self._buffer) - self._pos < total:
            if not await self._fill():
                raise _CutShortBatch("batch download ended early")
        pieces = []
        with memoryview(self._buffer) as view:  # released before the buffer next changes
            at = self._pos
            for size in sizes:
                pieces.append(view[at:at + size].tobytes())
                at += size
        self._pos = at
        return pieces


def partial_path(dest: Path) -> Path:
    """Where a download is written before its rename to ``dest``: a short name of its own,
    so it fits wherever ``dest`` does (a suffix on a 250-byte name would not)."""
    return dest.parent / f".ah-partial-{os.getpid()}-{random.getrandbits(48):012x}"


@contextlib.contextmanager
def local_names(object_path: str, dest: Path) -> Iterator[None]:
    """A name the local file system cannot hold becomes an error naming the object."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise OSError(errno.ENAMETOOLONG,
                      f"object {object_path!r} cannot be saved as {str(dest)[:200]!r}: the "
                      "local file system refuses a name or path that long") from None


def write_atomically(dest: Path, data: bytes, mtime: float, mode: int = 0o644) -> None:
    tmp = partial_path(dest)
    with local_names(dest.name, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_bytes(data)
            os.utime(tmp, (mtime, mtime))
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            remove_partial(tmp)
            raise


def remove_partial(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # a path too long to make is too long to remove
        tmp.unlink(missing_ok=True)


