"""What the control socket does to a branch of the mount: status, commit, reset, sync, merge.

Each takes the mount path of a place inside a branch (the segments below the mountpoint).
A commit takes a snapshot of the branch's queue, hashes and uploads what the hub lacks
(small files in batches), then commits deletes-then-adds in one atomic hub commit on top of
the branch's current head, path by path. Writes that land meanwhile keep a newer ``seq`` and
stay queued for the next commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ahmount.errors import InvalidArgument
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.mount.change_queue import BranchQueue
from ahmount.mount.fs import AssetFS, Node
from ahmount.mount.layout import Place
from ahmount.transfer import LocalFile, commit_files

log = logging.getLogger("ahmount.mount")


@dataclass(frozen=True)
class BranchRef:
    key: str
    asset: AssetAddr
    branch: str
    node: Node


async def branch_at(ops: AssetFS, parts: Any) -> BranchRef:
    """The branch that the mount path ``parts`` is in."""
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise InvalidArgument("path must be a list of path segments below the mountpoint")
    node = await ops.node(tuple(parts))
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


async def status(ops: AssetFS, ref: BranchRef) -> dict[str, Any]:
    """Pending changes of the branch, like ``git status``, and which of those paths were also
    changed on the hub since the change was queued."""
    assert ops.queue is not None
    queue = ops.queue.snapshot(ref.key)
    changes = [{"op": "add", "path": p, "size": r.size} for p, r in sorted(queue.files.items())]
    changes += [{"op": "delete", "path": p} for p in sorted([*queue.deleted,
                                                              *queue.deleted_dirs])]
    remote: list[str] = []
    head = await ops.view.resolve(ref.asset, ref.branch)
    bases = {r.base for r in queue.files.values()}
    if bases - {head.commit_id}:
        current = await ops.view.index(ref.asset, head.commit_id, head.created)
        for row in queue.files.values():
            if row.base == head.commit_id:
                continue
            base = await ops.view.index(ref.asset, row.base, 0.0)
            if base.lookup(row.path) != current.lookup(row.path):
                remote.append(row.path)
    return {"branch": ref.asset.at(ref.branch), **_summary(queue), "changes": changes,
            "changed_remotely": sorted(remote)}


async def commit(ops: AssetFS, ref: BranchRef, message: str, force: bool) -> dict[str, Any]:
    assert ops.queue is not None
    if not isinstance(message, str) or not message.strip():
        raise InvalidArgument("a commit needs a message (-m)")
    taken = ops.queue.snapshot(ref.key)
    log.info("committing %d queued change(s) of %s", len(taken.files) + len(taken.deleted)
             + len(taken.deleted_dirs), ref.asset.at(ref.branch))
    files = [LocalFile(ops.queue.local_path(r.local), p)
             for p, r in taken.files.items() if r.local is not None]
    blob_refs = [ObjectEntry(p, str(r.sha256), r.size, r.mtime)
                 for p, r in taken.files.items() if r.local is None]
    deletes = sorted(taken.deleted) + list(taken.deleted_dirs)
    info = await commit_files(ops.view.hub, ref.asset, ref.branch, message, deletes, files,
                              force, extra_adds=blob_refs)
    dropped = ops.queue.committed(ref.key, taken)
    ops.view.invalidate_asset(ref.asset)
    log.info("commit of %s: %s (%d queued changes taken)", ref.asset.at(ref.branch),
             info.id[:8] if info else "nothing changed", dropped)
    return {"commit": info.id if info else None, "taken": dropped,
            "left": _summary(ops.queue.snapshot(ref.key))}


async def reset(ops: AssetFS, ref: BranchRef) -> dict[str, Any]:
    """Drop the branch's queued edits and the hub's staging area for it."""
    assert ops.queue is not None
    local = ops.queue.reset(ref.key)
    staged = await ops.view.hub.reset(ref.asset, ref.branch)
    ops.view.invalidate_asset(ref.asset)
    return {"dropped_local": local, "dropped_staged": staged}


async def sync(ops: AssetFS, ref: BranchRef) -> dict[str, Any]:
    """Upload the queued bytes the hub lacks now, so that a commit is mostly metadata."""
    assert ops.queue is not None
    from ahmount.transfer import upload_files

    taken = ops.queue.snapshot(ref.key)
    pending = [(p, r) for p, r in taken.files.items() if r.local is not None and
               not r.uploaded]
    files = [LocalFile(ops.queue.local_path(str(r.local)), p) for p, r in pending]
    entries, sent = await upload_files(ops.view.hub, files)
    uploaded = 0
    for (path, row), entry in zip(pending, entries, strict=True):
        current = ops.queue.branch(ref.key).files.get(path)
        if current is not None and current.seq == row.seq:
            ops.queue.touch_file(ref.key, path, sha256=entry.sha256, uploaded=True,
                                 content_changed=False)
            uploaded += 1
    ops.bytes_uploaded += sent
    return {"uploaded": uploaded, "bytes": sent}


async def merge(ops: AssetFS, ref: BranchRef) -> dict[str, Any]:
    info = await ops.view.hub.merge(ref.asset, ref.branch)
    ops.view.invalidate_asset(ref.asset)
    return {"commit": info.id if info else None}
