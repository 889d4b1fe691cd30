"""Content-addressed blob stores: the bytes of every object, stored once per sha256.

A blob becomes visible under its hash only after all its bytes arrived, hashed to that value,
and were made durable: a local store writes a temp file, fsyncs it and renames it into place;
an S3 store completes a multipart upload only after the hash checked out. An upload in
progress lives under its own id, so it can be resumed at the offset the store reports and a
killed upload leaves nothing half-visible.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ahmount.errors import (
    ChecksumMismatch,
    Conflict,
    InvalidArgument,
    NotFound,
    RangeNotSatisfiable,
    StorageFull,
)

READ_CHUNK = 4 << 20
#: Small blobs a local store opens and asks the disk for at once (bounded: several batches
#: are read at a time, under the process's limit of open files).
READ_TOGETHER = 64


class BlobStore(Protocol):
    """What the hub needs from a blob store. Every method is blocking; callers in async code
    run them in a worker thread."""

    #: Reads are reads of local files: a small one (a page a random reader misses) costs
    #: less than a thread hand-off, so a server may make it on its event loop.
    local_reads: bool

    def size(self, sha256: str) -> int | None:
        """The blob's size, or ``None`` if it is not stored."""

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` of the blob in chunks. Raises NotFound."""

    def read_cached(self, sha256: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the blob when the page cache holds them all (no wait
        for a disk: a server may read them on its event loop); None otherwise, or when the
        store cannot tell. Raises NotFound."""

    def open_file(self, sha256: str) -> int | None:
        """A descriptor of the blob's file, opened for reading (the caller closes it), for a
        server to send it with ``sendfile``; None when the store keeps no local file.
        Raises NotFound."""

    def read_small(self, blobs: list[tuple[str, int]]) -> list[bytes]:
        """The whole bytes of each ``(sha256, size)``, in order, in one call (a batch of small
        files): the store fetches them together. Raises NotFound."""

    def store_small(self, blobs: list[tuple[str, bytes]]) -> None:
        """Publish whole blobs whose bytes the caller hashed to their sha256 (a batch
        upload's small files), many in one call; durable only after :meth:`sync`."""

    def start_upload(self, upload_id: str, local: bool = False) -> None:
        """Prepare an empty upload under ``upload_id``. ``local``: it will be written and
        finished within this process (one request), so the store may keep it here."""

    def upload_received(self, upload_id: str) -> int:
        """How many bytes of the upload are durably stored (where to resume)."""

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (which must equal the bytes received so far); returns
        the new count. Raises Conflict on a wrong offset."""

    def finish_upload(self, upload_id: str, sha256: str, size: int, durable: bool = True) -> None:
        """Verify size and hash and make the blob visible. On a mismatch the upload is
        discarded and ChecksumMismatch / InvalidArgument raised. With ``durable=False`` the
        caller makes it durable later with :meth:`sync` (many small blobs, one flush)."""

    def sync(self) -> None:
        """Make every blob finished so far durable."""

    def abort_upload(self, upload_id: str) -> None:
        """Discard an upload; no error if it is gone."""

    def delete(self, sha256: str) -> None:
        """Remove a blob; no error if it is gone."""

    def hashes(self) -> Iterator[str]:
        """Every stored blob's hash."""

    def presign(self, sha256: str) -> str | None:
        """A URL from which a client may read the blob straight from the store (it sends its
        own Range there), or None when this store makes none or the operator did not allow
        it."""


@contextlib.contextmanager
def room_errors(what: str) -> Iterator[None]:
    """A full disk (or quota) while ``what`` is written: :class:`StorageFull`, an answer
    the client can act on (507), not a crash of the request. Whatever the write left is the
    caller's to drop, as for any failure."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageFull(f"the hub's blob store has no room left for {what} "
                          f"({os.strerror(exc.errno)}): nothing of it was kept; the hub's "
                          "operator must free space") from exc


def hash_mismatch(actual: str, sha256: str) -> ChecksumMismatch:
    """The error for uploaded bytes that hash to ``actual``, sent as blob ``sha256``."""
    return ChecksumMismatch(f"uploaded bytes hash to {actual}, not to blob {sha256}")


def check_range(sha256: str, size: int, start: int, end: int) -> None:
    empty_read_of_empty_blob = size == 0 and start == 0 and end == 0
    if (start < 0 or end < start or (size > 0 and start >= size) or end > size) and not (
        empty_read_of_empty_blob
    ):
        raise RangeNotSatisfiable(
            f"byte range {start}-{end - 1} is outside blob {sha256} of {size} bytes"
        )


class LocalBlobStore:
    """Blobs as files ``ROOT/ab/<sha256>``; uploads as ``ROOT/uploads/<id>``.

    One level of 256 directories, not two: a cold read of a small blob then costs one
    directory lookup fewer, and the directories a batch of blobs lands in are few enough to
    stay cached. Reading 4,096 cold 4 KiB blobs grouped as :meth:`read_small` reads them took
    22-34 us a blob in one level against 88-96 us in ``ab/cd/`` (where a dataset's blobs
    spread over up to 65,536 directories: one read from disk for nearly every blob's
    directory). ext4's hashed directories keep a lookup fast with millions of entries in
    one. Blobs that a hub wrote before, under ``ROOT/ab/cd/<sha256>``, are read, listed and
    deleted where they are.
    """

    local_reads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self._uploads = root / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # blobs are private bytes (uploads move into place, 0600)

    def _path(self, sha256: str) -> str:
        """Where the blob is written, and looked for first."""
        return f"{self.root}/{sha256[:2]}/{sha256}"  # a str: pathlib's joining costs more

    def _places(self, sha256: str) -> tuple[str, str]:
        """Where the blob may lie, in the order to look: this layout's place, then where a
        hub before the one-level layout put it."""
        return self._path(sha256), f"{self.root}/{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def _open(self, sha256: str) -> int:
        """The blob's file, opened for reading, wherever it lies. Raises NotFound."""
        for path in self._places(sha256):
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                pass
        raise NotFound(f"blob {sha256} is not stored")

    def _upload_path(self, upload_id: str) -> Path:
        if not upload_id.replace("-", "").isalnum():
            raise InvalidArgument(f"upload id {upload_id!r} is malformed")
        return self._uploads / upload_id

    def size(self, sha256: str) -> int | None:
        for path in self._places(sha256):
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                pass
        return None

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        with open(self._open(sha256), "rb") as handle:
            check_range(sha256, os.fstat(handle.fileno()).st_size, start, end)
            # The first chunk asked of the disk at once, not a read-ahead window at a time
            # (a cold 1 MiB read here: 1.35-1.59 ms -> 0.79-1.15 ms; 200 cold 1 MiB GETs
            # from ah-server, 6 at a time: 209-213 -> 216-235 a second).
            os.posix_fadvise(handle.fileno(), start, min(end - start, READ_CHUNK),
                             os.POSIX_FADV_WILLNEED)
            handle.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = handle.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise NotFound(f"blob {sha256} is shorter than its record")
                remaining -= len(chunk)
                yield chunk

    def open_file(self, sha256: str) -> int | None:
        return self._open(sha256)

    def read_cached(self, sha256: str, start: int, end: int) -> bytes | None:
        fd = self._open(sha256)
        try:
            check_range(sha256, os.fstat(fd).st_size, start, end)
            buffer = bytearray(end - start)
            try:
                # RWF_NOWAIT: EAGAIN, or a short count, rather than a wait for the disk.
                done = os.preadv(fd, [buffer], start, os.RWF_NOWAIT)
            except OSError:  # not cached (EAGAIN), or a file system without it
                return None
            return bytes(buffer) if done == len(buffer) else None
        finally:
            os.close(fd)

    def read_small(self, blobs: list[tuple[str, int]]) -> list[bytes]:
        contents: list[bytes] = []
        for start in range(0, len(blobs), READ_TOGETHER):
            contents += self._read_together(blobs[start:start + READ_TOGETHER])
        return contents

    def _read_together(self, blobs: list[tuple[str, int]]) -> list[bytes]:
        # Every file is opened and its bytes asked for (readahead) before any is read: read
        # one by one, each cold read waits for the disk alone; asked for together, the disk
        # gets them at once and merges neighbours (blobs uploaded together lie together).
        # 100 cold 4 KiB files here: 120-330 us each one by one, 62-70 us together.
        fds: list[int] = []
        try:
            for sha256, size in blobs:
                if not size:
                    fds.append(-1)
                    continue
                fd = self._open(sha256)
                fds.append(fd)
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
            contents: list[bytes] = []
            for (sha256, size), fd in zip(blobs, fds, strict=True):
                data = os.pread(fd, size, 0) if size else b""
                while 0 < len(data) < size:  # rare: a short read
                    more = os.pread(fd, size - len(data), len(data))
                    if not more:
                        break
                    data += more
                if len(data) != size:
                    raise NotFound(f"blob {sha256} is shorter than its record")
                contents.append(data)
            return contents
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def store_small(self, blobs: list[tuple[str, bytes]]) -> None:
        """Each blob written to a private temp file and renamed into place: four system calls
        a blob, where an upload's start, append and finish (a file touched, reopened, read
        back to hash it) took a dozen and a worker-thread hand-off each. Uploading 30,000
        small files cost ah-server ~700 us of CPU a blob that way."""
        for sha256, data in blobs:
            temp = f"{self._uploads}/{uuid.uuid4().hex}"
            with room_errors(f"blob {sha256}"):
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    view = memoryview(data)
                    with room_errors(f"blob {sha256}"):
                        while view:
                            view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                final = self._path(sha256)
                try:
                    os.replace(temp, final)
                except FileNotFoundError:  # the first blob of its directory
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(temp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise

    def start_upload(self, upload_id: str, local: bool = False) -> None:
        with room_errors(f"upload {upload_id}"):
            self._upload_path(upload_id).touch(mode=0o600)

    def upload_received(self, upload_id: str) -> int:
        try:
            return self._upload_path(upload_id).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"upload {upload_id} does not exist") from None

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        path = self._upload_path(upload_id)
        try:
            handle = path.open("r+b")
        except FileNotFoundError:
            raise NotFound(f"upload {upload_id} does not exist") from None
        with handle:
            received = os.fstat(handle.fileno()).st_size
            if offset != received:
                # 409, as tus answers an offset mismatch: the client asks where to go on.
                raise Conflict(
                    f"upload {upload_id} has {received} bytes; a write at offset {offset} "
                    "would leave a gap or overwrite"
                )
            handle.seek(offset)
            with room_errors(f"upload {upload_id}"):
                handle.write(data)
                handle.flush()  # here, not at close: a full disk is this write's failure
            # No fsync per chunk: finish_upload hashes and fsyncs once, and a chunk torn by a
            # crash is caught there by the hash.
            return offset + len(data)

    def finish_upload(self, upload_id: str, sha256: str, size: int, durable: bool = True) -> None:
        path = self._upload_path(upload_id)
        try:
            actual_size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"upload {upload_id} does not exist") from None
        if actual_size != size:
            self.abort_upload(upload_id)
            raise InvalidArgument(
                f"upload of blob {sha256} is truncated: {actual_size} of {size} bytes arrived"
            )
        digest = hashlib.sha256()
        with path.open("rb") as handle, room_errors(f"blob {sha256}"):
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
            if durable:
                os.fsync(handle.fileno())
        if digest.hexdigest() != sha256:
            self.abort_upload(upload_id)
            raise hash_mismatch(digest.hexdigest(), sha256)
        final = Path(self._path(sha256))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        if durable:
            _fsync_dir(final.parent)

    def sync(self) -> None:
        """One syncfs of the store's file system (cheaper than an fsync per small blob)."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _libc is None or _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def abort_upload(self, upload_id: str) -> None:
        self._upload_path(upload_id).unlink(missing_ok=True)

    def delete(self, sha256: str) -> None:
        for path in self._places(sha256):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def presign(self, sha256: str) -> str | None:
        return None  # a directory has no URL of its own: reads go through the hub

    def hashes(self) -> Iterator[str]:
        for first in self.root.iterdir():
            if len(first.name) != 2 or not first.is_dir():
                continue
            for entry in first.iterdir():
                if len(entry.name) == 64:
                    yield entry.name
                elif len(entry.name) == 2 and entry.is_dir():  # ab/cd/: the layout before
                    yield from (blob.name for blob in entry.iterdir() if len(blob.name) == 64)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_libc = _load_libc()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
