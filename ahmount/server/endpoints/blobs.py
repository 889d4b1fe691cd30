"""Blobs: which the hub lacks, one blob in one PUT, many small ones in one body, and resumable
uploads (start, append at an offset, status, finish, abort).
"""

from __future__ import annotations

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ahmount import errors
from ahmount.hub.service import Actor, GrantedBlob, HubService
from ahmount.names import check_sha256
from ahmount.server import schemas
from ahmount.server.bodies import UPLOAD_BUFFER, BodyReader, json_body
from ahmount.server.ranges import WHOLE_BODY, answer_range, iterate, whole_body
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    call,
    caller,
    service_of,
)


async def blobs_missing(request: Request) -> Response:
    """POST {hashes: [...]}: which of these blobs the hub does not have."""
    actor = await caller(request)
    hashes = (await json_body(request, schemas.Hashes)).hashes
    missing = await call(service_of(request).missing_blobs, actor, hashes)
    return JSONResponse({"missing": missing})


async def _receive_into(request: Request, actor: Actor, upload_id: str, offset: int) -> int:
    """Stream the request body into an upload, in large buffered writes."""
    svc = service_of(request)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= UPLOAD_BUFFER:
                offset = await call(svc.append_upload, actor, upload_id, offset, bytes(buffer))
                buffer.clear()
    except ClientDisconnect:
        pass  # keep what arrived; the client resumes from the offset it asks for
    if buffer:
        offset = await call(svc.append_upload, actor, upload_id, offset, bytes(buffer))
    return offset


async def blob(request: Request) -> Response:
    """PUT the whole blob in one request (the body's sha256 must equal the path's).
    The size comes from `X-Ah-Size` or Content-Length; a short body is rejected."""
    actor = await caller(request)
    sha256 = check_sha256(request.path_params["sha256"])
    raw_size = request.headers.get("x-ah-size") or request.headers.get("content-length")
    if raw_size is None or not raw_size.isdigit():
        raise errors.InvalidArgument(f"upload of blob {sha256} needs X-Ah-Size or Content-Length")
    svc = service_of(request)
    stream = BodyReader(request.stream())
    if not await call(svc.missing_blobs, actor, [sha256]):
        await stream.drain()
        return JSONResponse({"sha256": sha256, "existed": True})
    size = int(raw_size)
    await _write_one_blob(svc, actor, stream, sha256, size)
    await stream.drain()
    await call(svc.register_blobs, actor, [(sha256, size)], True)
    return JSONResponse({"sha256": sha256, "existed": False}, status_code=201)


async def _write_one_blob(svc: HubService, actor: Actor, body: BodyReader, sha256: str,
                          size: int, durable: bool = True) -> None:
    """Copy exactly ``size`` bytes of the body into a new blob; verified, or nothing stays."""
    if size <= UPLOAD_BUFFER:
        data = await body.read(size)
        if len(data) < size:
            raise errors.InvalidArgument(
                f"upload of blob {sha256} is truncated: {len(data)} of {size} bytes arrived")
        await call(svc.store_bytes, actor, sha256, data, durable)
        return
    token = await call(svc.begin_blob, actor, sha256, size)
    try:
        offset = 0
        while offset < size:
            data = await body.read(min(UPLOAD_BUFFER, size - offset))
            if not data:
                break  # truncated: end_blob reports it
            offset = await call(svc.write_blob, actor, token, offset, data)
        await call(svc.end_blob, actor, token, sha256, size, durable)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await call(svc.drop_blob_write, actor, token)
        raise


#: A batch upload keeps its small blobs in groups of up to this many, or bytes (what one
#: request holds in memory: a blob of the group is at most UPLOAD_BUFFER, the same).
GROUP_BLOBS = 256
GROUP_BYTES = UPLOAD_BUFFER


async def blob_batch(request: Request) -> Response:
    """POST many small blobs in one body: a JSON line `{"blobs": [{sha256, size}, ...]}`, then
    their bytes back to back. Each is verified; those that arrive intact are kept even when a
    later one fails."""
    actor = await caller(request)
    svc = service_of(request)
    body = BodyReader(request.stream())
    manifest = schemas.parse(schemas.BatchManifest, await body.readline(16 << 20))
    items = [(b.sha256, b.size) for b in manifest.blobs]
    missing = set(await call(svc.missing_blobs, actor, [s for s, _ in items]))
    stored: list[tuple[str, int]] = []
    # Small blobs are kept a group at a time, in one worker-thread hand-off per group.
    group: list[tuple[str, bytes]] = []
    group_bytes = 0

    async def keep_group() -> None:
        nonlocal group_bytes
        if not group:
            return  # no hand-off for nothing (before each large blob, at the end)
        kept, failure = await call(svc.store_small_blobs, actor, list(group))
        stored.extend(kept)
        group.clear()
        group_bytes = 0
        if failure is not None:
            raise failure

    try:
        for sha256, size in items:
            if sha256 not in missing:
                await body.read(size)  # already stored: skip its bytes
                continue
            missing.discard(sha256)  # a second copy in the body is skipped
            if size > UPLOAD_BUFFER:
                await keep_group()
                await _write_one_blob(svc, actor, body, sha256, size, durable=False)
                stored.append((sha256, size))
                continue
            if group_bytes + size > GROUP_BYTES:
                await keep_group()  # a request holds at most GROUP_BYTES of blobs
            data = await body.read(size)
            if len(data) < size:
                await keep_group()  # those before it arrived whole
                raise errors.InvalidArgument(
                    f"upload of blob {sha256} is truncated: {len(data)} of {size} bytes "
                    "arrived")
            group.append((sha256, data))
            group_bytes += size
            if len(group) >= GROUP_BLOBS:
                await keep_group()
        await keep_group()
        await body.drain()
    finally:
        with anyio.CancelScope(shield=True):
            if stored:
                await call(svc.register_blobs, actor, stored)
    return JSONResponse({"stored": len(stored)}, status_code=201)


async def blob_content(request: Request) -> Response:
    """GET/HEAD a blob's bytes through a read URL (`user`, `expires` and `signature`, as an
    object read's `X-Ah-Read-Url` gave them): no API key, no metadata lookup, the signature
    is the check. Honours Range. A random reader's miss costs the hub a third of what a
    read through the object's path does."""
    q = request.query_params
    service = service_of(request)

    def opened() -> GrantedBlob:
        return service.open_granted_blob(request.path_params["sha256"], q.get("user", ""),
                                         q.get("expires", ""), q.get("signature", ""))

    local = service.local_blob_reads
    # On the event loop only when nothing can wait: a local blob and the key in memory (the
    # first read URL a restarted hub sees loads the key in a write transaction, which may
    # wait for another replica's).
    blob = opened() if local and service.grant_key_loaded else await call(opened)
    headers = {"etag": f'"{blob.sha256}"', "accept-ranges": "bytes",
               "content-type": "application/octet-stream", "cache-control": "private"}
    status, start, end = answer_range(request.headers.get("range"), blob.size, headers)
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers)
    if end - start <= WHOLE_BODY:  # one body, not a hand-off per chunk and one for the end
        return Response(await whole_body(blob, start, end, local), status_code=status,
                        headers=headers)
    chunks = await call(blob.read, start, end)
    return StreamingResponse(iterate(chunks), status_code=status, headers=headers)


async def uploads(request: Request) -> Response:
    """POST {sha256, size}: start a resumable upload (`id` is null if the blob exists)."""
    actor = await caller(request)
    body = await json_body(request, schemas.UploadStart)
    upload_id, received = await call(service_of(request).start_upload, actor, body.sha256,
                                      body.size)
    return JSONResponse({"id": upload_id, "received": received}, status_code=201)


async def upload(request: Request) -> Response:
    """GET: bytes received so far. PATCH with `Upload-Offset`: append the body there.
    DELETE: abort."""
    actor = await caller(request)
    upload_id = request.path_params["upload_id"]
    svc = service_of(request)
    if request.method == "GET":
        sha256, size, received = await call(svc.upload_status, actor, upload_id)
        return JSONResponse({"id": upload_id, "sha256": sha256, "size": size,
                             "received": received})
    if request.method == "DELETE":
        await call(svc.abort_upload, actor, upload_id)
        return Response(status_code=204)
    raw_offset = request.headers.get("upload-offset", "")
    if not raw_offset.isdigit():
        raise errors.InvalidArgument("PATCH of an upload needs an Upload-Offset header")
    received = await _receive_into(request, actor, upload_id, int(raw_offset))
    return JSONResponse({"id": upload_id, "received": received})


async def upload_finish(request: Request) -> Response:
    """POST: verify the upload's size and sha256 and publish the blob."""
    actor = await caller(request)
    sha256 = await call(service_of(request).finish_upload, actor, request.path_params["upload_id"])
    return JSONResponse({"sha256": sha256}, status_code=201)


ROUTES: Routes = [
    (API + "/blobs/missing", blobs_missing, ["POST"]),
    (API + "/blobs/batch", blob_batch, ["POST"]),
    (API + "/blobs/{sha256}", blob, ["PUT"]),
    (API + "/blobs/{sha256}/content", blob_content, ["GET", "HEAD"]),
    (API + "/uploads", uploads, ["POST"]),
    (API + "/uploads/{upload_id}", upload, ["GET", "PATCH", "DELETE"]),
    (API + "/uploads/{upload_id}/finish", upload_finish, ["POST"]),
]
BODIES: Bodies = {
    (blobs_missing, "POST"): schemas.Hashes,
    (uploads, "POST"): schemas.UploadStart,
}
