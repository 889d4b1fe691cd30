"""Making the kernel forget what changed elsewhere (the change feed's hook in the mount).

The kernel caches dentries, attributes and page contents of branch paths for ``--refresh``
seconds. When the feed says a branch moved (or an asset, a folder changed), every inode the
mount handed out at or below those paths, and the directory listing each sits in, is
invalidated, so the next ``ls`` or ``cat`` asks the mount, which asks the hub. The calls
block (they write to ``/dev/fuse`` and may wait for a request in flight on the same
directory), so they run in a worker thread while the trio thread keeps serving.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

from ahmount.hub.models import AssetAddr
from ahmount.mount.inodes import InodeTable
from ahmount.vfs.change_feed import Changed
from ahmount.vfs.layout import Key, places_of

#: When the second pass runs: a lookup the kernel sent before the change, answered after the
#: first pass, may have put the old entry back; it is forgotten again by then.
SECOND_PASS = 0.3


class KernelCache:
    """The mount's hook for the change feed. ``spawn`` starts the delayed second pass under
    the session's supervisor."""

    def __init__(self, inodes: InodeTable, me: str, is_file: Callable[[int], bool],
                 spawn: Callable[[str, Callable[[], Awaitable[Any]]], None]) -> None:
        self._inodes = inodes
        self._me = me
        self._is_file = is_file
        self._spawn = spawn

    async def forget(self, changed: Changed) -> int:
        """Invalidate what ``changed`` may have changed, now and once more a moment later;
        how many inodes the first pass touched."""
        asset = changed.asset.name if changed.asset is not None else None
        return await self._forget(places_of(changed.folder, asset, changed.ref, self._me),
                                  set())

    async def forget_paths(self, asset: AssetAddr, branch: str, paths: list[str],
                           replaced: list[str]) -> int:
        """Invalidate ``paths`` of one branch, which show otherwise now through no request
        of the kernel's (:attr:`Session.on_shown_changed`), as :meth:`forget` does. The
        files at ``replaced`` show other bytes (or none) now: their paths get new inodes,
        as a file replaced by ``mv`` would (with writeback caching the kernel keeps a
        cached file's size whatever getattr says), and the kernel forgets their names."""
        places = places_of(asset.folder, asset.name, branch, self._me)
        return await self._forget(
            [(*place, *path.split("/")) for place in places for path in paths],
            {(*place, *path.split("/")) for place in places for path in replaced})

    async def _forget(self, places: list[Key], replaced: set[Key]) -> int:
        """Invalidate everything at or below ``places``, giving the paths in ``replaced`` new
        inodes; once more :data:`SECOND_PASS` later. How many inodes the first pass
        touched."""
        targets = self._targets(places, replaced)
        for key in replaced:  # after the targets were taken: a detached inode has no name
            self._inodes.detach(key, replaced=True)
        await self._send(targets)

        async def again() -> None:
            await trio.sleep(SECOND_PASS)
            await self._send(self._targets(places, set()))

        self._spawn("kernel cache second pass", again)
        return len(targets)

    @staticmethod
    async def _send(targets: list[tuple[int, int | None, str]]) -> None:
        if targets:
            await trio.to_thread.run_sync(_forget_all, targets)

    def _targets(self, places: list[Key], files: set[Key]) -> list[tuple[int, int | None, str]]:
        """What to invalidate for ``places``: each inode at or below them and its name.
        Directories keep their names (a process may have its cwd in one: dropping the
        dentry would break its getcwd); their listings and attributes are forgotten. A
        file's name is forgotten too (one the hub showed, or one of ``files``): it may name
        a new inode now, or nothing."""
        targets: list[tuple[int, int | None, str]] = []
        for ino, parent, name in self._inodes.under(places):
            is_file = self._is_file(ino) or self._inodes.key(ino) in files
            targets.append((ino, parent if is_file else None, name))
        return targets


def _forget_all(targets: list[tuple[int, int | None, str]]) -> None:
    for ino, parent, name in targets:
        # ENOENT: the kernel had already forgotten it; nothing to do. The name first: the
        # inode's pages are dropped only once its writeback is done, which for a file still
        # being written (a write the disk refused) is when its writer stops, and until the
        # name is forgotten it leads to that inode.
        if parent is not None and name:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_entry(parent, os.fsencode(name))
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(ino, attr_only=False)
