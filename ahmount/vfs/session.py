"""A session: everything one front end needs to serve the asset tree, owned in one place.

``async with Session(hub, ...) as session`` opens, in this order, and closes in reverse:

1. the hub client (and asks who we are);
2. the state directory of (hub, user), locked against a second session (:mod:`cache_dir`);
3. the listings store, the object cache, the change queue (kept queued edits are logged);
4. the view, write-back and the :class:`VFS` over them;
5. one task group under a :class:`Supervisor` running write-back and the cache-index
   flusher (front ends add their own tasks, e.g. the control socket, with
   :attr:`supervisor`). Expected failures are contained and logged; a bug calls ``on_bug``
   (the FUSE daemon unmounts) and stops the session cleanly.

On exit the task group is cancelled first, then the stores are closed (the cache index is
flushed, the queue's WAL checkpointed), then the lock is released and the client closed.
The control socket, ``ah stats`` and the branch operations use the public methods here,
never the stores themselves.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import diskcache
import trio

from ahmount.client.hub_client import HubClient
from ahmount.disposable_cache import open_index
from ahmount.errors import HubUnavailable, InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr
from ahmount.nurseries import open_nursery
from ahmount.paths import parse
from ahmount.vfs import branch_ops
from ahmount.vfs.cache_dir import claim, last_user, remember_user
from ahmount.vfs.change_feed import Changed, ChangeFeed
from ahmount.vfs.change_queue import ChangeQueue
from ahmount.vfs.core import VFS
from ahmount.vfs.hub_view import HubView, hub_state, utc_time
from ahmount.vfs.layout import locate, places_of
from ahmount.vfs.object_cache import ObjectCache
from ahmount.vfs.prefetch import Prefetcher
from ahmount.vfs.queue_follow import QueueFollower
from ahmount.vfs.sibling_fetch import SMALL_OBJECT, SiblingFetcher
from ahmount.vfs.supervisor import Supervisor
from ahmount.vfs.writeback import UPLOAD_AHEAD_DELAY, WriteBack

log = logging.getLogger("ahmount.vfs")

LISTINGS_LIMIT = 4 << 30


def open_listings(root: Path) -> diskcache.Cache:
    """The listings cache of the state directory ``root`` (shared by the user's mounts and
    ``ah://`` file systems); started empty if a power loss damaged it."""
    return open_index(root / "listings", "the listings cache", size_limit=LISTINGS_LIMIT)


def _as_of(view: HubView) -> str:
    saved = view.saved_cursor()
    return "an unknown time" if saved is None else utc_time(saved[1])


class Session:
    def __init__(self, hub: HubClient, *, hub_url: str | None, cache_base: Path,
                 cache_size: int, refresh: float, holder: str,
                 on_bug: Callable[[BaseException], None] | None = None,
                 offline: bool = False,
                 write_back: float | None = UPLOAD_AHEAD_DELAY,
                 fill_limit: int | None = None, siblings: bool = True) -> None:
        """``hub`` is entered by the session; ``write_back``: seconds before a closed file
        is uploaded ahead of its commit (None: not ahead, at ``sync`` or commit only);
        ``fill_limit``: the largest object fetched whole behind a random reader (None: the
        cache's default, 0: none); ``siblings``: an opened file's small siblings travel in its
        batch and mid-size ones are fetched ahead (:mod:`sibling_fetch`), or not;
        ``hub_url`` keys the state directory (None for the embedded hub); ``holder`` names
        this session to a second one that finds the state directory locked (the mountpoint,
        for a mount)."""
        self._hub = hub
        self._offline = offline
        self._write_back = write_back
        self._fill_limit = fill_limit
        self._siblings = siblings
        self.hub_url = hub_url
        self._cache_base = cache_base
        self._cache_size = cache_size
        self._refresh = refresh
        self._holder = holder
        self._on_bug = on_bug
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self.started = time.time()
        self.me = ""
        self.state_dir: Path | None = None
        self._vfs: VFS | None = None
        self._supervisor: Supervisor | None = None
        self._client: HubClient | None = None
        self.feed: ChangeFeed | None = None
        self._prefetcher: Prefetcher | None = None
        self._follower: QueueFollower | None = None
        #: The front end's hook for paths of a branch that show otherwise now through no
        #: request of its own (``ah reset``): ``(asset, branch, paths, replaced)``, the
        #: paths inside the branch, and those of them that were files and show other bytes
        #: or none now. A mount makes the kernel forget what it kept of them.
        self.on_shown_changed: Callable[[AssetAddr, str, list[str], list[str]],
                                        Awaitable[object]] | None = None

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        stack = self._stack
        try:
            hub = self._client = await stack.enter_async_context(self._hub)
            if self._offline:
                hub.http.go_offline()
            try:
                self.me = await hub.whoami()
                remember_user(self._cache_base, self.hub_url, self.me)
            except HubUnavailable as exc:
                known = last_user(self._cache_base, self.hub_url)
                if known is None:
                    raise HubUnavailable(f"{exc}; and this machine has never reached it, so "
                                         "there is nothing cached to serve offline") from exc
                self.me = hub.known_user = known
                log.warning("hub %s is unreachable (%s): starting offline as %s, serving "
                            "what is cached", self.hub_url or "embedded", exc, known)
            claimed = claim(self._cache_base, self.hub_url, self.me, Path(self._holder))
            stack.callback(claimed.release)
            self.state_dir = root = claimed.root
            listings = open_listings(root)
            stack.callback(listings.close)
            cache = ObjectCache(root / "objects", self._cache_size)
            stack.callback(cache.close)
            cache.fill_limit = self._fill_limit
            queue = ChangeQueue(root / "queue")
            stack.callback(self._close_queue, queue)
            pending = queue.branches()
            if pending:
                log.info("queued changes kept from before on %d branch(es): %s",
                         len(pending), ", ".join(pending))
            view = HubView(hub, self.me, self._refresh, listings)
            view.read_urls_over = SMALL_OBJECT  # smaller ones travel in batches
            restored = view.restore()
            if restored:
                log.info("%d listing(s) kept from earlier runs (as of %s)", restored,
                         _as_of(view))
            writeback = WriteBack(hub, queue, self._write_back)
            self._vfs = VFS(view, cache, queue, writeback, self.started)
            self._nursery = nursery = await stack.enter_async_context(open_nursery())
            stack.callback(nursery.cancel_scope.cancel)  # runs first on the way out
            self._supervisor = supervisor = Supervisor(nursery, self._bug)
            cache.set_spawner(supervisor.spawn)
            view.set_spawner(supervisor.spawn)
            self._prefetcher = Prefetcher(self._vfs, supervisor.spawn)
            self._vfs.siblings = SiblingFetcher(cache, supervisor.spawn, self._siblings)
            self._follower = follower = QueueFollower(hub, queue, self._vfs.handles)
            if pending and not self._offline:
                supervisor.spawn("queued branches check", follower.check)
            await supervisor.start("upload-ahead", writeback.run)
            supervisor.spawn("cache index flusher", cache.run_flusher)
            supervisor.spawn("spare queue files", lambda: _keep_spares(queue))
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    @staticmethod
    def _close_queue(queue: ChangeQueue) -> None:
        left = queue.branches()
        queue.close()
        if left:
            log.info("queued changes kept for the next mount on: %s", ", ".join(left))

    def _bug(self, exc: BaseException) -> None:
        if self._on_bug is not None:
            self._on_bug(exc)
        elif self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def follow_changes(self, on_change: Callable[[Changed], Awaitable[object]] | None = None
                       ) -> ChangeFeed:
        """Follow the hub's change feed (``on_change``: the front end's own invalidation,
        after the tree's); until it connects, and whenever it is down, listings expire
        after ``refresh`` seconds as before."""
        assert self._client is not None and self.feed is None
        assert self._follower is not None
        self.feed = ChangeFeed(self._client, self.vfs.tree, self.vfs.view, on_change,
                               self._follower.on_event)
        self.supervisor.spawn("change feed", self.feed.run)
        return self.feed

    @property
    def vfs(self) -> VFS:
        assert self._vfs is not None, "the session is not open"
        return self._vfs

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "the session is not open"
        return self._supervisor

    @property
    def bug(self) -> BaseException | None:
        """The first bug a background task hit (the session stopped for it), if any."""
        return None if self._supervisor is None else self._supervisor.bug

    # -- what the control socket and ``ah stats`` ask ---------------------------------------

    def status(self) -> dict[str, Any]:
        feed = "off" if self.feed is None else "live" if self.feed.live else "polling"
        return {"user": self.me, "hub": self.hub_url or "embedded", "pid": os.getpid(),
                "hub_state": hub_state(self.vfs.view),
                "uptime": time.time() - self.started, "changes": feed,
                "changes_applied": self.feed.applied if self.feed else 0,
                "changes_cursor": self.feed.cursor if self.feed else None}

    def refresh(self) -> None:
        """Forget every listing that can change (``ah refresh``), and check that the
        branches with queued changes are still on the hub (:mod:`queue_follow`)."""
        self.vfs.tree.invalidate()
        assert self._follower is not None
        if self.vfs.queue is not None and self.vfs.queue.branches():
            self.supervisor.spawn("queued branches check", self._follower.check)

    def cache_stats(self) -> dict[str, Any]:
        cache = self.vfs.cache
        s = cache.stats
        return {"used_bytes": cache.used_bytes(), "max_bytes": cache.max_bytes,
                "objects": cache.object_count(), "hits": s.hits, "misses": s.misses,
                "evictions": s.evictions, "bytes_fetched": s.bytes_fetched,
                "uncached_reads": s.uncached_reads, "fills": s.fills,
                "disk_reads": cache.disk_reads()}

    def drop_cache(self) -> int:
        """Drop every cached object not open now; how many went."""
        dropped = self.vfs.cache.drop_all()
        self.vfs.cache.flush_index()
        return dropped

    def stats(self) -> dict[str, Any]:
        vfs = self.vfs
        assert vfs.queue is not None and vfs.writeback is not None
        siblings = vfs.siblings
        assert siblings is not None
        queued = sum(len(vfs.queue.branch(b).files) + len(vfs.queue.branch(b).deleted)
                     for b in vfs.queue.branches())
        return {"cache": self.cache_stats(), "listing_fetches": vfs.view.listing_fetches,
                "queue_length": queued, "open_handles": len(vfs.handles),
                # Branches gone from the hub whose queued changes were set aside, and where.
                "queue_set_aside": {"branches": self._follower.stranded if self._follower
                                    else 0, "where": str(vfs.queue.root / "lost+found")},
                "bytes_uploaded": vfs.writeback.bytes_uploaded,
                "uploading": vfs.writeback.uploading,
                "upload_failures": vfs.writeback.failures,
                "small_batches": {"batches": siblings.batches, "objects": siblings.objects,
                                  "failures": siblings.failures},
                "fetched_ahead": siblings.fetched_ahead}

    # -- warm-up -----------------------------------------------------------------------------

    async def prefetch(self, paths: Any, jobs: Any = 8) -> dict[str, Any]:
        """Start fetching the files under ``paths`` (lists of path segments below the
        mountpoint) into the cache; returns the job's first status."""
        if not isinstance(paths, list) or not all(
                isinstance(p, list) and all(isinstance(s, str) for s in p) for p in paths):
            raise InvalidArgument("paths must be a list of lists of path segments")
        assert self._prefetcher is not None
        job = await self._prefetcher.start([tuple(p) for p in paths], jobs)
        return job.status()

    def prefetch_status(self, job: Any) -> dict[str, Any]:
        assert self._prefetcher is not None
        found = self._prefetcher.jobs.get(job) if isinstance(job, int) else None
        if found is None:
            raise InvalidArgument(f"no prefetch job {job!r} in this mount")
        return found.status()

    # -- branches ----------------------------------------------------------------------------

    async def _branch(self, path: Any) -> branch_ops.BranchRef:
        return await branch_ops.branch_at(self.vfs, path)

    async def queued_branch(self, address: Any) -> list[str] | None:
        """The mount path of the branch ``address`` names (an API path: ``model/llm/gpt2:v1``,
        whose owner is this session's user when it names none; no ref is ``main``) when this
        mount has queued changes of it, for ``ah status|commit|reset|sync`` run outside the
        mount; None when it has none (or shows no such branch)."""
        parsed = parse(address)
        queue = self.vfs.queue
        if parsed.level not in ("asset", "ref") or queue is None:
            return None
        parsed = parsed.with_owner(self.me)
        folder, ref = parsed.folder_addr(), parsed.ref or "main"
        places = places_of(folder, parsed.asset, ref, self.me)
        # Every place of it has the same key. A directory made here and still empty counts:
        # the hub has no such directory, and a reset drops it.
        if locate(places[0], self.me).ref_key not in queue.branches():
            return None
        for place in places:  # the first place that shows it as a branch
            try:
                await branch_ops.branch_at(self.vfs, list(place))
            except (NotFound, InvalidArgument):
                continue
            return list(place)
        return None

    async def branch_status(self, path: Any) -> dict[str, Any]:
        return await branch_ops.status(self.vfs, await self._branch(path))

    async def commit(self, path: Any, message: Any, force: Any = False) -> dict[str, Any]:
        if not isinstance(force, bool):
            raise InvalidArgument("force must be true or false")
        return await branch_ops.commit(self.vfs, await self._branch(path), message, force)

    async def reset(self, path: Any) -> dict[str, Any]:
        ref = await self._branch(path)
        assert self.vfs.queue is not None
        dropped = self.vfs.queue.snapshot(ref.key)
        try:
            return await branch_ops.reset(self.vfs, ref)
        finally:  # the queue's rows are gone even when the hub's staging could not be reset
            await self._shown_changed(ref.asset, ref.branch, [
                *dropped.files, *dropped.deleted, *dropped.dirs,
                *(d.rstrip("/") for d in dropped.deleted_dirs)], list(dropped.files))

    async def sync(self, path: Any) -> dict[str, Any]:
        return await branch_ops.sync(self.vfs, await self._branch(path))

    async def merge(self, path: Any) -> dict[str, Any]:
        return await branch_ops.merge(self.vfs, await self._branch(path))

    async def _shown_changed(self, asset: AssetAddr, branch: str, paths: list[str],
                             replaced: list[str]) -> None:
        if self.on_shown_changed is not None and paths:
            await self.on_shown_changed(asset, branch, paths, replaced)


async def _keep_spares(queue: ChangeQueue) -> None:
    """Keep empty queue files made ahead (:meth:`ChangeQueue.keep_spares`), in a worker
    thread: a ``create`` then costs no file creation. The queue's close ends the thread."""
    await trio.to_thread.run_sync(queue.keep_spares, abandon_on_cancel=True)
