"""The data plane: blobs' bytes through read URLs, sent from the page cache by ``sendfile``.

A read URL (:mod:`ahmount.hub.read_grants`) needs no key and no lookup: the signature is the
check. Served by the API's app, such a read still went through hypercorn, Starlette and h11,
and each of its bytes was copied twice in the hub's process (the file into a buffer, the
buffer into the socket). 200 GETs of 1 MiB blobs by 8 clients cost the hub 3.5 ms of CPU
each that way, three quarters of it those copies and the Python around them; a loop that
answers each with ``sendfile`` cost 0.3 ms, and the 8 clients read 1,270 files/s against
270 (``bench/loader_bench.py``, "hub, GET each"). On this VM each new megabyte a process
touches also costs ~0.6 ms of page faults, and ``sendfile`` touches none.

So ``ah-server`` with a local blob store listens on a second port for exactly one request:
``GET|HEAD /blobs/<sha256>?user=…&expires=…&signature=…`` (with an optional single
``Range``), answered from here. The read URLs the API hands out then point here, as an
absolute ``http://`` URL on the host the client reached the API by. Everything else
(authentication, listings, uploads, errors in the API's JSON shape) stays with the API.
A client that cannot reach this port (a proxy in front of the API, a firewall) reads
through the API as before (:mod:`ahmount.client.read_urls`); ``--data-listen off`` turns
it off.

HTTP/1.1 framing is h11's (a well-kept parser already under hypercorn and httpx): requests,
keep-alive, bad input; only the body bypasses it, passed through by
``send_with_data_passthrough`` as h11 allows for exactly this. A head longer than
:data:`MAX_HEAD` is refused (431), a request with a body 400, a connection idle between
requests (or a slow head: slowloris) is closed after the idle timeout, and one whose
reader stops taking bytes after :data:`STALL_SECONDS`.

Concurrency: one trio task per connection, on the server's event loop. A range that the
page cache holds is sent on the loop (``sendfile`` then never waits for a disk), and so is
a small one that arrives from the disk within a fraction of a millisecond of being asked
for (:data:`WAIT_INLINE`); any other is sent from a worker thread, a socket buffer's worth
at a time. Nothing here writes: a crash loses only the answers in flight, which clients
retry through the API.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import trio

from ahmount import errors
from ahmount.hub.read_grants import Grant
from ahmount.hub.service import GrantedBlob, HubService
from ahmount.server.http_errors import error_body, status_for
from ahmount.server.observed import HubMetrics
from ahmount.server.ranges import answer_range

log = logging.getLogger("ahmount.server.data")

#: The one path this plane serves; the read URLs it is named in carry the grant's query.
PREFIX = "/blobs/"
#: A request head (line and headers) longer than this is refused (431): a read URL's is
#: ~400 bytes.
MAX_HEAD = 16 << 10
#: A reader that takes no bytes for this long is cut off (its connection holds a file open).
STALL_SECONDS = 60.0
#: What one ``sendfile`` call from a worker thread sends at most (a thread hand-off each).
THREAD_SEND = 8 << 20
#: A range not in the page cache up to this size is asked of the disk at once and waited
#: for on the loop (other connections run between its probes), at most WAIT_INLINE_SECONDS;
#: then, or for larger ranges, a worker thread sends it. A thread hand-off and back costs two
#: wake-ups, ~250 us on this VM, where a small range comes from disk in 60-150 us: a cold
#: 4 KiB GET took 640-710 us through a thread and 440-460 us so, 64 KiB 950-1,040 us and
#: 520 us (a random reader's miss asks for 64 KiB).
WAIT_INLINE = 64 << 10
WAIT_INLINE_SECONDS = 300e-6
ENDPOINT = "blob_data"


@dataclass(frozen=True)
class DataPlaneAddress:
    """The port the data plane listens on. Read URLs name the host the client reached the
    API by, whatever address the plane is bound to: a client keeps only URLs naming the very
    host it asked (:mod:`ahmount.client.read_urls`), and the plane listens where the API
    does (``auto``) or where the operator made that name reach."""

    port: int

    def read_url(self, api_host: str, grant: Grant) -> str:
        """The absolute read URL of ``grant`` on this plane, for a client that reached the
        API at ``api_host``."""
        host = f"[{api_host}]" if ":" in api_host else api_host  # IPv6
        return f"http://{host}:{self.port}{PREFIX}{grant.sha256}?{grant.query()}"


def parse_listen(value: str, api_listen: str) -> tuple[str, int] | None:
    """``--data-listen``: ``off`` -> None; ``auto`` -> the API's host, a free port (None
    when the API is on a Unix socket or a passed descriptor); or ``HOST:PORT``."""
    if value == "off":
        return None
    if value == "auto":
        if api_listen.startswith("unix:"):
            return None
        if api_listen.startswith("fd://"):
            return _socket_host(api_listen[len("fd://"):])
        host, _, _ = api_listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", 0
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise errors.InvalidArgument(f"--data-listen {value!r} is not off, auto or HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _socket_host(fd: str) -> tuple[str, int] | None:
    """The host of the TCP socket passed as descriptor ``fd`` (systemd's socket activation,
    a test's bound port), with port 0; None for a Unix socket or no socket."""
    if not fd.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(fd))
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return str(sock.getsockname()[0]), 0
    finally:
        sock.detach()  # the descriptor stays open: it is the API's


class _Answered(Exception):
    """The request was answered with the error ``status``; the connection may go on."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class DataPlane:
    """Serves :data:`PREFIX` reads of ``service``'s blobs; ``metrics`` counts them as the
    API's requests are counted (endpoint ``blob_data``)."""

    def __init__(self, service: HubService, metrics: HubMetrics,
                 idle_timeout: float) -> None:
        self._service = service
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self._stopping = False
        self._idle_scopes: set[trio.CancelScope] = set()
        self._accepting = trio.CancelScope()
        self._listeners: list[trio.SocketListener] = []

    async def listen(self, host: str | None, port: int) -> DataPlaneAddress:
        """Bind ``host:port`` (port 0: a free one; host None: every address); the port
        read URLs should name. Raises InvalidArgument naming the address when it cannot."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            if len({listener.socket.getsockname()[1] for listener in listeners}) > 1:
                # A host with several addresses (localhost: 127.0.0.1 and ::1) got a free
                # port each; read URLs name one, so all listen on the first's.
                for listener in listeners:
                    await listener.aclose()
                listeners = await trio.open_tcp_listeners(bound, host=host)
        except OSError as exc:
            raise errors.InvalidArgument(
                f"cannot listen on {host or '*'}:{port} for the data plane "
                f"(--data-listen): {exc.strerror or exc}") from None
        self._listeners = listeners
        log.info("data plane listening on %s:%d", host or "*", bound)
        return DataPlaneAddress(bound)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve what :meth:`listen` bound. Returns after :meth:`stop`, once every
        connection has ended."""
        async with trio.open_nursery() as connections:
            with self._accepting:
                task_status.started()
                await trio.serve_listeners(self._connection, self._listeners,
                                           handler_nursery=connections)

    def stop(self) -> None:
        """Shutting down: no new connections; those waiting for a next request close now,
        the others after their answer."""
        self._stopping = True
        self._accepting.cancel()
        for scope in list(self._idle_scopes):
            scope.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while not self._stopping:
                head = await self._next_request(conn, stream)
                if head is None:
                    return
                await self._answer(conn, stream, *head)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # a body we will not read, or a close either side asked for
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the client went away: nothing to answer
        except Exception:
            log.exception("data plane connection crashed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _next_request(self, conn: h11.Connection,
                            stream: trio.SocketStream) -> tuple[h11.Request, bool] | None:
        """The next request's head, and whether it has no body; None when the client
        closed, stayed idle too long, or sent something that is not HTTP/1.1 (answered 400
        or 431 first)."""
        with trio.CancelScope(deadline=trio.current_time() + self._idle_timeout) as idle:
            self._idle_scopes.add(idle)
            try:
                while True:
                    try:
                        event = conn.next_event()
                        if isinstance(event, h11.Request):
                            # h11 bounds only a head still incomplete; one that arrived
                            # whole in a single read is measured here.
                            if _head_size(event) > MAX_HEAD:
                                raise h11.RemoteProtocolError(
                                    f"request head is over {MAX_HEAD} bytes",
                                    error_status_hint=431)
                            # A body-less request's end comes at once; others have a body.
                            return event, isinstance(conn.next_event(), h11.EndOfMessage)
                    except h11.RemoteProtocolError as exc:
                        await self._refuse_malformed(conn, stream, exc)
                        return None
                    if event is not h11.NEED_DATA:
                        return None  # ConnectionClosed, or PAUSED after a close
                    conn.receive_data(await stream.receive_some(64 << 10))  # b"": closed
            finally:
                self._idle_scopes.discard(idle)
        return None  # idle past the timeout, or shutting down

    async def _refuse_malformed(self, conn: h11.Connection, stream: trio.SocketStream,
                                exc: h11.RemoteProtocolError) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        body = error_body("invalid_argument", f"malformed request: {exc}", None)
        await self._send_json(conn, stream, status, body, close=True)

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream,
                      request: h11.Request, bodiless: bool) -> None:
        start = time.perf_counter()
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = urllib.parse.urlsplit(target).path
        status, sent = 500, 0
        try:
            status, sent = await self._serve_read(conn, stream, request, method, target,
                                                 bodiless)
        except _Answered as answered:
            status = answered.status
        finally:
            self._metrics.observe(ENDPOINT, method, path, status, start, 0, sent)

    async def _serve_read(self, conn: h11.Connection, stream: trio.SocketStream,
                          request: h11.Request, method: str, target: str,
                          bodiless: bool) -> tuple[int, int]:
        """Answer one read; returns (status, body bytes sent). Errors are answered in the
        API's JSON shape and raise :class:`_Answered`."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        split = urllib.parse.urlsplit(target)
        try:
            if method not in ("GET", "HEAD"):
                await self._send_json(conn, stream, 405, error_body(
                    "invalid_argument", f"{method} {split.path}: the data plane only reads",
                    split.path), extra=[("allow", "GET, HEAD")])
                raise _Answered(405)
            if not bodiless:
                raise errors.InvalidArgument(f"{method} {split.path}: a read takes no body")
            if not split.path.startswith(PREFIX):
                raise errors.NotFound(f"{split.path} is not a blob's read URL", path=split.path)
            query = urllib.parse.parse_qs(split.query)

            def field(name: str) -> str:
                return query.get(name, [""])[0]

            def opened() -> GrantedBlob:
                return self._service.open_granted_blob(
                    split.path[len(PREFIX):], field("user"), field("expires"),
                    field("signature"))

            # The key is in memory after the first grant: checking one then touches no store.
            blob = opened() if self._service.grant_key_loaded else \
                await trio.to_thread.run_sync(opened)
            answer = {"etag": f'"{blob.sha256}"', "accept-ranges": "bytes",
                      "content-type": "application/octet-stream", "cache-control": "private"}
            status, begin, end = answer_range(headers.get("range"), blob.size, answer)
            # Opened before anything is answered: a blob collected since the grant's check
            # is a 404, not a crash halfway through an answer.
            fd = blob.open_file() if method == "GET" and end > begin else None
        except errors.AhError as exc:
            code = status_for(exc)
            await self._send_json(conn, stream, code,
                                  error_body(exc.code, exc.message, exc.path),
                                  close=code >= 500 or conn.their_state is not h11.DONE)
            raise _Answered(code) from None
        if method == "HEAD" or end == begin:
            await self._send(stream, conn.send(h11.Response(status_code=status,
                                                            headers=list(answer.items()))))
            await self._send(stream, conn.send(h11.EndOfMessage()))
            return status, 0
        if fd is None:  # a store without local files: never started for one
            raise RuntimeError("the data plane serves local blob stores only")
        try:
            await self._send(stream, conn.send(h11.Response(status_code=status,
                                                            headers=list(answer.items()))))
            body: Any = _Length(end - begin)  # h11 counts it; it never reads it
            conn.send_with_data_passthrough(h11.Data(data=body))
            await self._send_file(stream, fd, begin, end)
            await self._send(stream, conn.send(h11.EndOfMessage()))
        finally:
            os.close(fd)
        return status, end - begin

    async def _send_file(self, stream: trio.SocketStream, fd: int, start: int,
                         end: int) -> None:
        """Bytes ``[start, end)`` of ``fd`` into the socket with ``sendfile``."""
        sock = stream.socket
        out = sock.fileno()
        inline = _cached(fd, start, end) or \
            (end - start <= WAIT_INLINE and await _arrived(fd, start, end))
        offset = start
        while offset < end:
            try:
                if inline:
                    sent = os.sendfile(out, fd, offset, end - offset)
                else:
                    sent = await trio.to_thread.run_sync(
                        os.sendfile, out, fd, offset, min(end - offset, THREAD_SEND))
            except BlockingIOError:
                with trio.move_on_after(STALL_SECONDS) as stalled:
                    await trio.lowlevel.wait_writable(sock)
                if stalled.cancelled_caught:
                    raise trio.BrokenResourceError("reader stalled") from None
                continue
            if sent == 0:
                raise errors.InternalError("blob file is shorter than its record")
            offset += sent
            if inline:
                await trio.lowlevel.checkpoint()  # other connections between large sends

    async def _send_json(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                         body: dict[str, object], *, extra: list[tuple[str, str]] | None = None,
                         close: bool = False) -> None:
        payload = json.dumps(body).encode()
        headers = [("content-type", "application/json"),
                   ("content-length", str(len(payload))), *(extra or [])]
        if close:
            headers.append(("connection", "close"))
        await self._send(stream, conn.send(h11.Response(status_code=status, headers=headers)))
        await self._send(stream, conn.send(h11.Data(data=payload)))
        await self._send(stream, conn.send(h11.EndOfMessage()))

    @staticmethod
    async def _send(stream: trio.SocketStream, data: bytes | None) -> None:
        if data:
            await stream.send_all(data)


class _Length:
    """A body h11 counts but never sees (``send_with_data_passthrough``): ``sendfile``
    sends it."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


def _head_size(request: h11.Request) -> int:
    """About the bytes of ``request``'s head (line and headers, without their separators)."""
    return len(request.method) + len(request.target) + sum(
        len(name) + len(value) + 4 for name, value in request.headers)


def _pages(start: int, end: int) -> Iterator[int]:
    yield start
    if end - 1 != start:
        yield end - 1


async def _arrived(fd: int, start: int, end: int) -> bool:
    """Ask the disk for a range at once and wait for it on the loop, checkpointing between
    probes; False if it is not in the page cache within :data:`WAIT_INLINE_SECONDS` (a slow
    disk: a worker thread waits instead)."""
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
    except OSError:  # a file system that takes no advice: the thread it is
        return False
    deadline = time.perf_counter() + WAIT_INLINE_SECONDS
    while time.perf_counter() < deadline:
        await trio.lowlevel.checkpoint()
        if _cached(fd, start, end):
            return True
    return False


def _cached(fd: int, start: int, end: int) -> bool:
    """Whether the range's first and last pages are in the page cache (a blob is read whole
    far more often than in part, so the ends stand for the rest): a read of a byte with
    ``RWF_NOWAIT`` fails rather than wait for a disk."""
    probe = bytearray(1)
    try:
        return all(os.preadv(fd, [probe], at, os.RWF_NOWAIT) == 1 for at in _pages(start, end))
    except OSError:  # not cached (EAGAIN), or a file system without RWF_NOWAIT
        return False
