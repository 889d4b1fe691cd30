"""One owner for the mount's background tasks: the failure policy written once.

Every background task of the daemon (control server, upload-ahead, cache flusher, block
verification, read-ahead) runs under :class:`Supervisor`. What a task may fail with is split
in two:

* **expected failures** (:data:`EXPECTED`): the hub is down or answered an error, a local
  file vanished or the disk is full, a control client hung up, a block arrived corrupted.
  They are logged (once per task run) and contained: the task ends, the mount stays up.
* **anything else is a bug**: it is logged once with its traceback, and the mount is shut down
  cleanly through ``on_bug`` (the daemon unmounts, flushes the cache index and keeps the
  queue), instead of escaping into ``pyfuse3.main()`` and leaving "Transport endpoint is not
  connected" behind.

``AHMOUNT_FAULT=<start of a task name>`` makes the tasks so named raise
:class:`InjectedFault` (a bug, by this policy) when they start: the tests use it to prove
that a bug unmounts cleanly and keeps the queue. Nothing else reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from ahmount.errors import AhError

log = logging.getLogger("ahmount.vfs")

#: Failures a background task may meet in normal operation; everything else is a bug.
EXPECTED: tuple[type[BaseException], ...] = (
    AhError, httpx.HTTPError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
)
FAULT_ENV = "AHMOUNT_FAULT"


class InjectedFault(RuntimeError):
    """The programming error ``AHMOUNT_FAULT`` stands in for."""


def is_expected(exc: BaseException) -> bool:
    """True for a failure the policy contains (see the module docstring)."""
    return isinstance(exc, EXPECTED)


class Supervisor:
    """Runs tasks in ``nursery`` under the failure policy.

    ``on_bug(exc)`` is called once, for the first bug of any task; it must start a clean
    shutdown (it is not awaited). Later bugs are logged only.
    """

    def __init__(self, nursery: trio.Nursery, on_bug: Callable[[BaseException], None]) -> None:
        self._nursery = nursery
        self._on_bug = on_bug
        #: The first bug seen, if any (the daemon's exit status reports it).
        self.bug: BaseException | None = None
        self.contained = 0

    def _guard(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def guarded(*args: Any, **kwargs: Any) -> None:
            try:
                fault = os.environ.get(FAULT_ENV)
                if fault and name.startswith(fault):
                    raise InjectedFault(f"fault injected into {name} by {FAULT_ENV}")
                await fn(*args, **kwargs)
            except trio.Cancelled:
                raise
            except Exception as exc:
                self._failed(name, exc)

        return guarded

    def _failed(self, name: str, exc: BaseException) -> None:
        if is_expected(exc):
            self.contained += 1
            log.warning("%s failed and was contained: %s", name, exc or type(exc).__name__)
            return
        log.critical("bug in %s; shutting the mount down cleanly", name,
                     exc_info=(type(exc), exc, exc.__traceback__))
        if self.bug is None:
            self.bug = exc
            self._on_bug(exc)

    def spawn(self, name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        """Start a task that needs no start-up handshake (one-shot work, loops)."""
        self._nursery.start_soon(self._guard(name, fn))

    async def start(self, name: str, fn: Callable[..., Awaitable[Any]]) -> None:
        """Start a service task and wait for its ``task_status.started()``. A failure before
        it started is raised here, as itself (the mount cannot come up without the task);
        after that the policy applies."""
        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            status = _Started(task_status)
            try:
                await fn(task_status=status)
            except trio.Cancelled:
                raise
            except Exception as exc:
                if not status.done:
                    raise
                self._failed(name, exc)

        await self._nursery.start(run)


class _Started:
    """A task status that remembers whether the task reported itself started."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self._inner.started(value)
