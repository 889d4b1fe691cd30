"""The FUSE adapter: ``pyfuse3.Operations`` as a thin layer over :class:`ahmount.vfs.core.VFS`.

Each handler converts arguments (inodes to paths, bytes to names, flags to intents), calls
the core, and converts the answer (a :class:`Node` to ``EntryAttributes``). It fails only with
``FUSEError``, through :func:`fuse_errors`, the one errno translation. What is the kernel's
business stays here: inode numbers and lookup counts (:mod:`inodes`), file-handle numbers,
whether the kernel may keep its page cache, entry and attribute timeouts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from typing import Any

import pyfuse3
import trio

from ahmount.errors import NotFound
from ahmount.mount.attrs import (
    attributes,
    kernel_timeout,
    nameless_attributes,
    node_attributes,
)
from ahmount.mount.dir_cache import keep_listing
from ahmount.mount.errno_map import fuse_errors
from ahmount.mount.inodes import ROOT_INODE, InodeTable
from ahmount.vfs.core import VFS, Listing
from ahmount.vfs.errors import BadHandle, InvalidName, NotPermitted
from ahmount.vfs.handles import Handle, ReadHandle, WriteHandle
from ahmount.vfs.layout import Key
from ahmount.vfs.resources import XATTR_PREFIX
from ahmount.vfs.tree import Node, shown_permissions

log = logging.getLogger("ahmount.mount")

LISTED_ENTRIES_MAX = 100_000  # listed entries of commits whose replies are kept
_MISSING: Any = object()

assert ROOT_INODE == pyfuse3.ROOT_INODE

#: The extended attributes the mount has (``user.ah.*``), as the kernel names them.
_OUR_XATTRS = XATTR_PREFIX.encode()


class AssetFS(pyfuse3.Operations):
    """The asset tree as a file system."""

    supports_dot_lookup = False
    # The kernel buffers writes and sends them in large pieces; it flushes them before a
    # close or fsync returns, so nothing closed or fsynced is ever only in its cache.
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, vfs: VFS, uid: int, gid: int, read_only: bool = False) -> None:
        super().__init__()
        #: A read-only mount (``ah-mount --read-only``): nothing to buffer, nothing to flush.
        self.read_only = read_only
        if read_only:
            # Writeback caching marks a file's block count stale at every flush, which
            # costs a GETATTR at the next open of a warm file; with no writes it buys nothing.
            self.enable_writeback_cache = False
        self.vfs = vfs
        self.uid = uid
        self.gid = gid
        self._served_sha: dict[int, str] = {}
        self.inodes = InodeTable(on_drop=self._dropped)
        self._files: dict[int, tuple[int, Handle]] = {}
        self._dirs: dict[int, Listing] = {}
        self._next_fh = 1
        #: The readdir entries (name, attributes) of directories that show one commit's
        #: objects, by (directory, commit, writable, kernel timeout), with the inode table's
        #: version they were made under: a listing of them again replies from here.
        self._listed: dict[tuple[Key, str, bool, float],
                           tuple[int, list[tuple[bytes, pyfuse3.EntryAttributes]]]] = {}
        self._listed_entries = 0
        #: What the listing the kernel keeps of each directory showed (see
        #: :meth:`_let_kernel_keep`).
        self._kernel_listings: dict[int, tuple[str, bool, float, int]] = {}
        self.op_counts: dict[str, int] = {}
        #: Inodes whose first open came (it handed the kernel their bytes if it could).
        self._stored: set[int] = set()

    def shows_hub_file(self, ino: int) -> bool:
        """True for an inode that showed a file of the hub (what the change feed may
        replace)."""
        return ino in self._served_sha

    def _dropped(self, ino: int) -> None:
        self._served_sha.pop(ino, None)
        self._stored.discard(ino)
        self._kernel_listings.pop(ino, None)

    def _count(self, op: str) -> None:
        self.op_counts[op] = self.op_counts.get(op, 0) + 1

    def attrs(self, node: Node, ino: int) -> pyfuse3.EntryAttributes:
        return node_attributes(node, ino, self.uid, self.gid, self.vfs.refresh)

    def _reply(self, key: Key, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of a looked-up entry: the kernel now counts one more lookup.

        A hub file whose bytes changed elsewhere since this inode showed it gets a new
        inode, as a file replaced by ``mv`` would: with writeback caching the kernel keeps
        a cached regular file's size whatever getattr says, so the old inode would show
        the new bytes cut to the old length."""
        ino = self._inode_for(key, node)
        self.inodes.remember(ino)
        return self.attrs(node, ino)

    def _inode_for(self, key: Key, node: Node) -> int:
        """The inode ``key`` shows ``node`` under: a new one when it is a hub file whose
        bytes differ from what its inode showed (see :meth:`_reply`)."""
        return self._inode_showing(
            key, "" if node.is_dir or node.queued is not None else node.sha256)

    def _inode_showing(self, key: Key, sha: str) -> int:
        """The inode ``key`` shows the hub file ``sha`` under ('': not a hub file)."""
        ino = self.inodes.ino(key)
        if sha:
            served = self._served_sha.get(ino)
            if served is not None and served != sha:
                self.inodes.detach(key)
                ino = self.inodes.ino(key)
            self._served_sha[ino] = sha
        return ino

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _file(self, fh: int) -> Handle:
        found = self._files.get(fh)
        if found is None:
            raise BadHandle(f"file handle {fh} is not open")
        return found[1]

    # -- lookup and attributes ---------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        parent = self.inodes.key(parent_inode)
        text = _decode(name)
        try:
            key, node = await self.vfs.lookup(parent, text)
        except NotFound:
            self.inodes.detach((*parent, text))  # gone (perhaps on the hub): its inode too
            raise
        return self._reply(key, node)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        try:
            return self.attrs(await self.vfs.stat(self.inodes.key(inode)), inode)
        except NotFound:
            orphan = self._orphan_attrs(inode)
            if orphan is not None:
                return orphan
            former = self.inodes.former(inode)
            if former is None:
                raise
            return self.attrs(await self.vfs.stat(former), inode)

    def _handles_of(self, inode: int) -> list[Handle]:
        return [h for ino, h in self._files.values() if ino == inode]

    def _orphan_attrs(self, inode: int, handle: Handle | None = None
                      ) -> pyfuse3.EntryAttributes | None:
        """``fstat`` of an open file whose name is gone: what its open handles hold."""
        if handle is None:
            handles = self._handles_of(inode)
            if not handles:
                return None
            handle = handles[0]
        return nameless_attributes(self.vfs.handle_stat(handle), inode, self.uid, self.gid)

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2) and chdir on a private mount (no ``default_permissions``)."""
        self._count("access")
        return await self.vfs.access(self.inodes.key(inode), bool(mode & os.W_OK),
                                     bool(mode & os.X_OK))

    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        found = self.vfs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = found.block_size
        data.f_blocks = found.blocks
        data.f_bfree = data.f_bavail = found.blocks_free
        data.f_files = 1 << 32
        data.f_ffree = data.f_favail = 1 << 31
        data.f_namemax = found.name_max
        return data

    # -- directories -------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._count("opendir")
        fh = self._new_fh()
        listing = self._dirs[fh] = await self.vfs.opendir(self.inodes.key(inode))
        self._let_kernel_keep(inode, listing)
        return fh

    def _let_kernel_keep(self, inode: int, listing: Listing) -> None:
        """Let the kernel keep the listing of a directory that shows one commit's objects,
        and answer the next listings from it while the directory shows the same: commit,
        write permission, kernel timeout and inode table version (see :mod:`dir_cache`). A
        warm ``find`` of 10,000 files in 100 directories is then an opendir and a
        releasedir per directory, where it was 10,000 entries made and sent again. Any
        other listing (a branch with queued changes, the places above refs) is read afresh
        on each open, and the kernel drops what it kept of it."""
        commit = self._commit_shown(listing.node)
        before = self._kernel_listings.pop(inode, None)
        if commit is None:
            return
        shown = (*commit, self.inodes.version)
        if keep_listing(inode, reuse=before == shown):
            self._kernel_listings[inode] = shown

    def _commit_shown(self, node: Node) -> tuple[str, bool, float] | None:
        """For a directory that shows one commit's objects (in a tag, a commit, or a branch
        with nothing queued): what fixes its entries' attributes besides their inodes, the
        commit, the write permission and the kernel timeout. None for any other directory:
        a ref that moves lists under another commit, a queued edit takes the branch off
        this path."""
        if node.resolved is None or not self.vfs.shows_commit_only(node):
            return None
        return node.resolved.commit_id, node.writable, self.vfs.refresh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._count("readdir")
        listing = self._dirs.get(fh)
        if listing is None:
            raise BadHandle(f"directory handle {fh} is not open")
        commit = self._commit_shown(listing.node)
        if commit is not None:
            place = (listing.node.loc.key, *commit)
            kept = self._listed.get(place)
            if kept is None or kept[0] != self.inodes.version or \
                    len(kept[1]) != len(listing.names):
                kept = (self.inodes.version, await self._entries(listing))
                self._keep_listed(place, kept)
            entries = kept[1]
            for position in range(start_id, len(entries)):
                name, attrs = entries[position]
                if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                    return
                self.inodes.remember(attrs.st_ino)
            return
        for position in range(start_id, len(listing.names)):
            entry = await self._entry(listing, listing.names[position])
            if entry is None:
                continue  # vanished since opendir: skip it, the snapshot keeps positions
            if not pyfuse3.readdir_reply(token, entry[0], entry[1], position + 1):
                return
            self.inodes.remember(entry[1].st_ino)

    async def _entry(self, listing: Listing, name: str
                     ) -> tuple[bytes, pyfuse3.EntryAttributes] | None:
        """One readdir entry of an open listing; None if it vanished since opendir."""
        child = await self.vfs.listed(listing, name)
        if child is None:
            return None
        # A file whose bytes changed elsewhere lists under a new inode, as a lookup gives it
        # (the kernel would keep the old inode's cached size).
        ino = self._inode_for((*listing.node.loc.key, name), child)
        return name.encode(), self.attrs(child, ino)

    async def _entries(self, listing: Listing) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """Every entry of a listing of one commit's objects (none can vanish: the commit's
        index holds them all). Made straight from the index's entries, no :class:`Node`
        each: a cold ``find`` of 10,000 files spent a third of the daemon's time here."""
        parent = listing.node
        children = self.vfs.commit_children(parent) or {}  # None: each entry resolved
        out = []
        base = parent.loc.key
        timeout = kernel_timeout(parent.immutable, self.vfs.refresh)
        uid, gid, writable = self.uid, self.gid, parent.writable
        directory = shown_permissions(None, writable)
        for name in listing.names:
            found = children.get(name, _MISSING)
            if found is _MISSING:
                entry = await self._entry(listing, name)
                if entry is not None:
                    out.append(entry)
            elif found is None:
                ino = self.inodes.ino((*base, name))
                out.append((name.encode(), attributes(ino, True, directory, 0, parent.mtime,
                                                      timeout, uid, gid)))
            else:
                ino = self._inode_showing((*base, name), found.sha256)
                out.append((name.encode(), attributes(
                    ino, False, shown_permissions(found, writable), found.size, found.mtime,
                    timeout, uid, gid)))
        return out

    def _keep_listed(self, place: tuple[Key, str, bool, float],
                     kept: tuple[int, list[tuple[bytes, pyfuse3.EntryAttributes]]]) -> None:
        """Bounded: forgotten all at once past :data:`LISTED_ENTRIES_MAX` entries."""
        if self._listed_entries + len(kept[1]) > LISTED_ENTRIES_MAX:
            self._listed.clear()
            self._listed_entries = 0
        old = self._listed.pop(place, None)
        if old is not None:
            self._listed_entries -= len(old[1])
        self._listed[place] = kept
        self._listed_entries += len(kept[1])

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------------------

    def _opened(self, inode: int, handle: Handle) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo()
        info.fh = self._new_fh()
        self._files[info.fh] = (inode, handle)
        if isinstance(handle, ReadHandle):
            # Keep the kernel's page cache when this inode last showed the same bytes;
            # otherwise the kernel drops it on open (a branch moved underneath).
            sha = handle.source.sha256
            served = self._served_sha.setdefault(inode, sha)
            # A sha that differs stays recorded as the old one: the next lookup then gives
            # the path a new inode (see _reply), whose size the kernel takes afresh.
            info.keep_cache = handle.immutable or served == sha
        else:
            info.keep_cache = False
            self._served_sha.pop(inode, None)  # its bytes are ours now, not the hub's
        return info

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._count("open")
        write = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        handle = await self.vfs.open(self.inodes.key(inode), write=write,
                                     truncate=bool(flags & os.O_TRUNC))
        info = self._opened(inode, handle)
        if info.keep_cache and inode not in self._stored and not flags & os.O_DIRECT:
            self._stored.add(inode)  # first: another open of it meanwhile reads as usual
            await self._store_in_kernel(inode, handle)
        return info

    async def _store_in_kernel(self, inode: int, handle: Handle) -> None:
        """Hand the kernel's page cache a small file's bytes at its first open, when they
        are here already: its reads then ask the daemon nothing (one request per file
        less, the one a loader waits on). Once per inode: after that the kernel keeps them
        (the open says keep_cache) or, having dropped them, asks with reads as usual."""
        try:
            data = await self.vfs.read_whole_if_here(handle)
            # Only while this open is the inode's one open file. Another's read may be
            # waiting for this thread with the pages it reads into locked, and the store
            # locks each page it fills: here, on the thread that would answer that read.
            if data is not None and len(self._handles_of(inode)) == 1:
                pyfuse3.notify_store(inode, 0, data)
        except OSError as exc:  # the cache's disk, or a kernel without the call: read later
            log.debug("bytes of inode %d not handed to the kernel at open: %s", inode, exc)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        self._count("create")
        # The mode asked for, less the caller's umask: kept, shown and committed.
        handle, key, node = await self.vfs.create(
            self.inodes.key(parent_inode), _decode(name),
            stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask))
        attrs = self._reply(key, node)
        return self._opened(attrs.st_ino, handle), attrs

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        return await self.vfs.read(self._file(fh), off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._count("write")
        handle = self._file(fh)
        try:
            return self.vfs.write(handle, off, buf)
        except OSError:
            if isinstance(handle, WriteHandle) and handle.failed is not None and \
                    not handle.failed_shown:
                handle.failed_shown = True
                await self._forget_name(self._files[fh][0])
            raise

    async def _forget_name(self, inode: int) -> None:
        """A write to the file at ``inode`` failed (a full disk): its bytes fall short of
        the size and pages the kernel kept (writeback caching), which it would go on
        showing. Its path gets a new inode and the kernel forgets the name before this
        write is answered, so no ``stat`` after the writer's ``close`` sees the old one.
        (Only the name: dropping the inode's pages would wait for this very write.)"""
        if not self.inodes.has_name(inode):
            return
        key = self.inodes.key(inode)
        self.inodes.detach(key, replaced=True)
        parent = self.inodes.ino(key[:-1])
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                          os.fsencode(key[-1]))

    @fuse_errors
    async def flush(self, fh: int) -> None:
        self._count("flush")
        if self.read_only:
            # No handle here has anything to flush: ENOSYS tells the kernel to send no more
            # flushes, one request less per close.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self.vfs.flush(self._file(fh))

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(self._file(fh))

    @fuse_errors
    async def release(self, fh: int) -> None:
        self._count("release")
        found = self._files.pop(fh, None)
        if found is not None:
            await self.vfs.release(found[1])

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("setattr")
        size = attr.st_size if fields.update_size else None
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else None
        if not self.inodes.has_name(inode):
            return self._setattr_orphan(inode, size, mtime_ns, fh)
        if mtime_ns is not None and fh is not None and fh in self._files and not (
                fields.update_size or fields.update_mode or fields.update_uid or
                fields.update_gid or fields.update_atime):
            shown = self.vfs.writer_mtime(self._files[fh][1], mtime_ns / 1e9)
            if shown is not None:
                return self.attrs(shown, inode)
        if (fields.update_uid and attr.st_uid != self.uid) or (
            fields.update_gid and attr.st_gid != self.gid
        ):
            # Chowning to the owner it already shows (tar, rsync -a) is a no-op.
            raise NotPermitted(f"chown of {'/'.join(self.inodes.key(inode))} refused: assets "
                               "have no owners per file")
        try:
            node = await self.vfs.setattr(
                self.inodes.key(inode), size=size,
                mtime=None if mtime_ns is None else mtime_ns / 1e9,
                mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
                atime=bool(fields.update_atime))
        except NotFound:
            # Gone on the hub while open (its branch deleted elsewhere, say): like getattr,
            # an open file answers for itself (the kernel's flush of a writer's times).
            if not self._handles_of(inode):
                raise
            return self._setattr_orphan(inode, size, mtime_ns, fh)
        return self.attrs(node, inode)

    def _setattr_orphan(self, inode: int, size: int | None, mtime_ns: int | None,
                        fh: int | None) -> pyfuse3.EntryAttributes:
        """ftruncate/futimens of an unlinked open file: applied to its own bytes only. With
        only read-only opens left, the kernel's own flush of the times (it sends one right
        after the unlink) has nothing to change, and answers the attributes."""
        handle = self._files[fh][1] if fh is not None and fh in self._files else None
        if handle is None:
            handles = self._handles_of(inode)
            writers = [h for h in handles if not isinstance(h, ReadHandle)]
            handle = (writers or handles or [None])[0]
        if handle is None:
            raise NotFound(f"inode {inode} has no name and no open handle")
        self.vfs.handle_setattr(handle, size, mtime_ns)
        found = self._orphan_attrs(inode, handle)
        assert found is not None
        return found

    # -- names -------------------------------------------------------------------------------

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._count("unlink")
        key = await self.vfs.unlink(self.inodes.key(parent_inode), _decode(name))
        self.inodes.detach(key)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("mkdir")
        key, node = await self.vfs.mkdir(self.inodes.key(parent_inode), _decode(name))
        return self._reply(key, node)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._count("rmdir")
        key = await self.vfs.rmdir(self.inodes.key(parent_inode), _decode(name))
        self.inodes.detach(key)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._count("rename")
        old, new = await self.vfs.rename(
            self.inodes.key(parent_inode_old), _decode(name_old),
            self.inodes.key(parent_inode_new), _decode(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE))
        self.inodes.rename(old, new)

    # -- extended attributes -----------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._count("getxattr")
        if not name.startswith(_OUR_XATTRS):
            # What `ls -l` asks of every file (security.selinux, system.posix_acl_access) and
            # the kernel before writes (security.capability): never ours, answered before
            # the inode's key is found and the name decoded (the vfs says the same after:
            # a warm `ls -lR` of 10,000 files took 0.89-0.96 s instead of 0.99-1.04).
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self.vfs.getxattr(self.inodes.key(inode), _decode(name))

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [n.encode() for n in await self.vfs.listxattr(self.inodes.key(inode))]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.setxattr(self.inodes.key(inode), _decode(name), value)

    # -- what assets never hold --------------------------------------------------------------

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"symlink {name!r} refused: assets hold regular files only")

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"hard link {new_name!r} refused: assets hold regular files only")

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise NotPermitted(f"mknod {name!r} refused: assets hold regular files only")


def _decode(name: bytes) -> str:
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise InvalidName(f"name {name!r} refused: not UTF-8") from None

