"""Downloads: the chosen objects of one commit into a directory, in parallel (small ones many
to a request), each verified and written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import trio

from ahmount.client.files import local_names
from ahmount.client.hub_client import HubClient
from ahmount.errors import InvalidArgument
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.nurseries import open_nursery
from ahmount.transfer.plan import LocalFile, select_objects
from ahmount.transfer.progress import Progress
from ahmount.transfer.upload import PARALLEL_TRANSFERS, SMALL_FILE, batches

log = logging.getLogger("ahmount.ah")


async def download_objects(
    hub: HubClient, addr: AssetAddr, ref: str, wanted: Sequence[str] | None, save_dir: Path
) -> list[Path]:
    """Download objects of one commit into ``save_dir`` (keeping their paths), in parallel,
    each verified and written atomically. Returns the written paths."""
    commit, entries = await hub.list_objects(addr, ref)
    chosen = select_objects(entries, wanted, addr.at(ref))
    save_dir.mkdir(parents=True, exist_ok=True)
    root = save_dir.resolve()
    progress = Progress("Downloading", len(chosen), sum(e.size for e in chosen))
    limiter = trio.CapacityLimiter(PARALLEL_TRANSFERS)
    written: list[Path] = []
    counter = iter(range(1, len(chosen) + 1))

    def destination(e: ObjectEntry) -> Path:
        with local_names(e.path, root / e.path):
            dest = (root / e.path).resolve()
            in_the_way = dest.is_dir()  # found before the bytes travel, not at the rename
        if root not in dest.parents:
            raise InvalidArgument(f"object {e.path!r} would be written outside {root}")
        if in_the_way:
            raise InvalidArgument(f"object {e.path!r} cannot be written to {dest}: a local "
                                  "directory is in the way", path=str(dest))
        return dest

    async def fetch(e: ObjectEntry) -> None:
        dest = destination(e)
        async with limiter:
            log.debug("Downloading object %d/%d %s", next(counter), len(chosen), e.path)
            await hub.download(addr, commit, e, dest, progress.add_bytes)
            progress.file_done()
            written.append(dest)

    async def fetch_batch(batch: list[ObjectEntry]) -> None:
        items = [(e, destination(e)) for e in batch]
        async with limiter:
            for e in batch:
                log.debug("Downloading object %d/%d %s", next(counter), len(chosen), e.path)
            await hub.download_batch(addr, commit, items, progress.add_bytes)
            for _, dest in items:
                progress.file_done()
                written.append(dest)

    small = [e for e in chosen if e.size <= SMALL_FILE]
    try:
        async with open_nursery() as nursery:
            for e in chosen:
                if e.size > SMALL_FILE:
                    nursery.start_soon(fetch, e)
            for batch in batches([(LocalFile(Path(), e.path), e) for e in small]):
                nursery.start_soon(fetch_batch, [e for _, e in batch])
    finally:
        progress.close()
    return sorted(written)
