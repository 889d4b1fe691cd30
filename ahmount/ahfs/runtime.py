"""The event loop behind the synchronous ``ah://`` file system: one per process and hub.

fsspec calls arrive on any thread (pandas, a DataLoader, Jupyter's); the hub client, the view
of the hub (:class:`HubView`) and the block cache (:class:`ObjectCache`) all live on one trio
thread, started on first use, and calls cross over with ``trio.from_thread.run``. That is the
design of fsspec's own async file systems (one IO loop thread), with trio, so the client code
is the mount's.

Shared with the mount, under the same state directory of (hub, user): the commit listings
(diskcache, safe across processes) and the object cache (whose blocks are shared by every
process of the user: see ``docs/cache.md``). Nothing else of the mount's is touched: the
change queue belongs to the mount that claimed the directory.

After ``fork`` the child cannot use the parent's loop thread (it does not exist there) or its
connections and SQLite handles (shared with the parent): :func:`runtime_for` notices the new
PID and starts a fresh runtime, abandoning the inherited one without closing it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from ahmount.client.embedded import connect
from ahmount.client.hub_client import HubClient
from ahmount.config import ClientConfig
from ahmount.errors import HubUnavailable
from ahmount.nurseries import open_nursery
from ahmount.vfs.cache_dir import last_user, open_state_dir, remember_user
from ahmount.vfs.hub_view import HubView
from ahmount.vfs.object_cache import ObjectCache
from ahmount.vfs.session import open_listings
from ahmount.vfs.supervisor import Supervisor

log = logging.getLogger("ahmount.ahfs")

T = TypeVar("T")
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class RuntimeKey:
    """What makes two file systems share a runtime: the same hub, key and cache."""

    config: ClientConfig
    cache_base: Path
    cache_size: int


class Runtime:
    """The trio thread and what lives on it. ``me`` may be preset (a pickled file system
    knows who it is) to save the hub a ``whoami``."""

    def __init__(self, key: RuntimeKey, me: str | None = None) -> None:
        self.key = key
        self.pid = os.getpid()
        self.me = me or ""
        self._preset_me = me
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stop: trio.Event | None = None
        self._view: HubView | None = None
        self._cache: ObjectCache | None = None
        self.state_dir: Path | None = None
        self._thread = threading.Thread(target=self._run, name="ah-fsspec", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError(f"the ah:// runtime did not start in {START_TIMEOUT:.0f} s")
        if self._failure is not None:
            raise self._failure

    @property
    def view(self) -> HubView:
        assert self._view is not None
        return self._view

    @property
    def hub(self) -> HubClient:
        return self.view.hub

    @property
    def cache(self) -> ObjectCache:
        assert self._cache is not None
        return self._cache

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the thread that started us
            if not self._ready.is_set():
                self._failure = exc
            else:
                log.error("the ah:// runtime stopped: %s", exc)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with AsyncExitStack() as stack:
            # Few retries and a short fail-fast window, as the mount: a read must not hang
            # on a hub that is away (what is cached still serves).
            hub = await stack.enter_async_context(connect(self.key.config, retries=2,
                                                          down_for=2.0))
            hub.known_user = self._preset_me
            base, hub_url = self.key.cache_base, self.key.config.ah_host
            try:
                self.me = await hub.whoami()
                remember_user(base, hub_url, self.me)
            except HubUnavailable as exc:
                # Offline: what earlier runs cached (listings, resolved refs, blocks) still
                # serves; what they never saw answers EIO.
                known = last_user(base, hub_url)
                if known is None:
                    raise
                self.me = hub.known_user = known
                log.warning("hub %s is unreachable (%s): ah:// serves what is cached",
                            hub_url or "embedded", exc)
            root = open_state_dir(base, hub_url, self.me)
            self.state_dir = root
            listings = open_listings(root)
            stack.callback(listings.close)
            self._cache = cache = ObjectCache(root / "objects", self.key.cache_size)
            stack.callback(cache.close)
            # Branch heads are never cached by the view: the file system decides when a
            # branch is resolved again (``invalidate_cache``), see ``listings.py``.
            self._view = HubView(hub, self.me, 0.0, listings)
            self._view.restore()
            nursery = await stack.enter_async_context(open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            supervisor = Supervisor(nursery, self._bug)
            cache.set_spawner(supervisor.spawn)
            self._view.set_spawner(supervisor.spawn)
            supervisor.spawn("cache index flusher", cache.run_flusher)
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def _bug(self, exc: BaseException) -> None:
        # A background task's bug (read-ahead, verification) ends this runtime cleanly; the
        # next call starts a fresh one (runtime_for sees it stopped).
        if self._stop is not None:
            self._stop.set()

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive() and self._token is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return what it returns (or raise)."""
        if not self.alive:
            raise RuntimeError("the ah:// runtime is not running")
        assert self._token is not None
        if threading.current_thread() is self._thread:
            raise RuntimeError("a synchronous ah:// call from inside its own event loop")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the synchronous ``fn(*args)`` on the loop thread soon, from any thread (its
        own included) without waiting; nothing happens once the runtime has stopped."""
        if self.pid != os.getpid() or self._token is None:
            return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self._token is not None and self._stop is not None
        stop = self._stop
        try:
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            return
        self._thread.join(10)


_LOCK = threading.Lock()
_RUNTIMES: dict[RuntimeKey, Runtime] = {}
_AT_EXIT = False


def _after_fork_in_child() -> None:
    """A fork may happen while another thread holds the lock: the child gets a new one (and
    forgets the parent's runtimes, whose threads it does not have)."""
    global _LOCK
    _LOCK = threading.Lock()
    _RUNTIMES.clear()


def runtime_for(key: RuntimeKey, me: str | None = None) -> Runtime:
    """The running runtime of ``key`` in this process, started if needed (and again after a
    fork or a stop). The start happens outside the lock: a thread that needs another
    runtime meanwhile (even the new loop thread, through the garbage collector) never waits
    for this one."""
    global _AT_EXIT
    with _LOCK:
        found = _RUNTIMES.get(key)
        if found is not None and found.alive:
            return found
        if found is not None and found.pid != os.getpid():
            _RUNTIMES.clear()  # the parent's: its threads are not here; leave them be
    runtime = Runtime(key, me)
    with _LOCK:
        found = _RUNTIMES.get(key)
        if found is not None and found.alive:
            winner = found  # another thread started one first: keep that one
        else:
            winner = _RUNTIMES[key] = runtime
        if not _AT_EXIT:
            atexit.register(stop_all)
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _AT_EXIT = True
    if winner is not runtime:
        runtime.stop()
    return winner


def stop_all() -> None:
    """Stop this process's runtimes (at exit): the cache index is saved, clients closed."""
    with _LOCK:
        runtimes = [r for r in _RUNTIMES.values() if r.pid == os.getpid()]
        _RUNTIMES.clear()
    for runtime in runtimes:
        runtime.stop()
