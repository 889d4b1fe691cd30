"""The one place that turns errors into exit codes, for ``ah``, ``ah-mount`` and
``ah-server`` alike. A plain ``ValueError`` (not :class:`InvalidArgument`) is a bug, and
exits 1 like any other."""

from __future__ import annotations

import httpx

from ahmount import errors

OK = 0
FAILURE = 1
USAGE = 2  # argparse's own code for bad command lines, reused for bad arguments

_CODES: list[tuple[type[BaseException], int]] = [
    # Corrupt bytes are no bad input of the caller's (they are a subclass of it, for the
    # API's ValueError contract).
    (errors.ChecksumMismatch, FAILURE),
    (errors.InvalidArgument, USAGE),
    (errors.NotFound, 3),
    (errors.AlreadyExists, 4),
    (errors.Unauthenticated, 5),
    (errors.PermissionDenied, 5),
    (errors.Conflict, 6),
    (errors.HubUnavailable, 7),
    (errors.StorageFull, 9),
    (httpx.HTTPError, 7),
    (OSError, 8),
]


#: What each code means, for ``ah --help`` and the README.
EXIT_CODE_MEANINGS: list[tuple[int, str]] = [
    (OK, "done"), (FAILURE, "failed (a corrupt download, or a bug)"),
    (USAGE, "bad command line or bad argument"), (3, "not found"), (4, "already exists"),
    (5, "not allowed (no or bad API key, no permission, read-only)"),
    (6, "conflict (changed meanwhile, or busy)"), (7, "hub unreachable"),
    (8, "local file system error"), (9, "the hub is out of storage"), (130, "interrupted"),
    (141, "output pipe closed (ah ... | head)"),
]


def exit_code(exc: BaseException) -> int:
    """Exit code for an error: 2 bad input, 3 not found, 4 already exists, 5 not allowed,
    6 conflict, 7 hub unreachable, 8 local I/O, 9 hub storage full, 1 anything else."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return FAILURE
