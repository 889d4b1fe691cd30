"""Commits of more changes than one call may carry (a dataset of a million files), against a
real ``ah-server``: staged a call's worth at a time under one session, committed at once, and
dropped again when the commit does not happen."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from ahmount.client import hub_client
from ahmount.client.hub_client import HubClient
from ahmount.errors import UnknownChanges
from ahmount.hub.models import MAX_CHANGES_PER_CALL, AssetAddr, ObjectEntry
from tests.conftest import HubProcess
from tests.test_http import client, entry
from tests.test_replicas import _asset


@pytest.fixture
async def alice(hub_server: HubProcess) -> AsyncIterator[HubClient]:
    async with client(hub_server, "alice") as hub:
        yield hub


@pytest.fixture
async def dataset(alice: HubClient, unique: str, tmp_path: Path) -> tuple[AssetAddr, ObjectEntry]:
    """A new dataset, and an uploaded blob to name in its objects."""
    return await _asset(alice, unique), await entry(alice, "x", b"bytes", tmp_path)


def named(template: ObjectEntry, paths: list[str]) -> list[ObjectEntry]:
    return [ObjectEntry(path, template.sha256, template.size, template.mtime)
            for path in paths]


async def paths_of(hub: HubClient, addr: AssetAddr) -> list[str]:
    return [o.path for o in (await hub.list_objects(addr, "main"))[1]]


async def commit_count(hub: HubClient, addr: AssetAddr) -> int:
    return len(await hub.log(addr, "main"))


async def test_more_changes_than_a_call_make_one_commit(
        alice: HubClient, dataset: tuple[AssetAddr, ObjectEntry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_client, "MAX_CHANGES_PER_CALL", 4)
    addr, blob = dataset
    first = await alice.commit(addr, "main", "ten files",
                               adds=named(blob, [f"d/{i}" for i in range(10)]))
    assert first is not None
    assert await paths_of(alice, addr) == sorted(f"d/{i}" for i in range(10))
    # 5 deletes and 7 adds, in 3 staging calls: deletes first, so re-adding under a
    # deleted directory keeps the new files, as one call would.
    second = await alice.commit(
        addr, "main", "replace",
        deletes=["d/", "nothing/here", "d/1", "d/2", "d/3"],
        adds=named(blob, ["d/new", *(f"e/{i}" for i in range(6))]))
    assert second is not None and second.parents == [first.id]
    assert await paths_of(alice, addr) == ["d/new", *(f"e/{i}" for i in range(6))]
    assert await commit_count(alice, addr) == 3  # "Repository created" and the two
    assert await alice.changes(addr, "main") == []
    # Nothing to change: no commit, and nothing left staged.
    assert await alice.commit(addr, "main", "same again",
                              adds=named(blob, [f"e/{i}" for i in range(6)])) is None
    assert await alice.changes(addr, "main") == []


async def test_a_large_commit_that_fails_drops_only_what_it_staged(
        alice: HubClient, dataset: tuple[AssetAddr, ObjectEntry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_client, "MAX_CHANGES_PER_CALL", 3)
    addr, blob = dataset
    await alice.stage(addr, "main", "someone-else", adds=named(blob, ["theirs"]))
    with pytest.raises(UnknownChanges, match="1 uncommitted change"):
        await alice.commit(addr, "main", "mine", adds=named(blob, [f"m/{i}" for i in range(8)]))
    assert [c.path for c in await alice.changes(addr, "main")] == ["theirs"]
    assert await paths_of(alice, addr) == []
    # Dropping one session's changes leaves the others'.
    await alice.stage(addr, "main", "mine", adds=named(blob, ["a", "b"]))
    assert await alice.reset(addr, "main", session="mine") == 2
    assert await alice.reset(addr, "main", session="nobody") == 0
    assert [c.path for c in await alice.changes(addr, "main")] == ["theirs"]


async def test_a_large_commit_cancelled_while_staging_leaves_the_branch_as_it_was(
        alice: HubClient, dataset: tuple[AssetAddr, ObjectEntry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_client, "MAX_CHANGES_PER_CALL", 2)
    addr, blob = dataset
    staging = alice.stage
    calls = 0

    async def stage_then_cancel(*args: object, **kwargs: object) -> int:
        nonlocal calls
        staged = await staging(*args, **kwargs)  # type: ignore[arg-type]
        calls += 1
        if calls == 2:  # the user's Ctrl-C, between two staging calls
            scope.cancel()
            await trio.lowlevel.checkpoint()
        return staged

    monkeypatch.setattr(alice, "stage", stage_then_cancel)
    with trio.CancelScope() as scope:
        await alice.commit(addr, "main", "cancelled",
                           adds=named(blob, [f"c/{i}" for i in range(9)]))
    assert scope.cancelled_caught and calls == 2
    assert await alice.changes(addr, "main") == []
    assert await paths_of(alice, addr) == []
    assert await commit_count(alice, addr) == 1


async def test_a_commit_past_the_hubs_limit(sqlite_server: HubProcess, unique: str,
                                            tmp_path: Path) -> None:
    """The real limit, not a lowered one: one change more than a call may carry."""
    count = MAX_CHANGES_PER_CALL + 1
    async with client(sqlite_server, "alice") as hub:
        addr = await _asset(hub, unique)
        blob = await entry(hub, "x", b"bytes", tmp_path)
        started = time.perf_counter()
        made = await hub.commit(addr, "main", "a large dataset",
                                adds=named(blob, [f"n{i // 1000:03d}/{i:06d}.bin"
                                                  for i in range(count)]))
        assert made is not None
        listed = await paths_of(hub, addr)
        assert len(listed) == count and listed[-1] == f"n100/{count - 1:06d}.bin"
        assert await hub.changes(addr, "main") == []
        print(f"commit of {count} objects: {time.perf_counter() - started:.1f} s")
