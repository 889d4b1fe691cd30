"""The tree: what each path of the asset hierarchy is right now.

A path (a :data:`Key` of segments below the root) resolves to a :class:`Node`: its place in
the layout, whether it is a directory, its object entry, the commit it is read at and
whether it may change. Inside a branch the head commit is overlaid with the branch's change
queue (queued files shown, deleted ones hidden, queued directories listed). Every hub call
the tree needs goes through :class:`HubView`, which caches and expires listings;
:meth:`Tree.invalidate` is the one entry point that forgets what is known of an asset (or
of everything).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

from ahmount.errors import InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.names import (
    KINDS,
    MAX_OBJECT_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    has_control_characters,
    is_commit_prefix,
)
from ahmount.vfs.change_queue import ChangeQueue, Row
from ahmount.vfs.errors import InvalidName, NameTooLong, ReadOnly
from ahmount.vfs.hub_view import CommitIndex, HubView, Resolved
from ahmount.vfs.layout import SCOPES, Key, Location, Place, locate


@dataclass
class Node:
    """What one path is right now: its location, whether it is a directory, its entry (for
    files), the resolved commit (inside a ref) and whether it may change."""

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
        if self.resolved is None or self.resolved.type != "branch":
            return None
        return self.loc.ref_key

    @property
    def size(self) -> int:
        return 0 if self.entry is None else self.entry.size

    @property
    def permissions(self) -> int:
        return shown_permissions(None if self.is_dir else self.entry, self.writable)

    @property
    def sha256(self) -> str:
        """The object's hash ('' for a queued file not hashed yet)."""
        if self.entry is not None and self.entry.sha256:
            return self.entry.sha256
        return (self.queued.sha256 or "") if self.queued is not None else ""


def shown_permissions(entry: ObjectEntry | None, writable: bool) -> int:
    """The permission bits shown for a file's ``entry`` (``None``: a directory): the file's
    own, without write bits where nothing may change; 0755/0555 for directories."""
    if entry is None:
        return 0o755 if writable else 0o555
    return entry.mode if writable else entry.mode & ~0o222


def child_path(parent: Node, name: str) -> str:
    """The object path of ``name`` inside ``parent`` ('' above the refs)."""
    return f"{parent.loc.subpath}/{name}" if parent.loc.subpath else name


def check_name(name: str, subpath: str) -> None:
    """Refuse what the hub could never store: the limits and the name rule are the hub's own
    (:mod:`ahmount.names`), so nothing the tree accepts can block a commit later."""
    size = len(name.encode())
    if size > MAX_SEGMENT_BYTES:
        raise NameTooLong(f"name of {size} bytes refused: at most {MAX_SEGMENT_BYTES}")
    if "/" in name or name in ("", ".", ".."):
        raise InvalidName(f"name {name!r} refused: not a single path segment")
    if has_control_characters(name):
        raise InvalidName(f"name {name!r} refused: control characters are not allowed in "
                          "names")
    if len(subpath.encode()) > MAX_OBJECT_PATH_BYTES:
        raise NameTooLong(f"object path {subpath[:60]}... refused: over "
                          f"{MAX_OBJECT_PATH_BYTES} bytes")


@dataclass
class RefState:
    """What every path inside one ref rests on: whether its folder may be edited, the
    ref's commit, and (once a path below the ref needed it) the commit's listing; fresh
    while the view's generation is ``generation`` and until ``until``."""

    can_edit: bool
    resolved: Resolved
    index: CommitIndex | None
    generation: int
    until: float


#: Refs whose state is kept (:meth:`Tree._ref_state`); beyond it, all are forgotten.
REF_STATES = 4096


class Tree:
    """Path → :class:`Node`, children, and the branch overlay."""

    def __init__(self, view: HubView, queue: ChangeQueue | None, started: float) -> None:
        self.view = view
        #: Queued edits of branches; without one, branches are read-only.
        self.queue = queue
        self.started = started
        self._ref_states: dict[tuple[Any, ...], RefState] = {}

    @property
    def me(self) -> str:
        return self.view.me

    def invalidate(self, asset: AssetAddr | None = None) -> None:
        """Forget what may have changed of ``asset`` (its refs and heads), or of everything:
        the next look asks the hub (what was seen stays to serve if the hub is down)."""
        if asset is None:
            self.view.invalidate()
        else:
            self.view.invalidate_asset(asset)

    async def node(self, key: Key) -> Node:
        """Resolve a path to a :class:`Node`; raises NotFound."""
        loc = locate(key, self.me)
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
        if place is Place.FOLDER or place is Place.ASSET:
            folder = await self.view.folder(scope, loc.owner, loc.kind, str(loc.folder))
            can_edit = folder.permission in ("own", "edit")
            if place is Place.FOLDER:
                return Node(loc, True, can_edit, False, folder.modified)
            asset = await self.view.asset(loc.asset_addr)
            return Node(loc, True, can_edit, False, asset.modified)
        state = await self._ref_state(loc, with_index=place is not Place.REF)
        resolved = state.resolved
        writable = state.can_edit and resolved.type == "branch"
        immutable = resolved.type != "branch"
        if place is Place.REF:  # its listing is loaded when it is opened, not when stat'ed
            return Node(loc, True, writable, immutable, resolved.created, resolved=resolved)
        index = state.index
        assert index is not None
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

    async def exists(self, key: Key) -> Node | None:
        try:
            return await self.node(key)
        except NotFound:
            return None

    async def with_index(self, node: Node) -> Node:
        """``node`` (a ref) with its commit's listing loaded."""
        if node.index is not None or node.resolved is None:
            return node
        index = await self.view.index(node.loc.asset_addr, node.resolved.commit_id,
                                      node.resolved.created)
        return replace(node, index=index)

    def _overlay(self, loc: Location, writable: bool, resolved: Resolved, index: CommitIndex,
                 found: ObjectEntry | str | None) -> Node:
        """A path inside a branch: the head commit with the change queue laid over it."""
        assert self.queue is not None
        queue = self.queue.branch(loc.ref_key)
        path = loc.subpath
        in_head = found is not None and not queue.hides(path)
        row = queue.files.get(path)
        if row is not None:
            return self.queued_node(loc, writable, resolved, index, row, in_head,
                                    self._live_size(row))
        if queue.is_dir(path) or (found == "dir" and in_head):
            return Node(loc, True, writable, False, resolved.created, resolved=resolved,
                        index=index, in_head=in_head)
        if isinstance(found, ObjectEntry) and in_head:
            return Node(loc, False, writable, False, found.mtime, entry=found,
                        resolved=resolved, index=index, in_head=True)
        raise NotFound(f"no object {path!r} in {loc.api_path()}")

    @staticmethod
    def queued_node(loc: Location, writable: bool, resolved: Resolved,
                    index: CommitIndex | None, row: Row, in_head: bool, size: int) -> Node:
        entry = ObjectEntry(row.path, row.sha256 or "", size, row.mtime, mode=row.mode)
        return Node(loc, False, writable, False, row.mtime, entry=entry, resolved=resolved,
                    index=index, queued=row, in_head=in_head)

    def _live_size(self, row: Row) -> int:
        """A queued file's size: its local file's while someone may be writing it."""
        if row.local is None:
            return row.size
        try:
            return os.stat(self.local_path(row.local)).st_size
        except FileNotFoundError:
            return row.size

    def local_path(self, local: str) -> str:
        # Joined as a str: pathlib's joining costs as much as the stat that follows it on
        # every lookup, getattr and setattr of a queued file.
        assert self.queue is not None
        return f"{self.queue.files_dir}/{local}"

    def commit_children(self, parent: Node) -> dict[str, ObjectEntry | None] | None:
        """The children of a directory inside a commit, straight from the parent's index
        (each child's entry, ``None`` for a subdirectory); None when the overlay or a fresh
        resolution must decide (no index, or a branch with queued changes)."""
        index = parent.index
        if index is None:
            return None
        branch = parent.branch_key
        if branch is not None and self.queue is not None and \
                not self.queue.branch(branch).empty():
            return None
        return index.dirs.get(parent.loc.subpath, {})

    def child_in_commit(self, parent: Node, name: str, key: Key) -> Node | None:
        """A child of a directory inside a commit, straight from the parent's index (listing
        a 100,000-object tree must not resolve every entry from the top again); None when
        the overlay or a fresh resolution must decide."""
        children = self.commit_children(parent)
        if children is None or name not in children:
            return None
        found = children[name]
        p = parent.loc
        # Plain constructors, not dataclasses.replace: this runs once per listed entry.
        loc = Location(Place.OBJECT, key, p.scope, p.kind, p.owner, p.folder, p.asset, p.ref,
                       child_path(parent, name))
        if found is None:
            return Node(loc, True, parent.writable, parent.immutable, parent.mtime, None,
                        parent.resolved, parent.index)
        return Node(loc, False, parent.writable, parent.immutable, found.mtime, found,
                    parent.resolved, parent.index)

    async def _ref_state(self, loc: Location, with_index: bool) -> RefState:
        """The folder, asset, ref and listing a path inside a ref rests on, resolved once
        per ref while none of them expired or was invalidated: every lookup, getattr and
        open of a file would otherwise walk the four listings again (a third of what a
        cold small-file read costs the daemon)."""
        assert loc.owner is not None and loc.kind is not None and loc.ref is not None
        key = (loc.scope, loc.owner, loc.kind, loc.folder, loc.asset, loc.ref)
        state = self._ref_states.get(key)
        if state is not None and state.generation == self.view.generation and \
                state.until > time.monotonic() and (state.index is not None or not with_index):
            return state
        generation = self.view.generation
        scope: Any = loc.scope
        folder = await self.view.folder(scope, loc.owner, loc.kind, str(loc.folder))
        await self.view.asset(loc.asset_addr)  # it must still exist
        resolved = await self._resolve(loc)
        index = None
        if with_index:
            index = await self.view.index(loc.asset_addr, resolved.commit_id, resolved.created)
        elif state is not None and state.resolved == resolved:
            index = state.index
        state = RefState(folder.permission in ("own", "edit"), resolved, index, generation,
                         self.view.fresh_until(scope, loc.owner, loc.kind, loc.asset_addr,
                                               loc.ref))
        if len(self._ref_states) >= REF_STATES:
            self._ref_states.clear()
        self._ref_states[key] = state
        return state

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
        node = await self.with_index(node)
        assert node.index is not None
        branch = node.branch_key
        if branch is None or self.queue is None:
            return node.index.names(loc.subpath)
        queue = self.queue.branch(branch)
        if queue.empty():  # nothing queued: the commit's names (sorted already)
            return node.index.names(loc.subpath)
        prefix = loc.subpath + "/" if loc.subpath else ""
        names = {n for n in node.index.names(loc.subpath) if not queue.hides(prefix + n)}
        return sorted(names | queue.names_under(loc.subpath))

    async def is_empty(self, node: Node) -> bool:
        """An asset is empty when none of its branches and tags holds an object (its
        directory always lists its refs); any other directory when it lists nothing."""
        if node.loc.place is not Place.ASSET:
            return not await self.children(node)
        for ref in await self.view.refs(node.loc.asset_addr):
            child = await self.with_index(await self.node((*node.loc.key, ref)))
            assert child.index is not None
            queued = child.branch_key and self.queue and not self.queue.branch(
                child.branch_key).empty()
            if child.index.names("") or queued:
                return False
        return True

    def writable_branch(self, node: Node, what: str) -> str:
        """The branch key of a writable place, or :class:`ReadOnly` naming why not."""
        branch = node.branch_key
        if branch is None or not node.writable or self.queue is None:
            why = "a tag or commit" if node.immutable else "read-only for you"
            raise ReadOnly(f"{what} {node.loc.api_path()} refused: {node.loc.api_path()} is "
                           f"{why}")
        return branch

    def origin(self, node: Node) -> str:
        """Where a head object's bytes are read from: ``<commit>/<path>``."""
        assert node.resolved is not None and node.entry is not None
        return f"{node.resolved.commit_id}/{node.entry.path}"
