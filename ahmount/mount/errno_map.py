"""The one place where errors of any layer become an errno for the kernel.

Every FUSE handler runs inside :func:`fuse_errors`: a ``FUSEError`` passes through, a refusal
of the file-system core (:mod:`ahmount.vfs.errors`) or a domain error becomes its errno (and
a log line saying why), anything else is a bug — logged with its traceback and answered with
``EIO`` — so no exception ever escapes into ``pyfuse3.main()``, where it would end the mount.
The in-process test driver of the POSIX suite uses :func:`errno_for` too, so both drivers
answer the same errno for the same refusal.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import httpx
import pyfuse3

from ahmount import errors
from ahmount.vfs import errors as vfs

log = logging.getLogger("ahmount.mount")

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
    (vfs.NoAttribute, pyfuse3.ENOATTR),
    (vfs.BadHandle, errno.EBADF),
    (errors.NotFound, errno.ENOENT),
    (errors.AlreadyExists, errno.EEXIST),
    (errors.PermissionDenied, errno.EACCES),
    (errors.Unauthenticated, errno.EACCES),
    (errors.UnknownChanges, errno.EBUSY),
    (errors.Conflict, errno.EBUSY),
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


P = ParamSpec("P")
R = TypeVar("R")


def fuse_errors(handler: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Wrap a handler so that it fails only with ``FUSEError``."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except errors.NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except vfs.NoAttribute:  # the kernel asks for security.* before writes: not news
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        except vfs.VfsError as exc:  # a refusal on purpose: say why, once, for the user
            number = errno_for(exc)
            log.info("%s: %s (%s)", handler.__name__, exc, errno.errorcode.get(number, number))
            raise pyfuse3.FUSEError(number) from None
        except (errors.AhError, httpx.HTTPError, OSError) as exc:
            number = errno_for(exc)
            log.warning("%s: %s (%s)", handler.__name__, exc, errno.errorcode.get(number, number))
            raise pyfuse3.FUSEError(number) from None
        except Exception:
            log.exception("bug in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
