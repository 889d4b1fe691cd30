"""The stand-in ``trio`` pyfuse3's request loop gets (``mount/fuse_wait.py``): a wait on a
descriptor that is readable now is answered by a poll alone, the read lock pyfuse3 takes
around it being the request's checkpoint; any other wait is trio's own (it blocks until
readable, is cancellable, and sees a closed peer)."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from ahmount.mount.fuse_wait import _ReadyFirst, trio_for_pyfuse3


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


async def test_a_readable_descriptor_is_answered_without_trios_wait(
        pair: tuple[socket.socket, socket.socket]) -> None:
    waits = _ReadyFirst()
    pair[1].send(b"x")
    with trio.testing.assert_no_checkpoints():
        await waits.wait_readable(pair[0].fileno())
    assert waits.immediate == 1


async def test_pyfuse3s_wait_under_its_read_lock_is_one_checkpoint(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """What pyfuse3's loop does before each request: take the read lock, wait, let go. The
    lock's acquire is the checkpoint: a pending cancellation ends the loop there."""
    stand_in = trio_for_pyfuse3()
    lock = stand_in.Lock()
    pair[1].send(b"x")
    with trio.testing.assert_checkpoints():
        async with lock:
            await stand_in.lowlevel.wait_readable(pair[0].fileno())
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:
            await stand_in.lowlevel.wait_readable(pair[0].fileno())
    assert scope.cancelled_caught


async def test_other_tasks_run_between_requests_that_are_always_ready(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A stream of requests that never waits (the next one is always there) still lets the
    daemon's other tasks (batches arriving, timers, the control socket) run once per
    request, as two pyfuse3 workers taking turns at the lock do."""
    stand_in = trio_for_pyfuse3()
    lock = stand_in.Lock()
    pair[1].send(b"x")  # never read: the descriptor stays readable
    served = 0
    ran: list[int] = []

    async def worker() -> None:
        nonlocal served
        for _ in range(100):
            async with lock:
                await stand_in.lowlevel.wait_readable(pair[0].fileno())
            served += 1

    async def other() -> None:
        while served < 200:
            ran.append(served)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        nursery.start_soon(worker)
        nursery.start_soon(other)
    assert served == 200
    steps = [b - a for a, b in itertools.pairwise(ran)]
    assert len(ran) >= 100 and max(steps) <= 2  # never more than a turn each between runs


async def test_a_wait_blocks_until_the_descriptor_is_readable(
        pair: tuple[socket.socket, socket.socket]) -> None:
    waits = _ReadyFirst()
    done = trio.Event()

    async def waiter() -> None:
        await waits.wait_readable(pair[0].fileno())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        pair[1].send(b"x")
        with trio.fail_after(5):
            await done.wait()
    assert waits.immediate == 0
    pair[1].close()  # a closed peer: readable (end of file), through trio's wait too
    pair[0].recv(1)
    with trio.fail_after(5):
        await waits.wait_readable(pair[0].fileno())


async def test_a_cancelled_wait_is_cancelled_on_both_paths(
        pair: tuple[socket.socket, socket.socket]) -> None:
    waits = _ReadyFirst()
    outcome: list[str] = []

    async def waiter(scope: trio.CancelScope) -> None:
        with scope:
            await waits.wait_readable(pair[0].fileno())  # nothing to read: trio's wait
            outcome.append("returned")
        outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

    blocked = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, blocked)
        await trio.testing.wait_all_tasks_blocked()
        blocked.cancel()
    assert outcome == ["cancelled"]
    pair[1].send(b"x")
    with trio.CancelScope() as scope:
        scope.cancel()
        async with trio.Lock():  # as pyfuse3 waits: the lock's acquire cancels
            await waits.wait_readable(pair[0].fileno())
    assert scope.cancelled_caught


def test_the_stand_in_is_trio_but_for_that_wait() -> None:
    stand_in = trio_for_pyfuse3()
    assert stand_in.Lock is trio.Lock and stand_in.open_nursery is trio.open_nursery
    assert stand_in.lowlevel.current_task is trio.lowlevel.current_task
    assert stand_in.lowlevel.wait_readable is not trio.lowlevel.wait_readable
    assert trio.lowlevel.wait_readable is not stand_in.lowlevel.wait_readable  # trio intact
