"""The ``pyfuse3.Operations`` of the mount: thin handlers over the tree model.

Each handler converts arguments, asks :class:`HubView` / :class:`ObjectCache`, and fails only
with ``FUSEError`` (through :func:`fuse_errors`, the errno boundary). Inode numbers are handed
out once per mount path and never reused while the mount lives; lookup counts rise in
``lookup`` and for every entry ``readdir_reply`` accepts, and fall in ``forget``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pyfuse3

from ahmount.errors import InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.mount.errno_map import fuse_errors, refuse
from ahmount.mount.hub_view import CommitIndex, HubView, Resolved
from ahmount.mount.layout import SCOPES, Key, Location, Place, locate
from ahmount.mount.object_cache import BLOCK, ObjectCache
from ahmount.names import KINDS, is_commit_prefix

log = logging.getLogger("ahmount.mount")

IMMUTABLE_TIMEOUT = 3600.0
READAHEAD_START = 2 * BLOCK
READAHEAD_MAX = 32 * BLOCK
XATTR_PREFIX = b"user.ah."


@dataclass
class HubSource:
    """An object's bytes at one commit: what a read handle pins."""

    view: HubView
    asset: AssetAddr
    commit_id: str
    path: str
    sha256: str
    size: int

    @asynccontextmanager
    async def fetch(self, start: int, end: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.view.hub.open_object(self.asset, self.commit_id, self.path,
                                             start, end) as response:
            yield response.aiter_bytes()


@dataclass
class FileHandle:
    inode: int
    source: HubSource
    next_offset: int = 0
    window: int = READAHEAD_START
    prefetched_to: int = 0


@dataclass
class DirHandle:
    inode: int
    node: Node
    entries: list[tuple[str, Key]] = field(default_factory=list)


@dataclass
class Node:
    """What one mount path is right now: its location, whether it is a directory, its entry
    (for files), the resolved commit (inside a ref) and whether it may change."""

    loc: Location
    is_dir: bool
    writable: bool
    immutable: bool
    mtime: float
    entry: ObjectEntry | None = None
    resolved: Resolved | None = None
    index: CommitIndex | None = None


class InodeTable:
    """Mount path ↔ inode, stable for the life of the mount."""

    def __init__(self) -> None:
        self._by_key: dict[Key, int] = {(): pyfuse3.ROOT_INODE}
        self._by_ino: dict[int, Key] = {pyfuse3.ROOT_INODE: ()}
        self.lookups: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def ino(self, key: Key) -> int:
        found = self._by_key.get(key)
        if found is None:
            found = self._next
            self._next += 1
            self._by_key[key] = found
            self._by_ino[found] = key
        return found

    def key(self, ino: int) -> Key:
        try:
            return self._by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def remember(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
        else:
            self.lookups.pop(ino, None)


class AssetFS(pyfuse3.Operations):
    """The asset tree as a file system."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, view: HubView, cache: ObjectCache, uid: int, gid: int) -> None:
        super().__init__()
        self.view = view
        self.cache = cache
        self.uid = uid
        self.gid = gid
        self.inodes = InodeTable()
        self.started = time.time()
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._served_sha: dict[int, str] = {}
        self.op_counts: dict[str, int] = {}

    # -- the tree model ----------------------------------------------------------------------

    def _count(self, op: str) -> None:
        self.op_counts[op] = self.op_counts.get(op, 0) + 1

    async def node(self, key: Key) -> Node:
        """Resolve a mount path to a :class:`Node`; raises NotFound."""
        loc = locate(key, self.view.me)
        place = loc.place
        if place in (Place.ROOT, Place.SCOPE, Place.SCOPE_KIND):
            return Node(loc, True, place is Place.ROOT, False, self.started)
        if place is Place.KIND:
            return Node(loc, True, True, False, self.started)
        assert loc.kind is not None and loc.owner is not None
        scope: Any = loc.scope
        if place is Place.OWNER:
            if loc.owner not in await self.view.owners(scope, loc.kind):
                raise NotFound(f"no folders of {loc.owner!r} are {loc.scope} with you")
            return Node(loc, True, False, False, self.started)
        folder = await self.view.folder(scope, loc.owner, loc.kind, str(loc.folder))
        can_edit = folder.permission in ("own", "edit")
        if place is Place.FOLDER:
            return Node(loc, True, can_edit, False, folder.modified)
        asset = await self.view.asset(loc.asset_addr)
        if place is Place.ASSET:
            return Node(loc, True, can_edit, False, asset.modified)
        assert loc.ref is not None
        resolved = await self._resolve(loc)
        writable = can_edit and resolved.type == "branch"
        immutable = resolved.type != "branch"
        if place is Place.REF:  # its listing is loaded when it is opened, not when stat'ed
            return Node(loc, True, writable, immutable, resolved.created, resolved=resolved)
        index = await self.view.index(loc.asset_addr, resolved.commit_id, resolved.created)
        found = index.lookup(loc.subpath)
        if found is None:
            raise NotFound(f"no object {loc.subpath!r} in {loc.api_path()}")
        if found == "dir":
            return Node(loc, True, writable, immutable, resolved.created, resolved=resolved,
                        index=index)
        return Node(loc, False, writable, immutable, found.mtime, entry=found,
                    resolved=resolved, index=index)

    def _child_in_commit(self, parent: Node, name: str, key: Key) -> Node | None:
        """A child of a directory inside a commit, straight from the parent's index (listing
        a 100,000-object tree must not resolve every entry from the top again)."""
        index = parent.index
        if index is None:
            return None
        subpath = f"{parent.loc.subpath}/{name}" if parent.loc.subpath else name
        children = index.dirs.get(parent.loc.subpath, {})
        if name not in children:
            return None
        found = children[name]
        p = parent.loc
        # Plain constructors, not dataclasses.replace: this runs once per listed entry.
        loc = Location(Place.OBJECT, key, p.scope, p.kind, p.owner, p.folder, p.asset, p.ref,
                       subpath)
        if found is None:
            return Node(loc, True, parent.writable, parent.immutable, parent.mtime, None,
                        parent.resolved, index)
        return Node(loc, False, parent.writable, parent.immutable, found.mtime, found,
                    parent.resolved, index)

    async def _resolve(self, loc: Location) -> Resolved:
        assert loc.ref is not None
        refs = await self.view.refs(loc.asset_addr)
        if loc.ref not in refs and not is_commit_prefix(loc.ref):
            raise NotFound(f"no branch or tag {loc.ref!r} in {loc.asset_addr}")
        try:
            return await self.view.resolve(loc.asset_addr, loc.ref)
        except InvalidArgument as exc:  # an ambiguous prefix names nothing in the tree
            raise NotFound(str(exc)) from None

    async def children(self, node: Node) -> list[str]:
        loc = node.loc
        scope: Any = loc.scope
        if loc.place is Place.ROOT:
            return [*KINDS, *SCOPES]
        if loc.place is Place.SCOPE:
            return list(KINDS)
        assert loc.kind is not None
        if loc.place is Place.SCOPE_KIND:
            return await self.view.owners(scope, loc.kind)
        assert loc.owner is not None
        if loc.place in (Place.KIND, Place.OWNER):
            return sorted(await self.view.folders(scope, loc.owner, loc.kind))
        if loc.place is Place.FOLDER:
            return sorted(await self.view.assets(loc.folder_addr))
        if loc.place is Place.ASSET:
            return sorted(await self.view.refs(loc.asset_addr))
        assert node.resolved is not None
        index = node.index or await self.view.index(loc.asset_addr, node.resolved.commit_id,
                                                    node.resolved.created)
        return index.names(loc.subpath)

    def attrs(self, node: Node, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        timeout = IMMUTABLE_TIMEOUT if node.immutable else self.view.refresh
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        if node.is_dir:
            entry.st_mode = stat.S_IFDIR | (0o755 if node.writable else 0o555)
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            assert node.entry is not None
            entry.st_mode = stat.S_IFREG | (0o644 if node.writable else 0o444)
            entry.st_nlink = 1
            entry.st_size = node.entry.size
        entry.st_blksize = BLOCK
        entry.st_blocks = -(-entry.st_size // 512)
        ns = int(node.mtime * 1e9)
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        return entry

    async def _entry(self, key: Key) -> pyfuse3.EntryAttributes:
        node = await self.node(key)
        return self.attrs(node, self.inodes.ino(key))

    def _fh(self, handle: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    # -- handlers: lookup and attributes -----------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        key = (*self.inodes.key(parent_inode), _decode(name))
        attrs = await self._entry(key)
        self.inodes.remember(attrs.st_ino)
        return attrs

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        return await self._entry(self.inodes.key(inode))

    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK
        data.f_frsize = BLOCK
        data.f_blocks = max(self.cache.max_bytes // BLOCK, 1)
        data.f_bfree = max((self.cache.max_bytes - self.cache.used_bytes()) // BLOCK, 0)
        data.f_bavail = data.f_bfree
        data.f_files = 1 << 32
        data.f_ffree = 1 << 31
        data.f_favail = data.f_ffree
        data.f_namemax = 255
        return data

    # -- directories -------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._count("opendir")
        key = self.inodes.key(inode)
        node = await self.node(key)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # The listing is a snapshot: entries added or removed later neither shift nor repeat
        # what a reader already got.
        if node.loc.place is Place.REF and node.resolved is not None:
            node = replace(node, index=await self.view.index(
                node.loc.asset_addr, node.resolved.commit_id, node.resolved.created))
        names = await self.children(node)
        return self._fh(DirHandle(inode, node, [(n, (*key, n)) for n in names]))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._count("readdir")
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        for position in range(start_id, len(handle.entries)):
            name, key = handle.entries[position]
            child = self._child_in_commit(handle.node, name, key)
            try:
                attrs = self.attrs(child, self.inodes.ino(key)) if child else \
                    await self._entry(key)
            except NotFound:
                continue  # vanished since opendir: skip it, the snapshot keeps positions
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, position + 1):
                return
            self.inodes.remember(attrs.st_ino)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files -------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._count("open")
        node = await self.node(self.inodes.key(inode))
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            place = "a tag or commit" if node.immutable else "this mount (read path only)"
            raise refuse(errno.EROFS, "write to %s refused: %s is read-only",
                         node.loc.api_path(), place)
        assert node.entry is not None and node.resolved is not None
        source = HubSource(self.view, node.loc.asset_addr, node.resolved.commit_id,
                           node.entry.path, node.entry.sha256, node.entry.size)
        self.cache.pin(source.sha256)
        info = pyfuse3.FileInfo()
        info.fh = self._fh(FileHandle(inode, source))
        # Keep the kernel's page cache when this inode last showed the same bytes; otherwise
        # the kernel drops it on open (a branch moved underneath).
        info.keep_cache = node.immutable or self._served_sha.get(inode) == source.sha256
        self._served_sha[inode] = source.sha256
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        source = handle.source
        # The kernel sends several reads of one stream at once, slightly out of order: a read
        # near the stream's front counts as sequential.
        sequential = abs(off - handle.next_offset) <= 2 * BLOCK
        if not sequential:
            handle.window = READAHEAD_START
            handle.prefetched_to = off
        elif off > 0:
            handle.window = min(handle.window * 2, READAHEAD_MAX)
        data = await self.cache.read(source, off, size)
        end = off + len(data)
        handle.next_offset = max(handle.next_offset, end) if sequential else end
        if sequential and handle.next_offset < source.size:
            # Read ahead in large runs (one ranged request each), refilled whenever less than
            # half a window lies ahead: few requests, many bytes in flight, bounded memory
            # (blocks stream to the cache file as they arrive).
            target = min(handle.next_offset + handle.window, source.size)
            start = max(handle.prefetched_to, handle.next_offset)
            if target - start >= handle.window // 2 or target == source.size > start:
                self.cache.prefetch(source, start // BLOCK, (target - 1) // BLOCK)
                handle.prefetched_to = target
        return data

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            self.cache.unpin(handle.source.sha256)

    # -- extended attributes -----------------------------------------------------------------

    async def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        out = {b"user.ah.path": node.loc.api_path().encode()}
        loc = node.loc
        scope: Any = loc.scope
        if loc.place is Place.FOLDER:
            assert loc.kind is not None and loc.owner is not None
            folder = await self.view.folder(scope, loc.owner, loc.kind, str(loc.folder))
            out[b"user.ah.labels"] = ",".join(folder.labels).encode()
            out[b"user.ah.description"] = folder.description.encode()
        elif loc.place is Place.ASSET:
            asset = await self.view.asset(loc.asset_addr)
            out[b"user.ah.labels"] = ",".join(asset.labels).encode()
            out[b"user.ah.description"] = asset.description.encode()
        if node.resolved is not None:
            out[b"user.ah.commit"] = node.resolved.commit_id.encode()
            out[b"user.ah.ref_type"] = node.resolved.type.encode()
        if node.entry is not None:
            out[b"user.ah.sha256"] = node.entry.sha256.encode()
            out[b"user.ah.content_type"] = node.entry.content_type.encode()
        return out

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = await self.node(self.inodes.key(inode))
        value = (await self._xattrs(node)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = await self.node(self.inodes.key(inode))
        return sorted(await self._xattrs(node))

    # -- what the read path refuses ----------------------------------------------------------

    async def _refuse_write(self, what: str) -> None:
        raise refuse(errno.EROFS, "%s refused: the tree is read-only here", what)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._refuse_write("setattr")
        raise AssertionError("unreachable")

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        await self._refuse_write("create")
        raise AssertionError("unreachable")

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._refuse_write("mkdir")
        raise AssertionError("unreachable")

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._refuse_write("unlink")

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._refuse_write("rmdir")

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._refuse_write("rename")

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._refuse_write("setxattr")

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "symlink %r refused: assets hold regular files only", name)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "hard link %r refused: assets hold regular files only",
                     new_name)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "mknod %r refused: assets hold regular files only", name)


def _decode(name: bytes) -> str:
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None
