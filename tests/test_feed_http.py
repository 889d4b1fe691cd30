"""The change feed over HTTP (Server-Sent Events) against real ah-servers: live delivery,
resumption with Last-Event-ID after a disconnect and after a server restart (nothing lost,
nothing twice), permissions, and two replicas on PostgreSQL + S3 (a change through one is
delivered by the other)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable
from ahmount.hub.models import AssetAddr, EventPage, FolderAddr
from tests.conftest import HubProcess
from tests.proxies import Scripted, scripted_server
from tests.test_replicas import replicas  # noqa: F401  (the fixture)

DEADLINE = 20.0


async def next_change(feed: AsyncGenerator[EventPage, None]) -> dict[str, object]:
    """The next change on the feed (cursor moves skipped), within the deadline."""
    with trio.fail_after(DEADLINE):
        async for page in feed:
            if page.events:
                return {**page.events[0].payload, "id": page.events[0].id}
    raise AssertionError("the feed ended")


async def test_changes_arrive_live_and_resume_without_loss(hub_server: HubProcess) -> None:
    name, key = hub_server.fresh_user()
    folder = FolderAddr(name, "model", f"f{uuid.uuid4().hex[:8]}")
    async with HubClient(hub_server.url, api_key=key) as hub, \
            HubClient(hub_server.url, api_key=key) as writer:
        feed = hub.watch()
        with trio.fail_after(DEADLINE):
            start = await feed.__anext__()  # where the stream starts: the newest event
        assert start.events == [] and not start.reset
        await writer.create_folder(folder)
        created = await next_change(feed)
        assert (created["type"], created["folder"]) == ("folder.created", folder.name)
        await feed.aclose()  # a disconnect; changes go on meanwhile
        for i in range(3):
            await writer.create_asset(AssetAddr(folder, f"a{i}"))
        resumed = hub.watch(after=int(str(created["id"])))
        with trio.fail_after(DEADLINE):
            again = await resumed.__anext__()
        assert again.cursor == created["id"]
        got = [await next_change(resumed) for _ in range(3)]
        assert [g["asset"] for g in got] == ["a0", "a1", "a2"]
        await resumed.aclose()
        page = await hub.event_page(after=int(str(created["id"])))  # the JSON form agrees
        assert [e.payload["asset"] for e in page.events] == ["a0", "a1", "a2"]


async def test_the_feed_shows_only_what_the_caller_may_see(hub_server: HubProcess) -> None:
    alice, alice_key = hub_server.fresh_user()
    bob, bob_key = hub_server.fresh_user()
    private = FolderAddr(alice, "model", f"p{uuid.uuid4().hex[:8]}")
    async with HubClient(hub_server.url, api_key=alice_key) as a, \
            HubClient(hub_server.url, api_key=bob_key) as b:
        cursor = (await b.event_page()).cursor
        feed = b.watch(after=cursor)
        await a.create_folder(private)
        await a.create_asset(AssetAddr(private, "secret"))
        await a.share_folder(private, bob, "view")
        shared = await next_change(feed)  # the first thing bob hears of it
        assert (shared["type"], shared["user"]) == ("folder.shared", bob)
        await feed.aclose()
        page = await b.event_page(after=cursor)
        assert [e.payload["type"] for e in page.events] == ["folder.shared"]
        headers = {"authorization": f"Bearer {bob_key}", "last-event-id": "nope"}
        bad = httpx.get(f"{hub_server.url}/api/v1/events", headers=headers)
        assert bad.status_code == 400 and "Last-Event-ID" in bad.text
        assert httpx.get(f"{hub_server.url}/api/v1/events").status_code == 401


async def test_a_restarted_server_resumes_the_feed(tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "data")
    key = server.add_user("alice")
    server.start()
    try:
        async with HubClient(server.url, api_key=key) as hub:
            cursor = (await hub.event_page()).cursor
            await hub.create_folder(FolderAddr("alice", "model", "before"))
        port = server.port
        server.stop()
        server.start(port)
        async with HubClient(server.url, api_key=key) as hub:
            feed = hub.watch(after=cursor)
            before = await next_change(feed)
            await hub.create_folder(FolderAddr("alice", "model", "after"))
            after = await next_change(feed)
            await feed.aclose()
        assert (before["folder"], after["folder"]) == ("before", "after")
        assert int(str(after["id"])) > int(str(before["id"]))
    finally:
        server.stop()


async def test_a_change_through_one_replica_is_delivered_by_the_other(
        replicas: tuple[HubProcess, HubProcess, list[str]]) -> None:  # noqa: F811
    a, b, _ = replicas
    async with HubClient(a.url, api_key=a.keys["alice"]) as through_a, \
            HubClient(b.url, api_key=b.keys["alice"]) as through_b:
        feed = through_b.watch()
        with trio.fail_after(DEADLINE):
            await feed.__anext__()
        seen = []
        for i in range(5):
            folder = FolderAddr("alice", "model", f"r{i}")
            await (through_a if i % 2 else through_b).create_folder(folder)
            seen.append(await next_change(feed))
        await feed.aclose()
        assert [s["folder"] for s in seen] == [f"r{i}" for i in range(5)]
        ids = [int(str(s["id"])) for s in seen]
        assert ids == sorted(ids)


CHANGE = {"id": 3, "created": 1.0, "type": "branch.moved", "owner": "a", "kind": "model",
          "folder": "f", "asset": "x", "ref": "main"}
#: A feed a proxy or a damaged store mangled: a change whose data is not JSON, a good one, a
#: change with fields missing, a cursor move that is not an object, then an id that is not
#: a number.
MANGLED_FEED = [("1", "hello", '{"cursor": 1, "reset": false}'), ("2", "change", "not json"),
                ("3", "change", json.dumps(CHANGE)), ("4", "change", '{"id": 4}'),
                ("5", "cursor", "[5]"), ("x6", "change", json.dumps(CHANGE))]
#: Pages of the events API: events with fields missing, then no cursor at all.
MANGLED_PAGES = [{"events": [{"id": 7}], "cursor": 7, "reset": False},
                 {"events": [], "reset": False}]


class _MangledHub(Scripted):
    """Answers ``/api/v1/events`` as no real hub does (see MANGLED_FEED, MANGLED_PAGES)."""

    pages = list(MANGLED_PAGES)

    def do_GET(self) -> None:
        if "text/event-stream" in self.headers.get("accept", ""):
            body = "".join(f"id: {i}\nevent: {e}\ndata: {d}\n\n" for i, e, d in MANGLED_FEED)
            kind = "text/event-stream"
        else:
            body, kind = json.dumps(self.pages.pop(0)), "application/json"
        self.answer(200, body.encode(), {"content-type": kind})


@pytest.fixture
def mangled_hub() -> Iterator[str]:
    with scripted_server(_MangledHub) as url:
        yield url


async def test_a_mangled_change_feed_is_a_reset_not_a_crash(mangled_hub: str) -> None:
    """A change event that cannot be read raised ValueError or KeyError out of the client,
    which the mount's supervisor took for a bug: the mount shut down, and at every restart
    the same stored event did it again. Now it is a reset at its cursor (the follower
    forgets what it cached and goes on after it); an id or a page cursor that is not a
    number is the hub failing (the feed falls back to polling and reconnects)."""
    async with HubClient(mangled_hub, api_key="k", retries=0) as hub:
        pages = []
        with pytest.raises(HubUnavailable, match="event id 'x6', not a number"):
            async for page in hub.watch(after=0):
                pages.append(([e.id for e in page.events], page.cursor, page.reset))
        assert pages == [([], 1, False), ([], 2, True), ([3], 3, False), ([], 4, True),
                         ([], 5, True)]
        page = await hub.event_page(after=6)
        assert (page.events, page.cursor, page.reset) == ([], 7, True)
        with pytest.raises(HubUnavailable, match="a page with no cursor"):
            await hub.event_page(after=7)
