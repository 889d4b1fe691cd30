"""Blobs from local files to the hub: one streamed PUT for a small file, many small files in
one batch request, and the resumable-upload protocol for large ones (segments of
:data:`SEGMENT`, resumed where the hub says it stopped, after a dropped connection or in the
next process, whose unfinished upload ids :class:`UnfinishedUploads` keeps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ahmount import errors
from ahmount.client.http import CHUNK, HttpSession, Progress

log = logging.getLogger("ahmount.client")

#: Blobs above this size go through a resumable upload in segments of this size.
SEGMENT = 64 << 20
MAX_RESYNCS = 5  # offset corrections per upload before giving up


class Uploads:
    """Uploads through one session; unfinished resumable uploads are remembered in
    ``unfinished``."""

    def __init__(self, http: HttpSession, unfinished: UnfinishedUploads) -> None:
        self._http = http
        self._unfinished = unfinished

    async def upload_batch(self, files: Sequence[tuple[Path, str, int]],
                           progress: Progress | None = None) -> None:
        """Upload many small files as blobs in one request: ``(path, sha256, size)`` each."""
        total = sum(size for _, _, size in files)
        body = _batch_body(files, progress)
        await self._http.send("POST", "/api/v1/blobs/batch", content=body,
                         headers={"x-ah-batch-bytes": str(total)})

    async def upload_file(self, path: Path, sha256: str, size: int,
                          progress: Progress | None = None) -> None:
        """Upload a local file as blob ``sha256``: one streamed PUT for small files, a
        resumable upload in segments for large ones (resumed where the hub says it stopped)."""
        if size <= SEGMENT:
            content = _file_chunks(path, 0, size, progress)
            await self._http.send("PUT", f"/api/v1/blobs/{sha256}", content=content,
                             headers={"x-ah-size": str(size), "content-length": str(size)})
            return
        upload_id, received = await self._resume_or_start(sha256, size)
        if upload_id is None:
            if progress:
                progress(size)
            return
        try:
            failures = resyncs = 0
            while received < size:
                end = min(received + SEGMENT, size)
                try:
                    result = await self._http.json(
                        "PATCH", f"/api/v1/uploads/{upload_id}",
                        content=_file_chunks(path, received, end, progress),
                        headers={"upload-offset": str(received),
                                 "content-length": str(end - received)},
                    )
                    received = int(result["received"])
                    failures = 0
                except (errors.HubUnavailable, errors.Conflict) as exc:
                    # A dropped connection, or the hub holding other bytes than we thought
                    # (the tail of a request cut earlier landed after we asked): ask it.
                    if isinstance(exc, errors.Conflict):
                        resyncs += 1
                        if resyncs > MAX_RESYNCS:
                            raise
                    else:
                        failures += 1
                        if failures > self._http.retries:
                            raise
                    status = await self._http.json("GET", f"/api/v1/uploads/{upload_id}")
                    log.warning("upload of %s interrupted at %d bytes; resuming at %d", path,
                                received, status["received"])
                    received = int(status["received"])
            await self._http.json("POST", f"/api/v1/uploads/{upload_id}/finish")
        except BaseException:
            # A later upload of the same blob through this client continues this one.
            self._unfinished.keep(sha256, upload_id)
            raise

    async def _resume_or_start(self, sha256: str, size: int) -> tuple[str | None, int]:
        """An unfinished upload of ``sha256`` this client began (and where the hub says it
        stopped), or a new one; ``(None, size)`` when the hub has the blob already. Taking
        the id out of the map keeps two concurrent uploads of one blob apart."""
        upload_id = self._unfinished.take(sha256)
        if upload_id is not None:
            try:
                status = await self._http.json("GET", f"/api/v1/uploads/{upload_id}")
            except errors.NotFound:
                pass  # finished, aborted or collected meanwhile: start again
            except BaseException:
                self._unfinished.keep(sha256, upload_id)  # still ours to resume next time
                raise
            else:
                log.info("resuming upload of blob %s at %d bytes", sha256, status["received"])
                return upload_id, int(status["received"])
        started = await self._http.json("POST", "/api/v1/uploads",
                                   json={"sha256": sha256, "size": size})
        if started["id"] is None:
            return None, size
        return str(started["id"]), int(started.get("received", 0))


class UnfinishedUploads:
    """Ids of resumable uploads a client began and did not finish, by blob, per hub and API
    key: in memory, or in a directory (a diskcache, safe across processes) so that ``ah
    commit`` run again after Ctrl-C, or a restarted mount, continues them. Taking an id removes
    it, which keeps two concurrent uploads of one blob apart."""

    def __init__(self, where: Path | None, scope: str) -> None:
        self._scope = scope
        self._memory: dict[str, str] = {}
        self._disk: Any = None
        if where is not None:
            from ahmount.disposable_cache import open_index

            # Damaged, the ids are dropped: an unfinished upload then starts over.
            self._disk = open_index(where, "the ids of unfinished uploads", size_limit=16 << 20)

    def _key(self, sha256: str) -> str:
        return f"{self._scope} {sha256}"

    def take(self, sha256: str) -> str | None:
        if self._disk is None:
            return self._memory.pop(self._key(sha256), None)
        found = self._disk.pop(self._key(sha256), None)
        return found if isinstance(found, str) else None

    def keep(self, sha256: str, upload_id: str) -> None:
        if self._disk is None:
            self._memory[self._key(sha256)] = upload_id
        else:
            self._disk.set(self._key(sha256), upload_id, expire=7 * 86400)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()


#: The small files of a batch read per worker-thread hand-off. Reading each through its own
#: hand-offs (open, seek, read) cost the client more than the bytes: 30,000 files of a few
#: bytes took ~400 us of CPU each, most of it waking threads.
READ_TOGETHER_FILES = 64
READ_TOGETHER_BYTES = 4 << 20


async def _batch_body(files: Sequence[tuple[Path, str, int]],
                      progress: Progress | None) -> AsyncIterator[bytes]:
    manifest = {"blobs": [{"sha256": sha, "size": size} for _, sha, size in files]}
    yield json.dumps(manifest).encode() + b"\n"
    group: list[tuple[Path, int]] = []
    group_bytes = 0
    for index, (path, _, size) in enumerate(files):
        group.append((path, size))
        group_bytes += size
        if len(group) < READ_TOGETHER_FILES and group_bytes < READ_TOGETHER_BYTES and \
                index + 1 < len(files):
            continue
        data = await anyio.to_thread.run_sync(_read_whole, list(group))
        group.clear()
        group_bytes = 0
        if progress:
            progress(len(data))
        yield data


def _read_whole(files: list[tuple[Path, int]]) -> bytes:
    """The first ``size`` bytes of each file, back to back."""
    parts = []
    for path, size in files:
        with path.open("rb") as handle:
            data = handle.read(size)
        if len(data) < size:
            raise errors.InvalidArgument(f"{path} shrank while it was being uploaded")
        parts.append(data)
    return b"".join(parts)


async def _file_chunks(path: Path, start: int, end: int,
                       progress: Progress | None) -> AsyncGenerator[bytes, None]:
    handle = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        await anyio.to_thread.run_sync(handle.seek, start)
        remaining = end - start
        while remaining > 0:
            chunk = await anyio.to_thread.run_sync(handle.read, min(CHUNK, remaining))
            if not chunk:
                raise errors.InvalidArgument(f"{path} shrank while it was being uploaded")
            remaining -= len(chunk)
            if progress:
                progress(len(chunk))
            yield chunk
    finally:
        handle.close()
