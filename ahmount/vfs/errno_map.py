"""The one place where errors of any layer become an errno: for the kernel (the mount), the
in-process POSIX test driver and the ``ah://`` file system (which raises the ``OSError``
subclass Python picks for that errno). It lives in the vfs layer because it needs no FUSE.
"""

from __future__ import annotations

import errno

import httpx

from ahmount import errors
from ahmount.vfs import errors as vfs

#: pyfuse3.ENOATTR, without importing pyfuse3: "no such attribute" is ENODATA on Linux.
ENOATTR = errno.ENODATA

_ERRNO: list[tuple[type[BaseException], int]] = [
    (vfs.NotADirectory, errno.ENOTDIR),
    (vfs.IsADirectory, errno.EISDIR),
    (vfs.ReadOnly, errno.EROFS),
    (vfs.NotEmpty, errno.ENOTEMPTY),
    (vfs.CrossBranch, errno.EXDEV),
    (vfs.NameTooLong, errno.ENAMETOOLONG),
    (vfs.InvalidName, errno.EINVAL),
    (vfs.NotPermitted, errno.EPERM),
    (vfs.NotSupported, errno.ENOTSUP),
    (vfs.NoAttribute, ENOATTR),
    (vfs.BadHandle, errno.EBADF),
    (errors.NotFound, errno.ENOENT),
    (errors.AlreadyExists, errno.EEXIST),
    (errors.PermissionDenied, errno.EACCES),
    (errors.Unauthenticated, errno.EACCES),
    (errors.UnknownChanges, errno.EBUSY),
    (errors.DirectoryInTheWay, errno.EISDIR),
    (errors.FileInTheWay, errno.ENOTDIR),
    (errors.Conflict, errno.EBUSY),
    (errors.StorageFull, errno.ENOSPC),
    (errors.RangeNotSatisfiable, errno.EINVAL),
    (errors.ChecksumMismatch, errno.EIO),
    (errors.InvalidArgument, errno.EINVAL),
    (errors.HubUnavailable, errno.EIO),
    (httpx.HTTPError, errno.EIO),
    (OSError, errno.EIO),
]


def errno_for(exc: BaseException) -> int:
    for cls, number in _ERRNO:
        if isinstance(exc, cls):
            if cls is OSError and isinstance(exc, OSError) and exc.errno:
                return exc.errno
            return number
    return errno.EIO
