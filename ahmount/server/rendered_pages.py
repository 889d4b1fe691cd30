"""Rendered pages of commit listings, kept for the next caller.

A commit never changes, so a page of its listing is the same bytes every time it is asked
for with the same query: only who may see it changes, and that is checked on every request
before a kept page is looked up (:func:`ahmount.server.endpoints.objects.objects`).
Rendering a page of 10,000 objects costs the hub 15-70 ms of CPU (the tree walk, a dict per
object, the JSON encoding), and a data set's listing is asked for by every mount, every
worker and every ``ah://`` client that reads it.

A page carrying read URLs (``read_urls_over``) is kept per user (a grant names its user)
and only while its URLs have :data:`URLS_LEFT` of their life left or more (10 of a grant's
15 minutes). A page without is kept until it is the least recently used past
:data:`KEEP_BYTES`.

Thread safety: rendering runs in worker threads; one lock guards the map.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

#: Bytes of rendered pages kept (a 10,000-object page is ~2 MB).
KEEP_BYTES = 64 << 20
#: A page with read URLs is handed out again only while they have this long left, seconds.
URLS_LEFT = 600.0


class RenderedPages:
    """Rendered pages by key, bounded by :data:`KEEP_BYTES`; ``clock``: the wall clock."""

    def __init__(self, keep_bytes: int = KEEP_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self._keep_bytes = keep_bytes
        self._clock = clock
        self._pages: OrderedDict[Hashable, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        """The page kept under ``key``, unless none is or it is past its time."""
        with self._lock:
            found = self._pages.get(key)
            if found is None:
                return None
            if found[1] <= self._clock():
                self._drop(key)
                return None
            self._pages.move_to_end(key)
            return found[0]

    def keep(self, key: Hashable, body: bytes, until: float = float("inf")) -> None:
        """Keep ``body`` under ``key`` until ``until`` (wall clock); a page larger than the
        whole bound is not kept."""
        if len(body) > self._keep_bytes:
            return
        with self._lock:
            if key in self._pages:
                self._drop(key)
            self._pages[key] = (body, until)
            self._bytes += len(body)
            while self._bytes > self._keep_bytes:
                self._drop(next(iter(self._pages)))

    def _drop(self, key: Hashable) -> None:
        body, _ = self._pages.pop(key)
        self._bytes -= len(body)

    def __len__(self) -> int:
        return len(self._pages)
