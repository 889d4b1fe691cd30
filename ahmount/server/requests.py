"""What every endpoint does with a request: authenticate the caller (once, before anything of
the request is read), run a blocking service call in a worker thread, read the path's
addresses and query integers, and render the hub's records as JSON.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response

from ahmount import errors
from ahmount.hub.models import (
    AssetAddr,
    AssetInfo,
    CommitInfo,
    FolderAddr,
    FolderInfo,
    RefInfo,
)
from ahmount.hub.read_grants import Grant
from ahmount.hub.service import Actor, HubService
from ahmount.names import check_kind, check_name
from ahmount.server import schemas

if TYPE_CHECKING:
    from ahmount.server.data_plane import DataPlaneAddress

API = "/api/v1"
T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]
#: An endpoint's routes: (path, endpoint, methods).
Routes = list[tuple[str, Endpoint, list[str]]]
#: The declared JSON body of each (endpoint, method) that takes one.
Bodies = dict[tuple[Endpoint, str], type[schemas.Body]]


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def service_of(request: Request) -> HubService:
    service: HubService = request.app.state.service
    return service


async def caller(request: Request) -> Actor:
    """The caller, authenticated once per request (before anything of the request is
    validated: see :func:`authenticated`)."""
    known: Actor | None = getattr(request.state, "actor", None)
    if known is not None:
        return known
    request.state.actor = actor = await authenticate(request)
    return actor


async def authenticate(request: Request) -> Actor:
    key = _bearer_key(request)
    if key is not None:
        return await call(service_of(request).authenticate, key)
    return _trusted(request)


def _bearer_key(request: Request) -> str | None:
    """The request's API key, or None when it sends none (a trusted embedded caller)."""
    header = request.headers.get("authorization", "")
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.Unauthenticated("the Authorization header must be 'Bearer <api key>'")
    return key.strip()


def _trusted(request: Request) -> Actor:
    trusted: Actor | None = request.app.state.trusted_actor
    if trusted is None:
        raise errors.Unauthenticated(
            f"{request.url.path} needs an API key: run 'ah login --host URL --api-key KEY'"
        )
    return trusted


async def call_as(request: Request, fn: Callable[[Actor], T], inline: bool = False) -> T:
    """``fn(actor)`` in a worker thread, the caller authenticated first in the same thread
    hand-off when not known yet: one hand-off per request instead of two (each costs a
    thread wake-up, a fifth of a small object's whole request). ``fn`` validates the rest
    of the request itself, so nothing answers before identity does. ``inline``: run on the
    event loop instead, for a caller that knows ``fn`` cannot wait (local stores only)."""
    known: Actor | None = getattr(request.state, "actor", None)
    key = None if known is not None else _bearer_key(request)
    service = service_of(request)

    def both() -> tuple[Actor, T]:
        actor = known if known is not None else (
            _trusted(request) if key is None else service.authenticate(key))
        return actor, fn(actor)

    request.state.actor, result = both() if inline else await call(both)
    return result


def authenticates_itself(endpoint: Endpoint) -> Endpoint:
    """Mark an endpoint that authenticates in its first step (:func:`call_as`):
    :func:`authenticated` leaves it to do so."""
    endpoint.authenticates_itself = True  # type: ignore[attr-defined]
    return endpoint


def folder_addr(request: Request) -> FolderAddr:
    p = request.path_params
    return FolderAddr(check_name(p["owner"], "owner"), check_kind(p["kind"]),
                      check_name(p["folder"], "folder"))


def asset_addr(request: Request) -> AssetAddr:
    return AssetAddr(folder_addr(request), check_name(request.path_params["asset"], "asset"))


def query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.InvalidArgument(f"query parameter {name}={raw!r} is not an integer") from None


def folder_json(info: FolderInfo) -> dict[str, Any]:
    return {**asdict(info), "path": info.path}


def asset_json(info: AssetInfo) -> dict[str, Any]:
    return {**asdict(info), "path": info.path}


def commit_json(info: CommitInfo | None) -> dict[str, Any] | None:
    return None if info is None else asdict(info)


def ref_json(info: RefInfo) -> dict[str, Any]:
    return {"type": info.type, "name": info.name, "commit": commit_json(info.commit)}


def blob_read_url(request: Request, grant: Grant) -> str:
    """The read URL of a grant: on the data plane (:mod:`ahmount.server.data_plane`) when
    the server has one and the client reached it over plain HTTP, on the host it reached;
    else ``blob_content``'s path on this server."""
    plane: DataPlaneAddress | None = request.app.state.data_plane
    host = request.url.hostname
    if plane is not None and request.url.scheme == "http" and host:
        return plane.read_url(host, grant)
    root = request.scope.get("root_path", "")
    return f"{root}{API}/blobs/{grant.sha256}/content?{grant.query()}"


def authenticated(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` behind authentication: a caller without a valid key gets 401 for any
    request, well-formed or not, so bad input never answers before identity does."""
    if getattr(endpoint, "authenticates_itself", False):
        return endpoint

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        await caller(request)
        return await endpoint(request)

    return wrapper
