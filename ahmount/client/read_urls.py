"""Read URLs a hub gave with objects' bytes, by blob: later ranges of a blob go there.

A hub answers an object read with ``X-Ah-Read-Url`` (a path of the hub that reads the
object's blob with no key, signed, see :mod:`ahmount.hub.read_grants`) and
``X-Ah-Read-Expires``. A random reader's next miss, a fill's runs and a stream's later runs
of the same blob are then read through it, which costs the hub a third of a read through
the object's path. Only paths of the hub itself are kept (never another host's URL: the
client's key travels with every request to its hub). A URL the hub refuses (expired early,
a hub with a new key, a collected blob) is forgotten and the read goes the old way.

Thread safety: used from the trio thread and from direct reads' worker threads; one lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ahmount.client.direct_reads import Header

#: Blobs whose URL is kept (the least recently used go first): a URL is ~250 bytes.
KEEP = 16_384
#: A URL this close to its expiry is not used: a run read through it may take a while.
MARGIN = 60.0


class ReadUrls:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock

    def learn(self, header: Header) -> None:
        """Keep the read URL an answer carried (``header`` looks up its headers)."""
        sha256, url, expires = (header("x-ah-sha256"), header("x-ah-read-url"),
                                header("x-ah-read-expires"))
        if not sha256 or not url or not expires or not (expires.isascii() and expires.isdigit()):
            return
        self.keep(sha256, url, int(expires))

    def keep(self, sha256: str, url: str, expires: int) -> None:
        """Keep ``url`` as the blob's read URL until ``expires`` (Unix time), if it is a
        path of this hub."""
        if not url.startswith("/") or url.startswith("//"):
            return  # not a path of this hub
        with self._lock:
            self._urls[sha256] = (url, float(expires))
            self._urls.move_to_end(sha256)
            while len(self._urls) > KEEP:
                self._urls.popitem(last=False)

    def get(self, sha256: str | None) -> str | None:
        """The blob's read URL, unless none is known or it expires soon."""
        if sha256 is None:
            return None
        with self._lock:
            found = self._urls.get(sha256)
            if found is None:
                return None
            url, expires = found
            if expires - self._clock() < MARGIN:
                del self._urls[sha256]
                return None
            self._urls.move_to_end(sha256)
            return url

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._urls.pop(sha256, None)
