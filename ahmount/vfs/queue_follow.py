"""What changes made elsewhere mean for the change queue's rows.

Rows are keyed by branch (``owner/kind/folder/asset:ref``). A rename or delete made
through this mount moves or drops them at once (``VFS.rename``, ``VFS.rmdir``). One made
elsewhere (the API, the CLI, another mount) reaches this mount through the change feed,
or not at all while it is down; without this module its rows then stayed under a key the
hub no longer has: they showed nowhere, and a branch made again under that name inherited
them (a queued delete of a file the new branch also has would have been committed).

- A folder or an asset renamed elsewhere (``folder.updated`` / ``asset.updated`` with a
  ``name``): its branches' rows follow it (:meth:`ChangeQueue.follow_rename`), and open
  write handles too.
- A branch, asset or folder deleted, or a folder unshared (``ref.deleted``,
  ``asset.deleted``, ``folder.deleted``, ``folder.shared``), events lost (the feed's reset),
  or a session starting: each queued branch concerned is asked of the hub, and one the hub
  no longer shows as a branch is *stranded*: its rows leave the queue for a directory of
  ``lost+found`` that holds their bytes and a manifest (:meth:`ChangeQueue.strand`). A
  file of it open for writing lives on alone, writing into the set-aside copy; a hub that
  does not answer changes nothing.

Runs on the trio thread, from the change feed's task and the session's start.
"""

from __future__ import annotations

import logging

from ahmount.client.hub_client import HubClient
from ahmount.errors import AhError, InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, Event, FolderAddr
from ahmount.names import check_kind
from ahmount.vfs.change_queue import ChangeQueue
from ahmount.vfs.handles import Handles
from ahmount.vfs.layout import asset_keys_prefix, branch_of_key, folder_keys_prefix

log = logging.getLogger("ahmount.vfs")

#: Events after which a queued branch of their folder (or asset) may be gone.
GONE = {"ref.deleted", "asset.deleted", "folder.deleted", "folder.shared"}


class QueueFollower:
    def __init__(self, hub: HubClient, queue: ChangeQueue, handles: Handles) -> None:
        self._hub = hub
        self._queue = queue
        self._handles = handles
        #: Branches stranded so far (for ``ah stats`` and tests).
        self.stranded = 0

    async def on_event(self, event: Event | None) -> None:
        """The change feed's hook: ``event``, or None when events were lost."""
        if not self._queue.branches():
            return
        if event is None:
            await self.check()
            return
        p = event.payload
        try:
            folder = FolderAddr(str(p["owner"]), check_kind(p["kind"]), str(p["folder"]))
        except (KeyError, InvalidArgument):
            return
        kind, name = p.get("type"), p.get("name")
        asset = AssetAddr(folder, str(p["asset"])) if "asset" in p else None
        if kind in ("folder.updated", "asset.updated") and isinstance(name, str):
            if asset is None:
                old = folder_keys_prefix(folder)
                new = folder_keys_prefix(FolderAddr(folder.owner, folder.kind, name))
            else:
                old, new = asset_keys_prefix(asset), asset_keys_prefix(AssetAddr(folder, name))
            moved = self._queue.follow_rename(old, new)
            if moved:
                self._handles.rebranch(old, new)
                log.info("%s was renamed elsewhere to %s: %d queued change(s) follow it",
                         old.rstrip(":/"), new.rstrip(":/"), moved)
            elif moved is None:
                log.warning("%s was renamed elsewhere to %s, where changes are queued "
                            "already: those of the old name are set aside",
                            old.rstrip(":/"), new.rstrip(":/"))
                await self.check(old)
            return
        if kind in GONE:
            prefix = (asset_keys_prefix(asset) if asset is not None
                      else folder_keys_prefix(folder))
            await self.check(prefix)

    async def check(self, prefix: str = "") -> int:
        """Strand each queued branch whose key starts with ``prefix`` that the hub no
        longer shows as a branch; how many were."""
        count = 0
        for key in [k for k in self._queue.branches() if k.startswith(prefix)]:
            asset, branch = branch_of_key(key)
            try:
                ref = await self._hub.resolve(asset, branch)
            except NotFound:
                why = "the hub no longer has it (deleted, renamed or unshared elsewhere)"
            except AhError as exc:  # the hub is down or refuses: nothing is concluded
                log.info("queued branch %s not checked (%s)", key, exc)
                return count
            else:
                if ref.type == "branch":
                    continue
                why = f"{branch!r} names a {ref.type} on the hub now, not a branch"
            # On this thread, with nothing awaited in between: no write handle of the
            # branch opens meanwhile. Those open now live on alone (their bytes are the
            # set-aside copy's: a hard link of the same file).
            self._handles.orphan(key)
            where = self._queue.strand(key, why)
            if where is not None:
                count += 1
                self.stranded += 1
                log.warning("queued changes of %s set aside: %s; their bytes and a list of "
                            "them are in %s", key, why, where)
        return count
