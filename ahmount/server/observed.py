"""ASGI middleware around the hub app: request ids, one access-log line per request,
Prometheus metrics served at ``/metrics``, and ``Connection: close`` on an answer given
before its request's body was read.

The hub answers some requests without reading their bodies (401 before anything of the
request is read, 413 on a declared length over the limit), or all of them (a write that
failed halfway: a wrong upload offset, a full disk). The server then cannot reuse the
connection (the unread body is still on it) and closes it after the answer; said
nothing, a keep-alive client sends its next request on that connection and, when the close
wins the race, gets no answer at all. The header tells the client up front.

While the end of such an answer is sent, what of the body arrives is read and dropped.
hypercorn hands a body to the app through a queue of 10 pieces, and when an answer ends it
puts a "client disconnected" message in that queue; with the queue full (the app stopped
reading halfway), that put, and so the app's send of its answer, waited forever: the
connection and its task were never released, and the client, which reads an answer only
once it has sent its body, hung until its write timed out, never seeing the 409 (a wrong
upload offset) or 507 (a full disk) it was given. Draining makes room; hypercorn then
closes the connection (the body unfinished), the client's write fails, and it reads the
answer, as HTTP clients do.

Metrics (one registry per app, so tests and embedded hubs never share counters):
``ah_requests_total{endpoint,method,status}``, ``ah_request_seconds{endpoint}`` (histogram),
``ah_bytes_received_total``, ``ah_bytes_sent_total``, ``ah_errors_total{endpoint}`` (5xx),
``ah_commits_total`` (commits and merges that created a commit).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from ahmount.observability import request_id

log = logging.getLogger("ahmount.server.access")

Scope = dict[str, Any]
Message = dict[str, Any]


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ah_requests", "HTTP requests served",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("ah_request_seconds", "Time to serve a request",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
        self.bytes_in = Counter("ah_bytes_received", "Request body bytes received",
                                registry=self.registry)
        self.bytes_out = Counter("ah_bytes_sent", "Response body bytes sent",
                                 registry=self.registry)
        self.errors = Counter("ah_errors", "Requests that failed on the server (5xx)",
                              ["endpoint"], registry=self.registry)
        self.commits = Counter("ah_commits", "Commits created (including merges)",
                               registry=self.registry)
        self.listing_pages = Counter(
            "ah_listing_pages", "Listing pages served: rendered, or kept from an earlier "
            "rendering of the same commit's page", ["source"], registry=self.registry)

    def observe(self, endpoint: str, method: str, path: str, status: int, start: float,
                received: int, sent: int) -> None:
        """One request's metrics and access-log line (``start``: its ``perf_counter``)."""
        elapsed = time.perf_counter() - start
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(elapsed)
        self.bytes_in.inc(received)
        self.bytes_out.inc(sent)
        if status >= 500:
            self.errors.labels(endpoint).inc()
        log.info("request", extra={"fields": {
            "method": method, "path": path, "status": status,
            "ms": round(elapsed * 1000, 1), "bytes_in": received, "bytes_out": sent}})


class ObservedApp:
    """Wraps an ASGI app; ``metrics`` is shared with the app (it counts commits)."""

    def __init__(self, app: Any, metrics: HubMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            body = generate_latest(self.metrics.registry)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500
        sent = received = 0
        body_unread = _has_body(headers)

        async def counting_receive() -> Message:
            nonlocal received, body_unread
            message: Message = await receive()
            received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_unread = False  # read to its end (or the client went away)
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode("latin-1"))]
                if body_unread:
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if body_unread and not message.get("more_body", False):
                    await send_while_draining(message)
                    return
            await send(message)

        async def send_while_draining(message: Message) -> None:
            """The answer's end, while what the client still sends is read and dropped
            (see the module's docstring)."""
            async def drain() -> None:
                while body_unread:
                    await counting_receive()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(drain)
                await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            endpoint = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self.metrics.observe(endpoint, scope["method"], scope["path"], status, start,
                                 received, sent)
            request_id.reset(token)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    """Whether the request declares a body (HTTP/1.1: a length above 0, or chunks)."""
    if headers.get(b"transfer-encoding", b"").strip().lower() not in (b"", b"identity"):
        return True
    return headers.get(b"content-length", b"0").strip() not in (b"", b"0")
