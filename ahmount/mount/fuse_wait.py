"""pyfuse3's request loop, without a trip through trio's I/O manager when a request waits.

Before reading each request from ``/dev/fuse``, pyfuse3 awaits
``trio.lowlevel.wait_readable`` on it. Trio registers the descriptor with epoll for that one
wait and removes it after (two ``epoll_ctl`` calls), and wakes the task from its I/O pass:
under load, when the next request is always there already, that was an eighth of the trio
thread's time serving warm small files to 8 readers. pyfuse3 looks its ``trio`` up as a
module global (which is how its own asyncio mode swaps it), so :func:`install` gives it a
``trio`` whose ``lowlevel.wait_readable`` first asks ``poll`` with no timeout: readable now
means straight back to the read; not readable (or closed, or in error) means trio's wait, as
before.

The readable path needs no checkpoint of its own: pyfuse3 waits only inside
``async with read_lock``, and the stand-in's ``Lock`` (:class:`TakeTurns`, the one lock
pyfuse3 makes) decides when a request yields. Each take delivers a pending cancellation; a
worker yields (or parks) after :data:`TURNS` takes in a row, so the daemon's other tasks
still run every few requests. With ``trio.Lock`` and a checkpoint here, each request cost
two scheduler passes (100,543 for the 50,226 requests of a cold read of 10,000 small files
by 8 readers), one with ``trio.Lock`` alone; now one per TURNS requests or so. Measured on
the do-nothing floor (8 readers, warm, medians of 6 alternated rounds): daemon CPU per
file 88 -> 70 us without the second pass, and in a later run 60 -> 36 us with this lock.

pyfuse3 holds its read lock across the wait and reads with no ``await`` after it, so no
other task can take the request in between, as with trio's own wait.

When no request is there, the wait first polls for :data:`SPIN_SECONDS` before it sleeps
in trio's: one process doing one thing at a time (``ls -l``, a ``stat`` walk, a writer of
small files, a one-worker loader) sends its next request a few tens of microseconds after
the last answer, and a daemon gone to sleep in ``epoll_wait`` by then pays a wake-up of
its own and one of trio's I/O passes for each (a request libfuse answers by itself took
80-100 us here; 55 us caught spinning). It spins only while no other task of the loop is
runnable (they go first), and each poll lets the GIL go, so worker threads run on. Under
load it rarely spins at all (a request is there already): 250 spins over the 50,000
requests of 8 workers reading 10,000 small files, 83 of them for nothing (4 ms), against
24,668 caught and 222 missed for 1 worker.
"""

from __future__ import annotations

import select
import time
import types
from typing import Any

import pyfuse3
import trio

#: How long a wait polls for the next request before it sleeps in trio's (see the module's
#: docstring). Spinning 50 us or 100 us caught the same requests here; 0 turns it off.
SPIN_SECONDS = 50e-6


class _ReadyFirst:
    """``wait_readable`` with a zero-timeout ``poll`` first (one poll object per fd), then
    polls for up to ``spin`` seconds while no other task is runnable. Its readable path does
    not checkpoint: for callers under a lock that yields for them (see the module's
    docstring), as pyfuse3's loop is."""

    def __init__(self, spin: float = SPIN_SECONDS) -> None:
        self._polls: dict[int, select.poll] = {}
        self._spin = spin
        #: Waits answered by the poll alone (no trip through trio's I/O manager), of them
        #: those caught spinning; spins that ended in trio's wait.
        self.immediate = 0
        self.caught_spinning = 0
        self.missed_spinning = 0

    def _readable_now(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        events = poll.poll(0)
        return bool(events) and events[0][1] == select.POLLIN

    async def wait_readable(self, fd: Any) -> None:
        if isinstance(fd, int) and (self._readable_now(fd) or self._spun_until_readable(fd)):
            self.immediate += 1
            return
        await trio.lowlevel.wait_readable(fd)

    def _spun_until_readable(self, fd: int) -> bool:
        """Poll ``fd`` for up to the spin time, unless another task is runnable (it goes
        first: trio's wait lets it run). True if it became readable."""
        if self._spin <= 0 or trio.lowlevel.current_statistics().tasks_runnable:
            return False
        deadline = time.perf_counter() + self._spin
        while time.perf_counter() < deadline:
            if self._readable_now(fd):
                self.caught_spinning += 1
                return True
        self.missed_spinning += 1
        return False


#: Requests one pyfuse3 worker may take in a row without a scheduler pass (see TakeTurns).
TURNS = 8


class TakeTurns:
    """pyfuse3's read lock, taken without a scheduler pass up to :data:`TURNS` times in a
    row.

    Two pyfuse3 workers always exist under load (one starts whenever none waits), and with
    ``trio.Lock`` they hand the lock to each other at every request: the one that read a
    request answers it and parks on the lock, the other is rescheduled with it, one
    scheduler pass per request even when every handler answers at once. Here a release
    wakes one parked worker (unless one is awake already) but hands it nothing: the
    releasing worker, back after answering, takes the free lock again at once. After
    :data:`TURNS` takes in a row, the next one yields first (``cancel_shielded_checkpoint``,
    or it parks), so the woken worker and the daemon's other tasks (batches arriving,
    timers, the control socket) run every few requests. A handler that really waits
    (a cold read, a thread) yields too, and the woken worker then takes the lock and reads
    the next request meanwhile, as before. Every take delivers a pending cancellation
    first (``checkpoint_if_cancelled``), so a cancelled loop still ends at its next take.
    """

    def __init__(self, turns: int = TURNS) -> None:
        self._turns = turns
        self._owner: trio.lowlevel.Task | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._woken = 0  # parked tasks unparked that have not run yet
        self._run = 0  # takes since the last yield
        #: Takes with no scheduler pass, and takes that yielded or parked.
        self.straight = self.yielded = 0

    def locked(self) -> bool:
        return self._owner is not None

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if self._owner is None and self._run < self._turns:
            self._owner = task
            self._run += 1
            self.straight += 1
            return
        self.yielded += 1
        if self._owner is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while self._owner is not None:
            # Cancelled while parked: never woken, so nothing to count (Cancelled goes on).
            await self._lot.park()
            self._woken -= 1  # woken by a release; the lock may have been taken again since
        self._owner = task
        self._run = 1

    def release(self) -> None:
        if self._owner is not trio.lowlevel.current_task():
            raise RuntimeError("can't release a lock you don't own")
        self._owner = None
        if not self._woken and self._lot:
            self._woken += len(self._lot.unpark())

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def trio_for_pyfuse3() -> types.ModuleType:
    """A stand-in for the ``trio`` module: trio itself, but for ``lowlevel.wait_readable``
    and ``Lock`` (the one lock pyfuse3 makes: its read lock)."""
    lowlevel = types.ModuleType("trio.lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.wait_readable = _ReadyFirst().wait_readable  # type: ignore[attr-defined]
    stand_in = types.ModuleType("trio")
    stand_in.__dict__.update(vars(trio))
    stand_in.lowlevel = lowlevel  # type: ignore[attr-defined]
    stand_in.Lock = TakeTurns  # type: ignore[attr-defined]
    return stand_in


def install() -> None:
    """Make pyfuse3's request loop use :func:`trio_for_pyfuse3` (for the mount's life)."""
    pyfuse3.trio = trio_for_pyfuse3()  # type: ignore[attr-defined]


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
