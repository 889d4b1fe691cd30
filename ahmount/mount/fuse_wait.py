"""pyfuse3's request loop, without a trip through trio's I/O manager when a request waits.

Before reading each request from ``/dev/fuse``, pyfuse3 awaits
``trio.lowlevel.wait_readable`` on it. Trio registers the descriptor with epoll for that one
wait and removes it after (two ``epoll_ctl`` calls), and wakes the task from its I/O pass:
under load, when the next request is always there already, that was an eighth of the trio
thread's time serving warm small files to 8 readers. pyfuse3 looks its ``trio`` up as a
module global (which is how its own asyncio mode swaps it), so :func:`install` gives it a
``trio`` whose ``lowlevel.wait_readable`` first asks ``poll`` with no timeout: readable now
means a checkpoint (other tasks run, a cancellation is delivered) and back to the read; not
readable (or closed, or in error) means trio's wait, as before.

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
    """``wait_readable`` with a zero-timeout ``poll`` first (one poll object per fd)."""

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
            await trio.lowlevel.checkpoint()
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
