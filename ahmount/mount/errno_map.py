"""Errors of any layer become an errno for the kernel (the table: ``ahmount/vfs/errno_map.py``).

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
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import httpx
import pyfuse3

from ahmount import errors
from ahmount.fd_limit import open_files_limit
from ahmount.vfs import errors as vfs
from ahmount.vfs.errno_map import errno_for

__all__ = ["errno_for", "fuse_errors"]

log = logging.getLogger("ahmount.mount")

#: A hub that is away fails every read of what was never cached: each object is told of
#: once a minute (the message names it), not at every retry of every reader.
RETELL_AFTER = 60.0
_told: OrderedDict[str, float] = OrderedDict()


def _first_telling(message: str) -> bool:
    now = time.monotonic()
    last = _told.get(message)
    if last is not None and now - last < RETELL_AFTER:
        return False
    _told[message] = now
    _told.move_to_end(message)
    while len(_told) > 10_000:
        _told.popitem(last=False)
    return True


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
            if number in (errno.EMFILE, errno.ENFILE) and _first_telling("out of descriptors"):
                log.error("the daemon is out of file descriptors (open files limit %d): "
                          "files opened through the mount get %s until some are closed; "
                          "raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd "
                          "unit) and mount again", open_files_limit(),
                          errno.errorcode[number])
            if not isinstance(exc, errors.HubUnavailable) or _first_telling(str(exc)):
                log.warning("%s: %s (%s)", handler.__name__, exc,
                            errno.errorcode.get(number, number))
            raise pyfuse3.FUSEError(number) from None
        except Exception:
            log.exception("bug in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
