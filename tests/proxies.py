"""Stand-ins on the network for tests, in threads (blocking clients such as boto3 and
direct reads use them from any thread): a TCP proxy that passes bytes both ways and cuts
connections mid-answer, and HTTP servers scripted to answer as no real hub does."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator


class BodyCutter:
    """A TCP proxy to a server on 127.0.0.1 that closes a connection once it has passed
    more than ``cut_after`` bytes down to the client, for the first ``cuts`` connections that
    get that far (None: every one): a network or a server that drops a connection in the
    middle of an answer."""

    def __init__(self, target_port: int, cut_after: int, cuts: int | None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cut = 0  # connections cut so far
        self.downstream = 0  # bytes passed to clients, all connections
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed: the proxy stops
                return
            thread = threading.Thread(target=self._handle, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, client: socket.socket) -> None:
        store = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            self._open |= {client, store}
        up = threading.Thread(target=_pump, args=(client, store), daemon=True)
        up.start()
        passed = 0
        try:
            while data := store.recv(65536):
                client.sendall(data)
                passed += len(data)
                with self._lock:
                    self.downstream += len(data)
                    cut = passed > self.cut_after and self.cuts_left != 0
                    if cut:
                        self.cut += 1
                        if self.cuts_left is not None:
                            self.cuts_left -= 1
                if cut:
                    return
        except OSError:
            pass
        finally:
            for sock in (client, store):
                _shut(sock)
                sock.close()
            up.join(timeout=10)

    def close(self) -> None:
        """Stop accepting and end every connection (clients keep idle ones open)."""
        _shut(self._listener)  # wakes the accepting thread (close alone would not)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _shut(sock)
        for thread in self._threads:
            thread.join(timeout=10)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass


class Scripted(http.server.BaseHTTPRequestHandler):
    """Base of a scripted server's handler: it logs nothing (the test says what it sends)."""

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` with ``body`` (its length said) and ``headers``."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def scripted_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering with ``handler``, in a thread: its URL. Stopped,
    and its thread joined, on the way out."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
