"""The mount's view of the hub, in-process: the real service behind the ASGI transport,
with a switch that takes the hub away. Listings are cached for their documented time, a
commit's listing is fetched once, and an outage serves what was seen."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import diskcache
import httpx
import pytest
import trio

from ahmount.client.asgi_transport import StreamingASGITransport
from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.hub.open import open_hub
from ahmount.server.app import create_app
from ahmount.vfs.hub_view import HubView


class Switch(httpx.AsyncBaseTransport):
    """A transport to an in-process hub that can be cut (``down = True``)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = False
        self.requests: list[str] = []
        #: When set: a batch response's body stops after its first chunk until this is set.
        self.hold_batches: trio.Event | None = None
        self.first_chunks: list[bytes] = []

    async def __aenter__(self) -> Switch:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(*exc)  # type: ignore[arg-type]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("hub unplugged", request=request)
        self.requests.append(request.url.path)
        response = await self.inner.handle_async_request(request)
        if self.hold_batches is not None and request.url.path.endswith("/batch"):
            response.stream = _HeldAfterFirstChunk(response.stream, self.hold_batches,
                                                   self.first_chunks)
        return response


class _HeldAfterFirstChunk(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream | httpx.AsyncByteStream,
                 hold: trio.Event, first_chunks: list[bytes]) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner
        self._hold = hold
        self._first_chunks = first_chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        first = True
        async for chunk in self._inner:
            yield chunk
            if first:
                self._first_chunks.append(chunk)
                await self._hold.wait()
                first = False

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
def hub(tmp_path: Path) -> tuple[HubClient, Switch, AssetAddr]:
    stack = open_hub(tmp_path / "hub")
    service = stack.__enter__()
    alice = service.ensure_user("alice")
    folder = FolderAddr("alice", "model", "llm")
    service.create_folder(alice, folder)
    addr = AssetAddr(folder, "gpt2")
    service.create_asset(alice, addr)
    switch = Switch(StreamingASGITransport(create_app(service, trusted_user="alice")))
    return HubClient("http://scripted", transport=switch, retries=0), switch, addr


async def test_a_commit_listing_is_fetched_once_and_an_outage_serves_what_was_seen(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path) -> None:
    client, switch, addr = hub
    listings = diskcache.Cache(str(tmp_path / "listings"))
    view = HubView(client, "alice", 60.0, listings)
    async with client:
        folders = await view.folders("own", "alice", "model")
        assert list(folders) == ["llm"]
        head = await view.resolve(addr, "main")
        first = await view.index(addr, head.commit_id, head.created)
        again = await view.index(addr, head.commit_id, head.created)
        assert first is again and view.listing_fetches == 1
        before = len(switch.requests)
        assert list(await view.folders("own", "alice", "model")) == ["llm"]  # cached
        assert len(switch.requests) == before
        view.invalidate()  # ah refresh: ask again; the hub is gone, the last value is served
        switch.down = True
        assert list(await view.folders("own", "alice", "model")) == ["llm"]
        with pytest.raises(HubUnavailable):
            await view.assets(FolderAddr("alice", "model", "never-seen"))
        # A second view on the same disk cache reads the commit's listing without the hub.
        other = HubView(client, "alice", 60.0, listings)
        assert (await other.index(addr, head.commit_id, head.created)).names("") == []
        assert other.listing_fetches == 0
    listings.close()


async def test_a_branch_head_is_asked_again_after_the_refresh_time(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path) -> None:
    client, _, addr = hub
    listings = diskcache.Cache(str(tmp_path / "listings"))
    view = HubView(client, "alice", 0.0, listings)  # every read of a branch asks the hub
    async with client:
        old = await view.resolve(addr, "main")
        blob = b"x"
        sha = hashlib.sha256(blob).hexdigest()
        path = tmp_path / "x"
        path.write_bytes(blob)
        await client.upload_file(path, sha, 1)
        await client.commit(addr, "main", "one", adds=[ObjectEntry("x", sha, 1, 0.0)])
        new = await view.resolve(addr, "main")
        assert new.commit_id != old.commit_id
        index = await view.index(addr, new.commit_id, new.created)
        assert index.names("") == ["x"]
    listings.close()


async def test_saved_listings_come_back_expired_and_are_trusted_only_after_a_replay(
        tmp_path: Path) -> None:
    """A TtlCache with a store: what a live process saw is restored as expired, served in
    an outage, fresh once trusted; what was invalidated, or saved while not live, is not."""
    from ahmount.vfs.hub_view import TtlCache

    store = diskcache.Cache(str(tmp_path / "listings"))
    try:
        first: TtlCache[str, int] = TtlCache("t", store)
        first.saving_trusted = True

        async def value(n: int) -> int:
            return n

        assert await first.get("kept", 60, lambda: value(1)) == 1
        assert await first.get("changed", 60, lambda: value(2)) == 2
        first.invalidate("changed")
        first.saving_trusted = False
        assert await first.get("polled", 60, lambda: value(3)) == 3

        second: TtlCache[str, int] = TtlCache("t", store)
        assert second.restore() == 3

        async def down() -> int:
            raise HubUnavailable("hub away")

        for key, expected in (("kept", 1), ("changed", 2), ("polled", 3)):
            assert await second.get(key, 60, down) == expected  # stale, served in an outage
        assert second.trust_restored(60) == 1  # an outage changes nothing: "kept" only
        assert await second.get("kept", 60, down) == 1

        third: TtlCache[str, int] = TtlCache("t", store)
        third.restore()
        assert third.trust_restored(60) == 1  # only "kept": saved live, never invalidated
        assert await third.get("kept", 60, down) == 1  # fresh: no load at all

        async def fresh(n: int) -> int:
            return n * 10

        assert await third.get("changed", 60, lambda: fresh(2)) == 20  # asked again
    finally:
        store.close()


async def test_a_listing_is_saved_behind_its_reader_and_a_full_disk_only_costs_the_save(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a spawner (the session's supervisor), a commit's listing is saved to disk in the
    background, after its reader was answered; a disk that cannot take it (full) is logged
    and leaves the listing in memory."""
    import sqlite3

    import trio

    client, _switch, addr = hub
    listings = diskcache.Cache(str(tmp_path / "listings"))
    view = HubView(client, "alice", 60.0, listings)
    async with client:
        head = await view.resolve(addr, "main")
        async with trio.open_nursery() as nursery:
            view.set_spawner(lambda name, fn: nursery.start_soon(fn, name=name))
            await view.index(addr, head.commit_id, head.created)
        # The nursery waited for the save.
        assert listings.get(head.commit_id) == []
        blob = tmp_path / "blob"
        blob.write_bytes(b"b")
        sha = hashlib.sha256(b"b").hexdigest()
        await client.upload_file(blob, sha, 1)
        commit = await client.commit(addr, "main", "two", adds=[ObjectEntry("a/b", sha, 1, 0.0)])
        assert commit is not None

        def full(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(listings, "set", full)
        async with trio.open_nursery() as nursery:
            view.set_spawner(lambda name, fn: nursery.start_soon(fn, name=name))
            index = await view.index(addr, commit.id, commit.created)
        assert index.names("") == ["a"] and listings.get(commit.id) is None
    listings.close()


async def test_an_upload_whose_file_vanishes_is_the_clients_error_not_a_hub_crash(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The in-process transport behaves as a socket would when the client's request body
    fails (a queued file removed while upload-ahead streams it): the hub sees the client go
    away, and only the client sees its error."""
    import logging

    client, _switch, _addr = hub
    gone = tmp_path / "gone"
    sha = hashlib.sha256(b"never").hexdigest()
    caplog.set_level(logging.ERROR, logger="ahmount.server")
    async with client:
        with pytest.raises(FileNotFoundError):
            await client.upload_batch([(gone, sha, 5)])
    assert not [r for r in caplog.records if r.name.startswith("ahmount.server")]


async def test_paths_inside_a_ref_are_as_fresh_as_the_listings_they_rest_on(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path) -> None:
    """The tree resolves a ref's folder, asset, head and listing once for all the paths in
    it (Tree._ref_state), and never past what those listings would answer: a commit made
    elsewhere shows after an invalidation (the change feed's, ``ah refresh``), or at once
    where branch heads are not cached (a refresh time of 0)."""
    from ahmount.errors import NotFound
    from ahmount.vfs.tree import Tree

    client, switch, addr = hub

    async def commit(name: str) -> None:
        blob = name.encode()
        sha = hashlib.sha256(blob).hexdigest()
        (tmp_path / name).write_bytes(blob)
        await client.upload_file(tmp_path / name, sha, len(blob))
        await client.commit(addr, "main", name, adds=[ObjectEntry(name, sha, len(blob), 0.0)])

    async with client:
        cached = Tree(HubView(client, "alice", 60.0, diskcache.Cache(str(tmp_path / "a"))),
                      None, 0.0)
        uncached = Tree(HubView(client, "alice", 0.0, diskcache.Cache(str(tmp_path / "b"))),
                        None, 0.0)
        await commit("one")
        for tree in (cached, uncached):
            assert (await tree.node(("model", "llm", "gpt2", "main", "one"))).size == 3
        before = len(switch.requests)
        for _ in range(3):  # other paths of the same ref: nothing asked again
            with pytest.raises(NotFound):
                await cached.node(("model", "llm", "gpt2", "main", "two"))
        assert len(switch.requests) == before
        await commit("two")
        assert (await uncached.node(("model", "llm", "gpt2", "main", "two"))).size == 3
        with pytest.raises(NotFound):  # the head stays cached for its refresh time
            await cached.node(("model", "llm", "gpt2", "main", "two"))
        cached.invalidate(addr)
        assert (await cached.node(("model", "llm", "gpt2", "main", "two"))).size == 3
        cached.view.invalidate()  # everything, as ah refresh does: still found
        assert (await cached.node(("model", "llm", "gpt2", "main", "one"))).size == 3


async def test_the_opened_file_of_a_batch_is_kept_before_its_siblings_arrive(
        hub: tuple[HubClient, Switch, AssetAddr], tmp_path: Path) -> None:
    """The hub sends a batch's first object (the file being opened) on its own, and the mount
    keeps it and wakes its reader at once: opening a small file never waits for the rest of
    its directory to travel."""
    import os

    from ahmount.vfs.handles import HubSource
    from ahmount.vfs.object_cache import ObjectCache
    from ahmount.vfs.sibling_fetch import SiblingFetcher

    client, switch, addr = hub
    entries = []
    for name in ("a", "b", "c"):
        blob = os.urandom(4096)
        sha = hashlib.sha256(blob).hexdigest()
        (tmp_path / name).write_bytes(blob)
        entries.append(ObjectEntry(f"d/{name}.bin", sha, len(blob), 0.0))
    async with client:
        for entry in entries:
            await client.upload_file(tmp_path / entry.path[2], entry.sha256, entry.size)
        await client.commit(addr, "main", "three files", adds=entries)
        view = HubView(client, "alice", 60.0, diskcache.Cache(str(tmp_path / "listings")))
        cache = ObjectCache(tmp_path / "cache", 64 << 20)
        try:
            fetcher = SiblingFetcher(cache, lambda name, job: None)
            assert len(cache.claim([(e.sha256, e.size) for e in entries])) == 3
            opened = cache._inflight[(entries[0].sha256, 0)]
            source = HubSource(view, addr, "main", entries[0].path, entries[0].sha256,
                               entries[0].size)
            switch.hold_batches = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher._fetch, source, entries)
                with trio.fail_after(10):
                    await opened.wait()
                assert cache.is_complete(entries[0].sha256, entries[0].size)
                [chunk] = switch.first_chunks  # the first object, alone
                assert chunk.endswith(b"\n" + (tmp_path / "a").read_bytes())
                assert chunk.count(b'"path"') == 1
                assert not any(cache.is_complete(e.sha256, e.size) for e in entries[1:])
                switch.hold_batches.set()
            assert all(cache.is_complete(e.sha256, e.size) for e in entries)
        finally:
            cache.close()
