"""The ``pyfuse3.Operations`` of the mount: thin handlers over the tree model.

Each handler converts arguments, asks :class:`HubView` / :class:`ObjectCache`, and fails only
with ``FUSEError`` (through :func:`fuse_errors`, the errno boundary). Inode numbers are handed
out once per mount path and never reused while the mount lives; lookup counts rise in
``lookup`` and for every entry ``readdir_reply`` accepts, and fall in ``forget``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pyfuse3
import trio

from ahmount.errors import InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.mount.change_queue import ChangeQueue, Row
from ahmount.mount.errno_map import fuse_errors, refuse
from ahmount.mount.hub_view import CommitIndex, HubView, Resolved
from ahmount.mount.layout import SCOPES, Key, Location, Place, locate
from ahmount.mount.object_cache import BLOCK, ObjectCache
from ahmount.mount.supervisor import EXPECTED
from ahmount.names import (
    KINDS,
    MAX_OBJECT_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    has_control_characters,
    is_commit_prefix,
)

log = logging.getLogger("ahmount.mount")

IMMUTABLE_TIMEOUT = 3600.0
IMMUTABLE_ATTRS_MAX = 100_000  # listed entries of tags and commits whose attributes are kept
UPLOAD_AHEAD_DELAY = 0.5
UPLOAD_RETRY_FIRST = 2.0  # the hub client fails fast for 2 s after giving up on a dead hub
UPLOAD_RETRY_MAX = 60.0
READAHEAD_START = 2 * BLOCK
READAHEAD_MAX = 128 * BLOCK  # reached after 128 MiB read in order (the window doubles)
XATTR_PREFIX = b"user.ah."
SHA256_XATTR = XATTR_PREFIX + b"sha256"


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
    mode: int = 0o444  # the permission bits the file showed when opened (fstat after unlink)


@dataclass
class LocalHandle:
    """An open queued file of a branch: reads and writes go to its local bytes."""

    inode: int
    branch: str
    path: str
    fd: int
    dirty: bool = False  # written since the queue last recorded its size
    written: bool = False  # written at all through this handle
    mtime: float | None = None  # set by setattr while dirty; recorded with the size
    may_write: bool = True  # opened for writing (a commit snapshots such files by copy)
    mode: int = 0o644  # the file's permission bits when opened (fstat after unlink)
    copied_seq: int | None = None  # this open copied a head object into the queue as seq
    orphaned: bool = False  # its name was unlinked or replaced: the open file lives on alone
    mid_change: bool = False  # written since the writer last flushed or fsynced: a commit
    #                           leaves the file queued rather than take it half-written


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
    queued: Row | None = None  # a branch file whose content is in the change queue
    in_head: bool = False  # the branch head has this object or directory

    @property
    def branch_key(self) -> str | None:
        """The change queue's key of the branch this node is in (None outside branches)."""
        loc = self.loc
        if self.resolved is None or self.resolved.type != "branch":
            return None
        return f"{loc.owner}/{loc.kind}/{loc.folder}/{loc.asset}:{loc.ref}"


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

    def rename(self, old: Key, new: Key) -> None:
        """A path (and everything below it) moved: its inodes follow it, as the kernel's
        dentries do."""
        depth = len(old)
        moved = [k for k in self._by_key if k[:depth] == old]
        for key in moved:
            ino = self._by_key.pop(key)
            target = new + key[depth:]
            stale = self._by_key.pop(target, None)
            if stale is not None:
                self._by_ino.pop(stale, None)
            self._by_key[target] = ino
            self._by_ino[ino] = target

    def detach(self, key: Key) -> None:
        """``key`` was unlinked: its inode no longer has a name (open handles keep using it,
        and a new file at that path gets a new inode, as on any POSIX file system)."""
        ino = self._by_key.pop(key, None)
        if ino is not None:
            self._by_ino.pop(ino, None)

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
    # The kernel buffers writes and sends them in large pieces; it flushes them before a
    # close or fsync returns, so nothing closed or fsynced is ever only in its cache.
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, view: HubView, cache: ObjectCache, uid: int, gid: int,
                 queue: ChangeQueue | None = None) -> None:
        super().__init__()
        self.view = view
        self.cache = cache
        #: Queued edits of branches; without one, branches are read-only.
        self.queue = queue
        self.uid = uid
        self.gid = gid
        self.inodes = InodeTable()
        self.started = time.time()
        self._handles: dict[int, FileHandle | DirHandle | LocalHandle] = {}
        self._next_fh = 1
        self._served_sha: dict[int, str] = {}
        self._immutable_attrs: dict[tuple[int, str], pyfuse3.EntryAttributes] = {}
        self.op_counts: dict[str, int] = {}
        #: Written files closed since the uploader last ran: (branch, path).
        self._closed: set[tuple[str, str]] = set()
        self._closed_event = trio.Event()
        self.bytes_uploaded = 0
        self.upload_failures = 0
        self.uploading = False

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
        if resolved.type == "branch" and self.queue is not None:
            return self._overlay(loc, writable, resolved, index, found)
        if found is None:
            raise NotFound(f"no object {loc.subpath!r} in {loc.api_path()}")
        if found == "dir":
            return Node(loc, True, writable, immutable, resolved.created, resolved=resolved,
                        index=index)
        return Node(loc, False, writable, immutable, found.mtime, entry=found,
                    resolved=resolved, index=index)

    def _overlay(self, loc: Location, writable: bool, resolved: Resolved, index: CommitIndex,
                 found: ObjectEntry | str | None) -> Node:
        """A path inside a branch: the head commit with the change queue laid over it."""
        assert self.queue is not None
        key = f"{loc.owner}/{loc.kind}/{loc.folder}/{loc.asset}:{loc.ref}"
        queue = self.queue.branch(key)
        path = loc.subpath
        in_head = found is not None and not queue.hides(path)
        row = queue.files.get(path)
        if row is not None:
            return self._queued_node(loc, writable, resolved, index, row, in_head,
                                     self._live_size(key, path, row))
        if queue.is_dir(path) or (found == "dir" and in_head):
            return Node(loc, True, writable, False, resolved.created, resolved=resolved,
                        index=index, in_head=in_head)
        if isinstance(found, ObjectEntry) and in_head:
            return Node(loc, False, writable, False, found.mtime, entry=found,
                        resolved=resolved, index=index, in_head=True)
        raise NotFound(f"no object {path!r} in {loc.api_path()}")

    @staticmethod
    def _queued_node(loc: Location, writable: bool, resolved: Resolved,
                     index: CommitIndex | None, row: Row, in_head: bool, size: int) -> Node:
        entry = ObjectEntry(row.path, row.sha256 or "", size, row.mtime, mode=row.mode)
        return Node(loc, False, writable, False, row.mtime, entry=entry, resolved=resolved,
                    index=index, queued=row, in_head=in_head)

    def _live_size(self, branch: str, path: str, row: Row) -> int:
        """A queued file's size: its local file's while someone may be writing it."""
        if row.local is None:
            return row.size
        try:
            return os.stat(self.queue_local(row.local)).st_size
        except FileNotFoundError:
            return row.size

    def queue_local(self, local: str) -> str:
        assert self.queue is not None
        return str(self.queue.local_path(local))

    def _child_in_commit(self, parent: Node, name: str, key: Key) -> Node | None:
        """A child of a directory inside a commit, straight from the parent's index (listing
        a 100,000-object tree must not resolve every entry from the top again)."""
        index = parent.index
        if index is None:
            return None
        branch = parent.branch_key
        if branch is not None and self.queue is not None and \
                not self.queue.branch(branch).empty():
            return None  # the overlay decides
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
        branch = node.branch_key
        if branch is None or self.queue is None:
            return index.names(loc.subpath)
        queue = self.queue.branch(branch)
        prefix = loc.subpath + "/" if loc.subpath else ""
        names = {n for n in index.names(loc.subpath) if not queue.hides(prefix + n)}
        return sorted(names | queue.names_under(loc.subpath))

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
            # The object's own permission bits; no write bits where nothing may change.
            entry.st_mode = stat.S_IFREG | (node.entry.mode if node.writable
                                            else node.entry.mode & ~0o222)
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

    def _fh(self, handle: FileHandle | DirHandle | LocalHandle) -> int:
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
        subpath = ""
        if len(key) > 4:  # deep enough to be inside a ref: the object path's bound too
            with contextlib.suppress(NotFound):
                subpath = locate(key, self.view.me).subpath
        _check_name(name, subpath)
        attrs = await self._entry(key)
        self.inodes.remember(attrs.st_ino)
        return attrs

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        try:
            return await self._entry(self.inodes.key(inode))
        except (pyfuse3.FUSEError, NotFound):
            orphan = self._orphan_attrs(inode)
            if orphan is None:
                raise
            return orphan

    def _handles_of(self, inode: int) -> list[FileHandle | LocalHandle]:
        return [h for h in self._handles.values()
                if isinstance(h, FileHandle | LocalHandle) and h.inode == inode]

    def _orphan_attrs(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """``fstat`` of an open file whose name is gone: what its open handles hold."""
        handles = self._handles_of(inode)
        if not handles:
            return None
        handle = handles[0]
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_nlink = 0  # unlinked
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_blksize = BLOCK
        entry.st_mode = stat.S_IFREG | handle.mode
        if isinstance(handle, LocalHandle):
            st = os.fstat(handle.fd)
            entry.st_size = st.st_size
            entry.st_mtime_ns = entry.st_ctime_ns = entry.st_atime_ns = st.st_mtime_ns
        else:
            entry.st_size = handle.source.size
        entry.st_blocks = -(-entry.st_size // 512)
        return entry

    def _orphan(self, branch: str, path: str, key: Key) -> None:
        """The file at ``path`` lost its name (unlink, or a rename over it): its open
        handles go on alone and nothing they do reaches the queue any more."""
        for handle in self._local_handles(branch, path):
            handle.orphaned = True
        self.inodes.detach(key)

    def _rehome(self, branch: str, old: str, new: str) -> None:
        """Open handles follow their file (or directory) to its new path."""
        for handle in self._local_handles(branch):
            if handle.path == old:
                handle.path = new
            elif handle.path.startswith(old + "/"):
                handle.path = new + handle.path[len(old):]

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2) and chdir on a private mount (no ``default_permissions``): the modes
        :meth:`attrs` shows, with EROFS for writes where nothing may change."""
        self._count("access")
        node = await self.node(self.inodes.key(inode))
        if mode & os.W_OK and not node.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        return not (mode & os.X_OK and not node.is_dir)

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
        data.f_namemax = MAX_SEGMENT_BYTES
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
        # In a tag or commit, an entry's attributes are fixed by (inode, commit): a tag that is
        # deleted and made again elsewhere lists under another commit.
        commit = handle.node.resolved.commit_id if handle.node.immutable and \
            handle.node.resolved is not None else None
        for position in range(start_id, len(handle.entries)):
            name, key = handle.entries[position]
            ino = self.inodes.ino(key)
            attrs = self._immutable_attrs.get((ino, commit)) if commit else None
            if attrs is None:
                child = self._child_in_commit(handle.node, name, key)
                try:
                    attrs = self.attrs(child or await self.node(key), ino)
                except NotFound:
                    continue  # vanished since opendir: skip it, the snapshot keeps positions
                if commit:
                    self._remember_attrs((ino, commit), attrs)
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, position + 1):
                return
            self.inodes.remember(attrs.st_ino)

    def _remember_attrs(self, entry: tuple[int, str], attrs: pyfuse3.EntryAttributes) -> None:
        """Attributes of an entry of one commit never change: repeated listings reuse them.
        Bounded: forgotten all at once past :data:`IMMUTABLE_ATTRS_MAX` entries."""
        if len(self._immutable_attrs) >= IMMUTABLE_ATTRS_MAX:
            self._immutable_attrs.clear()
        self._immutable_attrs[entry] = attrs

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
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writing:
            branch = self._writable(node, "write")
            truncate = bool(flags & os.O_TRUNC)
            row = await self._materialize(node, truncate)
            info = self._open_local(inode, branch, node.loc.subpath, row)
            handle = self._handles[info.fh]
            assert isinstance(handle, LocalHandle)
            if node.queued is None and not truncate:
                handle.copied_seq = row.seq  # undone at release if nothing is written
            # Emptied: mid-change until closed or fsynced.
            handle.dirty = handle.written = handle.mid_change = truncate
            return info
        if node.queued is not None and node.queued.local is not None:
            return self._open_local(inode, str(node.branch_key), node.loc.subpath, node.queued,
                                    may_write=False)
        assert node.entry is not None and node.resolved is not None
        commit_id, path = node.resolved.commit_id, node.entry.path
        if node.queued is not None:  # a moved or re-timed object: read where it came from
            commit_id, path = node.queued.origin_parts()
        source = HubSource(self.view, node.loc.asset_addr, commit_id, path,
                           str(node.entry.sha256 or (node.queued and node.queued.sha256)),
                           node.entry.size)
        self.cache.pin(source.sha256)
        info = pyfuse3.FileInfo()
        info.fh = self._fh(FileHandle(inode, source,
                                      mode=stat.S_IMODE(self.attrs(node, inode).st_mode)))
        # Keep the kernel's page cache when this inode last showed the same bytes; otherwise
        # the kernel drops it on open (a branch moved underneath).
        info.keep_cache = node.immutable or self._served_sha.get(inode) == source.sha256
        self._served_sha[inode] = source.sha256
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        handle = self._handles.get(fh)
        if isinstance(handle, LocalHandle):
            return os.pread(handle.fd, size, off)
        if not isinstance(handle, FileHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        source = handle.source
        # The kernel sends several reads of one stream at once (as many as its read-ahead
        # holds), slightly out of order: a read near the stream's front, or inside what this
        # handle has already asked to prefetch, counts as sequential.
        front = max(handle.prefetched_to, handle.next_offset + 2 * BLOCK)
        sequential = handle.next_offset - 2 * BLOCK <= off <= front
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
        self._count("release")
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            self.cache.unpin(handle.source.sha256)
        elif isinstance(handle, LocalHandle):
            try:
                self._settle(handle)
            finally:
                os.close(handle.fd)
            assert self.queue is not None
            if handle.orphaned:
                return  # its bytes went with its name
            if not handle.written and handle.copied_seq is not None:
                self._undo_copy(handle)
            elif handle.written:
                await trio.to_thread.run_sync(self.queue.make_durable)
                self._closed.add((handle.branch, handle.path))
                self.uploading = True
                self._closed_event.set()

    async def run_uploader(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Upload closed files in the background, so that ``ah commit`` is mostly a metadata
        call: files closed within :data:`UPLOAD_AHEAD_DELAY` of each other travel together
        (small ones in batches). A failed round is tried again after a backoff that doubles up
        to :data:`UPLOAD_RETRY_MAX` (a large file resumes where the hub says it stopped); the
        commit uploads whatever is still missing."""
        task_status.started()
        delay = UPLOAD_AHEAD_DELAY
        failures = 0
        while True:
            await self._closed_event.wait()
            await trio.sleep(delay)
            self._closed_event = trio.Event()
            closed, self._closed = self._closed, set()
            self.uploading = True
            try:
                await self._upload_closed(closed)
                failures, delay = 0, UPLOAD_AHEAD_DELAY
            except EXPECTED as exc:  # anything else is a bug: the supervisor stops the mount
                failures += 1
                self.upload_failures += 1
                delay = min(UPLOAD_RETRY_FIRST * 2 ** (failures - 1), UPLOAD_RETRY_MAX)
                log.warning("upload ahead of %d file(s) failed (%s); trying again in %.0fs",
                            len(closed), exc, delay)
                self._closed |= closed
                self._closed_event.set()
            finally:
                self.uploading = bool(self._closed)

    async def _upload_closed(self, closed: set[tuple[str, str]]) -> None:
        from ahmount.transfer import LocalFile, upload_files

        assert self.queue is not None
        pending: list[tuple[str, str, Row]] = []
        for branch, path in sorted(closed):
            row = self.queue.branch(branch).files.get(path)
            if row is not None and row.local is not None and not row.uploaded:
                pending.append((branch, path, row))
        if not pending:
            return
        files = [LocalFile(self.queue.local_path(str(r.local)), p) for _, p, r in pending]
        entries, sent = await upload_files(self.view.hub, files)
        self.bytes_uploaded += sent
        for (branch, path, row), entry in zip(pending, entries, strict=True):
            current = self.queue.branch(branch).files.get(path)
            if current is not None and current.seq == row.seq:
                self.queue.touch_file(branch, path, sha256=entry.sha256, uploaded=True,
                                      content_changed=False)

    # -- extended attributes -----------------------------------------------------------------

    async def queued_sha256(self, row: Row) -> str:
        """The hash of a queued file's local bytes, computed now if upload-ahead has not yet
        (remembered in the hash cache, so the upload does not read the file again)."""
        from ahmount.transfer import LocalFile, hash_files

        assert row.local is not None and self.queue is not None
        [entry] = await hash_files([LocalFile(self.queue.local_path(row.local), row.path)])
        return entry.sha256

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
        if not name.startswith(XATTR_PREFIX):
            # The kernel asks for security.capability before every write: answer at once.
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = await self.node(self.inodes.key(inode))
        if name == SHA256_XATTR and node.queued is not None and not node.queued.sha256:
            return (await self.queued_sha256(node.queued)).encode()
        value = (await self._xattrs(node)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = await self.node(self.inodes.key(inode))
        return sorted(await self._xattrs(node))

    # -- writing branches --------------------------------------------------------------------

    def _writable(self, node: Node, what: str) -> str:
        """The branch key of a writable place, or EROFS naming why not."""
        branch = node.branch_key
        if branch is None or not node.writable or self.queue is None:
            why = "a tag or commit" if node.immutable else "read-only for you"
            raise refuse(errno.EROFS, "%s %s refused: %s is %s", what, node.loc.api_path(),
                         node.loc.api_path(), why)
        return branch

    async def _child(self, parent_inode: int, name: bytes) -> tuple[Node, Key, str]:
        parent_key = self.inodes.key(parent_inode)
        parent = await self.node(parent_key)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = _decode(name)
        if "/" in text or text in (".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        subpath = f"{parent.loc.subpath}/{text}" if parent.loc.subpath else text
        key = (*parent_key, text)
        _check_name(name, subpath)
        return parent, key, subpath

    async def _exists(self, key: Key) -> Node | None:
        try:
            return await self.node(key)
        except NotFound:
            return None

    def _dirty_handle(self, branch: str, path: str) -> LocalHandle | None:
        """An open handle with writes the queue has not recorded yet, if any."""
        return next((h for h in self._local_handles(branch, path) if h.dirty), None)

    def _open_local(self, inode: int, branch: str, path: str, row: Row,
                    fd: int | None = None, may_write: bool = True) -> pyfuse3.FileInfo:
        assert row.local is not None
        if fd is None:
            fd = os.open(self.queue_local(row.local), os.O_RDWR if may_write else os.O_RDONLY)
        info = pyfuse3.FileInfo()
        info.fh = self._fh(LocalHandle(inode, branch, path, fd, may_write=may_write,
                                       mode=row.mode))
        info.keep_cache = False
        return info

    async def _materialize(self, node: Node, truncate: bool) -> Row:
        """Copy-on-write: give a branch file local bytes (its current content unless
        ``truncate``) and queue it."""
        assert self.queue is not None and node.entry is not None and node.resolved is not None
        branch = str(node.branch_key)
        path = node.loc.subpath
        row = node.queued
        if row is not None and row.local is not None:
            if self.queue.is_pinned(row.local):
                return await self._copy_pinned(branch, node, row, truncate)
            if truncate:
                os.truncate(self.queue_local(row.local), 0)
                row = self.queue.touch_file(branch, path, size=0, mtime=time.time())
            return row
        local, local_path = self.queue.new_local()
        size = 0
        if not truncate and node.entry.size:
            commit_id, origin_path = node.resolved.commit_id, path
            if row is not None:
                commit_id, origin_path = row.origin_parts()
            source = HubSource(self.view, node.loc.asset_addr, commit_id, origin_path,
                               str(node.entry.sha256 or (row and row.sha256)), node.entry.size)
            await self.cache.copy_to(source, local_path)
            size = node.entry.size
        return self.queue.put_file(branch, path, node.resolved.commit_id, local=local,
                                   size=size, mtime=time.time() if truncate else node.mtime,
                                   mode=node.entry.mode)

    async def _copy_pinned(self, branch: str, node: Node, row: Row, truncate: bool) -> Row:
        """A write to a file that a running commit is reading: the writer gets bytes of its
        own (a copy, or nothing when truncating), so the commit sees the file as it was."""
        assert self.queue is not None and row.local is not None and node.resolved is not None
        local, local_path = self.queue.new_local()
        if not truncate:
            await trio.to_thread.run_sync(shutil.copyfile, self.queue_local(row.local),
                                          local_path)
        current = self.queue.branch(branch).files.get(node.loc.subpath)
        if current is not None and current.local is not None and \
                not self.queue.is_pinned(current.local):
            # Another writer made its copy while this one was copying: share it.
            local_path.unlink(missing_ok=True)
            if truncate:
                os.truncate(self.queue_local(current.local), 0)
                return self.queue.touch_file(branch, node.loc.subpath, size=0,
                                             mtime=time.time())
            return current
        size = 0 if truncate else os.stat(local_path).st_size
        return self.queue.put_file(branch, node.loc.subpath, row.base, local=local, size=size,
                                   mtime=time.time() if truncate else row.mtime, mode=row.mode)

    def _undo_copy(self, handle: LocalHandle) -> None:
        """A head object opened for writing and closed unwritten (``sqlite3 db 'select'``)
        is no change: its copy leaves the queue, unless someone else changed it meanwhile."""
        assert self.queue is not None
        row = self.queue.branch(handle.branch).files.get(handle.path)
        if row is None or row.seq != handle.copied_seq or \
                self.open_for_writing(handle.branch, handle.path):
            return
        self.queue.delete(handle.branch, handle.path, row.base, in_head=False)

    def _local_handles(self, branch: str, path: str | None = None) -> list[LocalHandle]:
        """Open handles of queued files of ``branch`` (at ``path``, if given) that still
        have a name."""
        return [h for h in self._handles.values() if isinstance(h, LocalHandle) and
                not h.orphaned and h.branch == branch and (path is None or h.path == path)]

    def settle_branch(self, branch: str) -> None:
        """Record in the queue what open handles of ``branch`` wrote since they last did (a
        commit must see every write as a newer ``seq``)."""
        for handle in self._local_handles(branch):
            self._settle(handle)

    def being_written(self, branch: str, path: str) -> bool:
        """True if an open handle wrote to (or truncated, or created) ``path`` since its last
        flush or fsync: its bytes are in the middle of a change the writer has not finished."""
        return any(h.mid_change for h in self._local_handles(branch, path))

    def open_for_writing(self, branch: str, path: str) -> bool:
        """True if a handle that may write ``path`` of ``branch`` is open."""
        return any(h.may_write for h in self._local_handles(branch, path))

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        self._count("create")
        parent, key, path = await self._child(parent_inode, name)
        branch = self._writable(parent, "create")
        assert self.queue is not None and parent.resolved is not None
        if not stat.S_ISREG(mode):
            raise refuse(errno.EPERM, "create of %r refused: only regular files", path)
        existing = await self._exists(key)
        if existing is not None and existing.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        local, fd = self.queue.create_local()
        try:
            # The mode asked for, less the caller's umask: kept, shown and committed.
            row = self.queue.put_file(branch, path, parent.resolved.commit_id, local=local,
                                      mode=stat.S_IMODE(mode) & 0o777 & ~ctx.umask)
        except BaseException:
            os.close(fd)
            raise
        # What node(key) would resolve to now, without resolving it again: a new, empty file.
        node = self._queued_node(locate(key, self.view.me), parent.writable, parent.resolved,
                                 parent.index, row, existing is not None and existing.in_head, 0)
        ino = self.inodes.ino(key)
        self.inodes.remember(ino)
        info = self._open_local(ino, branch, path, row, fd)
        handle = self._handles[info.fh]
        assert isinstance(handle, LocalHandle)
        # New: mid-change until closed or fsynced.
        handle.dirty = handle.written = handle.mid_change = True
        return info, self.attrs(node, ino)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._count("write")
        handle = self._handles.get(fh)
        if not isinstance(handle, LocalHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        handle.dirty = handle.written = handle.mid_change = True
        return os.pwrite(handle.fd, buf, off)

    def _settle(self, handle: LocalHandle) -> None:
        """Record a written file's size and time in the queue (durable from here on)."""
        assert self.queue is not None
        if handle.orphaned or not handle.dirty or \
                handle.path not in self.queue.branch(handle.branch).files:
            return
        size = os.fstat(handle.fd).st_size
        mtime = time.time() if handle.mtime is None else handle.mtime
        self.queue.touch_file(handle.branch, handle.path, size=size, mtime=mtime)
        handle.dirty = False
        handle.mtime = None

    @fuse_errors
    async def flush(self, fh: int) -> None:
        self._count("flush")
        handle = self._handles.get(fh)
        if isinstance(handle, LocalHandle):
            self._settle(handle)
            handle.mid_change = False

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, LocalHandle):
            await trio.to_thread.run_sync(os.fsync, handle.fd)
            self._settle(handle)
            handle.mid_change = False
            assert self.queue is not None
            await trio.to_thread.run_sync(self.queue.make_durable)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("setattr")
        try:
            key = self.inodes.key(inode)
        except pyfuse3.FUSEError:
            return self._setattr_orphan(inode, attr, fields, fh)
        node = await self.node(key)
        if (fields.update_uid and attr.st_uid != self.uid) or (
            fields.update_gid and attr.st_gid != self.gid
        ):
            # Chowning to the owner it already shows (tar, rsync -a) is a no-op.
            raise refuse(errno.EPERM, "chown of %s refused: assets have no owners per file",
                         node.loc.api_path())
        changes = fields.update_size or fields.update_mtime or fields.update_atime or \
            fields.update_mode
        if not changes:
            return self.attrs(node, inode)
        chmod = fields.update_mode and \
            stat.S_IMODE(attr.st_mode) != stat.S_IMODE(self.attrs(node, inode).st_mode)
        if chmod:  # (a chmod to what it already is, as rsync -a and cp -p do, is no change)
            if node.is_dir:
                raise refuse(errno.EPERM, "chmod of directory %s refused: directories are "
                             "implied by object paths and keep no mode", node.loc.api_path())
            elif stat.S_IMODE(attr.st_mode) & ~0o777:
                raise refuse(errno.EPERM, "chmod of %s refused: only permission bits are kept"
                             " (no setuid, setgid or sticky)", node.loc.api_path())
        branch = self._writable(node, "setattr")
        assert self.queue is not None
        if node.is_dir:
            return self.attrs(node, inode)
        if chmod:
            self._chmod(branch, node, stat.S_IMODE(attr.st_mode))
            node = await self.node(key)
        if fields.update_size:
            row = await self._materialize(node, truncate=attr.st_size == 0)
            assert row.local is not None
            os.truncate(self.queue_local(row.local), attr.st_size)
            self.queue.touch_file(branch, node.loc.subpath, size=attr.st_size,
                                  mtime=time.time())
        if fields.update_mtime:
            mtime = attr.st_mtime_ns / 1e9
            writing = self._dirty_handle(branch, node.loc.subpath)
            if writing is not None and not fields.update_size:
                # The kernel's writeback sends the new mtime just before the flush that
                # records the size: both go into the queue in the flush's one transaction.
                os.utime(writing.fd, (mtime, mtime))
                writing.mtime = mtime
                node = replace(node, mtime=mtime)
                return self.attrs(node, inode)
            node = await self.node(key)
            if node.queued is not None:
                if node.queued.local is not None:
                    os.utime(self.queue_local(node.queued.local), (mtime, mtime))
                self.queue.touch_file(branch, node.loc.subpath, mtime=mtime,
                                      content_changed=False)
            else:
                assert node.resolved is not None
                self._queue_blob_ref(branch, node, node.loc.subpath, node.resolved.commit_id,
                                     mtime=mtime)
        return self.attrs(await self.node(key), inode)

    def _chmod(self, branch: str, node: Node, mode: int) -> None:
        """Queue a file's new permission bits (its bytes stay where they are)."""
        assert self.queue is not None and node.entry is not None and node.resolved is not None
        if node.queued is not None:
            self.queue.touch_file(branch, node.loc.subpath, mode=mode, content_changed=False)
        else:
            self._queue_blob_ref(branch, node, node.loc.subpath, node.resolved.commit_id,
                                 mode=mode)

    def _queue_blob_ref(self, branch: str, node: Node, path: str, base: str,
                        mtime: float | None = None, mode: int | None = None) -> None:
        """Queue the head object of ``node`` at ``path`` by reference to its blob (no bytes
        copied), with a new mtime or mode if given."""
        assert self.queue is not None and node.entry is not None
        self.queue.put_file(branch, path, base, sha256=node.entry.sha256, size=node.entry.size,
                            mtime=node.entry.mtime if mtime is None else mtime,
                            origin=self._origin(node),
                            mode=node.entry.mode if mode is None else mode)

    def _setattr_orphan(self, inode: int, attr: pyfuse3.EntryAttributes,
                        fields: pyfuse3.SetattrFields, fh: int | None
                        ) -> pyfuse3.EntryAttributes:
        """ftruncate/futimens of an unlinked open file: applied to its own bytes only. Only
        read-only opens left: the kernel's own flush of the times (it sends one right after
        the unlink) has nothing to change, and answers the attributes."""
        handle = self._handles.get(fh) if fh is not None else None
        local = [h for h in self._handles_of(inode) if isinstance(h, LocalHandle)]
        if not isinstance(handle, LocalHandle):
            handle = local[0] if local else None
        if handle is not None and fields.update_size:
            os.ftruncate(handle.fd, attr.st_size)
        if handle is not None and fields.update_mtime:
            os.utime(handle.fd, ns=(attr.st_mtime_ns, attr.st_mtime_ns))
        found = self._orphan_attrs(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._count("unlink")
        parent, key, path = await self._child(parent_inode, name)
        branch = self._writable(parent, "unlink")
        node = await self.node(key)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        assert self.queue is not None and parent.resolved is not None
        self.queue.delete(branch, path, parent.resolved.commit_id, in_head=node.in_head)
        self._orphan(branch, path, key)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("mkdir")
        parent, key, path = await self._child(parent_inode, name)
        if await self._exists(key) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if parent.loc.place in (Place.KIND, Place.FOLDER, Place.ASSET):
            await self._create_resource(parent, _decode(name))
        else:
            branch = self._writable(parent, "mkdir")
            assert self.queue is not None and parent.resolved is not None
            self.queue.add_dir(branch, path, parent.resolved.commit_id)
        ino = self.inodes.ino(key)
        self.inodes.remember(ino)
        return self.attrs(await self.node(key), ino)

    async def _create_resource(self, parent: Node, name: str) -> None:
        """mkdir in a kind directory makes a folder, in a folder an asset, in an asset a
        branch (models only)."""
        loc = parent.loc
        if not parent.writable:
            raise refuse(errno.EROFS, "mkdir %s/%s refused: read-only", loc.api_path(), name)
        hub = self.view.hub
        try:
            if loc.place is Place.KIND:
                assert loc.kind is not None
                await hub.create_folder(FolderAddr(self.view.me, loc.kind, name))
            elif loc.place is Place.FOLDER:
                await hub.create_asset(AssetAddr(loc.folder_addr, name))
            else:
                await hub.create_branch(loc.asset_addr, name)
        except InvalidArgument as exc:
            raise refuse(errno.EINVAL, "mkdir %s/%s refused: %s", loc.api_path(), name,
                         exc) from None
        self.view.invalidate()

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._count("rmdir")
        parent, key, path = await self._child(parent_inode, name)
        node = await self.node(key)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not await self._is_empty(node):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        loc = node.loc
        if loc.place in (Place.FOLDER, Place.ASSET, Place.REF):
            if not parent.writable:
                raise refuse(errno.EROFS, "rmdir %s refused: read-only", loc.api_path())
            if loc.place is Place.REF and loc.ref == "main":
                raise refuse(errno.EPERM, "rmdir %s refused: main is never deleted",
                             loc.api_path())
            hub = self.view.hub
            if loc.place is Place.FOLDER:
                await hub.delete_folder(loc.folder_addr)
            elif loc.place is Place.ASSET:
                await hub.delete_asset(loc.asset_addr)
            else:
                assert loc.ref is not None
                await hub.delete_ref(loc.asset_addr, loc.ref)
            self.view.invalidate()
            return
        branch = self._writable(parent, "rmdir")
        assert self.queue is not None
        self.queue.remove_dir(branch, path)

    async def _is_empty(self, node: Node) -> bool:
        """An asset is empty when none of its branches and tags holds an object (its
        directory always lists its refs); any other directory when it lists nothing."""
        if node.loc.place is not Place.ASSET:
            return not await self.children(node)
        for ref in await self.view.refs(node.loc.asset_addr):
            child = await self.node((*node.loc.key, ref))
            assert child.resolved is not None
            index = await self.view.index(node.loc.asset_addr, child.resolved.commit_id,
                                          child.resolved.created)
            queued = child.branch_key and self.queue and not self.queue.branch(
                child.branch_key).empty()
            if index.names("") or queued:
                return False
        return True

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._count("rename")
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise refuse(errno.EINVAL, "rename with RENAME_EXCHANGE is not supported")
        old_parent, old_key, old_path = await self._child(parent_inode_old, name_old)
        new_parent, new_key, new_path = await self._child(parent_inode_new, name_new)
        node = await self.node(old_key)
        target = await self._exists(new_key)
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if node.loc.place in (Place.FOLDER, Place.ASSET):
            await self._rename_resource(node, old_parent, new_parent, _decode(name_new))
            self.inodes.rename(old_key, new_key)
            return
        branch = self._writable(old_parent, "rename")
        if new_parent.branch_key != branch:
            raise refuse(errno.EXDEV, "rename across branches refused: %s to %s",
                         old_parent.loc.api_path(), new_parent.loc.api_path())
        assert self.queue is not None and old_parent.resolved is not None
        base = old_parent.resolved.commit_id
        if target is not None:
            if target.is_dir != node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR if target.is_dir else errno.ENOTDIR)
            if target.is_dir and await self.children(target):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        if target is not None and not target.is_dir:
            self._orphan(branch, new_path, new_key)  # the replaced file lives on if open
        if node.is_dir:
            await self._move_dir(branch, base, node, old_path, new_path)
        else:
            self._move_file(branch, base, node, new_path)
        self._rehome(branch, old_path, new_path)
        self.inodes.rename(old_key, new_key)

    def _move_file(self, branch: str, base: str, node: Node, new_path: str) -> None:
        """Queue a file's move: its queued bytes go along; an unchanged object of the head
        moves as a reference to its blob (no bytes copied)."""
        assert self.queue is not None and node.entry is not None
        if node.queued is not None:
            self.queue.move_file(branch, node.loc.subpath, new_path, base, node.in_head)
        else:
            self._queue_blob_ref(branch, node, new_path, base)
            self.queue.delete(branch, node.loc.subpath, base, in_head=True)

    def _origin(self, node: Node) -> str:
        assert node.resolved is not None and node.entry is not None
        return f"{node.resolved.commit_id}/{node.entry.path}"

    async def _move_dir(self, branch: str, base: str, node: Node, old: str, new: str) -> None:
        assert self.queue is not None
        queue = self.queue.branch(branch)
        files: list[tuple[str, Node]] = []

        async def walk(directory: Node, path: str) -> None:
            for name in await self.children(directory):
                child = await self.node((*directory.loc.key, name))
                child_path = f"{path}/{name}"
                if child.is_dir:
                    await walk(child, child_path)
                else:
                    files.append((child_path, child))

        await walk(node, old)
        empty_dirs = [d for d in queue.dirs if d == old or d.startswith(old + "/")]
        for path, child in files:
            self._move_file(branch, base, child, new + path[len(old):])
        for d in empty_dirs:
            self.queue.remove_dir(branch, d)
            self.queue.add_dir(branch, new + d[len(old):], base)
        if node.in_head:
            self.queue.delete(branch, old + "/", base, in_head=True)

    async def _rename_resource(self, node: Node, old_parent: Node, new_parent: Node,
                               new_name: str) -> None:
        """``mv`` of a folder or an asset renames it (in the same parent only)."""
        if old_parent.loc.key != new_parent.loc.key:
            raise refuse(errno.EXDEV, "moving %s to another parent is not a rename",
                         node.loc.api_path())
        if not old_parent.writable:
            raise refuse(errno.EROFS, "rename of %s refused: read-only", node.loc.api_path())
        if node.loc.place is Place.FOLDER:
            await self.view.hub.update_folder(node.loc.folder_addr, name=new_name)
        else:
            await self.view.hub.update_asset(node.loc.asset_addr, name=new_name)
        self.view.invalidate()

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = await self.node(self.inodes.key(inode))
        loc = node.loc
        if name not in (b"user.ah.labels", b"user.ah.description") or \
                loc.place not in (Place.FOLDER, Place.ASSET):
            raise refuse(errno.ENOTSUP, "xattr %r cannot be set on %s", name, loc.api_path())
        if not node.writable:
            raise refuse(errno.EROFS, "xattr of %s refused: read-only", loc.api_path())
        text = value.decode(errors="replace")
        labels = [x.strip() for x in text.split(",") if x.strip()] \
            if name == b"user.ah.labels" else None
        description = text if name == b"user.ah.description" else None
        if loc.place is Place.FOLDER:
            await self.view.hub.update_folder(loc.folder_addr, labels=labels,
                                              description=description)
        else:
            await self.view.hub.update_asset(loc.asset_addr, labels=labels,
                                             description=description)
        self.view.invalidate()

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


def _check_name(name: bytes, subpath: str) -> None:
    """ENAMETOOLONG / EINVAL for what the hub could never store: the limits and the name rule
    are the hub's own (:mod:`ahmount.names`), so nothing the mount accepts can block a commit
    later."""
    if len(name) > MAX_SEGMENT_BYTES:
        raise refuse(errno.ENAMETOOLONG, "name of %d bytes refused: at most %d",
                     len(name), MAX_SEGMENT_BYTES)
    if has_control_characters(name.decode(errors="replace")):
        raise refuse(errno.EINVAL, "name %r refused: control characters are not allowed in "
                     "names", name)
    if len(subpath.encode()) > MAX_OBJECT_PATH_BYTES:
        raise refuse(errno.ENAMETOOLONG, "object path %s... refused: over %d bytes",
                     subpath[:60], MAX_OBJECT_PATH_BYTES)


def _decode(name: bytes) -> str:
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None
