"""Folders: list and create (per owner, or shared with me, or public), get, rename, relabel,
delete, share and publish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ahmount.hub.models import FolderAddr
from ahmount.names import check_kind
from ahmount.server import schemas
from ahmount.server.bodies import json_body
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    call,
    caller,
    folder_addr,
    folder_json,
    service_of,
)


async def folders(request: Request) -> Response:
    """GET: list folders of an owner (or `shared`, `public`). POST: create a folder."""
    actor = await caller(request)
    owner = request.path_params["owner"]
    kind = check_kind(request.path_params["kind"])
    if request.method == "GET":
        found = await call(service_of(request).list_folders, actor, owner, kind)
        return JSONResponse({"folders": [folder_json(f) for f in found]})
    body = await json_body(request, schemas.FolderCreate)
    addr = FolderAddr(owner, kind, body.name)
    info = await call(service_of(request).create_folder, actor, addr, body.labels, body.description)
    return JSONResponse(folder_json(info), status_code=201)


async def described(request: Request, addr: Any, get: Callable[..., Any],
                     delete: Callable[..., Any], update: Callable[..., Any],
                     render: Callable[[Any], dict[str, Any]]) -> Response:
    """GET, DELETE or PATCH (name, labels, description) of a folder or an asset."""
    actor = await caller(request)
    if request.method == "GET":
        return JSONResponse(render(await call(get, actor, addr)))
    if request.method == "DELETE":
        await call(delete, actor, addr)
        return Response(status_code=204)
    body = await json_body(request, schemas.Described)
    info = await call(update, actor, addr, body.name, body.labels, body.description)
    return JSONResponse(render(info))


async def folder(request: Request) -> Response:
    """GET, PATCH (name, labels, description) or DELETE a folder."""
    svc = service_of(request)
    return await described(request, folder_addr(request), svc.get_folder,
                            svc.delete_folder, svc.update_folder, folder_json)


async def folder_shares(request: Request) -> Response:
    """List who a folder is shared with (owner only)."""
    actor = await caller(request)
    found = await call(service_of(request).folder_shares, actor, folder_addr(request))
    return JSONResponse({"shares": found})


async def folder_share(request: Request) -> Response:
    """PUT {permission: view|edit} shares a folder with a user; DELETE stops sharing."""
    actor = await caller(request)
    permission = None
    if request.method == "PUT":
        permission = (await json_body(request, schemas.Share)).permission
    await call(service_of(request).share_folder, actor, folder_addr(request),
                request.path_params["user"], permission)
    return Response(status_code=204)


async def folder_public(request: Request) -> Response:
    """PUT {public: bool} makes a folder public or private (owner only)."""
    actor = await caller(request)
    public = (await json_body(request, schemas.Public)).public
    await call(service_of(request).set_public, actor, folder_addr(request), public)
    return Response(status_code=204)


F = API + "/folders/{owner}/{kind}/{folder}"
ROUTES: Routes = [
    (API + "/folders/{owner}/{kind}", folders, ["GET", "POST"]),
    (F, folder, ["GET", "PATCH", "DELETE"]),
    (F + "/shares", folder_shares, ["GET"]),
    (F + "/shares/{user}", folder_share, ["PUT", "DELETE"]),
    (F + "/public", folder_public, ["PUT"]),
]
BODIES: Bodies = {
    (folders, "POST"): schemas.FolderCreate,
    (folder, "PATCH"): schemas.Described,
    (folder_share, "PUT"): schemas.Share,
    (folder_public, "PUT"): schemas.Public,
}
