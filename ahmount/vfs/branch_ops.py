"""What the control socket does to a branch of the mount: status, commit, reset, sync, merge.

Each takes the mount path of a place inside a branch (the segments below the mountpoint).
A commit takes a snapshot of the branch's queue, hashes and uploads what the hub lacks
(small files in batches), then commits deletes-then-adds in one atomic hub commit on top of
the branch's current head, path by path. Writes that land meanwhile keep a newer ``seq`` and
stay queued for the next commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ahmount.errors import Changed, Conflict, InvalidArgument
from ahmount.hub.models import MAX_CHANGES_PER_CALL, AssetAddr, ObjectEntry
from ahmount.transfer.plan import LocalFile
from ahmount.vfs.change_queue import BranchQueue, Row
from ahmount.vfs.core import VFS
from ahmount.vfs.hub_view import CommitIndex, hub_state
from ahmount.vfs.layout import Place
from ahmount.vfs.tree import Node

log = logging.getLogger("ahmount.vfs")


@dataclass(frozen=True)
class BranchRef:
    key: str
    asset: AssetAddr
    branch: str
    node: Node


async def branch_at(vfs: VFS, parts: Any) -> BranchRef:
    """The branch that the mount path ``parts`` is in."""
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise InvalidArgument("path must be a list of path segments below the mountpoint")
    node = await vfs.stat(tuple(parts))
    if node.loc.place not in (Place.REF, Place.OBJECT) or node.branch_key is None:
        raise InvalidArgument(f"{'/'.join(parts) or '(mount root)'} is not inside a branch")
    assert node.loc.ref is not None
    return BranchRef(node.branch_key, node.loc.asset_addr, node.loc.ref, node)


def _summary(queue: BranchQueue) -> dict[str, Any]:
    return {
        "adds": len(queue.files),
        "deletes": len(queue.deleted) + len(queue.deleted_dirs),
        "bytes": sum(r.size for r in queue.files.values()),
    }


async def _head(vfs: VFS, ref: BranchRef, fresh: bool) -> CommitIndex:
    """The branch head's listing (asked of the hub again when ``fresh``)."""
    if fresh:
        vfs.tree.invalidate(ref.asset)
    head = await vfs.view.resolve(ref.asset, ref.branch)
    return await vfs.view.index(ref.asset, head.commit_id, head.created)


def _in_head(entry: ObjectEntry, head: CommitIndex) -> bool:
    found = head.lookup(entry.path)
    return isinstance(found, ObjectEntry) and (found.sha256, found.size, found.mode) == \
        (entry.sha256, entry.size, entry.mode)


async def _same_as_head(vfs: VFS, row: Row, head: CommitIndex) -> bool:
    """True if a queued file holds exactly the head's bytes at its path (opened for writing
    and closed unwritten, or written back as it was): that is no change."""
    entry = head.lookup(row.path)
    if not isinstance(entry, ObjectEntry) or (entry.size, entry.mode) != (row.size, row.mode):
        return False
    sha = row.sha256 if row.local is None else await vfs.queued_sha256(row)
    return sha == entry.sha256


async def _changed_remotely(vfs: VFS, ref: BranchRef, queue: BranchQueue,
                            head: CommitIndex) -> list[str]:
    """Queued paths that changed on the hub since they were queued (their base and the head
    disagree there): committing would overwrite someone else's change unseen. A path the
    head already holds exactly as queued is none: nothing would be overwritten (this very
    queue's commit that landed before its daemon was killed, or the same bytes from
    elsewhere; it refused the commit that would have found it done)."""
    remote: list[str] = []
    for row in queue.files.values():
        if row.base == head.commit_id:
            continue
        base = await vfs.view.index(ref.asset, row.base, 0.0)
        if base.lookup(row.path) != head.lookup(row.path) and \
                not await _same_as_head(vfs, row, head):
            remote.append(row.path)
    return sorted(remote)


def _as_in(head: CommitIndex, adds: list[ObjectEntry]) -> dict[str, str | None]:
    """What the commit of ``adds`` expects of the head it is made on: each path as in
    ``head`` (its sha256, or None), which the refusal above has just compared with what the
    file was queued on. The hub checks it in the same step as the commit, so a change
    someone makes there while the commit uploads refuses it too, instead of being
    overwritten unseen. At most a request's worth (a larger commit keeps the check above)."""
    expect: dict[str, str | None] = {}
    for entry in adds[:MAX_CHANGES_PER_CALL]:
        found = head.lookup(entry.path)
        expect[entry.path] = found.sha256 if isinstance(found, ObjectEntry) else None
    return expect


async def status(vfs: VFS, ref: BranchRef) -> dict[str, Any]:
    """Pending changes of the branch, like ``git status``: each file ``new`` (not in the
    head) or ``modified``, each delete, and which paths were also changed on the hub since
    they were queued. A queued file equal to the head is not listed."""
    assert vfs.queue is not None
    queue = vfs.queue.snapshot(ref.key)
    head = await _head(vfs, ref, fresh=False)
    changes: list[dict[str, Any]] = []
    for path, row in sorted(queue.files.items()):
        if not queue.hides(path) and await _same_as_head(vfs, row, head):
            continue
        op = "modified" if isinstance(head.lookup(path), ObjectEntry) else "new"
        changes.append({"op": op, "path": path, "size": row.size,
                        "incomplete": vfs.incomplete(row)})
    deletes = sorted([*queue.deleted, *queue.deleted_dirs])
    changes += [{"op": "delete", "path": p} for p in deletes]
    files = [c for c in changes if c["op"] != "delete"]
    return {"branch": ref.asset.at(ref.branch), "adds": len(files), "deletes": len(deletes),
            "bytes": sum(c["size"] for c in files), "changes": changes,
            "changed_remotely": await _changed_remotely(vfs, ref, queue, head),
            "hub": hub_state(vfs.view)}


def _filled(head: CommitIndex, taken: BranchQueue) -> Callable[[str], bool]:
    """Whether the head has an object in a directory that ``taken``'s deletes leave there
    (the commit of ``taken`` keeps that directory in the head it makes)."""
    def filled(directory: str) -> bool:
        stack = [directory]
        while stack:
            below = stack.pop()
            if taken.hides(below):
                continue
            for name, entry in head.dirs.get(below, {}).items():
                path = f"{below}/{name}" if below else name
                if entry is None:
                    stack.append(path)
                elif not taken.hides(path):
                    return True
        return False
    return filled


async def commit(vfs: VFS, ref: BranchRef, message: str, force: bool) -> dict[str, Any]:
    """Commit the branch's queue (:func:`_commit`), after any commit of it in progress."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidArgument("a commit needs a message (-m)")
    async with vfs.commit_turn(ref.key):
        return await _commit(vfs, ref, message, force)


async def _commit(vfs: VFS, ref: BranchRef, message: str, force: bool) -> dict[str, Any]:
    """Commit the branch's queue. Each file is taken as its writer last left it (closed,
    flushed or fsynced), at one instant: files no handle may write are pinned (a writer that
    comes later gets a copy of its own), files open for writing but at rest are copied now,
    with no await in between, and files in the middle of being written stay queued for the
    next commit (named in ``busy``). Paths changed on the hub since
    they were queued refuse the commit unless ``force``, checked before the upload and
    again by the hub in the same step as the commit. Rows that changed while the commit
    ran stay queued, rebased on the new commit."""
    assert vfs.queue is not None and vfs.writeback is not None
    writeback = vfs.writeback
    head = await _head(vfs, ref, fresh=True)
    vfs.settle_branch(ref.key)
    taken = vfs.queue.snapshot(ref.key)  # from here to pin(): no await
    files: list[LocalFile] = []
    pinned: list[str] = []
    copies: list[Path] = []
    busy = [p for p in taken.files if vfs.being_written(ref.key, p)]
    for path in busy:  # mid-write: its writer has not closed or fsynced it yet
        del taken.files[path]
    incomplete = sorted(p for p, row in taken.files.items() if vfs.incomplete(row))
    if incomplete and not force:
        reason = vfs.incomplete(taken.files[incomplete[0]])
        named = _some(incomplete)
        one = len(incomplete) == 1
        raise Conflict(f"{ref.asset.at(ref.branch)}: {named} {'is' if one else 'are'} "
                       f"incomplete ({reason}): {'it holds' if one else 'each holds'} only "
                       "what was written before the failure; write it again or remove it, or "
                       "commit with --force to commit it as it is",
                       path=ref.asset.at(ref.branch))
    for path, row in taken.files.items():
        if row.local is None:
            continue
        if vfs.open_for_writing(ref.key, path):  # at rest since its last flush or fsync
            copies.append(vfs.queue.commit_copy(row.local))
            files.append(LocalFile(copies[-1], path))
        else:
            pinned.append(row.local)
            files.append(LocalFile(vfs.queue.local_path(row.local), path))
    vfs.queue.pin(pinned)
    try:
        if not force:
            remote = await _changed_remotely(vfs, ref, taken, head)
            if remote:
                one = len(remote) == 1
                raise Conflict(
                    f"{ref.asset.at(ref.branch)}: {_some(remote)} changed on the hub since "
                    f"{'it was' if one else 'they were'} queued; commit with --force to "
                    f"overwrite {'it' if one else 'them'}", path=ref.asset.at(ref.branch))
        log.info("committing %d queued change(s) of %s", len(taken.files) + len(taken.deleted)
                 + len(taken.deleted_dirs), ref.asset.at(ref.branch))
        blob_refs = [ObjectEntry(p, str(r.sha256), r.size, r.mtime, mode=r.mode)
                     for p, r in taken.files.items() if r.local is None]
        deletes = sorted(taken.deleted) + list(taken.deleted_dirs)
        uploaded, _ = await writeback.send(files)
        # The queue file's own mode is the queue's (0600); the object's is the row's.
        uploaded = [replace(e, mode=taken.files[e.path].mode) for e in uploaded]
        # Files that hold exactly the head's bytes are no change (git's rule): left out,
        # unless a delete of the commit removes them from the head (a directory moved away
        # and made again, its file written back as it was).
        adds = [e for e in [*uploaded, *blob_refs]
                if not _in_head(e, head) or taken.hides(e.path)]
        info = None
        if adds or deletes:
            try:
                info = await vfs.view.commit(ref.asset, ref.branch, message, deletes=deletes,
                                             adds=adds, force=force,
                                             expect=None if force else _as_in(head, adds))
            except Changed as exc:
                raise Conflict(
                    f"{ref.asset.at(ref.branch)}: {exc.path} changed on the hub while this "
                    "commit uploaded; nothing was committed (ah status shows it); commit "
                    "with --force to overwrite it", path=ref.asset.at(ref.branch)) from exc
        vfs.settle_branch(ref.key)  # writes since the snapshot keep their rows queued
        # A file still open for writing keeps its row (rebased, so it is no change until
        # written): dropping it would delete the bytes under the open handle, and what the
        # handle writes next would reach no row.
        still_open = [p for p in taken.files if vfs.open_for_writing(ref.key, p)]
        for path in still_open:
            del taken.files[path]
        dropped = vfs.queue.committed(ref.key, taken, _filled(head, taken))
        if info is not None:
            vfs.queue.rebase(ref.key, [*taken.files, *still_open], info.id)
    finally:
        vfs.queue.unpin(pinned)
        for copy in copies:
            copy.unlink(missing_ok=True)
    vfs.tree.invalidate(ref.asset)
    log.info("commit of %s: %s (%d queued changes taken)", ref.asset.at(ref.branch),
             info.id[:8] if info else "nothing changed", dropped)
    if busy:
        log.info("left queued while being written: %s", ", ".join(busy))
    return {"commit": info.id if info else None, "taken": dropped, "busy": busy,
            "left": _summary(vfs.queue.snapshot(ref.key))}


async def reset(vfs: VFS, ref: BranchRef) -> dict[str, Any]:
    """Drop the branch's queued edits and the hub's staging area for it."""
    assert vfs.queue is not None
    local = vfs.queue.reset(ref.key)
    staged = await vfs.view.reset_staging(ref.asset, ref.branch)
    return {"dropped_local": local, "dropped_staged": staged}


async def sync(vfs: VFS, ref: BranchRef) -> dict[str, Any]:
    """Upload the queued bytes the hub lacks now, so that a commit is mostly metadata."""
    assert vfs.writeback is not None
    uploaded, sent = await vfs.writeback.upload_branch(ref.key)
    return {"uploaded": uploaded, "bytes": sent}


async def merge(vfs: VFS, ref: BranchRef) -> dict[str, Any]:
    info = await vfs.view.merge(ref.asset, ref.branch)
    return {"commit": info.id if info else None}


def _some(paths: list[str]) -> str:
    """``paths`` for a message: the first five, and how many more."""
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
