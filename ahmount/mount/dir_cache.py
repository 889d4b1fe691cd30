"""Directory listings the kernel keeps (``FOPEN_CACHE_DIR``), which pyfuse3 cannot ask for.

A warm ``find`` or ``os.walk`` of a dataset lists every directory again: each listing is an
opendir, READDIRPLUS requests that carry every entry with its attributes, and a releasedir.
The kernel can keep a directory's listing in its page cache and answer the next ones itself
when the opendir reply carries ``FOPEN_CACHE_DIR`` (and ``FOPEN_KEEP_CACHE``, or the kernel
drops what it kept on that open). libfuse sets them from ``fuse_file_info.cache_readdir`` and
``keep_cache``, but pyfuse3 3.5's ``opendir`` handler returns only a file handle: it replies
with the ``fuse_file_info`` it copied from libfuse, which it keeps in the ``_Container`` its
``fuse_opendir_async`` coroutine gets.

:func:`install` puts a wrapper in front of that coroutine (pyfuse3's C callback looks it up
among the module's globals at each request, as it does ``trio``, see ``fuse_wait``), which
tells :func:`keep_listing` which container the opendir being answered has. That function
sets the two bits in the container's copy of ``fuse_file_info``: offsets of pyfuse3 3.5
built against libfuse 3.14 (``struct __pyx_obj_7pyfuse3__Container``: the object header,
``dev_t rdev``, then ``fi``, then ``ino``). It checks the ``ino`` it finds at its offset
against the inode being opened and touches nothing when they differ, so another layout
means no kept listings, never a wrong write.

When a kept listing may be reused is the mount's decision (:meth:`AssetFS.opendir`): only
for a directory whose listing is a commit's (a tag, a commit, a branch with nothing queued),
and only while the commit it showed is still the one the mount shows.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pyfuse3

log = logging.getLogger("ahmount.mount")

#: The layout this module knows (see the module's docstring): pyfuse3's version, and the
#: size of its container (the header, rdev, fi, ino, parent, req, flags, mode, off, size,
#: a struct stat, fh).
KNOWN_PYFUSE3 = "3.5.0"
KNOWN_SIZE = 264
_FI_AT = 16 + 8  # PyObject_HEAD, dev_t rdev
_BITS_AT = _FI_AT + 4  # after ``int flags``: writepage, direct_io, keep_cache, ...
_INO_AT = _FI_AT + 40  # sizeof(struct fuse_file_info) in libfuse 3.14
_KEEP_CACHE = 1 << 2
_CACHE_READDIR = 1 << 6

#: The container of the opendir the current task is answering.
_opening: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "ahmount_opening_dir", default=None)
_original: Callable[[Any], Awaitable[Any]] | None = None


def install() -> bool:
    """Wrap pyfuse3's opendir coroutine (for the mount's life); False (and nothing done)
    for a pyfuse3 whose layout this module does not know."""
    global _original
    if _original is not None:
        return True
    found = getattr(pyfuse3, "fuse_opendir_async", None)
    if not known_layout() or found is None:
        log.info("pyfuse3 %s: the kernel will not keep directory listings",
                 pyfuse3.__version__)
        return False
    _original = found

    async def opendir_async(container: Any) -> Any:
        with answering(container):
            return await found(container)

    pyfuse3.fuse_opendir_async = opendir_async  # type: ignore[attr-defined]
    return True


def uninstall() -> None:
    global _original
    if _original is not None:
        pyfuse3.fuse_opendir_async = _original  # type: ignore[attr-defined]
        _original = None


def known_layout() -> bool:
    """True for the pyfuse3 whose container layout this module knows."""
    container = getattr(pyfuse3, "_Container", None)
    return pyfuse3.__version__ == KNOWN_PYFUSE3 and isinstance(container, type) and \
        container.__basicsize__ == KNOWN_SIZE


@contextlib.contextmanager
def answering(container: object) -> Iterator[None]:
    """Within: the current task answers the opendir ``container`` holds."""
    token = _opening.set(container)
    try:
        yield
    finally:
        _opening.reset(token)


def keep_listing(inode: int, reuse: bool) -> bool:
    """Ask the kernel, in the reply to the opendir of ``inode`` being answered, to keep the
    listing it reads now; ``reuse``: the listing it kept before is still true, and is
    answered from. False when there is no such opendir (or not the layout expected)."""
    container = _opening.get()
    if container is None:
        return False
    base = id(container)  # CPython: the object's address
    if ctypes.c_uint64.from_address(base + _INO_AT).value != inode:
        return False
    bits = ctypes.c_uint32.from_address(base + _BITS_AT)
    bits.value |= _CACHE_READDIR | (_KEEP_CACHE if reuse else 0)
    return True
