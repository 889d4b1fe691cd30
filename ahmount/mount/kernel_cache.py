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

from ahmount.mount.inodes import InodeTable
from ahmount.vfs.change_feed import Changed
from ahmount.vfs.layout import places_of

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
        touched = await self._pass(changed)

        async def again() -> None:
            await trio.sleep(SECOND_PASS)
            await self._pass(changed)

        self._spawn("kernel cache second pass", again)
        return touched

    async def _pass(self, changed: Changed) -> int:
        asset = changed.asset.name if changed.asset is not None else None
        places = places_of(changed.folder, asset, changed.ref, self._me)
        # Directories keep their names (a process may have its cwd in one: dropping the
        # dentry would break its getcwd); their listings and attributes are forgotten. A
        # file's name is forgotten too: it may name a new inode now, or nothing.
        targets = [(ino, parent if self._is_file(ino) else None, name)
                   for ino, parent, name in self._inodes.under(places)]
        if targets:
            await trio.to_thread.run_sync(_forget_all, targets)
        return len(targets)


def _forget_all(targets: list[tuple[int, int | None, str]]) -> None:
    for ino, parent, name in targets:
        # ENOENT: the kernel had already forgotten it; nothing to do
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(ino, attr_only=False)
        if parent is not None and name:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_entry(parent, os.fsencode(name))
