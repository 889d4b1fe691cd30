"""The hub's HTTP API: a Starlette app over :class:`HubService`, versioned under ``/api/v1``.

It knows nothing of SQL: each endpoint parses the request, runs one service call in a worker
thread (the service blocks on its stores) and renders the result as JSON. Errors become JSON
``{"error": {"code", "message", "path"}}`` in ``http_errors``, the one place that picks
statuses. Object bytes stream both ways in chunks; nothing holds a whole blob in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ahmount import errors
from ahmount.hub.models import (
    AssetAddr,
    AssetInfo,
    CommitInfo,
    FolderAddr,
    FolderInfo,
    ObjectEntry,
    RefInfo,
)
from ahmount.hub.service import Actor, HubService
from ahmount.names import check_kind, check_name, check_sha256
from ahmount.server import schemas
from ahmount.server.http_errors import (
    handle_domain_error,
    handle_routing_error,
    handle_unexpected,
)
from ahmount.server.observed import HubMetrics, ObservedApp

API = "/api/v1"
#: The largest JSON body: a commit of 100,000 objects (the most one call may carry) fits.
MAX_JSON_BODY = 64 << 20
UPLOAD_BUFFER = 8 << 20
T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _svc(request: Request) -> HubService:
    service: HubService = request.app.state.service
    return service


async def _actor(request: Request) -> Actor:
    """The caller, authenticated once per request (before anything of the request is
    validated: see :func:`_authenticated`)."""
    known: Actor | None = getattr(request.state, "actor", None)
    if known is not None:
        return known
    request.state.actor = actor = await _authenticate(request)
    return actor


async def _authenticate(request: Request) -> Actor:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.Unauthenticated("the Authorization header must be 'Bearer <api key>'")
        return await _call(_svc(request).authenticate, key.strip())
    trusted: Actor | None = request.app.state.trusted_actor
    if trusted is None:
        raise errors.Unauthenticated(
            f"{request.url.path} needs an API key: run 'ah login --host URL --api-key KEY'"
        )
    return trusted


async def _body(request: Request, model: type[schemas.Body]) -> Any:
    """The request's JSON body, validated as ``model`` (400 naming the bad fields).

    A declared length over :data:`MAX_JSON_BODY` is refused (413) before a byte is read;
    an undeclared one is counted while it streams, so memory never holds more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BODY):
        raise errors.TooLarge(f"request body of {declared} bytes is over the "
                              f"{MAX_JSON_BODY} bytes a JSON body may have")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise errors.TooLarge(f"request body is over the {MAX_JSON_BODY} bytes a JSON "
                                  "body may have")
    return schemas.parse(model, bytes(body))


def _folder_addr(request: Request) -> FolderAddr:
    p = request.path_params
    return FolderAddr(check_name(p["owner"], "owner"), check_kind(p["kind"]),
                      check_name(p["folder"], "folder"))


def _asset_addr(request: Request) -> AssetAddr:
    return AssetAddr(_folder_addr(request), check_name(request.path_params["asset"], "asset"))


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.InvalidArgument(f"query parameter {name}={raw!r} is not an integer") from None


# -- renderers -------------------------------------------------------------------------------

def folder_json(info: FolderInfo) -> dict[str, Any]:
    return {**asdict(info), "path": info.path}


def asset_json(info: AssetInfo) -> dict[str, Any]:
    return {**asdict(info), "path": info.path}


def commit_json(info: CommitInfo | None) -> dict[str, Any] | None:
    return None if info is None else asdict(info)


def ref_json(info: RefInfo) -> dict[str, Any]:
    return {"type": info.type, "name": info.name, "commit": commit_json(info.commit)}


def object_json(entry: ObjectEntry) -> dict[str, Any]:
    return asdict(entry)


# -- endpoints -------------------------------------------------------------------------------

async def healthz(request: Request) -> Response:
    """Liveness and readiness: the metadata store answers."""
    await _call(_svc(request).metadata.get_nodes, [])
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    """The caller's user name."""
    actor = await _actor(request)
    return JSONResponse({"name": actor.name})


async def folders(request: Request) -> Response:
    """GET: list folders of an owner (or `shared`, `public`). POST: create a folder."""
    actor = await _actor(request)
    owner = request.path_params["owner"]
    kind = check_kind(request.path_params["kind"])
    if request.method == "GET":
        found = await _call(_svc(request).list_folders, actor, owner, kind)
        return JSONResponse({"folders": [folder_json(f) for f in found]})
    body = await _body(request, schemas.FolderCreate)
    addr = FolderAddr(owner, kind, body.name)
    info = await _call(_svc(request).create_folder, actor, addr, body.labels, body.description)
    return JSONResponse(folder_json(info), status_code=201)


async def _described(request: Request, addr: Any, get: Callable[..., Any],
                     delete: Callable[..., Any], update: Callable[..., Any],
                     render: Callable[[Any], dict[str, Any]]) -> Response:
    """GET, DELETE or PATCH (name, labels, description) of a folder or an asset."""
    actor = await _actor(request)
    if request.method == "GET":
        return JSONResponse(render(await _call(get, actor, addr)))
    if request.method == "DELETE":
        await _call(delete, actor, addr)
        return Response(status_code=204)
    body = await _body(request, schemas.Described)
    info = await _call(update, actor, addr, body.name, body.labels, body.description)
    return JSONResponse(render(info))


async def folder(request: Request) -> Response:
    """GET, PATCH (name, labels, description) or DELETE a folder."""
    svc = _svc(request)
    return await _described(request, _folder_addr(request), svc.get_folder,
                            svc.delete_folder, svc.update_folder, folder_json)


async def folder_shares(request: Request) -> Response:
    """List who a folder is shared with (owner only)."""
    actor = await _actor(request)
    found = await _call(_svc(request).folder_shares, actor, _folder_addr(request))
    return JSONResponse({"shares": found})


async def folder_share(request: Request) -> Response:
    """PUT {permission: view|edit} shares a folder with a user; DELETE stops sharing."""
    actor = await _actor(request)
    permission = None
    if request.method == "PUT":
        permission = (await _body(request, schemas.Share)).permission
    await _call(_svc(request).share_folder, actor, _folder_addr(request),
                request.path_params["user"], permission)
    return Response(status_code=204)


async def folder_public(request: Request) -> Response:
    """PUT {public: bool} makes a folder public or private (owner only)."""
    actor = await _actor(request)
    public = (await _body(request, schemas.Public)).public
    await _call(_svc(request).set_public, actor, _folder_addr(request), public)
    return Response(status_code=204)


async def assets(request: Request) -> Response:
    """GET: list a folder's assets. POST {name, labels, description}: create an asset."""
    actor = await _actor(request)
    addr = _folder_addr(request)
    if request.method == "GET":
        found = await _call(_svc(request).list_assets, actor, addr)
        return JSONResponse({"assets": [asset_json(a) for a in found]})
    body = await _body(request, schemas.AssetCreate)
    target = AssetAddr(addr, body.name)
    info = await _call(_svc(request).create_asset, actor, target, body.labels,
                       body.description)
    return JSONResponse(asset_json(info), status_code=201)


async def asset(request: Request) -> Response:
    """GET, PATCH (name, labels, description) or DELETE an asset."""
    svc = _svc(request)
    return await _described(request, _asset_addr(request), svc.get_asset, svc.delete_asset,
                            svc.update_asset, asset_json)


async def branches(request: Request) -> Response:
    """GET: list branches. POST {name}: create a branch at the "Repository created" commit."""
    actor = await _actor(request)
    addr = _asset_addr(request)
    if request.method == "GET":
        found = await _call(_svc(request).list_refs, actor, addr, "branch")
        return JSONResponse({"branches": [{"name": n, "commit_id": c} for n, c in found]})
    name = (await _body(request, schemas.BranchCreate)).name
    info = await _call(_svc(request).create_branch, actor, addr, name)
    return JSONResponse(ref_json(info), status_code=201)


async def tags(request: Request) -> Response:
    """GET: list tags. POST {name, source}: tag the commit a branch, tag or commit names."""
    actor = await _actor(request)
    addr = _asset_addr(request)
    if request.method == "GET":
        found = await _call(_svc(request).list_refs, actor, addr, "tag")
        return JSONResponse({"tags": [{"name": n, "commit_id": c} for n, c in found]})
    body = await _body(request, schemas.TagCreate)
    info = await _call(_svc(request).create_tag, actor, addr, body.name, body.source)
    return JSONResponse(ref_json(info), status_code=201)


async def ref(request: Request) -> Response:
    """GET resolves a branch, tag or commit prefix; DELETE removes a branch or tag."""
    actor = await _actor(request)
    addr = _asset_addr(request)
    name = request.path_params["ref"]
    if request.method == "DELETE":
        await _call(_svc(request).delete_ref, actor, addr, name)
        return Response(status_code=204)
    return JSONResponse(ref_json(await _call(_svc(request).resolve, actor, addr, name)))


async def ref_log(request: Request) -> Response:
    """Commits reachable from a reference, newest first."""
    actor = await _actor(request)
    found = await _call(_svc(request).log, actor, _asset_addr(request),
                        request.path_params["ref"], _query_int(request, "limit", 1000))
    return JSONResponse({"commits": [commit_json(c) for c in found]})


async def commit_by_prefix(request: Request) -> Response:
    """A commit of the asset by id prefix (at least 4 hex characters)."""
    actor = await _actor(request)
    info = await _call(_svc(request).get_commit, actor, _asset_addr(request),
                       request.path_params["prefix"])
    return JSONResponse(commit_json(info))


async def objects(request: Request) -> Response:
    """A page of a reference's objects: `prefix`, `after` (cursor), `limit`, `delimiter=/`."""
    actor = await _actor(request)
    q = request.query_params
    delimiter = q.get("delimiter", "")
    if delimiter not in ("", "/"):
        raise errors.InvalidArgument(f"delimiter {delimiter!r} must be '/' or empty")
    page = await _call(
        _svc(request).list_objects, actor, _asset_addr(request), request.path_params["ref"],
        q.get("prefix", ""), q.get("after", ""), _query_int(request, "limit", 1000),
        bool(delimiter),
    )
    etag = '"' + hashlib.sha256(f"{page.commit}?{q}".encode()).hexdigest()[:32] + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    body = {
        "commit": page.commit,
        "objects": [object_json(o) for o in page.objects],
        "dirs": page.dirs,
        "next_after": page.next_after,
    }
    return JSONResponse(body, headers={"etag": etag})


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is not a single byte range")
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            return max(size - suffix, 0), size
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    except ValueError:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is malformed") from None
    if start >= size or end <= start:
        raise errors.RangeNotSatisfiable(f"Range {header!r} is outside the {size}-byte object")
    return start, end


async def _iterate(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    sentinel = b""
    while True:
        chunk = await anyio.to_thread.run_sync(next, chunks, sentinel)
        if chunk is sentinel or not chunk:
            return
        yield chunk


async def file(request: Request) -> Response:
    """GET/HEAD an object's bytes; honours Range and If-None-Match (the ETag is the sha256)."""
    actor = await _actor(request)
    addr = _asset_addr(request)
    name, path = request.path_params["ref"], request.path_params["path"]
    commit, entry = await _call(_svc(request).stat_object, actor, addr, name, path)
    etag = f'"{entry.sha256}"'
    headers = {
        "etag": etag,
        "accept-ranges": "bytes",
        "x-ah-sha256": entry.sha256,
        "x-ah-commit": commit.id,
        "x-ah-mtime": repr(entry.mtime),
        "content-type": entry.content_type,
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if request.query_params.get("redirect") == "1" and request.method == "GET" and entry.size:
        url = _svc(request).presigned_url(entry)
        if url is not None:  # the client reads from the blob store directly (data plane)
            return Response(status_code=307, headers={**headers, "location": url})
    byte_range = _parse_range(request.headers.get("range"), entry.size)
    start, end = byte_range or (0, entry.size)
    headers["content-length"] = str(end - start)
    status = 200
    if byte_range is not None:
        status = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{entry.size}"
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers)
    chunks = await _call(_svc(request).blobs.read, entry.sha256, start, end)
    return StreamingResponse(_iterate(chunks), status_code=status, headers=headers)


MAX_BATCH_READ = 256 << 20


async def files_batch(request: Request) -> Response:
    """POST {paths: [...]}: many objects of one commit in one response — for each, a JSON
    line `{path, size, sha256, mtime}` and then exactly `size` bytes."""
    actor = await _actor(request)
    paths = (await _body(request, schemas.Paths)).paths
    commit, entries = await _call(_svc(request).stat_objects, actor, _asset_addr(request),
                                  request.path_params["ref"], paths)
    total = sum(e.size for e in entries)
    if total > MAX_BATCH_READ:
        raise errors.InvalidArgument(
            f"a batch read of {total} bytes is over {MAX_BATCH_READ}; fetch large objects one "
            "by one")
    blobs = _svc(request).blobs

    async def stream() -> AsyncIterator[bytes]:
        for entry in entries:
            yield json.dumps({"path": entry.path, "size": entry.size, "sha256": entry.sha256,
                              "mtime": entry.mtime}).encode() + b"\n"
            if entry.size:
                async for chunk in _iterate(await _call(blobs.read, entry.sha256, 0,
                                                        entry.size)):
                    yield chunk

    return StreamingResponse(stream(), headers={"x-ah-commit": commit.id},
                             media_type="application/octet-stream")


async def changes(request: Request) -> Response:
    """GET: the branch's uncommitted changes. POST {session, deletes, adds}: stage changes.
    DELETE: reset (drop every uncommitted change)."""
    actor = await _actor(request)
    addr = _asset_addr(request)
    branch = request.path_params["branch"]
    svc = _svc(request)
    if request.method == "GET":
        found = await _call(svc.list_changes, actor, addr, branch)
        return JSONResponse({"changes": [
            {"id": c.id, "op": c.op, "path": c.path, "session": c.session, "created": c.created,
             "entry": None if c.entry is None else object_json(c.entry)}
            for c in found
        ]})
    if request.method == "DELETE":
        dropped = await _call(svc.reset, actor, addr, branch)
        return JSONResponse({"dropped": dropped})
    body = await _body(request, schemas.Stage)
    staged = await _call(svc.stage, actor, addr, branch, body.session, body.deletes,
                         [a.as_entry() for a in body.adds])
    return JSONResponse({"staged": staged}, status_code=201)


async def commits(request: Request) -> Response:
    """POST {message, session, deletes, adds, force, metadata}: commit; null when nothing
    changed."""
    actor = await _actor(request)
    body = await _body(request, schemas.Commit)
    info = await _call(
        _svc(request).commit, actor, _asset_addr(request), request.path_params["branch"],
        body.message, body.session, body.deletes, [a.as_entry() for a in body.adds],
        body.force, body.metadata,
    )
    if info is not None:
        request.app.state.metrics.commits.inc()
    return JSONResponse({"commit": commit_json(info)}, status_code=201 if info else 200)


async def merge(request: Request) -> Response:
    """POST: make main equal to the branch, as one commit with both heads as parents."""
    actor = await _actor(request)
    info = await _call(_svc(request).merge, actor, _asset_addr(request),
                       request.path_params["branch"])
    if info is not None:
        request.app.state.metrics.commits.inc()
    return JSONResponse({"commit": commit_json(info)})


async def blobs_missing(request: Request) -> Response:
    """POST {hashes: [...]}: which of these blobs the hub does not have."""
    actor = await _actor(request)
    hashes = (await _body(request, schemas.Hashes)).hashes
    missing = await _call(_svc(request).missing_blobs, actor, hashes)
    return JSONResponse({"missing": missing})


async def _receive_into(request: Request, actor: Actor, upload_id: str, offset: int) -> int:
    """Stream the request body into an upload, in large buffered writes."""
    svc = _svc(request)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= UPLOAD_BUFFER:
                offset = await _call(svc.append_upload, actor, upload_id, offset, bytes(buffer))
                buffer.clear()
    except ClientDisconnect:
        pass  # keep what arrived; the client resumes from the offset it asks for
    if buffer:
        offset = await _call(svc.append_upload, actor, upload_id, offset, bytes(buffer))
    return offset


async def blob(request: Request) -> Response:
    """PUT the whole blob in one request (the body's sha256 must equal the path's).
    The size comes from `X-Ah-Size` or Content-Length; a short body is rejected."""
    actor = await _actor(request)
    sha256 = check_sha256(request.path_params["sha256"])
    raw_size = request.headers.get("x-ah-size") or request.headers.get("content-length")
    if raw_size is None or not raw_size.isdigit():
        raise errors.InvalidArgument(f"upload of blob {sha256} needs X-Ah-Size or Content-Length")
    svc = _svc(request)
    stream = _BodyReader(request.stream())
    if not await _call(svc.missing_blobs, actor, [sha256]):
        await stream.drain()
        return JSONResponse({"sha256": sha256, "existed": True})
    size = int(raw_size)
    await _write_one_blob(svc, stream, sha256, size)
    await stream.drain()
    await _call(svc.register_blobs, actor, [(sha256, size)], True)
    return JSONResponse({"sha256": sha256, "existed": False}, status_code=201)


class _BodyReader:
    """Reads a request body in exact amounts (for batches of blobs in one body)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._done = False

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the body."""
        while len(self._buffer) < size and not self._done:
            try:
                self._buffer += await self._chunks.__anext__()
            except (StopAsyncIteration, ClientDisconnect):
                self._done = True
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def drain(self) -> None:
        """Consume the rest of the body (a client's stream ends cleanly, keep-alive works)."""
        while await self.read(UPLOAD_BUFFER):
            pass

    async def readline(self, limit: int) -> bytes:
        while b"\n" not in self._buffer and not self._done and len(self._buffer) <= limit:
            try:
                self._buffer += await self._chunks.__anext__()
            except (StopAsyncIteration, ClientDisconnect):
                self._done = True
        line, sep, _ = bytes(self._buffer).partition(b"\n")
        if not sep:
            raise errors.InvalidArgument("batch upload has no manifest line")
        del self._buffer[: len(line) + 1]
        return line


async def _write_one_blob(svc: HubService, body: _BodyReader, sha256: str, size: int,
                          durable: bool = True) -> None:
    """Copy exactly ``size`` bytes of the body into a new blob; verified, or nothing stays."""
    if size <= UPLOAD_BUFFER:
        data = await body.read(size)
        if len(data) < size:
            raise errors.InvalidArgument(
                f"upload of blob {sha256} is truncated: {len(data)} of {size} bytes arrived")
        await _call(svc.store_bytes, sha256, data, durable)
        return
    token = await _call(svc.begin_blob, sha256, size)
    try:
        offset = 0
        while offset < size:
            data = await body.read(min(UPLOAD_BUFFER, size - offset))
            if not data:
                break  # truncated: end_blob reports it
            offset = await _call(svc.write_blob, token, offset, data)
        await _call(svc.end_blob, token, sha256, size, durable)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _call(svc.drop_blob_write, token)
        raise


async def blob_batch(request: Request) -> Response:
    """POST many small blobs in one body: a JSON line `{"blobs": [{sha256, size}, ...]}`, then
    their bytes back to back. Each is verified; those that arrive intact are kept even when a
    later one fails."""
    actor = await _actor(request)
    svc = _svc(request)
    body = _BodyReader(request.stream())
    manifest = schemas.parse(schemas.BatchManifest, await body.readline(16 << 20))
    items = [(b.sha256, b.size) for b in manifest.blobs]
    missing = set(await _call(svc.missing_blobs, actor, [s for s, _ in items]))
    stored: list[tuple[str, int]] = []
    try:
        for sha256, size in items:
            if sha256 in missing:
                await _write_one_blob(svc, body, sha256, size, durable=False)
                stored.append((sha256, size))
                missing.discard(sha256)
            else:
                await body.read(size)  # already stored: skip its bytes
        await body.drain()
    finally:
        with anyio.CancelScope(shield=True):
            if stored:
                await _call(svc.register_blobs, actor, stored)
    return JSONResponse({"stored": len(stored)}, status_code=201)


async def uploads(request: Request) -> Response:
    """POST {sha256, size}: start a resumable upload (`id` is null if the blob exists)."""
    actor = await _actor(request)
    body = await _body(request, schemas.UploadStart)
    upload_id, received = await _call(_svc(request).start_upload, actor, body.sha256,
                                      body.size)
    return JSONResponse({"id": upload_id, "received": received}, status_code=201)


async def upload(request: Request) -> Response:
    """GET: bytes received so far. PATCH with `Upload-Offset`: append the body there.
    DELETE: abort."""
    actor = await _actor(request)
    upload_id = request.path_params["upload_id"]
    svc = _svc(request)
    if request.method == "GET":
        sha256, size, received = await _call(svc.upload_status, actor, upload_id)
        return JSONResponse({"id": upload_id, "sha256": sha256, "size": size,
                             "received": received})
    if request.method == "DELETE":
        await _call(svc.abort_upload, actor, upload_id)
        return Response(status_code=204)
    raw_offset = request.headers.get("upload-offset", "")
    if not raw_offset.isdigit():
        raise errors.InvalidArgument("PATCH of an upload needs an Upload-Offset header")
    received = await _receive_into(request, actor, upload_id, int(raw_offset))
    return JSONResponse({"id": upload_id, "received": received})


async def upload_finish(request: Request) -> Response:
    """POST: verify the upload's size and sha256 and publish the blob."""
    actor = await _actor(request)
    sha256 = await _call(_svc(request).finish_upload, actor, request.path_params["upload_id"])
    return JSONResponse({"sha256": sha256}, status_code=201)


async def openapi(request: Request) -> Response:
    """This API's OpenAPI document, generated from the route table."""
    return JSONResponse(request.app.state.openapi)


_A = API + "/assets/{owner}/{kind}/{folder}/{asset}"
_F = API + "/folders/{owner}/{kind}/{folder}"
ROUTES: list[tuple[str, Endpoint, list[str]]] = [
    ("/healthz", healthz, ["GET"]),
    (API + "/openapi.json", openapi, ["GET"]),
    (API + "/whoami", whoami, ["GET"]),
    (API + "/folders/{owner}/{kind}", folders, ["GET", "POST"]),
    (_F, folder, ["GET", "PATCH", "DELETE"]),
    (_F + "/shares", folder_shares, ["GET"]),
    (_F + "/shares/{user}", folder_share, ["PUT", "DELETE"]),
    (_F + "/public", folder_public, ["PUT"]),
    (_F + "/assets", assets, ["GET", "POST"]),
    (_A, asset, ["GET", "PATCH", "DELETE"]),
    (_A + "/branches", branches, ["GET", "POST"]),
    (_A + "/tags", tags, ["GET", "POST"]),
    (_A + "/refs/{ref}", ref, ["GET", "DELETE"]),
    (_A + "/refs/{ref}/log", ref_log, ["GET"]),
    (_A + "/refs/{ref}/objects", objects, ["GET"]),
    (_A + "/refs/{ref}/files/{path:path}", file, ["GET", "HEAD"]),
    (_A + "/refs/{ref}/batch", files_batch, ["POST"]),
    (_A + "/commits/{prefix}", commit_by_prefix, ["GET"]),
    (_A + "/branches/{branch}/changes", changes, ["GET", "POST", "DELETE"]),
    (_A + "/branches/{branch}/commits", commits, ["POST"]),
    (_A + "/branches/{branch}/merge", merge, ["POST"]),
    (API + "/blobs/missing", blobs_missing, ["POST"]),
    (API + "/blobs/batch", blob_batch, ["POST"]),
    (API + "/blobs/{sha256}", blob, ["PUT"]),
    (API + "/uploads", uploads, ["POST"]),
    (API + "/uploads/{upload_id}", upload, ["GET", "PATCH", "DELETE"]),
    (API + "/uploads/{upload_id}/finish", upload_finish, ["POST"]),
]


#: Routes anyone may call; every other one authenticates before it reads the request.
_OPEN = frozenset({"/healthz", API + "/openapi.json"})


def _authenticated(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` behind authentication: a caller without a valid key gets 401 for any
    request, well-formed or not, so bad input never answers before identity does."""
    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        await _actor(request)
        return await endpoint(request)

    return wrapper


#: The declared JSON body of each (endpoint, method) that takes one.
_BODIES: dict[tuple[Endpoint, str], type[schemas.Body]] = {
    (folders, "POST"): schemas.FolderCreate,
    (folder, "PATCH"): schemas.Described,
    (folder_share, "PUT"): schemas.Share,
    (folder_public, "PUT"): schemas.Public,
    (assets, "POST"): schemas.AssetCreate,
    (asset, "PATCH"): schemas.Described,
    (branches, "POST"): schemas.BranchCreate,
    (tags, "POST"): schemas.TagCreate,
    (files_batch, "POST"): schemas.Paths,
    (changes, "POST"): schemas.Stage,
    (commits, "POST"): schemas.Commit,
    (blobs_missing, "POST"): schemas.Hashes,
    (uploads, "POST"): schemas.UploadStart,
}
_NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 128,
                "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]*$"}
#: What each path parameter may be (the same grammar as :mod:`ahmount.names`).
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "owner": _NAME_SCHEMA, "folder": _NAME_SCHEMA, "asset": _NAME_SCHEMA,
    "branch": _NAME_SCHEMA, "ref": _NAME_SCHEMA, "user": _NAME_SCHEMA,
    "kind": {"type": "string", "enum": ["model", "dataset"]},
    "prefix": {"type": "string", "pattern": "^[0-9a-f]{4,64}$"},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "upload_id": {"type": "string", "format": "uuid"},
    "path": {"type": "string", "minLength": 1, "maxLength": 4096,
             "pattern": "^[^/\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"},
}
#: Statuses any operation may answer (its own success codes, and the error map's).
_STATUSES = {
    "200": "success", "201": "created", "204": "done, no body", "206": "partial content",
    "304": "not modified", "400": "bad input, naming what was wrong",
    "401": "no valid API key", "403": "not permitted", "404": "not found (or not yours)",
    "405": "method not allowed", "409": "conflict", "413": "body too large",
    "416": "range not satisfiable", "422": "bytes do not hash as announced",
    "503": "a store is unavailable",
}


def _openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in sorted(set(_BODIES.values()), key=lambda m: m.__name__):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(found.pop("$defs", {}))
        components[model.__name__] = found
    error = {"description": "error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "path": {"type": ["string", "null"]}}}}}}}}
    paths: dict[str, Any] = {}
    for path, endpoint, methods in ROUTES:
        doc = (endpoint.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else endpoint.__name__
        params = [
            {"name": name, "in": "path", "required": True,
             "schema": _PATH_PARAMS.get(name, {"type": "string", "minLength": 1})}
            for name in (seg.strip("{}").split(":")[0] for seg in path.split("/")
                         if seg.startswith("{"))
        ]
        operations: dict[str, Any] = {}
        for method in methods:
            operation: dict[str, Any] = {
                "summary": summary,
                "description": doc,
                "operationId": f"{endpoint.__name__}_{method.lower()}",
                "parameters": params,
                "responses": {code: ({"description": text} if code < "400" else
                                     {**error, "description": text})
                              for code, text in _STATUSES.items()},
            }
            if path in _OPEN:
                operation["security"] = []  # anyone may call it
            body = _BODIES.get((endpoint, method))
            if body is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {
                        "$ref": f"#/components/schemas/{body.__name__}"}}}}
            operations[method.lower()] = operation
        paths[path.replace(":path}", "}")] = operations
    return {
        "openapi": "3.1.0",
        "info": {"title": "ahmount hub", "version": "1"},
        "components": {"schemas": components,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "security": [{"apiKey": []}],
        "paths": paths,
    }


def create_app(service: HubService, trusted_user: str | None = None) -> Starlette:
    """The ASGI app serving ``service``.

    ``trusted_user`` (the embedded hub's OS user) is the caller of every request that carries
    no API key; without it such requests are refused. The service is owned by the caller.
    """
    app = Starlette(
        routes=[Route(p, e if p in _OPEN else _authenticated(e), methods=m)
                for p, e, m in ROUTES],
        exception_handlers={
            errors.AhError: handle_domain_error,
            HTTPException: handle_routing_error,
            Exception: handle_unexpected,
        },
    )
    app.state.service = service
    app.state.trusted_actor = service.ensure_user(trusted_user) if trusted_user else None
    app.state.openapi = _openapi_document()
    app.state.started = time.time()
    app.state.metrics = HubMetrics()
    return app


def create_observed_app(service: HubService, trusted_user: str | None = None) -> ObservedApp:
    """:func:`create_app` behind request ids, access logs and ``/metrics`` (what
    ``ah-server`` serves)."""
    app = create_app(service, trusted_user)
    return ObservedApp(app, app.state.metrics)
