"""Assets and their references: list and create assets, get/rename/relabel/delete one, list
and create branches and tags, resolve or delete a reference, a reference's log, a commit by
id prefix.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ahmount.hub.models import AssetAddr
from ahmount.server import schemas
from ahmount.server.bodies import json_body
from ahmount.server.endpoints.folders import F, described
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    asset_addr,
    asset_json,
    call,
    caller,
    commit_json,
    folder_addr,
    query_int,
    ref_json,
    service_of,
)


async def assets(request: Request) -> Response:
    """GET: list a folder's assets. POST {name, labels, description}: create an asset."""
    actor = await caller(request)
    addr = folder_addr(request)
    if request.method == "GET":
        found = await call(service_of(request).list_assets, actor, addr)
        return JSONResponse({"assets": [asset_json(a) for a in found]})
    body = await json_body(request, schemas.AssetCreate)
    target = AssetAddr(addr, body.name)
    info = await call(service_of(request).create_asset, actor, target, body.labels,
                       body.description)
    return JSONResponse(asset_json(info), status_code=201)


async def asset(request: Request) -> Response:
    """GET, PATCH (name, labels, description) or DELETE an asset."""
    svc = service_of(request)
    return await described(request, asset_addr(request), svc.get_asset, svc.delete_asset,
                            svc.update_asset, asset_json)


async def branches(request: Request) -> Response:
    """GET: list branches. POST {name}: create a branch at the "Repository created" commit."""
    actor = await caller(request)
    addr = asset_addr(request)
    if request.method == "GET":
        found = await call(service_of(request).list_refs, actor, addr, "branch")
        return JSONResponse({"branches": [{"name": n, "commit_id": c} for n, c in found]})
    name = (await json_body(request, schemas.BranchCreate)).name
    info = await call(service_of(request).create_branch, actor, addr, name)
    return JSONResponse(ref_json(info), status_code=201)


async def tags(request: Request) -> Response:
    """GET: list tags. POST {name, source}: tag the commit a branch, tag or commit names."""
    actor = await caller(request)
    addr = asset_addr(request)
    if request.method == "GET":
        found = await call(service_of(request).list_refs, actor, addr, "tag")
        return JSONResponse({"tags": [{"name": n, "commit_id": c} for n, c in found]})
    body = await json_body(request, schemas.TagCreate)
    info = await call(service_of(request).create_tag, actor, addr, body.name, body.source)
    return JSONResponse(ref_json(info), status_code=201)


async def ref(request: Request) -> Response:
    """GET resolves a branch, tag or commit prefix; DELETE removes a branch or tag."""
    actor = await caller(request)
    addr = asset_addr(request)
    name = request.path_params["ref"]
    if request.method == "DELETE":
        await call(service_of(request).delete_ref, actor, addr, name)
        return Response(status_code=204)
    return JSONResponse(ref_json(await call(service_of(request).resolve, actor, addr, name)))


async def ref_log(request: Request) -> Response:
    """Commits reachable from a reference, newest first."""
    actor = await caller(request)
    found = await call(service_of(request).log, actor, asset_addr(request),
                        request.path_params["ref"], query_int(request, "limit", 1000))
    return JSONResponse({"commits": [commit_json(c) for c in found]})


async def commit_by_prefix(request: Request) -> Response:
    """A commit of the asset by id prefix (at least 4 hex characters)."""
    actor = await caller(request)
    info = await call(service_of(request).get_commit, actor, asset_addr(request),
                       request.path_params["prefix"])
    return JSONResponse(commit_json(info))


A = API + "/assets/{owner}/{kind}/{folder}/{asset}"
ROUTES: Routes = [
    (F + "/assets", assets, ["GET", "POST"]),
    (A, asset, ["GET", "PATCH", "DELETE"]),
    (A + "/branches", branches, ["GET", "POST"]),
    (A + "/tags", tags, ["GET", "POST"]),
    (A + "/refs/{ref}", ref, ["GET", "DELETE"]),
    (A + "/refs/{ref}/log", ref_log, ["GET"]),
    (A + "/commits/{prefix}", commit_by_prefix, ["GET"]),
]
BODIES: Bodies = {
    (assets, "POST"): schemas.AssetCreate,
    (asset, "PATCH"): schemas.Described,
    (branches, "POST"): schemas.BranchCreate,
    (tags, "POST"): schemas.TagCreate,
}
