"""The file-system core: POSIX operations on the asset tree, by path, with no FUSE in sight.

Front ends (the FUSE adapter, the in-process test driver, fsspec) call these with paths as
:data:`Key` tuples and names as ``str``, and keep their own handle numbers and inodes. Every
failure is a :mod:`ahmount.vfs.errors` refusal or a domain error of :mod:`ahmount.errors`;
each front end maps them once.

Branches are written copy-on-write: the first write to a head object copies its bytes into
the change queue (or truncates), later writes go to that local file, and each
close/flush/fsync records size and time in the queue (durable from then on). Metadata-only
changes (a move, a new mtime, a chmod of an unchanged head object) queue a reference to the
object's blob and copy nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field, replace

import trio

from ahmount.errors import AlreadyExists, NotFound
from ahmount.hub.models import ObjectEntry
from ahmount.names import MAX_SEGMENT_BYTES
from ahmount.transfer.hashes import hash_files
from ahmount.transfer.plan import LocalFile
from ahmount.vfs import resources
from ahmount.vfs.change_queue import ChangeQueue, Row, room_on
from ahmount.vfs.errors import (
    BadHandle,
    CrossBranch,
    InvalidName,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    NotEmpty,
    NotPermitted,
    ReadOnly,
)
from ahmount.vfs.file_io import pread_unstalled, start_writeout
from ahmount.vfs.handles import (
    Handle,
    Handles,
    HandleStat,
    ReadHandle,
    WriteHandle,
    handle_stat,
    read_source,
)
from ahmount.vfs.hub_view import HubView
from ahmount.vfs.layout import Key, Place, locate
from ahmount.vfs.object_cache import BLOCK, ObjectCache
from ahmount.vfs.sibling_fetch import SiblingFetcher
from ahmount.vfs.tree import Node, Tree, check_name, child_path
from ahmount.vfs.writeback import WriteBack

log = logging.getLogger("ahmount.vfs")

#: A written file's bytes are handed to the disk every this many bytes written
#: (:func:`start_writeout`), not all at the writer's sync.
WRITEOUT_EVERY = 8 << 20


@dataclass
class Listing:
    """A directory as it was when opened: entries added or removed later neither shift nor
    repeat what a reader already got."""

    node: Node
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FsStats:
    block_size: int
    blocks: int
    blocks_free: int
    name_max: int


class VFS:
    def __init__(self, view: HubView, cache: ObjectCache, queue: ChangeQueue | None,
                 writeback: WriteBack | None, started: float | None = None) -> None:
        self.view = view
        self.cache = cache
        self.queue = queue
        self.writeback = writeback
        if writeback is not None:
            writeback.incomplete = self.incomplete
        self.tree = Tree(view, queue, time.time() if started is None else started)
        self.handles = Handles()
        #: Fetches small files with their directory's other small files (set by a session
        #: with a supervisor to run the batches under; None: one request per file).
        self.siblings: SiblingFetcher | None = None
        #: Only the user of this session sees its tree (a mount without ``--allow-other``):
        #: a directory's mode then keeps no one out, and a chmod of one is accepted and not
        #: kept, as its times are. Where others see it, that chmod is refused.
        self.private = True
        self._dir_modes_noted: set[str] = set()
        #: Failed writes the queue could not record yet, by the queue file written (which
        #: follows a rename of its path; a file created again has a new one).
        self._unrecorded_failures: dict[str, str] = {}
        #: Commits of one branch take turns (``ah commit`` in two terminals): each takes
        #: what its snapshot holds, and the second's view of the head must include the
        #: first's commit, or the hub refuses it as a change made while it uploaded.
        self._commit_turns: dict[str, trio.Lock] = {}

    def commit_turn(self, branch_key: str) -> trio.Lock:
        """The lock a commit of the branch ``branch_key`` holds from its snapshot to its
        end (one per branch committed in this session: a few bytes each)."""
        return self._commit_turns.setdefault(branch_key, trio.Lock())

    @property
    def refresh(self) -> float:
        """How long a front end (the kernel's entry and attribute caches) may keep what may
        change: ``--refresh`` while polling, the live TTL while the change feed is up (it
        invalidates what changed elsewhere at once, and replays what a lapse missed)."""
        return self.view.ttl

    @property
    def _queue(self) -> ChangeQueue:
        if self.queue is None:
            raise ReadOnly("this session has no change queue: branches are read-only")
        return self.queue

    # -- looking ---------------------------------------------------------------------------

    async def stat(self, key: Key) -> Node:
        return await self.tree.node(key)

    async def lookup(self, parent: Key, name: str) -> tuple[Key, Node]:
        key = (*parent, name)
        subpath = ""
        if len(key) > 4:  # deep enough to be inside a ref: the object path's bound too
            with contextlib.suppress(NotFound):
                subpath = locate(key, self.tree.me).subpath
        check_name(name, subpath)
        return key, await self.tree.node(key)

    async def access(self, key: Key, write: bool, execute: bool) -> bool:
        """access(2): the modes :class:`Node` shows, :class:`ReadOnly` for writes where
        nothing may change."""
        node = await self.tree.node(key)
        if write and not node.writable:
            raise ReadOnly(f"{node.loc.api_path()} is read-only")
        return not (execute and not node.is_dir)

    async def opendir(self, key: Key) -> Listing:
        node = await self.tree.node(key)
        if not node.is_dir:
            raise NotADirectory(f"{node.loc.api_path()} is not a directory")
        if node.loc.place is Place.REF:
            node = await self.tree.with_index(node)
        return Listing(node, await self.tree.children(node))

    def shows_commit_only(self, node: Node) -> bool:
        """True when what ``node`` (a directory of a ref) lists is its commit's objects and
        nothing else: a tag or commit, or a branch with nothing queued."""
        branch = node.branch_key
        return node.immutable or branch is None or self.queue is None or \
            self.queue.branch(branch).empty()

    def commit_children(self, node: Node) -> dict[str, ObjectEntry | None] | None:
        """What a directory inside a commit lists, straight from the commit's index (each
        child's entry, ``None`` for a subdirectory); None where the queue's overlay or a
        fresh resolution decides (see :meth:`listed`)."""
        return self.tree.commit_children(node)

    async def listed(self, listing: Listing, name: str) -> Node | None:
        """One entry of an open listing (None if it vanished since the listing was taken)."""
        key = (*listing.node.loc.key, name)
        child = self.tree.child_in_commit(listing.node, name, key)
        if child is not None:
            return child
        try:
            return await self.tree.node(key)
        except NotFound:
            return None

    async def listdir(self, key: Key) -> list[tuple[str, Node]]:
        """Every entry of a directory with what it is (an ``ls -l``)."""
        listing = await self.opendir(key)
        out = []
        for name in listing.names:
            node = await self.listed(listing, name)
            if node is not None:
                out.append((name, node))
        return out

    def statfs(self) -> FsStats:
        """The cache's size and use; free: what the cache has left, and never more than
        files may still take on its disk (``df`` before writing a checkpoint, or a
        downloader's free-space check, must not be told of room the disk lacks)."""
        free = max(self.cache.max_bytes - self.cache.used_bytes(), 0)
        disk = self.queue.files_dir if self.queue is not None else self.cache.root
        free = max(min(free, room_on(disk)), 0)
        return FsStats(BLOCK, max(self.cache.max_bytes // BLOCK, 1), free // BLOCK,
                       MAX_SEGMENT_BYTES)

    # -- files -----------------------------------------------------------------------------

    async def open(self, key: Key, write: bool = False, truncate: bool = False) -> Handle:
        node = await self.tree.node(key)
        if node.is_dir:
            raise IsADirectory(f"{node.loc.api_path()} is a directory")
        if write or truncate:
            branch = self.tree.writable_branch(node, "write")
            row = await self._materialize(node, truncate)
            handle = self._open_local(branch, node.loc.subpath, row)
            handle.shown = node
            if node.queued is None and not truncate:
                handle.copied_seq = row.seq  # undone at release if nothing is written
            if truncate:  # emptied: mid-change until closed or fsynced
                handle.mark_written()
            return handle
        if node.queued is not None and node.queued.local is not None:
            return self._open_local(str(node.branch_key), node.loc.subpath, node.queued,
                                    may_write=False)
        source = read_source(self.view, node)
        self.cache.pin(source.sha256)
        if self.siblings is not None:
            self.siblings.opened(node, source)
        return self.handles.add(ReadHandle(source, mode=node.permissions,
                                           immutable=node.immutable))

    async def create(self, parent_key: Key, name: str, mode: int) -> tuple[WriteHandle, Key,
                                                                            Node]:
        """A new empty file (or an existing one emptied) with permission bits ``mode``."""
        parent, key, path = await self._child(parent_key, name)
        branch = self.tree.writable_branch(parent, "create")
        assert parent.resolved is not None
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise NotPermitted(f"create of {path!r} refused: only regular files")
        existing = await self.tree.exists(key)
        if existing is not None and existing.is_dir:
            raise IsADirectory(f"{existing.loc.api_path()} is a directory")
        local, fd = self._queue.create_local()
        try:
            row = self._queue.put_file(branch, path, parent.resolved.commit_id, local=local,
                                       mode=stat.S_IMODE(mode) & 0o777)
        except BaseException:
            os.close(fd)
            raise
        # What node(key) would resolve to now, without resolving it again: a new, empty file.
        node = self.tree.queued_node(locate(key, self.tree.me), parent.writable,
                                     parent.resolved, parent.index, row,
                                     existing is not None and existing.in_head, 0)
        handle = self._open_local(branch, path, row, fd)
        handle.mark_written()  # new: mid-change until closed or fsynced
        handle.shown = node
        return handle, key, node

    def _live(self, handle: Handle) -> Handle:
        if handle not in self.handles:
            raise BadHandle("the handle is not open")
        return handle

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        handle = self._live(handle)
        if isinstance(handle, WriteHandle):
            return (await pread_unstalled(handle.fd, size, offset))[0]
        return await handle.read(self.cache, offset, size)

    async def read_whole_if_here(self, handle: Handle) -> bytes | None:
        """All the bytes of a file opened from the hub when they are small and here already
        (:meth:`ObjectCache.read_if_here`), else None."""
        handle = self._live(handle)
        if not isinstance(handle, ReadHandle):
            return None
        return await self.cache.read_if_here(handle.source)

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        handle = self._live(handle)
        if not isinstance(handle, WriteHandle) or not handle.may_write:
            raise BadHandle("the file is not open for writing")
        handle.mark_written()
        try:
            if self.queue is not None and not self.queue.room_for(len(data)):
                raise OSError(errno.ENOSPC, "No space left on device (the cache disk's last "
                              "MiBs are kept for the change queue's records)")
            done = os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            self._write_failed(handle, exc)
            raise
        handle.unwritten += done
        if handle.unwritten >= WRITEOUT_EVERY:
            handle.unwritten = 0
            start_writeout(handle.fd, max(0, offset + done - WRITEOUT_EVERY), WRITEOUT_EVERY)
        return done

    def flush(self, handle: Handle) -> None:
        if isinstance(handle, WriteHandle):
            self._settle(handle)
            handle.mid_change = False

    async def fsync(self, handle: Handle) -> None:
        if isinstance(handle, WriteHandle):
            try:
                await trio.to_thread.run_sync(os.fsync, handle.fd)
            except OSError as exc:  # written bytes that never reached the disk: lost
                self._write_failed(handle, exc)
                raise
            self._settle(handle)
            handle.mid_change = False
            await trio.to_thread.run_sync(self._queue.make_durable)

    async def release(self, handle: Handle) -> None:
        if handle not in self.handles:
            return
        self.handles.discard(handle)
        if isinstance(handle, ReadHandle):
            self.cache.unpin(handle.source.sha256)
            return
        try:
            self._settle(handle)
        finally:
            os.close(handle.fd)
        if handle.orphaned:
            return  # its bytes went with its name
        if not handle.written and handle.copied_seq is not None:
            self._undo_copy(handle)
        elif handle.written and self.writeback is not None:
            # Durable against a killed daemon already (the row is committed to SQLite, the
            # bytes are in the page cache); against a power loss once fsynced (``fsync``
            # makes the queue durable), as documented: no fsync per close.
            self.writeback.closed(handle.branch, handle.path)

    def handle_stat(self, handle: Handle) -> HandleStat:
        return handle_stat(self._live(handle))

    def handle_setattr(self, handle: Handle, size: int | None = None,
                       mtime_ns: int | None = None) -> HandleStat:
        """ftruncate/futimens of an open file whose name is gone: applied to its own bytes
        only (read handles have nothing to change)."""
        handle = self._live(handle)
        if isinstance(handle, WriteHandle):
            if size is not None:
                os.ftruncate(handle.fd, size)
            if mtime_ns is not None:
                os.utime(handle.fd, ns=(mtime_ns, mtime_ns))
        return handle_stat(handle)

    # -- attributes ------------------------------------------------------------------------

    @staticmethod
    def _keep_mtime(writing: WriteHandle, mtime: float) -> None:
        """A dirty writer's new mtime: on its local bytes now, into the queue with the size
        at its flush."""
        os.utime(writing.fd, (mtime, mtime))
        writing.mtime = mtime

    def writer_mtime(self, handle: Handle, mtime: float) -> Node | None:
        """The mtime the kernel's writeback sends for a written file just before the flush
        that records it (once per written file): kept on the handle and answered with what
        the file was last shown as, at its live size, without resolving its path again
        (half of what that setattr cost). None when :meth:`setattr` must decide: not a
        writer with unrecorded writes, or nothing shown for it yet."""
        if not isinstance(handle, WriteHandle) or not handle.dirty or handle.orphaned or \
                handle.shown is None or handle not in self.handles:
            return None
        self._keep_mtime(handle, mtime)
        shown = handle.shown
        assert shown.entry is not None
        return replace(shown, mtime=mtime,
                       entry=replace(shown.entry, size=os.fstat(handle.fd).st_size))

    async def setattr(self, key: Key, size: int | None = None, mtime: float | None = None,
                      mode: int | None = None, atime: bool = False) -> Node:
        """truncate, utimes, chmod. A chmod to what the file shows already (as rsync -a and
        cp -p do) is no change; an access time is not kept, but like any change it is
        refused where nothing may change."""
        node = await self.tree.node(key)
        if size is not None and node.is_dir:  # the kernel's rule, for other front ends
            raise IsADirectory(f"{node.loc.api_path()} is a directory")
        chmod = mode is not None and stat.S_IMODE(mode) != node.permissions
        if chmod:
            assert mode is not None
            if node.is_dir and not self.private:
                raise NotPermitted(f"chmod of directory {node.loc.api_path()} refused: "
                                   "directories are implied by object paths and keep no mode, "
                                   "and other users see this tree (a mode they would be "
                                   "kept out by cannot be shown)")
            if not node.is_dir and stat.S_IMODE(mode) & ~0o777:
                raise NotPermitted(f"chmod of {node.loc.api_path()} refused: only permission "
                                   "bits are kept (no setuid, setgid or sticky)")
        if size is None and mtime is None and mode is None and not atime:
            return node
        branch = self.tree.writable_branch(node, "setattr")
        queue = self._queue
        if node.is_dir:
            if chmod and branch not in self._dir_modes_noted:
                # As a directory's times are: tar x and rsync -a set both on every directory
                # they make, and failing them fails the whole extraction.
                self._dir_modes_noted.add(branch)
                log.info("chmod of directory %s to %o accepted but not kept: directories are "
                         "implied by object paths (noted once per branch)",
                         node.loc.api_path(), mode)
            return node
        if chmod:
            assert mode is not None
            self._chmod(branch, node, stat.S_IMODE(mode))
            node = await self.tree.node(key)
        if size is not None:
            row = await self._materialize(node, truncate=size == 0)
            assert row.local is not None
            os.truncate(self.tree.local_path(row.local), size)
            queue.touch_file(branch, node.loc.subpath, size=size, mtime=time.time())
        if mtime is not None:
            writing = self.handles.dirty(branch, node.loc.subpath)
            if writing is not None and size is None:
                # A kernel's writeback sends the new mtime just before the flush that records
                # the size: both go into the queue in the flush's one record.
                self._keep_mtime(writing, mtime)
                return replace(node, mtime=mtime)
            node = await self.tree.node(key)
            if node.queued is not None:
                if node.queued.local is not None:
                    os.utime(self.tree.local_path(node.queued.local), (mtime, mtime))
                queue.touch_file(branch, node.loc.subpath, mtime=mtime, content_changed=False)
            else:
                assert node.resolved is not None
                self._queue_blob_ref(branch, node, node.loc.subpath, node.resolved.commit_id,
                                     mtime=mtime)
        node = await self.tree.node(key)
        for writer in self.handles.writers(branch, node.loc.subpath):
            writer.shown = node  # a chmod shows in the next writer_mtime too
        return node

    def _chmod(self, branch: str, node: Node, mode: int) -> None:
        """Queue a file's new permission bits (its bytes stay where they are)."""
        assert node.resolved is not None
        if node.queued is not None:
            self._queue.touch_file(branch, node.loc.subpath, mode=mode, content_changed=False)
        else:
            self._queue_blob_ref(branch, node, node.loc.subpath, node.resolved.commit_id,
                                 mode=mode)

    async def getxattr(self, key: Key, name: str) -> bytes:
        if not name.startswith(resources.XATTR_PREFIX):
            raise NoAttribute(f"no attribute {name!r}")
        node = await self.tree.node(key)
        if name == "user.ah.sha256" and node.queued is not None and not node.queued.sha256:
            return (await self.queued_sha256(node.queued)).encode()
        return await resources.get_xattr(self.view, node, name)

    async def listxattr(self, key: Key) -> list[str]:
        return sorted(await resources.xattrs(self.view, await self.tree.node(key)))

    async def setxattr(self, key: Key, name: str, value: bytes) -> None:
        await resources.set_xattr(self.view, await self.tree.node(key), name, value)

    async def queued_sha256(self, row: Row) -> str:
        """The hash of a queued file's local bytes, computed now if write-back has not yet
        (remembered in the hash cache, so the upload does not read the file again)."""
        assert row.local is not None
        [entry] = await hash_files([LocalFile(self._queue.local_path(row.local), row.path)])
        return entry.sha256

    # -- names -----------------------------------------------------------------------------

    async def _child(self, parent_key: Key, name: str) -> tuple[Node, Key, str]:
        parent = await self.tree.node(parent_key)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.loc.api_path()} is not a directory")
        path = child_path(parent, name)
        check_name(name, path)
        return parent, (*parent_key, name), path

    async def unlink(self, parent_key: Key, name: str) -> Key:
        """Remove a file; its open handles live on alone. The key that lost its name."""
        parent, key, path = await self._child(parent_key, name)
        branch = self.tree.writable_branch(parent, "unlink")
        node = await self.tree.node(key)
        if node.is_dir:
            raise IsADirectory(f"{node.loc.api_path()} is a directory")
        assert parent.resolved is not None
        self._queue.delete(branch, path, parent.resolved.commit_id, in_head=node.in_head)
        self.handles.orphan(branch, path)
        return key

    async def mkdir(self, parent_key: Key, name: str) -> tuple[Key, Node]:
        parent, key, path = await self._child(parent_key, name)
        if await self.tree.exists(key) is not None:
            raise AlreadyExists(f"{'/'.join(key)} exists")
        if parent.loc.place in resources.RESOURCE_PARENTS:
            await resources.create(self.view, parent, name)
        else:
            branch = self.tree.writable_branch(parent, "mkdir")
            assert parent.resolved is not None
            self._queue.add_dir(branch, path, parent.resolved.commit_id)
        return key, await self.tree.node(key)

    async def rmdir(self, parent_key: Key, name: str) -> Key:
        parent, key, path = await self._child(parent_key, name)
        node = await self.tree.node(key)
        if not node.is_dir:
            raise NotADirectory(f"{node.loc.api_path()} is not a directory")
        if not await self.tree.is_empty(node):
            raise NotEmpty(f"{node.loc.api_path()} is not empty")
        if node.loc.place in resources.RESOURCES:
            await resources.delete(self.view, parent, node)
            if node.loc.place is Place.REF and self.queue is not None:
                # What was queued for it (deletes: it looked empty) went with the branch; a
                # branch made again under its name starts from its own head.
                self.queue.reset(node.loc.ref_key)
            return key
        branch = self.tree.writable_branch(parent, "rmdir")
        if node.in_head:
            # A directory of the head whose objects are all deleted here still shows, as a
            # local directory outlives its files: removing it is a queued delete of it.
            assert parent.resolved is not None
            self._queue.delete(branch, path + "/", parent.resolved.commit_id, in_head=True)
        else:
            self._queue.remove_dir(branch, path)
        return key

    async def rename(self, old_parent_key: Key, old_name: str, new_parent_key: Key,
                     new_name: str, noreplace: bool = False, exchange: bool = False
                     ) -> tuple[Key, Key]:
        """Move a file or directory within a branch, or rename a folder or asset. The keys
        it moved from and to."""
        if exchange:
            raise InvalidName("rename with RENAME_EXCHANGE is not supported")
        old_parent, old_key, old_path = await self._child(old_parent_key, old_name)
        new_parent, new_key, new_path = await self._child(new_parent_key, new_name)
        node = await self.tree.node(old_key)
        # The kernel's own rules (a FUSE mount never sends these; other front ends may).
        if old_key == new_key:
            return old_key, new_key
        if new_key[:len(old_key)] == old_key:
            raise InvalidName(f"cannot move {node.loc.api_path()} into itself")
        if old_key[:len(new_key)] == new_key:
            raise NotEmpty(f"{'/'.join(new_key)} contains {node.loc.api_path()}")
        target = await self.tree.exists(new_key)
        if target is not None and noreplace:
            raise AlreadyExists(f"{target.loc.api_path()} exists")
        if node.loc.place in (Place.FOLDER, Place.ASSET):
            # What is queued in its branches follows it, as files in a renamed local
            # directory do (queued under the old name, it showed nowhere).
            old_keys = node.loc.keys_prefix
            new_keys = node.loc.renamed(new_name).keys_prefix
            if self.queue is not None:  # refused before the hub renames anything
                self.queue.check_free(new_keys)
            await resources.rename(self.view, node, old_parent, new_parent, new_name)
            if self.queue is not None:
                self.queue.rename_branches(old_keys, new_keys)
                self.handles.rebranch(old_keys, new_keys)
            return old_key, new_key
        branch = self.tree.writable_branch(old_parent, "rename")
        if new_parent.branch_key != branch:
            raise CrossBranch(f"rename across branches refused: {old_parent.loc.api_path()} "
                              f"to {new_parent.loc.api_path()}")
        assert old_parent.resolved is not None
        base = old_parent.resolved.commit_id
        if target is not None:
            if target.is_dir != node.is_dir:
                if target.is_dir:
                    raise IsADirectory(f"{target.loc.api_path()} is a directory")
                raise NotADirectory(f"{target.loc.api_path()} is not a directory")
            if target.is_dir and await self.tree.children(target):
                raise NotEmpty(f"{target.loc.api_path()} is not empty")
            if not target.is_dir:
                self.handles.orphan(branch, new_path)  # the replaced file lives on if open
        if node.is_dir:
            await self._move_dir(branch, base, node, old_path, new_path)
        else:
            self._move_file(branch, base, node, new_path)
        self.handles.rehome(branch, old_path, new_path)
        return old_key, new_key

    def _move_file(self, branch: str, base: str, node: Node, new_path: str) -> None:
        """Queue a file's move: its queued bytes go along; an unchanged object of the head
        moves as a reference to its blob (no bytes copied)."""
        if node.queued is not None:
            self._queue.move_file(branch, node.loc.subpath, new_path, base, node.in_head)
        else:
            self._queue_blob_ref(branch, node, new_path, base)
            self._queue.delete(branch, node.loc.subpath, base, in_head=True)

    async def _move_dir(self, branch: str, base: str, node: Node, old: str, new: str) -> None:
        queue = self._queue
        files: list[tuple[str, Node]] = []

        async def walk(directory: Node, path: str) -> None:
            for name in await self.tree.children(directory):
                child = await self.tree.node((*directory.loc.key, name))
                if child.is_dir:
                    await walk(child, f"{path}/{name}")
                else:
                    files.append((f"{path}/{name}", child))

        await walk(node, old)
        empty_dirs = [d for d in queue.branch(branch).dirs if d == old or
                      d.startswith(old + "/")]
        for path, child in files:
            self._move_file(branch, base, child, new + path[len(old):])
        for d in empty_dirs:
            queue.remove_dir(branch, d)
            queue.add_dir(branch, new + d[len(old):], base)
        if node.in_head:
            queue.delete(branch, old + "/", base, in_head=True)

    # -- copy-on-write ---------------------------------------------------------------------

    def _open_local(self, branch: str, path: str, row: Row, fd: int | None = None,
                    may_write: bool = True) -> WriteHandle:
        assert row.local is not None
        if fd is None:
            fd = os.open(self.tree.local_path(row.local),
                         os.O_RDWR if may_write else os.O_RDONLY)
        handle = WriteHandle(branch, path, fd, may_write=may_write, mode=row.mode)
        self.handles.add(handle)
        return handle

    async def _materialize(self, node: Node, truncate: bool) -> Row:
        """Give a branch file local bytes (its current content unless ``truncate``) and
        queue it."""
        assert node.entry is not None and node.resolved is not None
        queue = self._queue
        branch = str(node.branch_key)
        path = node.loc.subpath
        row = node.queued
        if row is not None and row.local is not None:
            if queue.is_pinned(row.local):
                return await self._copy_pinned(branch, node, row, truncate)
            if truncate:
                row = self._emptied(branch, path, row.local)
            return row
        local, local_path = queue.new_local()
        size = 0
        if not truncate and node.entry.size:
            await self.cache.copy_to(read_source(self.view, node), local_path)
            size = node.entry.size
        return queue.put_file(branch, path, node.resolved.commit_id, local=local, size=size,
                              mtime=time.time() if truncate else node.mtime,
                              mode=node.entry.mode)

    def _emptied(self, branch: str, path: str, local: str) -> Row:
        """Truncate the queued file ``path`` (bytes in ``local``) to nothing: its content
        starts over, so it is no longer incomplete."""
        os.truncate(self.tree.local_path(local), 0)
        self._unrecorded_failures.pop(local, None)
        return self._queue.touch_file(branch, path, size=0, mtime=time.time(), failed="")

    async def _copy_pinned(self, branch: str, node: Node, row: Row, truncate: bool) -> Row:
        """A write to a file that a running commit is reading: the writer gets bytes of its
        own (a copy, or nothing when truncating), so the commit sees the file as it was."""
        assert row.local is not None and node.resolved is not None
        queue = self._queue
        local, local_path = queue.new_local()
        if not truncate:
            await trio.to_thread.run_sync(shutil.copyfile, self.tree.local_path(row.local),
                                          local_path)
        current = queue.branch(branch).files.get(node.loc.subpath)
        if current is not None and current.local is not None and \
                not queue.is_pinned(current.local):
            # Another writer made its copy while this one was copying: share it.
            local_path.unlink(missing_ok=True)
            if truncate:
                return self._emptied(branch, node.loc.subpath, current.local)
            return current
        size = 0 if truncate else os.stat(local_path).st_size
        return queue.put_file(branch, node.loc.subpath, row.base, local=local, size=size,
                              mtime=time.time() if truncate else row.mtime, mode=row.mode,
                              failed=None if truncate else row.failed)

    def _undo_copy(self, handle: WriteHandle) -> None:
        """A head object opened for writing and closed unwritten (``sqlite3 db 'select'``)
        is no change: its copy leaves the queue, unless someone else changed it meanwhile."""
        row = self._queue.branch(handle.branch).files.get(handle.path)
        if row is None or row.seq != handle.copied_seq or \
                self.handles.open_for_writing(handle.branch, handle.path):
            return
        self._queue.delete(handle.branch, handle.path, row.base, in_head=False)

    def _queue_blob_ref(self, branch: str, node: Node, path: str, base: str,
                        mtime: float | None = None, mode: int | None = None) -> None:
        """Queue the head object of ``node`` at ``path`` by reference to its blob (no bytes
        copied), with a new mtime or mode if given."""
        assert node.entry is not None
        self._queue.put_file(branch, path, base, sha256=node.entry.sha256,
                             size=node.entry.size,
                             mtime=node.entry.mtime if mtime is None else mtime,
                             origin=self.tree.origin(node),
                             mode=node.entry.mode if mode is None else mode)

    def _settle(self, handle: WriteHandle) -> None:
        """Record a written file's size and time in the queue (durable from here on)."""
        if handle.orphaned or not handle.dirty or self.queue is None or \
                handle.path not in self.queue.branch(handle.branch).files:
            return
        size = os.fstat(handle.fd).st_size
        mtime = time.time() if handle.mtime is None else handle.mtime
        failed = local = None
        if self._unrecorded_failures:
            local = self.queue.branch(handle.branch).files[handle.path].local
            failed = self._unrecorded_failures.get(local) if local is not None else None
        self.queue.touch_file(handle.branch, handle.path, size=size, mtime=mtime,
                              failed=failed)
        if failed is not None and local is not None:
            del self._unrecorded_failures[local]
        handle.dirty = False
        handle.mtime = None

    def _write_failed(self, handle: WriteHandle, exc: OSError) -> None:
        """A write or fsync of ``handle`` failed (a full disk, an I/O error): its file keeps
        what was written before, so it is queued as incomplete (:attr:`Row.failed`), which a
        commit refuses unless forced. Recorded at once if the queue can; if not (its own log
        on the same full disk), kept in memory for this session (:meth:`incomplete`) and
        recorded at the file's next settle."""
        first = handle.failed is None
        handle.failed = f"a write failed: {exc.strerror or exc}"
        if first:  # a writer's page cache may fail a write request per MiB from here on
            log.warning("%s of %s: %s; the file is incomplete until written again",
                        handle.path, handle.branch, handle.failed)
        queue = self.queue
        row = None if handle.orphaned or queue is None else \
            queue.branch(handle.branch).files.get(handle.path)
        if queue is None or row is None or row.local is None or \
                (row.failed == handle.failed and not first):
            return  # recorded already (the rest of a writer's page cache failing too)
        try:
            queue.touch_file(handle.branch, handle.path, failed=handle.failed)
        except OSError:
            self._unrecorded_failures[row.local] = handle.failed

    def incomplete(self, row: Row) -> str | None:
        """Why the queued file ``row`` is incomplete, or None."""
        if row.failed or row.local is None:
            return row.failed
        return self._unrecorded_failures.get(row.local)

    # -- what a commit needs to know -------------------------------------------------------

    def settle_branch(self, branch: str) -> None:
        """Record in the queue what open handles of ``branch`` wrote since they last did (a
        commit must see every write as a newer ``seq``)."""
        for handle in self.handles.writers(branch):
            self._settle(handle)

    def being_written(self, branch: str, path: str) -> bool:
        return self.handles.being_written(branch, path)

    def open_for_writing(self, branch: str, path: str) -> bool:
        return self.handles.open_for_writing(branch, path)
