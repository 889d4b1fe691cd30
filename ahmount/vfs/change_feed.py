"""Following the hub's change feed: what changed elsewhere shows at once, not after a poll.

A session runs :meth:`ChangeFeed.run` under its supervisor. It keeps one Server-Sent Events
stream open (``HubClient.watch``) and turns each event into the invalidation of exactly what
it may have changed: the tree's ``invalidate`` (the view's cached refs and heads of one
asset, or every listing for a folder-level change), then the front end's ``on_change`` (the
mount drops the kernel's dentries and attributes under those paths).

Modes, each said once in the log when it starts: **live** (the feed is connected; what the
view caches is kept for :data:`LIVE_TTL` seconds, since an event expires it at once) and
**polling** (the feed is down or the hub has none; it expires after ``refresh`` seconds, as
before there was a feed). A load in flight when its entry is invalidated is kept as already
expired (``TtlCache``'s generation), so an answer read just before a change never outlives
the event. The kernel's own timeouts stay at ``refresh`` in both modes. A reconnect
resumes from the last cursor, so events made while the stream was down are applied, not
lost; a ``reset`` (the hub pruned them)
invalidates everything. Immutable refs (tags and commits) are never re-fetched for an event:
their listings are keyed by commit id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from ahmount.client.hub_client import HubClient
from ahmount.errors import NotFound
from ahmount.hub.models import AssetAddr, Event, FolderAddr
from ahmount.vfs.hub_view import HubView
from ahmount.vfs.supervisor import EXPECTED
from ahmount.vfs.tree import Tree

log = logging.getLogger("ahmount.vfs")

LIVE_TTL = 60.0
RETRY_FIRST = 0.5
RETRY_MAX = 30.0


@dataclass(frozen=True)
class Changed:
    """What an event may have changed: one ref of an asset, an asset, a folder, or (all
    None) anything."""

    folder: FolderAddr | None = None
    asset: AssetAddr | None = None
    ref: str | None = None


def changed_by(event: Event) -> Changed:
    p = event.payload
    try:
        folder = FolderAddr(str(p["owner"]), p["kind"], str(p["folder"]))
    except KeyError:
        return Changed()
    kind = str(p.get("type", ""))
    if "asset" not in p or kind.startswith("folder."):
        return Changed(folder)
    asset = AssetAddr(folder, str(p["asset"]))
    if kind == "branch.moved" or kind.startswith("ref."):
        return Changed(folder, asset, str(p.get("ref")))
    return Changed(folder, asset)  # the asset itself: its folder's listing changed


class ChangeFeed:
    def __init__(self, hub: HubClient, tree: Tree, view: HubView,
                 on_change: Callable[[Changed], Awaitable[object]] | None = None,
                 on_event: Callable[[Event | None], Awaitable[object]] | None = None
                 ) -> None:
        """``on_change``: the front end's invalidation; ``on_event``: the session's (what
        an event means for the change queue), given each event before its invalidation,
        and None when events were lost (anything may have changed)."""
        self._hub = hub
        self._on_event = on_event
        self._tree = tree
        self._view = view
        self._refresh = view.refresh
        self._on_change = on_change
        self.live = False
        self.cursor: int | None = None
        self.applied = 0

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = RETRY_FIRST
        told_polling = False
        saved = self._view.saved_cursor()
        self.cursor = saved[0] if saved is not None else None
        caught_up = False
        while True:
            try:
                if not caught_up:
                    await self._catch_up()
                    caught_up = True
                async with aclosing(self._hub.watch(after=self.cursor)) as feed:
                    async for page in feed:
                        if page.reset:
                            await self._lost()
                        self._go_live()
                        delay = RETRY_FIRST
                        for event in page.events:
                            await self._follow(event)
                        self._advance(page.cursor)
            except NotFound:
                if not told_polling:
                    log.info("the hub has no change feed: polling it every %.1f s",
                             self._refresh)
                    told_polling = True
                delay = RETRY_MAX
            except EXPECTED as exc:
                self._go_polling(exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _catch_up(self) -> None:
        """Apply what changed since the cursor an earlier process saved, page by page; then
        what that process saw (restored from disk) is current again, and trusted."""
        if self.cursor is None:
            return
        restored_ok = True
        while True:
            before = self.cursor
            page = await self._hub.event_page(after=before)
            if page.reset:
                await self._lost()
                restored_ok = False
            for event in page.events:
                await self._follow(event)
            self._advance(page.cursor)
            if page.cursor == before:  # nothing after it: caught up
                break
        if restored_ok:
            trusted = self._view.trust_restored()
            if trusted:
                log.info("change feed replayed since the last run: %d saved listing(s) are "
                         "current", trusted)

    def _advance(self, cursor: int) -> None:
        if cursor != self.cursor:
            self.cursor = cursor
            self._view.save_cursor(cursor)

    def _go_live(self) -> None:
        if not self.live:
            self.live = True
            self._view.live_ttl = max(self._refresh, LIVE_TTL)
            self._view.save_trusted(True)
            log.info("change feed connected: changes made elsewhere show at once")

    def _go_polling(self, exc: BaseException) -> None:
        self._view.live_ttl = None
        self._view.save_trusted(False)
        if self.live:
            self.live = False
            # What the feed would have told us meanwhile is replayed on reconnect; until
            # then, what is cached expires at the polling pace.
            self._tree.invalidate()
            log.warning("change feed lost (%s): polling the hub every %.1f s until it is "
                        "back", exc or type(exc).__name__, self._refresh)

    async def _follow(self, event: Event) -> None:
        if self._on_event is not None:
            await self._on_event(event)
        await self._apply(changed_by(event))
        self.applied += 1

    async def _lost(self) -> None:
        """Events after the cursor are gone (pruned): anything may have changed."""
        if self._on_event is not None:
            await self._on_event(None)
        await self._apply(Changed())

    async def _apply(self, changed: Changed) -> None:
        if changed.asset is not None and changed.ref is not None:
            self._tree.invalidate(changed.asset)
        else:
            self._tree.invalidate()  # a folder's or an asset's listing, or everything
        if self._on_change is not None:
            await self._on_change(changed)
