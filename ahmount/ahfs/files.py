"""Open ``ah://`` files.

Read mode: the object is pinned at open to the commit its ref resolved to (a read handle of
the mount's kind), its blocks are kept from eviction while it is open, and every read goes
through the block cache, without fsspec's own read-ahead: a file read front to back gets the
mount's read-ahead; a jump (a Parquet reader fetching two column chunks) fetches just the
bytes asked for, keeping the whole blocks among them.

Write modes (``wb``, ``xb``, ``ab``): bytes are spooled to a private file in the state
directory; closing the file commits it (or, inside a transaction, adds it to the
transaction's commit).
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fsspec.spec import AbstractBufferedFile

from ahmount.ahfs.pending import rebase_append
from ahmount.vfs.handles import ReadHandle
from ahmount.vfs.object_cache import BLOCK

if TYPE_CHECKING:
    from ahmount.ahfs.filesystem import AhFileSystem
    from ahmount.ahfs.runtime import Runtime


class AhFile(AbstractBufferedFile):  # type: ignore[misc]
    def __init__(self, fs: AhFileSystem, path: str, mode: str = "rb",
                 block_size: int | None = None, autocommit: bool = True,
                 spool: Path | None = None, message: str | None = None,
                 cache_type: str = "none", appending: tuple[int, bytes] | None = None,
                 exclusive: bool = False, **kwargs: Any) -> None:
        self._spool = spool
        self._message = message
        #: An append's start: the length and sha256 of the bytes it was opened on.
        self._appending = appending
        #: Opened with "x": committed only if no one made the file meanwhile.
        self._exclusive = exclusive
        self._handle: IO[bytes] | None = None
        self._pinned_by: Runtime | None = None
        if "r" in mode:
            source, resolved = fs.open_source(path)
            self.source = source
            self._reader = ReadHandle(source, immutable=resolved.type != "branch")
            self._next = 0
            self._pid = os.getpid()
            super().__init__(fs, path, mode, block_size=block_size or BLOCK,
                             autocommit=autocommit, cache_type=cache_type,
                             size=source.size, **kwargs)
            self.details = {
                "name": path, "size": source.size, "type": "file", "sha256": source.sha256,
                "commit": source.commit_id, "ref_type": resolved.type}
            self._pinned_by = fs.pin_source(source)
        else:
            super().__init__(fs, path, mode, block_size=block_size or 4 * BLOCK,
                             autocommit=autocommit, **kwargs)

    # -- reading ---------------------------------------------------------------------------

    def _fetch_range(self, start: int, end: int) -> bytes:
        fs: AhFileSystem = self.fs
        if self._pid != os.getpid():
            self._reopen_here()
        sequential = start == self._next
        self._next = end
        return fs.read_at(self._reader, start, end, sequential)

    def _reopen_here(self) -> None:
        """A file opened before a fork, read in the child: the same bytes, through the
        child's own runtime (the parent's loop thread does not exist here)."""
        fs: AhFileSystem = self.fs
        self._pid = os.getpid()
        source = replace(self.source, view=fs._runtime().view)
        self.source = source
        self._reader = ReadHandle(source, immutable=self._reader.immutable)
        self._pinned_by = fs.pin_source(source)

    def close(self) -> None:
        """Close; a write commits (see :meth:`commit`). Unlike fsspec's own files this does
        not drop the file system's pinned refs: a write already moved its branch's pin."""
        if getattr(self, "closed", True):  # fsspec's property (untyped)
            return
        try:
            if self.mode == "rb":
                self.cache = None
            elif not self.forced:
                self.flush(force=True)
        finally:
            self.closed = True
            runtime, self._pinned_by = self._pinned_by, None
            if runtime is not None and self._pid == os.getpid():
                runtime.call_soon(runtime.cache.unpin, self.source.sha256)

    # -- writing ---------------------------------------------------------------------------

    def _initiate_upload(self) -> None:
        assert self._spool is not None
        self._handle = self._spool.open("ab")

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self._handle is not None
        self._handle.write(self.buffer.getvalue())
        if final:
            self._handle.close()
            # Inside a transaction too (fsspec would wait for its end): there a commit only
            # hands the bytes to the transaction's changes, and from the close on the
            # transaction's later writes see the file (an append adds to it, an exclusive
            # create finds it there).
            self.commit()
        return True

    def commit(self) -> None:
        """Hand the spooled bytes to a commit (this call's own, or the open transaction's)."""
        if self._spool is None:
            return
        fs: AhFileSystem = self.fs
        spool, self._spool = self._spool, None
        try:
            if self._appending is None and not self._exclusive:
                self._hand_over(spool)
                return
            # An append adds its bytes to the file as it is when committed, so appends of
            # several threads (or of this one, in a transaction) all land, as O_APPEND
            # writes do locally; an exclusive create commits only if no one made the file
            # since its open, as O_EXCL. Threads of this process take turns here; other
            # processes are caught by the hub, which commits only if the file is still
            # as seen here (the commit's ``expect``; docs/ahfs.md).
            with fs.path_lock(self.path):
                if self._exclusive:
                    if fs.exists_now(self.path):
                        raise FileExistsError(
                            errno.EEXIST, f"ah://{self.path} was made by another writer "
                            "while this one (opened with 'x') wrote it: nothing of this one "
                            "was committed")
                    self._hand_over(spool, exclusive=True)
                    return
                assert self._appending is not None
                length, digest = self._appending
                base = fs.append_base(self.path, unless=digest)
                if base.data is not None and hashlib.sha256(base.data).digest() != digest:
                    rebase_append(spool, length, base.data)
                    length = len(base.data)
                self._hand_over(spool, head=(base.head_sha, length) if base.from_head
                                else None)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise

    def _hand_over(self, spool: Path, exclusive: bool = False,
                   head: tuple[str | None, int] | None = None) -> None:
        fs: AhFileSystem = self.fs
        with fs._batch(self._message):
            changes, object_path = fs.changes_for(self.path)
            if self._appending is not None and not exclusive:
                changes.add_append(object_path, spool, head)
            else:
                changes.add_file(object_path, spool, spooled=True, exclusive=exclusive)

    def discard(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)
            self._spool = None
