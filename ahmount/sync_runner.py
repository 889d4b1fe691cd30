"""Run the async client from synchronous code: plain scripts, threads, and Jupyter.

Each call runs its own ``trio.run``. When the calling thread already runs an event loop (a
Jupyter kernel runs asyncio; a trio program may call the sync API by mistake), that call
happens on a short-lived worker thread instead, so it never nests inside the running loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import TypeVar

import sniffio
import trio

T = TypeVar("T")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    try:
        sniffio.current_async_library()
        return True
    except sniffio.AsyncLibraryNotFoundError:
        return False


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion under trio and return its result (or raise its error)."""
    if not _loop_running():
        return trio.run(fn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(trio.run, fn).result()
