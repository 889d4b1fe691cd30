"""A pyfuse3 file system that does nothing: creates, writes and flushes only answer; reads
return zeros up to the size written (with the page cache kept, as ah-mount keeps it);
directories list what was made in them (attributes built per entry, as any daemon must).

It is the floor under any Python (trio + pyfuse3) mount: what the kernel round trips and
pyfuse3's request dispatch cost before a daemon does any work of its own. The write benchmark
runs the same small-file workload on it, so its figures can be read against that floor.

With ``--read-from FILE`` it also shows one file, ``data``, whose reads are a ``pread`` of
the local ``FILE``: the floor under a Python mount that reads its bytes from local disk (a
pyfuse3 passthrough), which the read benchmarks put next to ah-mount's cold reads (ah-mount
answers a read with such a pread of its cache file, after the bytes arrived).

With ``--ready-first`` its request loop runs as ah-mount's does
(``ahmount/mount/fuse_wait.py``: a zero-timeout poll before trio's wait, polling for up to
50 us before it sleeps there, and a read lock taken up to 8 times in a row without a
scheduler pass): the floor under a daemon that does the same.

Usage: python bench/minimal_fs.py MOUNTPOINT [--read-from FILE] [--ready-first]
       (runs in the foreground until unmounted)
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio


class NothingFS(pyfuse3.Operations):
    """Files and directories exist (names, sizes) but file bytes go nowhere."""

    enable_writeback_cache = True  # as in ah-mount

    def __init__(self, read_from: str | None = None) -> None:
        super().__init__()
        self.inodes: dict[tuple[int, bytes], int] = {}
        self.dirs = {pyfuse3.ROOT_INODE}
        self.children: dict[int, list[bytes]] = {}  # names in order of creation
        self.sizes: dict[int, int] = {}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.backing: int | None = None  # the inode of "data", read from a local file
        self.backing_fd = -1
        if read_from is not None:
            self.backing_fd = os.open(read_from, os.O_RDONLY)
            self.backing = self._new(pyfuse3.ROOT_INODE, b"data")
            self.sizes[self.backing] = os.fstat(self.backing_fd).st_size

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = 3.0
        is_dir = inode in self.dirs
        entry.st_mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
        entry.st_nlink = 2 if is_dir else 1
        entry.st_size = self.sizes.get(inode, 0)
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        return entry

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if (parent, name) not in self.inodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.inodes[parent, name])

    def _new(self, parent: int, name: bytes) -> int:
        if (parent, name) not in self.inodes:
            self.children.setdefault(parent, []).append(name)
        inode = self.inodes.setdefault((parent, name), self.next_inode)
        self.next_inode += 1
        return inode

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = self.children.get(fh, [])
        for position in range(start_id, len(names)):
            attrs = self._attrs(self.inodes[fh, names[position]])
            if not pyfuse3.readdir_reply(token, names[position], attrs, position + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def mkdir(self, parent: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        inode = self._new(parent, name)
        self.dirs.add(inode)
        return self._attrs(inode)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self._new(parent, name)
        info = pyfuse3.FileInfo()
        info.fh = inode
        return info, self._attrs(inode)

    async def write(self, fh: int, offset: int, buf: bytes) -> int:
        self.sizes[fh] = max(self.sizes.get(fh, 0), offset + len(buf))
        return len(buf)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo()
        info.fh = inode
        info.keep_cache = True
        return info

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        if fh == self.backing:
            return os.pread(self.backing_fd, size, offset)
        return bytes(max(0, min(size, self.sizes.get(fh, 0) - offset)))

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--read-from")
    parser.add_argument("--ready-first", action="store_true")
    args = parser.parse_args()
    if args.ready_first:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from ahmount.mount import fuse_wait

        fuse_wait.install()
    options = set(pyfuse3.default_options) - {"default_permissions"}  # as a private ah-mount
    pyfuse3.init(NothingFS(args.read_from), args.mountpoint, options | {"fsname=nothingfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
