"""Uploads: hash local files, send the blobs the hub lacks in parallel (small ones many to a
request), and commit them.
"""

from __future__ import annotations

import logging
import uuid

import trio

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, CommitInfo, ObjectEntry
from ahmount.nurseries import open_nursery
from ahmount.transfer.hashes import hash_files
from ahmount.transfer.plan import LocalFile
from ahmount.transfer.progress import Progress

log = logging.getLogger("ahmount.ah")

PARALLEL_TRANSFERS = 4
#: Files up to this size travel in batches, many per request.
SMALL_FILE = 1 << 20
BATCH_BYTES = 32 << 20
BATCH_FILES = 1000


async def commit_files(
    hub: HubClient,
    addr: AssetAddr,
    branch: str,
    message: str,
    deletes: list[str],
    files: list[LocalFile],
    force: bool,
    extra_adds: list[ObjectEntry] | None = None,
) -> CommitInfo | None:
    """Hash ``files``, upload the blobs the hub lacks, and commit deletes-then-adds as one
    atomic commit (``extra_adds``: objects whose blobs the hub has already). Returns the
    commit, or None when nothing changed."""
    adds, _ = await upload_files(hub, files)
    return await hub.commit(addr, branch, message, session=uuid.uuid4().hex, deletes=deletes,
                            adds=[*adds, *(extra_adds or [])], force=force)


async def upload_files(hub: HubClient,
                       files: list[LocalFile]) -> tuple[list[ObjectEntry], int]:
    """Hash ``files`` and upload the blobs the hub lacks (small ones in batches); returns
    their entries, in order, and how many bytes were uploaded."""
    adds = await hash_files(files)
    missing = await hub.missing_blobs([e.sha256 for e in adds]) if adds else set()
    to_upload: dict[str, tuple[LocalFile, ObjectEntry]] = {}
    for f, e in zip(files, adds, strict=True):
        if e.sha256 in missing and e.sha256 not in to_upload:
            to_upload[e.sha256] = (f, e)
    total = len(to_upload)
    progress = Progress("Uploading", total, sum(e.size for _, e in to_upload.values()))
    upload_limiter = trio.CapacityLimiter(PARALLEL_TRANSFERS)
    counter = iter(range(1, total + 1))

    async def upload_one(f: LocalFile, e: ObjectEntry) -> None:
        async with upload_limiter:
            log.debug("Uploading object %d/%d %s", next(counter), total, e.path)
            await hub.upload_file(f.local, e.sha256, e.size, progress.add_bytes)
            progress.file_done()

    async def upload_batch(batch: list[tuple[LocalFile, ObjectEntry]]) -> None:
        async with upload_limiter:
            for _, e in batch:
                log.debug("Uploading object %d/%d %s", next(counter), total, e.path)
            await hub.upload_batch([(f.local, e.sha256, e.size) for f, e in batch],
                                   progress.add_bytes)
            for _ in batch:
                progress.file_done()

    small = [(f, e) for f, e in to_upload.values() if e.size <= SMALL_FILE]
    try:
        async with open_nursery() as nursery:
            for f, e in to_upload.values():
                if e.size > SMALL_FILE:
                    nursery.start_soon(upload_one, f, e)
            for batch in batches(small):
                nursery.start_soon(upload_batch, batch)
    finally:
        progress.close()
    return adds, sum(e.size for _, e in to_upload.values())


def batches(items: list[tuple[LocalFile, ObjectEntry]]
            ) -> list[list[tuple[LocalFile, ObjectEntry]]]:
    """Group small files into requests of at most BATCH_FILES files and BATCH_BYTES bytes."""
    out: list[list[tuple[LocalFile, ObjectEntry]]] = []
    size = 0
    for item in items:
        if not out or len(out[-1]) >= BATCH_FILES or size + item[1].size > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item[1].size
    return out
