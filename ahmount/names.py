"""Validation of every name and path that crosses a boundary (API, HTTP, mount).

Each check raises :class:`~ahmount.errors.InvalidArgument` with a message that names the bad
value and says what is allowed, and returns the value unchanged when it is good.
"""

from __future__ import annotations

import re
from typing import Literal

from ahmount.errors import InvalidArgument

Kind = Literal["model", "dataset"]
KINDS: tuple[Kind, ...] = ("model", "dataset")

#: Users, folders, assets, branches and tags share one grammar: it is safe as a directory name
#: on the mount, in a URL segment and after the ``:`` of a reference.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_NAME_LEN = 128
MAX_SEGMENT_BYTES = 255
MAX_OBJECT_PATH_BYTES = 4096
_HEX_RE = re.compile(r"[0-9a-f]+")
MIN_COMMIT_PREFIX = 4
#: Owners that are not users: ``shared/<kind>`` and ``/public/t9k-assethub/<kind>``.
RESERVED_USER_NAMES = frozenset({"shared", "public"})


def check_name(value: object, what: str) -> str:
    """Check a user, folder, asset, branch or tag name."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} name must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{what} name is empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidArgument(
            f"{what} name {value[:40]!r}... is {len(value)} characters long; "
            f"at most {MAX_NAME_LEN} are allowed"
        )
    if "\x00" in value:
        raise InvalidArgument(f"{what} name {value!r} contains a NUL byte")
    if value in (".", ".."):
        raise InvalidArgument(f"{what} name {value!r} is not allowed")
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} name {value!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter, digit or '_'"
        )
    return value


def check_user_name(value: object) -> str:
    name = check_name(value, "user")
    if name in RESERVED_USER_NAMES:
        raise InvalidArgument(f"user name {name!r} is reserved")
    return name


def check_kind(value: object) -> Kind:
    if value == "model":
        return "model"
    if value == "dataset":
        return "dataset"
    raise InvalidArgument(f"kind {value!r} is not one of 'model', 'dataset'")


def _check_segments(value: str, what: str) -> None:
    for segment in value.split("/"):
        if not segment:
            raise InvalidArgument(f"{what} {value!r} has an empty segment")
        if segment in (".", ".."):
            raise InvalidArgument(f"{what} {value!r} contains a {segment!r} segment")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidArgument(
                f"{what} {value[:60]!r}... has a segment longer than {MAX_SEGMENT_BYTES} bytes"
            )


def check_object_path(value: object) -> str:
    """Check the path of an object inside a commit: ``a/b/c.bin``, relative, no ``.``/``..``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"object path must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidArgument("object path is empty")
    if "\x00" in value:
        raise InvalidArgument(f"object path {value!r} contains a NUL byte")
    if len(value.encode()) > MAX_OBJECT_PATH_BYTES:
        raise InvalidArgument(
            f"object path {value[:60]!r}... is longer than {MAX_OBJECT_PATH_BYTES} bytes"
        )
    if value.startswith("/"):
        raise InvalidArgument(f"object path {value!r} must be relative (no leading '/')")
    if value.endswith("/"):
        raise InvalidArgument(f"object path {value!r} names a directory, not an object")
    _check_segments(value, "object path")
    return value


def check_delete_path(value: object) -> str:
    """Check a path to delete: ``a/b`` is one object, ``a/b/`` everything under ``a/b/``."""
    if isinstance(value, str) and value.endswith("/") and value != "/":
        check_object_path(value[:-1])
        return value
    return check_object_path(value)


def check_prefix(value: object) -> str:
    """Check a listing prefix: empty, or an object path optionally ending in ``/``."""
    if value == "" or value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"prefix must be a string, got {type(value).__name__}")
    return check_delete_path(value)


def check_sha256(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64 or not _HEX_RE.fullmatch(value):
        raise InvalidArgument(f"{value!r} is not a sha256 digest (64 lowercase hex characters)")
    return value


def check_size(value: object, what: str) -> int:
    """Check a byte count: a non-negative integer (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"size of {what} must be a non-negative integer")
    return value


def is_commit_prefix(value: str) -> bool:
    """True if ``value`` could name a commit (4 to 64 lowercase hex characters)."""
    return MIN_COMMIT_PREFIX <= len(value) <= 64 and bool(_HEX_RE.fullmatch(value))


def check_ref(value: object) -> str:
    """Check a reference: a branch or tag name, or a commit id prefix."""
    if isinstance(value, str) and _HEX_RE.fullmatch(value) and len(value) > MAX_NAME_LEN:
        raise InvalidArgument(f"reference {value[:40]!r}... is too long")
    return check_name(value, "reference")
