"""The change feed at the service, on both store pairs: what each change records, in order,
who sees it (as reads decide, at the time of the change), cursors, resumption, pruning."""

from __future__ import annotations

import time

import pytest

from ahmount.errors import InvalidArgument
from ahmount.hub.models import AssetAddr, FolderAddr
from ahmount.hub.service import Actor, HubService
from tests.test_service import obj


def types(service: HubService, actor: Actor, after: int) -> list[tuple[str, ...]]:
    page = service.events(actor, after)
    out = []
    for e in page.events:
        p = e.payload
        out.append(tuple(str(p[k]) for k in ("type", "folder", "asset", "ref")
                         if k in p))
    return out


def test_every_change_is_an_event_in_order(service: HubService, alice: Actor) -> None:
    start = service.events(alice, None).cursor
    folder = FolderAddr("alice", "model", "ev")
    addr = AssetAddr(folder, "m")
    service.create_folder(alice, folder)
    service.create_asset(alice, addr)
    head = service.resolve(alice, addr, "main").commit.id
    commit = service.commit(alice, addr, "main", "one", adds=[obj(service, alice, "a", b"a")])
    assert commit is not None
    service.create_branch(alice, addr, "dev")
    service.create_tag(alice, addr, "v1", "main")
    service.delete_ref(alice, addr, "v1")
    service.merge(alice, addr, "dev")  # dev is at the root: main changes to it
    service.update_asset(alice, addr, labels=["x"])
    service.update_asset(alice, addr, name="m2")
    service.update_folder(alice, folder, description="d")
    service.delete_asset(alice, AssetAddr(folder, "m2"))
    service.delete_folder(alice, folder)
    assert types(service, alice, start) == [
        ("folder.created", "ev"), ("asset.created", "ev", "m"),
        ("branch.moved", "ev", "m", "main"), ("ref.created", "ev", "m", "dev"),
        ("ref.created", "ev", "m", "v1"), ("ref.deleted", "ev", "m", "v1"),
        ("branch.moved", "ev", "m", "main"), ("asset.updated", "ev", "m"),
        ("asset.updated", "ev", "m"), ("folder.updated", "ev"), ("asset.deleted", "ev", "m2"),
        ("folder.deleted", "ev")]
    page = service.events(alice, start)
    moved = page.events[2].payload
    assert (moved["old"], moved["new"], moved["owner"], moved["kind"]) == (
        head, commit.id, "alice", "model")
    assert page.events[8].payload["name"] == "m2"
    ids = [e.id for e in page.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and page.cursor == ids[-1]
    # resuming from any cursor gives exactly the rest
    for i, cursor in enumerate(ids):
        assert [e.id for e in service.events(alice, cursor).events] == ids[i + 1:]


def test_events_respect_permissions_at_the_time_of_the_change(
        service: HubService, alice: Actor, bob: Actor) -> None:
    carol = service.ensure_user("carol")
    start = service.events(bob, None).cursor
    folder = FolderAddr("alice", "model", "private")
    service.create_folder(alice, folder)
    service.create_asset(alice, AssetAddr(folder, "secret"))
    assert types(service, bob, start) == []
    service.share_folder(alice, folder, "bob", "view")
    service.create_asset(alice, AssetAddr(folder, "shared"))
    service.share_folder(alice, folder, "bob", None)
    service.create_asset(alice, AssetAddr(folder, "after"))
    assert types(service, bob, start) == [
        ("folder.shared", "private"), ("asset.created", "private", "shared"),
        ("folder.shared", "private")]  # the unsharing reaches him; what follows does not
    assert types(service, carol, start) == []
    service.set_public(alice, folder, True)
    service.create_asset(alice, AssetAddr(folder, "open"))
    service.set_public(alice, folder, False)
    service.create_asset(alice, AssetAddr(folder, "closed"))
    assert types(service, carol, start) == [
        ("folder.public", "private"), ("asset.created", "private", "open"),
        ("folder.public", "private")]
    # the cursor moves past what the caller may not see: nothing is sent twice
    page = service.events(carol, start)
    assert page.cursor == service.events(alice, start).cursor


def test_cursors_new_subscribers_bad_and_stale(service: HubService, alice: Actor) -> None:
    service.create_folder(alice, FolderAddr("alice", "model", "c"))
    newest = service.events(alice, None)
    assert newest.events == [] and newest.cursor > 0 and not newest.reset
    future = service.events(alice, newest.cursor + 1000)
    assert future.reset and future.cursor == newest.cursor
    for bad in (-1, "3", 1.5, True):
        with pytest.raises(InvalidArgument, match="event cursor"):
            service.events(alice, bad)  # type: ignore[arg-type]
    service.create_folder(alice, FolderAddr("alice", "model", "c2"))
    import ahmount.hub.service as module

    kept = module.EVENT_RETENTION
    module.EVENT_RETENTION = -1.0  # everything but the newest is old
    try:
        time.sleep(0.01)
        assert service.gc(grace_seconds=3600)["events"] >= 1
    finally:
        module.EVENT_RETENTION = kept
    stale = service.events(alice, 0)
    assert stale.reset and stale.cursor >= newest.cursor
