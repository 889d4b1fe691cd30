"""The background-task policy, in-process: expected failures are contained, a bug calls for a
clean shutdown once; and the cache's background verification under it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from ahmount.errors import ChecksumMismatch, HubUnavailable
from ahmount.nurseries import open_nursery
from ahmount.vfs.object_cache import BLOCK, VERIFY_INLINE, ObjectCache
from ahmount.vfs.supervisor import FAULT_ENV, InjectedFault, Supervisor


class Bugs:
    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def __call__(self, exc: BaseException) -> None:
        self.seen.append(exc)


@pytest.mark.parametrize("failure", [HubUnavailable("hub down"), FileNotFoundError("gone"),
                                     trio.BrokenResourceError(), ChecksumMismatch("bad")])
async def test_expected_failures_are_contained(failure: BaseException) -> None:
    bugs = Bugs()
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, bugs)

        async def fails() -> None:
            raise failure

        supervisor.spawn("worker", fails)
    assert bugs.seen == [] and supervisor.contained == 1 and supervisor.bug is None


async def test_a_bug_asks_for_shutdown_once() -> None:
    bugs = Bugs()
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, bugs)

        async def buggy() -> None:
            raise KeyError("programming error")

        supervisor.spawn("a", buggy)
        supervisor.spawn("b", buggy)
    assert len(bugs.seen) == 1 and isinstance(bugs.seen[0], KeyError)
    assert supervisor.bug is bugs.seen[0]


async def test_fault_injection_names_one_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "read-ahead")
    bugs = Bugs()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, bugs)

        async def work() -> None:
            ran.append("x")

        supervisor.spawn("upload-ahead", work)
        supervisor.spawn("read-ahead of 0123", work)
    assert ran == ["x"] and isinstance(supervisor.bug, InjectedFault)


class LyingSource:
    """A scripted hub that sends ``data`` for an object whose hash is ``sha256``."""

    def __init__(self, sha256: str, data: bytes) -> None:
        self.sha256 = sha256
        self.size = len(data)
        self.data = data
        self.reads_directly = False

    @asynccontextmanager
    async def fetch(self, start: int, end: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield self.data[start:end]

        yield chunks()


async def test_a_corrupt_large_object_is_dropped_in_the_background(tmp_path: Path) -> None:
    data = os.urandom(2 * BLOCK)
    claimed = hashlib.sha256(b"something else").hexdigest()
    cache = ObjectCache(tmp_path / "cache", 64 << 20)
    bugs = Bugs()
    import ahmount.vfs.object_cache as module

    module_inline = module.VERIFY_INLINE
    module.VERIFY_INLINE = BLOCK  # make this 2 MiB object a "large" one, verified behind
    try:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, bugs)
            cache.set_spawner(supervisor.spawn)
            source = LyingSource(claimed, data)
            assert await cache.read(source, 0, 2 * BLOCK) == data  # answered before the check
    finally:
        module.VERIFY_INLINE = module_inline
        cache.close()
    assert bugs.seen == []
    assert cache.object_count() == 0  # dropped once the hash disagreed


async def test_a_small_corrupt_object_fails_the_read(tmp_path: Path) -> None:
    data = b"x" * 1000
    assert len(data) < VERIFY_INLINE
    cache = ObjectCache(tmp_path / "cache", 64 << 20)
    try:
        with pytest.raises(ChecksumMismatch):
            await cache.read(LyingSource("0" * 64, data), 0, 1000)
    finally:
        cache.close()
    assert cache.object_count() == 0


async def test_an_object_evicted_while_verified_is_no_bug(tmp_path: Path) -> None:
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    cache = ObjectCache(tmp_path / "cache", 64 << 20)
    bugs = Bugs()
    try:
        assert await cache.read(LyingSource(sha, data), 0, 1000) == data
        record = cache._records[sha]
        record.verified = False
        cache._path(sha).unlink()
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, bugs)
            cache.set_spawner(supervisor.spawn)
            await cache._verify(sha, record, inline=False)
    finally:
        cache.close()
    assert bugs.seen == [] and supervisor.contained == 0


async def test_a_service_that_cannot_start_raises_its_own_error() -> None:
    bugs = Bugs()

    async def cannot_bind(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("AF_UNIX path too long")

    with pytest.raises(OSError, match="AF_UNIX path too long"):
        async with open_nursery() as nursery:
            await Supervisor(nursery, bugs).start("control server", cannot_bind)
    assert bugs.seen == []


async def test_a_service_that_fails_after_starting_is_contained() -> None:
    bugs = Bugs()

    async def serves_then_breaks(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        raise trio.BrokenResourceError()

    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, bugs)
        await supervisor.start("control server", serves_then_breaks)
    assert bugs.seen == [] and supervisor.contained == 1


def test_control_sockets_fit_a_unix_address_under_any_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ahmount.mount.control import MAX_SOCKET_PATH, socket_path

    found = set()
    for home in ("h", "h" * 150, "i" * 150):
        monkeypatch.setenv("AHMOUNT_HOME", str(tmp_path / home))
        path = socket_path(tmp_path / "mnt")
        assert len(os.fsencode(path)) <= MAX_SOCKET_PATH
        found.add(path)
    assert len(found) == 3  # two long homes do not share a socket
