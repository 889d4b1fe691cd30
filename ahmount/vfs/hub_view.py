"""What the mount knows of the hub: cached listings of folders, assets, refs and commits.

Metadata that can change (folders, assets, branch heads) is cached for ``refresh`` seconds:
that is the documented delay after which a change made elsewhere shows in the mount. Tags are
re-checked every minute; commits are immutable, so a commit's object listing is fetched once,
kept in memory (a few recent ones) and on disk (diskcache), and never asked for again.

When the hub cannot be reached, the last value of an entry is served (and a line logged), so
a mount keeps working on what it has seen; what it never saw answers ``EIO``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import diskcache
import httpx
import trio

from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable, NotFound
from ahmount.hub.models import (
    AssetAddr,
    AssetInfo,
    CommitInfo,
    FolderAddr,
    FolderInfo,
    ObjectEntry,
)
from ahmount.names import Kind

log = logging.getLogger("ahmount.vfs")

TAG_TTL = 60.0
MEMORY_INDEXES = 8
K = TypeVar("K")
V = TypeVar("V")
Scope = Literal["own", "shared", "public"]


class TtlCache(Generic[K, V]):
    """Values with an expiry; one load per key at a time; stale values served on outage.

    With a ``store`` (the state directory's listings diskcache) every value loaded is also
    saved, so a later process (a remount, a reboot, an offline start) has what this one saw:
    :meth:`restore` loads the saved values as already expired — served when the hub cannot
    be reached — and :meth:`trust_restored` makes them fresh again once a change feed has
    replayed what changed since they were saved. Only a process that follows the feed saves
    values as *trusted*; every invalidation marks the saved copy untrusted.
    """

    def __init__(self, name: str = "", store: diskcache.Cache | None = None) -> None:
        self._values: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, trio.Event] = {}
        #: Raised by every invalidation: a load that started before one may have read what
        #: it invalidated, so its value is kept as already expired.
        self._generation = 0
        self._name = name
        self._store = store
        #: Keys restored from the store as trusted, not invalidated since.
        self._restored: set[K] = set()
        #: Whether values saved now count as trusted (a change feed is live here).
        self.saving_trusted = False

    def _disk_key(self, key: K) -> str:
        return f"view/{self._name}/{key!r}"

    def restore(self) -> int:
        """Load every value an earlier process saved (expired until trusted); how many."""
        if self._store is None:
            return 0
        prefix = f"view/{self._name}/"
        count = 0
        for disk_key in list(self._store.iterkeys()):
            if not isinstance(disk_key, str) or not disk_key.startswith(prefix):
                continue
            raw = self._store.get(disk_key)
            if not isinstance(raw, tuple) or len(raw) != 3:
                continue
            trusted, key, value = raw
            if key not in self._values:
                self._values[key] = (0.0, value)
                if trusted:
                    self._restored.add(key)
                count += 1
        return count

    def trust_restored(self, ttl: float) -> int:
        """Restored values nobody invalidated since become fresh for ``ttl``; how many."""
        until = time.monotonic() + ttl
        count = 0
        for key in self._restored:
            found = self._values.get(key)
            if found is not None and found[0] == 0.0:
                self._values[key] = (until, found[1])
                count += 1
        self._restored.clear()
        return count

    def _save(self, key: K, value: V, trusted: bool) -> None:
        if self._store is not None:
            try:
                self._store.set(self._disk_key(key), (trusted, key, value))
            except Exception as exc:  # a full disk: what is in memory still serves
                log.warning("listing %r not saved: %s", key, exc)

    def invalidate(self, key: K | None = None) -> None:
        """Expire ``key`` (or everything): the next read asks the hub, and the last value is
        still there to serve if the hub cannot be reached (``ah refresh`` during an outage
        must not turn what the mount has seen into EIO)."""
        self.invalidate_where(lambda k: key is None or k == key)

    def invalidate_where(self, predicate: Callable[[K], bool]) -> None:
        self._generation += 1
        for key in [k for k in self._values if predicate(k)]:
            value = self._values[key][1]
            self._values[key] = (0.0, value)
            self._restored.discard(key)
            self._save(key, value, trusted=False)

    def peek(self, key: K) -> V | None:
        found = self._values.get(key)
        return None if found is None else found[1]

    def expiry(self, key: K) -> float:
        """When ``key``'s value stops being fresh (monotonic clock; 0 if it is not)."""
        found = self._values.get(key)
        return 0.0 if found is None else found[0]

    @property
    def generation(self) -> int:
        """Raised by every invalidation."""
        return self._generation

    async def get(self, key: K, ttl: float, load: Callable[[], Awaitable[V]]) -> V:
        while True:
            found = self._values.get(key)
            if found is not None and found[0] > time.monotonic():
                return found[1]
            event = self._loading.get(key)
            if event is None:
                break
            await event.wait()
            if key in self._values and self._values[key][0] > time.monotonic():
                return self._values[key][1]
            if key not in self._loading:
                break
        event = trio.Event()
        self._loading[key] = event
        generation = self._generation
        try:
            value = await load()
        except HubUnavailable as exc:
            if found is not None:
                log.warning("hub unreachable (%s); serving the last known listing", exc)
                return found[1]
            raise
        finally:
            del self._loading[key]
            event.set()
        fresh = generation == self._generation
        self._values[key] = (time.monotonic() + ttl if fresh else 0.0, value)
        self._restored.discard(key)
        self._save(key, value, trusted=fresh and self.saving_trusted)
        return value


class CommitIndex:
    """A commit's objects arranged as directories: ``dirs['a/b']`` maps each child name to its
    entry (``None`` for a subdirectory). The root directory is ``''``."""

    def __init__(self, commit_id: str, created: float, entries: list[ObjectEntry]) -> None:
        self.commit_id = commit_id
        self.created = created
        self.dirs: dict[str, dict[str, ObjectEntry | None]] = {"": {}}
        self._sorted: dict[str, list[str]] = {}
        for entry in entries:
            parent, _, name = entry.path.rpartition("/")
            self._add_dir(parent)
            self.dirs[parent][name] = entry

    def _add_dir(self, path: str) -> None:
        """Make ``path`` and every missing ancestor a directory, each listed in its parent
        (the root always exists, so the walk up stops there at the latest)."""
        child: str | None = None
        while True:
            known = path in self.dirs
            children = self.dirs.setdefault(path, {})
            if child is not None:
                children[child] = None
            if known:
                return
            path, _, child = path.rpartition("/")

    def lookup(self, path: str) -> ObjectEntry | Literal["dir"] | None:
        if path in self.dirs:
            return "dir"
        parent, _, name = path.rpartition("/")
        children = self.dirs.get(parent)
        if children is None:
            return None
        return children.get(name)

    def names(self, path: str) -> list[str]:
        if path not in self._sorted:
            self._sorted[path] = sorted(self.dirs.get(path, {}))
        return self._sorted[path]

    def total_size(self) -> int:
        return sum(e.size for d in self.dirs.values() for e in d.values() if e is not None)


@dataclass(frozen=True)
class Resolved:
    type: Literal["branch", "tag", "commit"]
    commit_id: str
    created: float


class HubView:
    """Cached reads of the hub for the mount. ``me`` is the mounting user."""

    def __init__(self, hub: HubClient, me: str, refresh: float,
                 listings: diskcache.Cache) -> None:
        self.hub = hub
        self.me = me
        #: How long what can change is trusted (``--refresh``; the kernel's timeouts too).
        self.refresh = refresh
        #: A longer trust while a change feed expires entries as they change (None: none).
        self.live_ttl: float | None = None
        self._listings = listings
        self._folders: TtlCache[tuple[str, str, str], dict[str, FolderInfo]] = TtlCache(
            "folders", listings)
        self._assets: TtlCache[FolderAddr, dict[str, AssetInfo]] = TtlCache(
            "assets", listings)
        self._refs: TtlCache[AssetAddr, dict[str, tuple[str, str]]] = TtlCache(
            "refs", listings)
        self._resolved: TtlCache[tuple[AssetAddr, str], Resolved] = TtlCache(
            "resolved", listings)
        self._indexes: OrderedDict[str, CommitIndex] = OrderedDict()
        self._index_loading: dict[str, trio.Event] = {}
        #: Commit listings fetched from the hub (each commit at most once per cache).
        self.listing_fetches = 0

    @property
    def ttl(self) -> float:
        """How long a listing that can change is kept."""
        return self.live_ttl if self.live_ttl is not None else self.refresh

    @property
    def _caches(self) -> tuple[TtlCache[Any, Any], ...]:
        return (self._folders, self._assets, self._refs, self._resolved)

    @property
    def generation(self) -> int:
        """Raised by every invalidation of any listing that can change: what was derived
        from the listings under one generation, before the first of them expires
        (:meth:`fresh_until`), is what they would answer again. Asked at every lookup,
        getattr and open: four attribute reads, no tuple or generator."""
        return self._folders.generation + self._assets.generation + \
            self._refs.generation + self._resolved.generation

    def fresh_until(self, scope: str, owner: str, kind: str, addr: AssetAddr,
                    ref: str) -> float:
        """When the first of the listings a path inside ``ref`` rests on (its folder, its
        asset, the asset's refs, the ref's commit) expires; a commit named by id never does."""
        known = self._resolved.peek((addr, ref))
        resolved = float("inf") if known is not None and known.type == "commit" else \
            self._resolved.expiry((addr, ref))
        return min(self._folders.expiry((scope, owner, kind)),
                   self._assets.expiry(addr.folder), self._refs.expiry(addr), resolved)

    def restore(self) -> int:
        """What an earlier process of this state directory saw (see :class:`TtlCache`)."""
        return sum(cache.restore() for cache in self._caches)

    def trust_restored(self) -> int:
        """The change feed replayed everything since it was saved: it is current."""
        return sum(cache.trust_restored(self.ttl) for cache in self._caches)

    def saved_cursor(self) -> tuple[int, float] | None:
        """The change feed's cursor an earlier process applied last, and when."""
        raw = self._listings.get("feed/cursor")
        if isinstance(raw, tuple) and len(raw) == 2:
            return int(raw[0]), float(raw[1])
        return None

    def save_cursor(self, cursor: int) -> None:
        try:
            self._listings.set("feed/cursor", (cursor, time.time()))
        except Exception as exc:
            log.warning("change feed cursor not saved: %s", exc)

    def save_trusted(self, trusted: bool) -> None:
        for cache in self._caches:
            cache.saving_trusted = trusted

    def invalidate(self) -> None:
        """Forget every cached listing that can change (``ah refresh``)."""
        for cache in (self._folders, self._assets, self._refs, self._resolved):
            cache.invalidate()

    def invalidate_asset(self, addr: AssetAddr) -> None:
        self._refs.invalidate(addr)
        self._resolved.invalidate_where(lambda key: key[0] == addr)

    # -- folders and assets ------------------------------------------------------------------

    async def folders(self, scope: Scope, owner: str, kind: Kind) -> dict[str, FolderInfo]:
        """Folders of ``owner`` seen through ``scope`` (own, shared with me, public)."""
        async def load() -> dict[str, FolderInfo]:
            listed = await self.hub.list_folders(
                owner if scope == "own" else scope, kind)
            return {f.name: f for f in listed if scope == "own" or f.owner == owner}

        return await self._folders.get((scope, owner, kind), self.ttl, load)

    async def owners(self, scope: Scope, kind: Kind) -> list[str]:
        """Owners with folders shared with me (or public), for ``shared/<kind>/``."""
        async def load() -> dict[str, FolderInfo]:
            listed = await self.hub.list_folders(scope, kind)
            return {f"{f.owner}/{f.name}": f for f in listed}

        folders = await self._folders.get((scope, "*", kind), self.ttl, load)
        return sorted({f.owner for f in folders.values()})

    async def folder(self, scope: Scope, owner: str, kind: Kind, name: str) -> FolderInfo:
        found = (await self.folders(scope, owner, kind)).get(name)
        if found is None:
            raise NotFound(f"folder /{owner}/t9k-assethub/{kind}/{name} does not exist")
        return found

    async def assets(self, folder: FolderAddr) -> dict[str, AssetInfo]:
        async def load() -> dict[str, AssetInfo]:
            return {a.name: a for a in await self.hub.list_assets(folder)}

        return await self._assets.get(folder, self.ttl, load)

    async def asset(self, addr: AssetAddr) -> AssetInfo:
        found = (await self.assets(addr.folder)).get(addr.name)
        if found is None:
            raise NotFound(f"asset {addr} does not exist")
        return found

    # -- references --------------------------------------------------------------------------

    async def refs(self, addr: AssetAddr) -> dict[str, tuple[str, str]]:
        """Branches and tags: name → (type, commit id)."""
        async def load() -> dict[str, tuple[str, str]]:
            out: dict[str, tuple[str, str]] = {}
            for ref_type in ("branch", "tag"):
                for name, commit_id in await self.hub.list_refs(addr, ref_type):
                    out[name] = (ref_type, commit_id)
            return out

        return await self._refs.get(addr, self.ttl, load)

    async def resolve(self, addr: AssetAddr, ref: str) -> Resolved:
        async def load() -> Resolved:
            info = await self.hub.resolve(addr, ref)
            return Resolved(info.type, info.commit.id, info.commit.created)

        known = self._resolved.peek((addr, ref))
        if known is not None and known.type == "commit":
            return known  # commits never change
        ttl = self.ttl if known is None or known.type == "branch" else TAG_TTL
        return await self._resolved.get((addr, ref), ttl, load)

    # -- commit listings ---------------------------------------------------------------------

    async def index(self, addr: AssetAddr, commit_id: str, created: float) -> CommitIndex:
        """The commit's objects as directories: memory, then disk, then the hub (once)."""
        while commit_id in self._index_loading:
            await self._index_loading[commit_id].wait()
        found = self._indexes.get(commit_id)
        if found is not None:
            self._indexes.move_to_end(commit_id)
            return found
        event = trio.Event()
        self._index_loading[commit_id] = event
        try:
            raw: Any = await trio.to_thread.run_sync(self._listings.get, commit_id)
            if raw is None:
                self.listing_fetches += 1
                _, entries = await self.hub.list_objects(addr, commit_id,
                                                         read_urls_over=self.read_urls_over)
                index = await trio.to_thread.run_sync(CommitIndex, commit_id, created, entries)
                await self._keep_listing(commit_id, entries)
            else:
                index = await trio.to_thread.run_sync(
                    lambda: CommitIndex(commit_id, created, [ObjectEntry(*r) for r in raw]))
        finally:
            del self._index_loading[commit_id]
            event.set()
        self._indexes[commit_id] = index
        while len(self._indexes) > MEMORY_INDEXES:
            self._indexes.popitem(last=False)
        return index

    def set_spawner(self, spawn: Callable[[str, Callable[[], Awaitable[Any]]], None]) -> None:
        """How background work is started (the session's supervisor): commit listings are
        then saved to disk behind the reader who asked for them, not before it is answered
        (a 10k-object listing takes tens of milliseconds to pickle and write)."""
        self._spawn = spawn

    _spawn: Callable[[str, Callable[[], Awaitable[Any]]], None] | None = None
    #: Commit listings ask the read URLs of objects larger than this (those the reader
    #: fetches one request each: their first read then costs the hub no lookup).
    read_urls_over: int | None = None

    async def _keep_listing(self, commit_id: str, entries: list[ObjectEntry]) -> None:
        """Save a commit's listing for later runs and offline use; a failure (a full disk) is
        only logged: the listing is fetched again when next needed."""
        raw = [(e.path, e.sha256, e.size, e.mtime, e.content_type, e.mode) for e in entries]

        async def save() -> None:
            try:
                await trio.to_thread.run_sync(self._listings.set, commit_id, raw)
            except (OSError, sqlite3.Error) as exc:
                log.warning("listing of commit %s not saved: %s", commit_id[:12], exc)

        if self._spawn is None:
            await save()
        else:
            self._spawn(f"saving the listing of {commit_id[:12]}", save)

    # -- changes the tree makes (each expires what it may have changed) ----------------------

    def open_object(self, addr: AssetAddr, commit_id: str, path: str, start: int,
                    end: int, sha256: str | None = None
                    ) -> AbstractAsyncContextManager[httpx.Response]:
        """A streamed byte range of one object at one commit (``sha256``: its hash, which
        lets it be read through the blob's read URL)."""
        return self.hub.open_object(addr, commit_id, path, start, end, sha256)

    async def create_folder(self, addr: FolderAddr) -> None:
        await self.hub.create_folder(addr)
        self.invalidate()

    async def create_asset(self, addr: AssetAddr) -> None:
        await self.hub.create_asset(addr)
        self.invalidate()

    async def create_branch(self, addr: AssetAddr, name: str) -> None:
        await self.hub.create_branch(addr, name)
        self.invalidate_asset(addr)

    async def delete_folder(self, addr: FolderAddr) -> None:
        await self.hub.delete_folder(addr)
        self.invalidate()

    async def delete_asset(self, addr: AssetAddr) -> None:
        await self.hub.delete_asset(addr)
        self.invalidate()

    async def delete_ref(self, addr: AssetAddr, ref: str) -> None:
        await self.hub.delete_ref(addr, ref)
        self.invalidate_asset(addr)

    async def update_folder(self, addr: FolderAddr, *, name: str | None = None,
                            labels: list[str] | None = None,
                            description: str | None = None) -> None:
        await self.hub.update_folder(addr, name=name, labels=labels, description=description)
        self.invalidate()

    async def update_asset(self, addr: AssetAddr, *, name: str | None = None,
                           labels: list[str] | None = None,
                           description: str | None = None) -> None:
        await self.hub.update_asset(addr, name=name, labels=labels, description=description)
        self.invalidate()

    async def commit(self, addr: AssetAddr, branch: str, message: str, *,
                     deletes: list[str], adds: list[ObjectEntry], force: bool,
                     expect: dict[str, str | None] | None = None) -> CommitInfo | None:
        """One atomic commit of ``deletes`` then ``adds`` on the branch's current head
        (only if each path of ``expect`` has that sha256 there: the hub's precondition)."""
        try:
            return await self.hub.commit(addr, branch, message, session=uuid.uuid4().hex,
                                         deletes=deletes, adds=adds, force=force,
                                         expect=expect)
        finally:
            self.invalidate_asset(addr)

    async def reset_staging(self, addr: AssetAddr, branch: str) -> int:
        """Drop the hub's staging area of the branch; how many staged changes it held."""
        try:
            return await self.hub.reset(addr, branch)
        finally:
            self.invalidate_asset(addr)

    async def merge(self, addr: AssetAddr, branch: str) -> CommitInfo | None:
        try:
            return await self.hub.merge(addr, branch)
        finally:
            self.invalidate_asset(addr)


def utc_time(ts: float) -> str:
    """``2026-12-01 15:11:56 UTC``: how state and history print a moment."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def hub_state(view: HubView) -> str:
    """``online``, or ``offline, as of <time>`` (when the hub last answered, or when the
    listings kept from an earlier run were saved): what ``ah status`` and the
    ``user.ah.hub`` attribute say."""
    http = view.hub.http
    if http.reachable:
        return "online"
    when = http.last_answer
    if when is None:
        saved = view.saved_cursor()
        when = saved[1] if saved is not None else None
    if when is None:
        return "offline"
    return "offline, as of " + utc_time(when)
