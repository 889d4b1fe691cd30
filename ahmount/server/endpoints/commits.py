"""A branch's staging area and commits: list, stage and reset uncommitted changes, commit,
merge into main.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ahmount.server import schemas
from ahmount.server.bodies import json_body
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    asset_addr,
    call,
    caller,
    commit_json,
    service_of,
)


async def changes(request: Request) -> Response:
    """GET: the branch's uncommitted changes. POST {session, deletes, adds}: stage changes.
    DELETE: reset (drop every uncommitted change; with `?session=S` only those staged under S)."""
    actor = await caller(request)
    addr = asset_addr(request)
    branch = request.path_params["branch"]
    svc = service_of(request)
    if request.method == "GET":
        found = await call(svc.list_changes, actor, addr, branch)
        return JSONResponse({"changes": [
            {"id": c.id, "op": c.op, "path": c.path, "session": c.session, "created": c.created,
             "entry": None if c.entry is None else c.entry.as_json()}
            for c in found
        ]})
    if request.method == "DELETE":
        dropped = await call(svc.reset, actor, addr, branch,
                             request.query_params.get("session"))
        return JSONResponse({"dropped": dropped})
    body = await json_body(request, schemas.Stage)
    staged = await call(svc.stage, actor, addr, branch, body.session, body.deletes,
                         [a.as_entry() for a in body.adds])
    return JSONResponse({"staged": staged}, status_code=201)


async def commits(request: Request) -> Response:
    """POST {message, session, deletes, adds, force, metadata, expect}: commit; null when
    nothing changed; 412 when an object is not as ``expect`` says. With an
    ``Idempotency-Key`` header, a repeat of the request (its answer was lost) answers what
    the first got instead of committing again; a header, so hubs that predate it ignore it."""
    actor = await caller(request)
    body = await json_body(request, schemas.Commit)
    info = await call(
        service_of(request).commit, actor, asset_addr(request), request.path_params["branch"],
        body.message, body.session, body.deletes, [a.as_entry() for a in body.adds],
        body.force, body.metadata, body.expect, request.headers.get("idempotency-key", ""),
    )
    if info is not None:
        request.app.state.metrics.commits.inc()
    return JSONResponse({"commit": commit_json(info)}, status_code=201 if info else 200)


async def merge(request: Request) -> Response:
    """POST: make main equal to the branch, as one commit with both heads as parents."""
    actor = await caller(request)
    info = await call(service_of(request).merge, actor, asset_addr(request),
                       request.path_params["branch"])
    if info is not None:
        request.app.state.metrics.commits.inc()
    return JSONResponse({"commit": commit_json(info)})


A = API + "/assets/{owner}/{kind}/{folder}/{asset}"
ROUTES: Routes = [
    (A + "/branches/{branch}/changes", changes, ["GET", "POST", "DELETE"]),
    (A + "/branches/{branch}/commits", commits, ["POST"]),
    (A + "/branches/{branch}/merge", merge, ["POST"]),
]
BODIES: Bodies = {
    (changes, "POST"): schemas.Stage,
    (commits, "POST"): schemas.Commit,
}
