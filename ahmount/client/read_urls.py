"""Read URLs a hub gave with objects' bytes, by blob: later ranges of a blob go there.

A hub answers an object read with ``X-Ah-Read-Url`` (a path of the hub that reads the
object's blob with no key, signed, see :mod:`ahmount.hub.read_grants`) and
``X-Ah-Read-Expires``. A random reader's next miss, a fill's runs and a stream's later runs
of the same blob are then read through it, which costs the hub a third of a read through
the object's path. Kept are paths of the hub itself, and URLs of its data plane
(:mod:`ahmount.server.data_plane`: ``http://`` on the host the hub was reached by, another
port, read without the API key); never another host's URL. A URL the hub refuses (expired
early, a hub with a new key, a collected blob) is forgotten and the read goes the old way;
when the data plane cannot be reached (a proxy in front of the hub, a firewall), its URLs
are not used for :data:`PLANE_RETRY` seconds and reads go through the API.

Thread safety: used from the trio thread and from direct reads' worker threads; one lock.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable

from ahmount.client.direct_reads import Header

#: Blobs whose URL is kept (the least recently used go first): a URL is ~250 bytes.
KEEP = 16_384
#: A URL this close to its expiry is not used: a run read through it may take a while.
MARGIN = 60.0
#: After the data plane failed to answer, reads go through the API for this long.
PLANE_RETRY = 60.0


def on_data_plane(url: str) -> bool:
    """Whether a kept read URL is the data plane's (absolute) rather than an API path."""
    return not url.startswith("/")


class ReadUrls:
    """``plane_host``: the host of a hub reached over plain HTTP, whose data plane's URLs
    may be kept (None: only paths of the hub)."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 plane_host: str | None = None) -> None:
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock
        self._plane_host = plane_host
        self._plane_down_until = 0.0

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
        if not self._ours(url):
            return
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
            now = self._clock()
            if expires - now < MARGIN:
                del self._urls[sha256]
                return None
            if now < self._plane_down_until and on_data_plane(url):
                return None
            self._urls.move_to_end(sha256)
            return url

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._urls.pop(sha256, None)

    def plane_failed(self) -> None:
        """The data plane did not answer: read through the API for a while."""
        with self._lock:
            self._plane_down_until = self._clock() + PLANE_RETRY

    def _ours(self, url: str) -> bool:
        """A path of this hub, or a URL of its data plane."""
        if url.startswith("/"):
            return not url.startswith("//")
        if self._plane_host is None:
            return False
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        return (parts.scheme == "http" and parts.hostname == self._plane_host
                and port is not None and parts.path.startswith("/blobs/")
                and not parts.username and not parts.password)
