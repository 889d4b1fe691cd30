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
``async with read_lock`` (a ``trio.Lock``), and taking that lock already is one. Its
``acquire`` delivers a pending cancellation, then either parks (another worker holds the
lock: it is handed over from that worker's release) or yields to the scheduler
(``cancel_shielded_checkpoint``). So every request still lets the other tasks run once
(batches arriving, timers, the control socket), and a cancelled loop still ends. A second
checkpoint here was a second scheduler pass per request: 50,000 of 100,000 passes in a cold
read of 10,000 small files by 8 readers.

pyfuse3 holds its read lock across the wait and reads with no ``await`` after it, so no
other task can take the request in between, as with trio's own wait.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio


class _ReadyFirst:
    """``wait_readable`` with a zero-timeout ``poll`` first (one poll object per fd). Its
    readable path does not checkpoint: for callers that just took a trio lock (see the
    module's docstring), as pyfuse3's loop does."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        #: Waits answered by the poll alone (no trip through trio's I/O manager).
        self.immediate = 0

    def _readable_now(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        events = poll.poll(0)
        return bool(events) and events[0][1] == select.POLLIN

    async def wait_readable(self, fd: Any) -> None:
        if isinstance(fd, int) and self._readable_now(fd):
            self.immediate += 1
            return
        await trio.lowlevel.wait_readable(fd)


def trio_for_pyfuse3() -> types.ModuleType:
    """A stand-in for the ``trio`` module: trio itself, but for ``lowlevel.wait_readable``."""
    lowlevel = types.ModuleType("trio.lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.wait_readable = _ReadyFirst().wait_readable  # type: ignore[attr-defined]
    stand_in = types.ModuleType("trio")
    stand_in.__dict__.update(vars(trio))
    stand_in.lowlevel = lowlevel  # type: ignore[attr-defined]
    return stand_in


def install() -> None:
    """Make pyfuse3's request loop use :func:`trio_for_pyfuse3` (for the mount's life)."""
    pyfuse3.trio = trio_for_pyfuse3()  # type: ignore[attr-defined]


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
