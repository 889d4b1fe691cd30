"""The domain exception tree, shared by the hub, its clients, the CLI and the mount.

Every error carries a stable ``code`` (sent over HTTP as JSON and mapped back by the client) and
a message that names the path involved. The classes also derive from the builtin exceptions the
documented ``t9k.ah`` API raises (``RuntimeError`` for "not found" / "already exists" / "not
logged in", ``ValueError`` for bad arguments), so code written against the original keeps
working. HTTP statuses, errno values and CLI exit codes are each derived from this tree in
exactly one place (``server/http_errors.py``, ``mount/errno_map.py``, ``exit_codes.py``).
"""

from __future__ import annotations

from typing import ClassVar

import httpx


class AhError(Exception):
    """Base of every error ahmount raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class InvalidArgument(AhError, ValueError):
    """A name, path, reference, flag or request body is malformed."""

    code = "invalid_argument"


class ChecksumMismatch(InvalidArgument):
    """Uploaded or downloaded bytes do not hash to the sha256 they were announced with."""

    code = "checksum_mismatch"


class NotFound(AhError, RuntimeError):
    """The folder, asset, reference, commit, object or blob does not exist (or is invisible)."""

    code = "not_found"


class AlreadyExists(AhError, RuntimeError):
    """A resource with that name already exists."""

    code = "already_exists"


class PermissionDenied(AhError, RuntimeError):
    """The caller may see the resource but not do this to it."""

    code = "permission_denied"


class Unauthenticated(AhError, RuntimeError):
    """No valid API key was presented (the "not logged in" of the documented API)."""

    code = "unauthenticated"


class Conflict(AhError, RuntimeError):
    """The request clashes with the current state: unknown staged changes, a non-empty
    directory, a reference that moved, a file where a directory is needed."""

    code = "conflict"


class UnknownChanges(Conflict):
    """A commit found staged changes it did not make and was not forced."""

    code = "unknown_changes"


class DirectoryInTheWay(Conflict):
    """An object would be added where a directory of objects is (EISDIR to a writer)."""

    code = "directory_in_the_way"


class FileInTheWay(Conflict):
    """Objects would be added under a path that is an object (ENOTDIR to a writer)."""

    code = "file_in_the_way"


class Changed(Conflict):
    """A commit's precondition failed: an object it expected as the committer last saw it
    (``expect``) is not so in the branch's head any more; nothing was committed."""

    code = "changed"


class RangeNotSatisfiable(InvalidArgument):
    """A byte range lies outside the object."""

    code = "range_not_satisfiable"


class HubUnavailable(AhError, httpx.TransportError):
    """The hub could not be reached or kept failing after retries."""

    code = "unavailable"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        AhError.__init__(self, message, path=path)


class StorageFull(AhError, RuntimeError):
    """The hub's storage (its blob store or its database) has no room left: nothing of the
    write that found it full was kept. Not the caller's doing, and not passing by itself."""

    code = "storage_full"


class TooLarge(InvalidArgument):
    """A request (body, upload) over the hub's limit; refused before it is read."""

    code = "too_large"


class InternalError(AhError, RuntimeError):
    """A bug or an unexpected failure on the hub."""

    code = "internal"


#: Every concrete class by its wire code, for the client's one mapping back from JSON errors.
ERRORS_BY_CODE: dict[str, type[AhError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        ChecksumMismatch,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        Conflict,
        UnknownChanges,
        Changed,
        StorageFull,
        DirectoryInTheWay,
        FileInTheWay,
        RangeNotSatisfiable,
        TooLarge,
        HubUnavailable,
        InternalError,
    )
}
