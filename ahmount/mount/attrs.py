"""What the kernel is told a file is: a :class:`Node` (or an open handle whose name is gone)
as ``EntryAttributes``, with the timeouts for which the kernel may cache it."""

from __future__ import annotations

import stat

import pyfuse3

from ahmount.vfs.handles import HandleStat
from ahmount.vfs.object_cache import BLOCK
from ahmount.vfs.tree import Node

#: How long the kernel may keep what a tag or commit shows (it never changes).
IMMUTABLE_TIMEOUT = 3600.0


def node_attributes(node: Node, ino: int, uid: int, gid: int,
                    refresh: float) -> pyfuse3.EntryAttributes:
    """``node`` as inode ``ino``: what may change is cached for ``refresh`` seconds."""
    return attributes(ino, node.is_dir, node.permissions, node.size, node.mtime,
                      kernel_timeout(node.immutable, refresh), uid, gid)


def kernel_timeout(immutable: bool, refresh: float) -> float:
    """How long the kernel may keep what a path shows: a tag's or commit's for long, what
    may change for ``refresh`` seconds."""
    return IMMUTABLE_TIMEOUT if immutable else refresh


def attributes(ino: int, is_dir: bool, permissions: int, size: int, mtime: float,
               timeout: float, uid: int, gid: int) -> pyfuse3.EntryAttributes:
    """Inode ``ino`` as the kernel is told it, cached for ``timeout`` seconds."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.generation = 0
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | permissions
    entry.st_nlink = 2 if is_dir else 1
    entry.st_size = size
    entry.st_blksize = BLOCK
    entry.st_blocks = -(-size // 512)
    ns = int(mtime * 1e9)
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
    entry.st_uid = uid
    entry.st_gid = gid
    return entry


def nameless_attributes(held: HandleStat, ino: int, uid: int,
                        gid: int) -> pyfuse3.EntryAttributes:
    """``fstat`` of an open file whose name is gone: what its handle holds."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.st_nlink = 0  # unlinked
    entry.st_uid, entry.st_gid = uid, gid
    entry.st_blksize = BLOCK
    entry.st_mode = stat.S_IFREG | held.mode
    entry.st_size = held.size
    if held.mtime_ns is not None:
        entry.st_mtime_ns = entry.st_ctime_ns = entry.st_atime_ns = held.mtime_ns
    entry.st_blocks = -(-entry.st_size // 512)
    return entry
