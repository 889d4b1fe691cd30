"""The hub's HTTP API: a Starlette app over :class:`HubService`, versioned under ``/api/v1``.

It knows nothing of SQL nor of the stores: each endpoint (:mod:`ahmount.server.endpoints`,
one module per resource) parses the request, runs one service call in a worker thread (the
service blocks on its stores) and renders the result as JSON. Errors become JSON
``{"error": {"code", "message", "path"}}`` in ``http_errors``, the one place that picks
statuses. Object bytes stream both ways in chunks; nothing holds a whole blob in memory.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ahmount import errors
from ahmount.hub.service import HubService
from ahmount.server.endpoints import assets, blobs, commits, events, folders, objects
from ahmount.server.http_errors import (
    handle_domain_error,
    handle_routing_error,
    handle_unexpected,
)
from ahmount.server.observed import HubMetrics, ObservedApp
from ahmount.server.openapi import openapi_document
from ahmount.server.rendered_pages import KEEP_BYTES, RenderedPages
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    authenticated,
    call,
    caller,
    service_of,
)


async def healthz(request: Request) -> Response:
    """Liveness and readiness: the metadata store answers."""
    await call(service_of(request).check_health)
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    """The caller's user name."""
    found = await caller(request)
    return JSONResponse({"name": found.name})


async def openapi(request: Request) -> Response:
    """This API's OpenAPI document, generated from the route table."""
    return JSONResponse(request.app.state.openapi)


ROUTES: Routes = [
    ("/healthz", healthz, ["GET"]),
    (API + "/openapi.json", openapi, ["GET"]),
    (API + "/whoami", whoami, ["GET"]),
    *folders.ROUTES, *assets.ROUTES, *objects.ROUTES, *commits.ROUTES, *blobs.ROUTES,
    *events.ROUTES,
]
BODIES: Bodies = {**folders.BODIES, **assets.BODIES, **objects.BODIES, **commits.BODIES,
          **blobs.BODIES}
#: Routes anyone may call; every other one authenticates before it reads the request (a
#: read URL's signature is its caller's authentication).
OPEN = frozenset({"/healthz", API + "/openapi.json", API + "/blobs/{sha256}/content"})


def create_app(service: HubService, trusted_user: str | None = None, *,
               keep_pages: int = KEEP_BYTES) -> Starlette:
    """The ASGI app serving a hub's ``service`` (owned by the caller: ``ah-server`` opens
    the stores before it serves and closes them after its last request).

    ``trusted_user`` (the embedded hub's OS user) is the caller of every request that carries
    no API key; without it such requests are refused.

    ``keep_pages``: bytes of rendered listing pages kept (:mod:`rendered_pages`).
    """
    app = Starlette(
        routes=[Route(p, e if p in OPEN else authenticated(e), methods=m)
                for p, e, m in ROUTES],
        exception_handlers={
            errors.AhError: handle_domain_error,
            HTTPException: handle_routing_error,
            Exception: handle_unexpected,
        },
    )
    app.state.service = service
    app.state.trusted_actor = service.ensure_user(trusted_user) if trusted_user else None
    app.state.openapi = openapi_document(ROUTES, BODIES, OPEN)
    app.state.started = time.time()
    app.state.metrics = HubMetrics()
    app.state.rendered_pages = RenderedPages(keep_pages)
    #: Where read URLs point, once ah-server's data plane listens (data_plane.py).
    app.state.data_plane = None
    return app


def create_observed_app(service: HubService,
                        trusted_user: str | None = None) -> ObservedApp:
    """:func:`create_app` behind request ids, access logs and ``/metrics`` (what
    ``ah-server`` serves)."""
    app = create_app(service, trusted_user)
    return ObservedApp(app, app.state.metrics)


__all__ = ["Any", "create_app", "create_observed_app"]
