"""The change feed: ``GET /api/v1/events``.

Plain requests get one page of JSON (``after``: a cursor; none: the newest, nothing old).
A request that accepts ``text/event-stream`` gets Server-Sent Events: first a ``cursor``
event (where the stream starts, ``reset`` if the cursor given is gone), then a ``change``
event per change the caller may see, each with its cursor as the SSE ``id``, so a client
that reconnects with ``Last-Event-ID`` misses nothing and gets nothing twice. A comment line
every :data:`HEARTBEAT` seconds lets both ends notice a dead connection.

Replicas share nothing but the database: every stream of a process waits on one
:class:`EventBell`, which asks the database for the newest event id at most every
:data:`PROBE` seconds (one indexed query per process, however many subscribers), and each
stream then reads its events, filtered by who could see them, from the table. That works the
same on PostgreSQL (any number of replicas) and on SQLite (several processes on one file);
``LISTEN/NOTIFY`` would save the probes on PostgreSQL only, and a missed notification would
need this probe anyway.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ahmount import errors
from ahmount.hub.models import Event, EventPage
from ahmount.hub.service import HubService
from ahmount.server.requests import API, Bodies, Routes, call, caller, query_int, service_of

PROBE = 0.05
HEARTBEAT = 15.0
PAGE = 500


class EventBell:
    """The newest event id, probed at most once per :data:`PROBE` seconds for all waiters."""

    def __init__(self) -> None:
        self.newest = 0
        self._probed = 0.0
        self._lock = anyio.Lock()

    async def wait_beyond(self, service: HubService, cursor: int, timeout: float) -> bool:
        """True once an event past ``cursor`` exists, False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            async with self._lock:
                if time.monotonic() - self._probed >= PROBE:
                    self.newest = await call(service.newest_event)
                    self._probed = time.monotonic()
            if self.newest > cursor:
                return True
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(PROBE)


def _bell(request: Request) -> EventBell:
    bell: EventBell | None = getattr(request.app.state, "event_bell", None)
    if bell is None:
        bell = request.app.state.event_bell = EventBell()
    return bell


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "created": event.created, **event.payload}


def _cursor(request: Request) -> int | None:
    last = request.headers.get("last-event-id")
    if last is not None and last.strip():
        try:
            return int(last)
        except ValueError:
            raise errors.InvalidArgument(
                f"Last-Event-ID {last[:40]!r} is not an event cursor") from None
    if "after" in request.query_params:
        return query_int(request, "after", 0)
    return None


async def events(request: Request) -> Response:
    """Changes the caller may see after a cursor: JSON, or Server-Sent Events when asked."""
    actor = await caller(request)
    service = service_of(request)
    cursor = _cursor(request)
    limit = query_int(request, "limit", PAGE)
    first: EventPage = await call(service.events, actor, cursor, limit)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return JSONResponse({"events": [event_json(e) for e in first.events],
                             "cursor": first.cursor, "reset": first.reset})
    bell = _bell(request)

    async def stream() -> AsyncIterator[bytes]:
        page = first
        # Where the stream starts: the cursor given (its events follow), or the newest (for
        # a new subscriber, or a cursor this database never gave out).
        start = cursor if cursor is not None and cursor <= page.cursor else page.cursor
        yield (f"retry: 1000\nevent: cursor\nid: {start}\n"
               f"data: {json.dumps({'cursor': start, 'reset': page.reset})}\n\n").encode()
        at = page.cursor
        while True:
            for event in page.events:
                yield (f"event: change\nid: {event.id}\ndata: "
                       f"{json.dumps(event_json(event))}\n\n").encode()
            if page.cursor > at and not page.events:
                # nothing the caller may see, but the cursor moved: say so, so that a client
                # reconnecting does not make the server read those events again
                yield f"event: cursor\nid: {page.cursor}\ndata: {{}}\n\n".encode()
            at = page.cursor
            if len(page.events) < limit and not await bell.wait_beyond(service, at,
                                                                       HEARTBEAT):
                yield b": heartbeat\n\n"
                page = EventPage([], at, False)
                continue
            page = await call(service.events, actor, at, limit)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


ROUTES: Routes = [(API + "/events", events, ["GET"])]
BODIES: Bodies = {}
