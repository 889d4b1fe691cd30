"""Moving files between local disk and the hub: the ``add`` grammar, hashing, parallel
uploads and downloads, progress. Shared by the Python API and the CLI.
"""

from __future__ import annotations

import glob
import logging
import mimetypes
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ahmount.client.hub_client import HubClient, hash_file, local_names
from ahmount.config import dirs
from ahmount.errors import InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, CommitInfo, ObjectEntry
from ahmount.names import check_delete_path, check_object_path
from ahmount.nurseries import open_nursery

log = logging.getLogger("ahmount.ah")

PARALLEL_TRANSFERS = 4
PARALLEL_HASHES = 4
#: Files up to this size travel in batches, many per request.
SMALL_FILE = 1 << 20
BATCH_BYTES = 32 << 20
BATCH_FILES = 1000


@dataclass(frozen=True)
class LocalFile:
    """A local file and the object path it becomes."""

    local: Path
    target: str


def _walk(directory: Path, target_dir: str) -> list[LocalFile]:
    out: list[LocalFile] = []
    for root, subdirs, files in os.walk(directory):
        subdirs.sort()
        rel = Path(root).relative_to(directory)
        for name in sorted(files):
            parts = [p for p in (target_dir, *rel.parts, name) if p and p != "."]
            out.append(LocalFile(Path(root) / name, "/".join(parts)))
    return out


def _place(local: Path, target: str | None) -> list[LocalFile]:
    """Where one local file or directory goes. ``target`` None: under its own name at the root.
    A target ending in ``/`` is a directory to put it in; ``[name]`` keeps the name."""
    if not local.exists():
        raise InvalidArgument(f"local path {str(local)!r} does not exist", path=str(local))
    if target is None:
        target = local.name if local.is_file() else local.resolve().name
    else:
        target = target.replace("[", "").replace("]", "")
        if target.endswith("/"):
            target = target + (local.name if local.name not in ("", ".") else
                               local.resolve().name)
    target = target.strip("/")
    if local.is_dir():
        return _walk(local, target)
    if not local.is_file():
        raise InvalidArgument(f"local path {str(local)!r} is not a regular file or directory",
                              path=str(local))
    return [LocalFile(local, target)]


def plan_adds(add: Sequence[str] | Mapping[str, str | None] | None) -> list[LocalFile]:
    """Expand the documented ``add`` forms into ``(local file, object path)`` pairs.

    ``['model.pt']`` → ``model.pt``; ``{'model.pt': 'saved_model/'}`` →
    ``saved_model/model.pt``; ``['./saved_model']`` → ``saved_model/…``;
    ``['./saved_model/*']`` → the directory's contents at the root;
    ``{'./saved_model': 'path/to/[saved_model]'}`` → ``path/to/saved_model/…``;
    ``{'./saved_model': 'path/to/renamed_dir'}`` → ``path/to/renamed_dir/…``.
    A mapping value of ``None`` places that entry as in the list form.
    Raises :class:`InvalidArgument` for a missing local path, a bad object path or two files
    that would land on one object path.
    """
    if add is None:
        return []
    if isinstance(add, str | bytes):
        raise InvalidArgument("add must be a list of local paths or a mapping, not a string")
    pairs: list[tuple[str, str | None]]
    if isinstance(add, Mapping):
        pairs = [(k, v) for k, v in add.items()]
    else:
        pairs = [(p, None) for p in add]
    files: list[LocalFile] = []
    for local, target in pairs:
        if not isinstance(local, str) or (target is not None and not isinstance(target, str)):
            raise InvalidArgument(f"add entry {local!r}: {target!r} must be strings")
        if glob.has_magic(local):
            matches = sorted(glob.glob(local))
            if not matches:
                raise InvalidArgument(f"local pattern {local!r} matches nothing", path=local)
            for match in matches:
                inner = None if target is None else target.rstrip("/") + "/"
                files.extend(_place(Path(match), inner))
        else:
            files.extend(_place(Path(local), target))
    seen: dict[str, Path] = {}
    for f in files:
        try:
            check_object_path(f.target)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{f.local} cannot be added: {exc}", path=str(f.local)) from None
        if f.target in seen and seen[f.target] != f.local:
            raise InvalidArgument(
                f"{seen[f.target]} and {f.local} would both become object {f.target!r}",
                path=f.target,
            )
        seen[f.target] = f.local
    return files


def plan_deletes(delete: Sequence[str] | None) -> list[str]:
    if delete is None:
        return []
    if isinstance(delete, str | bytes):
        raise InvalidArgument("delete must be a list of paths, not a string")
    return [check_delete_path(p) for p in delete]


class HashCache:
    """sha256 of local files, remembered by (path, size, mtime, inode) in a diskcache, so that
    re-committing an unchanged 5 GiB file neither uploads nor re-reads it."""

    def __init__(self) -> None:
        import diskcache

        self._cache = diskcache.Cache(str(dirs().cache / "file-hashes"), size_limit=64 << 20)

    @staticmethod
    def _key(path: Path) -> tuple[str, os.stat_result]:
        st = path.stat()
        return f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}", st

    def lookup(self, paths: Sequence[Path]) -> list[tuple[str, os.stat_result, str | None]]:
        """``(key, stat, cached sha256 or None)`` for each path, in one transaction."""
        out: list[tuple[str, os.stat_result, str | None]] = []
        with self._cache.transact():
            for path in paths:
                key, st = self._key(path)
                cached = self._cache.get(key)
                out.append((key, st, cached if isinstance(cached, str) else None))
        return out

    def store(self, items: Sequence[tuple[str, str]]) -> None:
        """Remember ``(key, sha256)`` pairs, in one transaction."""
        with self._cache.transact():
            for key, sha in items:
                self._cache.set(key, sha)

    def close(self) -> None:
        self._cache.close()


class Progress:
    """Progress bars (files and bytes, with rate) on a terminal; silent when piped."""

    def __init__(self, what: str, files: int, total_bytes: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty() and total_bytes > 0:
            from tqdm import tqdm

            # A terminal that reports no size (a fresh pty) would make tqdm draw nothing.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"{what} 0/{files} files", file=sys.stderr, leave=True,
                             ncols=size.columns, nrows=size.lines)
        self._files = files
        self._done = 0
        self._what = what

    def add_bytes(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def file_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(f"{self._what} {self._done}/{self._files} files")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


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


async def hash_files(files: list[LocalFile]) -> list[ObjectEntry]:
    """Entries (sha256, size, mtime, content type) of local files: hashes remembered from
    earlier runs are looked up in one go; the rest are hashed in parallel worker threads, many
    small files per hand-off."""
    hashes = HashCache()
    try:
        found = await trio.to_thread.run_sync(hashes.lookup, [f.local for f in files])
        shas: list[str | None] = [cached for _, _, cached in found]
        todo = [i for i, sha in enumerate(shas) if sha is None]
        groups: list[list[int]] = []
        size = 0
        for i in todo:  # about 64 MiB or 256 files per hand-off
            if not groups or len(groups[-1]) >= 256 or size > (64 << 20):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += found[i][1].st_size
        limiter = trio.CapacityLimiter(PARALLEL_HASHES)

        async def hash_group(group: list[int]) -> None:
            def work() -> list[str]:
                return [hash_file(files[i].local)[0] for i in group]

            for i, sha in zip(group, await trio.to_thread.run_sync(work, limiter=limiter),
                              strict=True):
                shas[i] = sha

        async with open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(hash_group, group)
        # Remember only hashes of files that did not change while they were read.
        fresh = [(found[i][0], str(shas[i])) for i in todo
                 if files[i].local.stat().st_mtime_ns == found[i][1].st_mtime_ns]
        await trio.to_thread.run_sync(hashes.store, fresh)
    finally:
        hashes.close()
    return [
        ObjectEntry(f.target, str(sha), st.st_size, st.st_mtime,
                    mimetypes.guess_type(f.target)[0] or "application/octet-stream",
                    stat.S_IMODE(st.st_mode) & 0o777)
        for f, (_, st, _), sha in zip(files, found, shas, strict=True)
    ]


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
            log.info("Uploading object %d/%d %s", next(counter), total, e.path)
            await hub.upload_file(f.local, e.sha256, e.size, progress.add_bytes)
            progress.file_done()

    async def upload_batch(batch: list[tuple[LocalFile, ObjectEntry]]) -> None:
        async with upload_limiter:
            for _, e in batch:
                log.info("Uploading object %d/%d %s", next(counter), total, e.path)
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


def select_objects(entries: list[ObjectEntry], wanted: Sequence[str] | None,
                   where: str) -> list[ObjectEntry]:
    """The entries named by ``wanted`` (``a/b`` one object, ``a/b/`` all under it)."""
    if wanted is None:
        return entries
    if isinstance(wanted, str | bytes):
        raise InvalidArgument("objects must be a list of paths, not a string")
    by_path = {e.path: e for e in entries}
    chosen: dict[str, ObjectEntry] = {}
    for item in wanted:
        check_delete_path(item)
        if item.endswith("/"):
            found = [e for e in entries if e.path.startswith(item)]
        else:
            found = [by_path[item]] if item in by_path else []
        if not found:
            raise NotFound(f"no object {item!r} in {where}", path=f"{where}/{item}")
        chosen.update((e.path, e) for e in found)
    return [chosen[p] for p in sorted(chosen)]


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
        if root not in dest.parents:
            raise InvalidArgument(f"object {e.path!r} would be written outside {root}")
        return dest

    async def fetch(e: ObjectEntry) -> None:
        dest = destination(e)
        async with limiter:
            log.info("Downloading object %d/%d %s", next(counter), len(chosen), e.path)
            await hub.download(addr, commit, e, dest, progress.add_bytes)
            progress.file_done()
            written.append(dest)

    async def fetch_batch(batch: list[ObjectEntry]) -> None:
        items = [(e, destination(e)) for e in batch]
        async with limiter:
            for e in batch:
                log.info("Downloading object %d/%d %s", next(counter), len(chosen), e.path)
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
