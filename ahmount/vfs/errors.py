"""The file-system core's own refusals: what a POSIX call on the tree may fail with besides the
domain errors of :mod:`ahmount.errors` (``NotFound``, ``AlreadyExists``, ``HubUnavailable``…).

Each names what was refused and why in its message; front ends map them to their own
vocabulary in one place each (the FUSE adapter to errno in :mod:`ahmount.mount.errno_map`,
the fsspec front end to Python's ``OSError`` subclasses). Nothing here knows of FUSE.
"""

from __future__ import annotations


class VfsError(Exception):
    """A refusal the tree chose on purpose; the message says why."""


class NotADirectory(VfsError):
    pass


class IsADirectory(VfsError):
    pass


class ReadOnly(VfsError):
    """A write where nothing may change: a tag, a commit, or a place the user may only read."""


class NotEmpty(VfsError):
    pass


class CrossBranch(VfsError):
    """A move between branches, assets or parents that no single hub call can make."""


class NameTooLong(VfsError):
    pass


class InvalidName(VfsError):
    """A name the hub could never store (control characters, ``/``, not UTF-8), or a call with
    arguments the tree does not support (RENAME_EXCHANGE)."""


class NotPermitted(VfsError):
    """An operation the tree never allows (symlinks, chown, deleting ``main``)."""


class NotSupported(VfsError):
    """An attribute that cannot be set here."""


class NoAttribute(VfsError):
    """No such extended attribute."""


class BadHandle(VfsError):
    """A handle that is not open, or not open for what was asked."""
