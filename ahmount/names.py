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


#: Characters no name, path, label or content type may hold: C0 and C1 controls and DEL
#: (terminal escapes, header injection, names the mount cannot show).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: In free text (descriptions, commit messages) newlines and tabs are fine.
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MAX_TEXT = 65536
#: Seconds since the epoch an mtime may hold: the years 1 to 9999 (what listings can print).
MIN_MTIME, MAX_MTIME = -62_135_596_800.0, 253_402_300_799.0
#: The largest byte count the hub accepts for one blob (a JSON number stays exact below 2^53).
MAX_BLOB_BYTES = 1 << 50
_CONTENT_TYPE_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                              r"(\s*;\s*[ -~]*)?")


def has_control_characters(value: str) -> bool:
    """True if ``value`` breaks the one name rule (C0/C1 controls or DEL)."""
    return CONTROL_CHARACTERS.search(value) is not None


def check_text(value: object, what: str, *, multiline: bool = False,
               max_len: int = MAX_TEXT) -> str:
    """Check free text that is stored and shown again: valid UTF-8 (no lone surrogates), no
    control characters (``multiline`` allows newlines and tabs), at most ``max_len``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8 (it holds a lone surrogate)") from None
    bad = (_CONTROL_IN_TEXT if multiline else CONTROL_CHARACTERS).search(value)
    if bad:
        raise InvalidArgument(f"{what} {value[:40]!r} contains the control character "
                              f"{bad.group()!r}")
    if len(value) > max_len:
        raise InvalidArgument(f"{what} is {len(value)} characters long; at most {max_len}")
    return value


def check_content_type(value: object, what: str) -> str:
    """A media type as HTTP carries it (``type/subtype; params``), printable ASCII only."""
    text = check_text(value, f"content_type of {what}", max_len=255)
    if not _CONTENT_TYPE_RE.fullmatch(text):
        raise InvalidArgument(f"content_type {text!r} of {what} is not a media type "
                              "like 'application/octet-stream'")
    return text


def check_mtime(value: object, what: str) -> float:
    """A finite modification time in seconds since the epoch (years 1 to 9999)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidArgument(f"mtime of {what} must be a number")
    mtime = float(value)
    if not MIN_MTIME <= mtime <= MAX_MTIME:  # also false for NaN and the infinities
        raise InvalidArgument(f"mtime {value!r} of {what} is not a finite time from year 1 to "
                              "9999")
    return mtime


def check_mode(value: object, what: str) -> int:
    """Permission bits of an object: an integer from 0 to 0o777 (no type, setuid or sticky
    bits: the hub keeps regular files only)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise InvalidArgument(f"mode of {what} must be an integer from 0 to 0o777 (511)")
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
    # One name rule for hub, API, CLI and mount: no control characters (a name with a
    # newline could be committed but never fetched; escapes would reach terminals). Names
    # are kept exactly as given, NFC or NFD alike: like git and S3, the hub compares bytes.
    check_text(value, "object path", max_len=MAX_OBJECT_PATH_BYTES)
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
    if value > MAX_BLOB_BYTES:
        raise InvalidArgument(f"size {value} of {what} is over the hub's {MAX_BLOB_BYTES} bytes")
    return value


def is_commit_prefix(value: str) -> bool:
    """True if ``value`` could name a commit (4 to 64 lowercase hex characters)."""
    return MIN_COMMIT_PREFIX <= len(value) <= 64 and bool(_HEX_RE.fullmatch(value))


def check_ref(value: object) -> str:
    """Check a reference: a branch or tag name, or a commit id prefix."""
    if isinstance(value, str) and _HEX_RE.fullmatch(value) and len(value) > MAX_NAME_LEN:
        raise InvalidArgument(f"reference {value[:40]!r}... is too long")
    return check_name(value, "reference")
