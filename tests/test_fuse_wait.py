"""The stand-in ``trio`` pyfuse3's request loop gets (``mount/fuse_wait.py``): a wait on a
descriptor that is readable now is answered by a poll alone; any other wait is trio's own
(it blocks until readable, is cancellable, and sees a closed peer). Its read lock
(:class:`TakeTurns`) is taken straight up to TURNS times, then yields: one holder at a
time, every worker gets it, a pending cancellation ends every take."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ahmount.mount.fuse_wait import TURNS, TakeTurns, _ReadyFirst, trio_for_pyfuse3


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


async def test_a_take_of_the_read_lock_delivers_a_pending_cancellation(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """What pyfuse3's loop does before each request: take the read lock, wait, let go. A
    take that needs no scheduler pass still ends a cancelled loop, as does one that
    parks."""
    stand_in = trio_for_pyfuse3()
    lock = stand_in.Lock()
    pair[1].send(b"x")
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:
            await stand_in.lowlevel.wait_readable(pair[0].fileno())
    assert scope.cancelled_caught and not lock.locked()
    held = trio.Event()
    done = trio.Event()
    parked = trio.CancelScope()

    async def holder() -> None:
        async with lock:
            held.set()
            await done.wait()

    async def waiter() -> None:
        with parked:
            async with lock:
                raise AssertionError("took a lock that another task holds")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await held.wait()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        parked.cancel()
        await trio.testing.wait_all_tasks_blocked()
        done.set()
    assert parked.cancelled_caught and not lock.locked()
    async with lock:  # the cancelled waiter left nothing behind: the lock is free
        pass


async def test_other_tasks_run_every_few_requests_that_are_always_ready(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A stream of requests that never waits (the next one is always there) still lets the
    daemon's other tasks (batches arriving, timers, the control socket) run every few
    requests, with two pyfuse3 workers at the lock as under load: each worker yields after
    TURNS takes in a row, and a scheduler pass runs every waiting task once, in an order of
    its own: at most two passes' worth of takes, 2 x 2 x TURNS, go by between two turns of
    another task."""
    stand_in = trio_for_pyfuse3()
    lock = stand_in.Lock()
    pair[1].send(b"x")  # never read: the descriptor stays readable
    served = 0
    ran: list[int] = []

    async def worker() -> None:
        nonlocal served
        for _ in range(400):
            async with lock:
                await stand_in.lowlevel.wait_readable(pair[0].fileno())
            served += 1

    async def other() -> None:
        while served < 800:
            ran.append(served)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        nursery.start_soon(worker)
        nursery.start_soon(other)
    assert served == 800
    steps = [b - a for a, b in itertools.pairwise(ran)]
    assert len(ran) >= 800 // (4 * TURNS) and max(steps) <= 4 * TURNS
    assert lock.straight > lock.yielded  # most takes needed no scheduler pass


async def test_a_worker_whose_request_waits_leaves_the_next_request_to_another() -> None:
    """A handler that really waits (a cold read) yields: the parked worker takes the free
    lock and serves the next requests meanwhile."""
    lock = TakeTurns()
    cold = trio.Event()
    order: list[str] = []

    async def first() -> None:
        async with lock:
            order.append("first reads")
        await cold.wait()  # its handler waits for the hub
        order.append("first answers")

    async def second() -> None:
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            async with lock:
                order.append(f"second reads {i}")
        cold.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert order == ["first reads", "second reads 0", "second reads 1", "second reads 2",
                     "first answers"]


def test_only_the_owner_lets_go() -> None:
    async def main() -> None:
        lock = TakeTurns()
        with pytest.raises(RuntimeError):
            lock.release()
        await lock.acquire()
        done = trio.Event()

        async def other() -> None:
            with pytest.raises(RuntimeError):
                lock.release()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
        assert done.is_set() and lock.locked()
        lock.release()

    trio.run(main)


# Per worker, what each of its turns does with the lock held and after letting it go: 0
# nothing (a handler that answers at once), 1 a checkpoint, 2 a sleep (a handler that waits),
# 3 a wait for the next worker's turn (a handler waiting on another request).
_turns = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(_turns, min_size=1, max_size=5), st.integers(1, 4))
def test_the_lock_is_held_by_one_task_at_a_time_and_every_worker_gets_it(
        workers: list[list[tuple[int, int]]], turns: int) -> None:
    """Model check: any mix of workers and of what they do inside and outside the lock
    ends (no lost wake-up), and no two tasks ever hold the lock at once."""

    async def main() -> None:
        lock = TakeTurns(turns)
        inside: list[int] = []
        progress = [trio.Event() for _ in workers]
        taken = [0] * len(workers)

        async def act(what: int, who: int) -> None:
            if what == 1:
                await trio.lowlevel.checkpoint()
            elif what == 2:
                await trio.sleep(0.0005)
            elif what == 3:
                nxt = (who + 1) % len(workers)
                with trio.move_on_after(0.002):  # it may have ended already
                    await progress[nxt].wait()

        async def worker(who: int, script: list[tuple[int, int]]) -> None:
            for held, after in script:
                async with lock:
                    assert not inside, f"worker {who} took the lock {inside[0]} holds"
                    inside.append(who)
                    taken[who] += 1
                    await act(held, who)
                    inside.remove(who)
                progress[who].set()
                progress[who] = trio.Event()
                await act(after, who)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for who, script in enumerate(workers):
                    nursery.start_soon(worker, who, script)
        assert taken == [len(script) for script in workers]
        assert not lock.locked()

    trio.run(main)


async def test_a_wait_blocks_until_the_descriptor_is_readable(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Nothing to read: a spin that catches nothing, then trio's wait, until it is."""
    waits = _ReadyFirst(spin=0.001)
    done = trio.Event()

    async def waiter() -> None:
        await waits.wait_readable(pair[0].fileno())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()  # the spin is over: in trio's wait
        assert waits.missed_spinning == 1 and not done.is_set()
        pair[1].send(b"x")
        with trio.fail_after(5):
            await done.wait()
    assert (waits.immediate, waits.caught_spinning) == (0, 0)
    pair[1].close()  # a closed peer: readable (end of file), through trio's wait too
    pair[0].recv(1)
    with trio.fail_after(5):
        await waits.wait_readable(pair[0].fileno())


async def test_a_request_arriving_while_the_wait_spins_is_taken_without_trios_wait(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """One reader doing one thing at a time: its next request comes while the loop still
    polls, and no trip through trio's wait is paid for it."""
    waits = _ReadyFirst(spin=30.0)  # far longer than the sender needs: no timing in the test
    sender = threading.Timer(0.001, pair[1].send, args=(b"x",))
    sender.start()
    try:
        with trio.testing.assert_no_checkpoints():
            await waits.wait_readable(pair[0].fileno())
    finally:
        sender.join()
    assert (waits.immediate, waits.caught_spinning, waits.missed_spinning) == (1, 1, 0)


def test_no_spin_while_another_task_is_runnable_or_when_turned_off(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """Other tasks of the loop (a batch arriving, a timer) go first: trio's wait lets them
    run, a spin would hold them up."""
    polls = 0
    waits = _ReadyFirst(spin=30.0)
    readable_now = waits._readable_now

    def counted(fd: int) -> bool:
        nonlocal polls
        polls += 1
        return readable_now(fd)

    monkeypatch.setattr(waits, "_readable_now", counted)

    async def main() -> None:
        nonlocal polls
        runnable = SimpleNamespace(tasks_runnable=1)
        with monkeypatch.context() as patched:
            patched.setattr(trio.lowlevel, "current_statistics", lambda: runnable)
            assert not waits._spun_until_readable(pair[0].fileno())
        assert polls == 0
        off = _ReadyFirst(spin=0)
        assert not off._spun_until_readable(pair[0].fileno())
        assert (off.caught_spinning, off.missed_spinning) == (0, 0)

    trio.run(main)
    assert (waits.caught_spinning, waits.missed_spinning) == (0, 0)


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
        async with TakeTurns():  # as pyfuse3 waits: the lock's take cancels
            await waits.wait_readable(pair[0].fileno())
    assert scope.cancelled_caught


def test_the_stand_in_is_trio_but_for_that_wait() -> None:
    stand_in = trio_for_pyfuse3()
    assert stand_in.Lock is TakeTurns and stand_in.open_nursery is trio.open_nursery
    assert stand_in.lowlevel.current_task is trio.lowlevel.current_task
    assert stand_in.lowlevel.wait_readable is not trio.lowlevel.wait_readable
    assert trio.lowlevel.wait_readable is not stand_in.lowlevel.wait_readable  # trio intact
