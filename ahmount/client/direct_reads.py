"""Bulk byte ranges of an HTTP hub read straight into a caller's buffer, in a worker thread.

A streamed httpx response hands its body through h11, which copies every byte three times
(into its receive buffer, out of it, into ``bytes``) on the thread that awaits it: for a
mount, the trio thread that also answers the kernel. Reading 1 GiB cold that way kept the
trio thread busy 40% of the time on h11 and the socket alone. Here the standard library's
``http.client`` reads the body with ``readinto`` into the caller's buffer: one copy, made
by the kernel with the GIL released, in whichever thread calls.

The request itself is httpx's: :meth:`HttpSession.read_into` builds it with the session's
client (URL encoding, authentication, headers) and retries it, and an error answer becomes
the domain exception through the one mapping (:func:`raise_for_response`). What differs is
only how the bytes travel. Used for block runs of an HTTP hub (:meth:`HubClient.read_into`);
never for the embedded hub (no socket) or small reads (latency, not bytes, is their cost).

Thread safety: a :class:`DirectReads` may be used from several threads at once; its idle
connections are a locked pool.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable

import httpx

from ahmount import errors
from ahmount.client.answers import RETRYABLE_STATUS, raise_for_response

#: Idle connections kept per hub (a connection is reused only after a whole body was read),
#: and for how long: less than servers keep one open (hypercorn: 5 s, as httpx's expiry).
IDLE_CONNECTIONS = 8
KEEPALIVE_SECONDS = 4.0
REDIRECTS = 3
#: How long a connection may take to open (as the httpx client's connect timeout).
CONNECT_SECONDS = 10.0
#: Called with (the bytes read so far into the buffer, their offset in the range); returns
#: False to stop reading.
Consume = Callable[[memoryview, int], bool]
#: Looks up a header of an answer by its (case-insensitive) name.
Header = Callable[[str], str | None]
#: Shown an answer's headers before its body is read.
HeadSeen = Callable[[Header], None]


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (a hub at ``unix:/path``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("hub", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _bounded(conn: http.client.HTTPConnection,
             timeout: float) -> http.client.HTTPConnection:
    """``conn`` (made with the connect timeout), reading with ``timeout`` once connected:
    a host that drops packets (a firewalled data plane) costs :data:`CONNECT_SECONDS`, not
    a whole read timeout, as httpx's connect timeout bounds the streamed path."""
    connect = conn.connect

    def connected() -> None:
        connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)

    conn.connect = connected  # type: ignore[method-assign]
    return conn


Origin = tuple[str, str, int]
#: Where requests to a hub on a Unix socket go (its base URL is ``http://hub``); a redirect
#: elsewhere (a presigned URL of the blob store) goes over the network.
UDS_ORIGIN: Origin = ("http", "hub", 80)


class DirectReads:
    """Ranged GETs of one hub's objects into buffers. ``uds``: the hub's Unix socket path."""

    def __init__(self, timeout: float, ssl_context: ssl.SSLContext,
                 uds: str | None = None) -> None:
        self._timeout = timeout
        self._ssl = ssl_context
        self._uds = uds
        self._idle: dict[Origin, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def _idle_connection(self, origin: Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(origin, [])
            while idle:
                conn, since = idle.pop()
                if time.monotonic() - since < KEEPALIVE_SECONDS:
                    return conn
                conn.close()
        return None

    def _new_connection(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if self._uds is not None and origin == UDS_ORIGIN:
            return _UnixConnection(self._uds, self._timeout)
        connect = min(self._timeout, CONNECT_SECONDS)
        if scheme == "https":
            return _bounded(http.client.HTTPSConnection(host, port, timeout=connect,
                                                        context=self._ssl), self._timeout)
        return _bounded(http.client.HTTPConnection(host, port, timeout=connect),
                        self._timeout)

    def _keep(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < IDLE_CONNECTIONS:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for idle in pools:
            for conn, _since in idle:
                conn.close()

    def _exchange(self, origin: Origin, request: httpx.Request
                  ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send ``request`` and read the answer's head: on an idle connection if one is
        kept (one the hub closed meanwhile is dropped, and a new one tried at once)."""
        target = request.url.raw_path.decode("ascii")
        headers = dict(request.headers.items())
        conn = self._idle_connection(origin)
        if conn is not None:
            try:
                conn.request(request.method, target, headers=headers)
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()  # the hub closed it while it was idle
        conn = self._new_connection(origin)
        try:
            conn.request(request.method, target, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise Retryable(f"{request.method} {request.url.path}: {exc}") from exc

    def read_into(self, request: httpx.Request, length: int, buffer: memoryview,
                  consume: Consume, on_head: HeadSeen | None = None) -> int:
        """Send ``request`` (a ranged GET of ``length`` bytes), following redirects, and read
        its body into ``buffer``, handing each filled buffer (the last one partly) to
        ``consume``. Returns the bytes read; fewer than ``length`` only when ``consume``
        stopped it; ``on_head`` is shown the final answer's headers before its body is read.
        Errors: the hub's answer as its domain exception, a network failure as
        :class:`HubUnavailable` (:class:`Retryable` when no byte of the body was read)."""
        for _hop in range(REDIRECTS + 1):
            url = request.url
            origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
            conn, response = self._exchange(origin, request)
            reusable = False
            try:
                location = response.getheader("location")
                if response.status in (301, 302, 303, 307, 308) and location:
                    response.read()
                    reusable = not response.will_close
                    request = _redirected(request, location)
                    continue
                if response.status in RETRYABLE_STATUS:
                    response.read()
                    reusable = not response.will_close
                    raise Retryable(f"hub answered {response.status}")
                if response.status >= 400:
                    body = response.read()
                    reusable = not response.will_close
                    _raise_for(response, body, request)
                if on_head is not None and response.status in (200, 206):
                    on_head(functools.partial(_header, response))
                done = _read_body(response, length, buffer, consume, request)
                reusable = done == length and not response.will_close
                return done
            except (OSError, http.client.HTTPException) as exc:
                raise errors.HubUnavailable(f"{request.method} {url.path}: {exc}") from exc
            finally:
                if reusable:
                    self._keep(origin, conn)
                else:
                    conn.close()
        raise errors.HubUnavailable(f"{request.method} {request.url.path}: more than "
                                    f"{REDIRECTS} redirects")


class Retryable(errors.HubUnavailable):
    """The request failed before the hub answered, or it answered 502/503/504: safe to
    send again."""


class CutShort(errors.HubUnavailable):
    """The body of an answer stopped before its end (the connection broke, or the hub sent
    fewer bytes than it said): its first ``done`` bytes were handed on, and the rest of the
    range may be asked for."""

    def __init__(self, message: str, done: int) -> None:
        super().__init__(message)
        self.done = done


def _header(response: http.client.HTTPResponse, name: str) -> str | None:
    return response.getheader(name)


def _redirected(request: httpx.Request, location: str) -> httpx.Request:
    target = request.url.join(location)
    headers = httpx.Headers(request.headers)
    if (target.scheme, target.host, target.port) != \
            (request.url.scheme, request.url.host, request.url.port):
        headers.pop("authorization", None)  # as httpx does: our key stays with our hub
    headers.pop("host", None)
    return httpx.Request(request.method, target, headers=headers)


def _raise_for(response: http.client.HTTPResponse, body: bytes,
               request: httpx.Request) -> None:
    raise_for_response(httpx.Response(response.status, headers=response.getheaders(),
                                      content=body, request=request), body)


def _read_body(response: http.client.HTTPResponse, length: int, buffer: memoryview,
               consume: Consume, request: httpx.Request) -> int:
    if response.status not in (200, 206):
        raise errors.HubUnavailable(f"hub answered {response.status} to a ranged GET of "
                                    f"{request.url.path}")
    declared = response.getheader("content-length")
    if declared is None or int(declared) != length:
        raise errors.HubUnavailable(f"hub sent {declared} bytes for a {length}-byte range "
                                    f"of {request.url.path}")
    done = 0
    while done < length:
        want = min(len(buffer), length - done)
        filled = 0
        try:
            while filled < want:
                n = response.readinto(buffer[filled:want])
                if not n:
                    break
                filled += n
        except (OSError, http.client.HTTPException) as exc:
            # Not Retryable (the request as a whole): bytes were handed on.
            raise CutShort(f"reading {request.url.path} from the hub: {exc}", done) from exc
        if filled < want:
            raise CutShort(f"hub sent a short range of {request.url.path}", done)
        offset, done = done, done + filled
        if not consume(buffer[:filled], offset):
            return done
    return done

