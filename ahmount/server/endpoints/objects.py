"""Objects of a reference: pages of the listing, one object's bytes (ranges, ETags,
presigned redirects), many small objects in one stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pydantic_core
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ahmount import errors
from ahmount.hub.models import ObjectEntry
from ahmount.hub.read_grants import Grant
from ahmount.hub.service import Actor, ReadableObject
from ahmount.server import schemas
from ahmount.server.bodies import json_body
from ahmount.server.ranges import (
    INLINE_READ,
    WHOLE_BODY,
    answer_range,
    iterate,
    parse_range,
    whole_body,
)
from ahmount.server.rendered_pages import URLS_LEFT, RenderedPages
from ahmount.server.requests import (
    API,
    Bodies,
    Routes,
    asset_addr,
    authenticates_itself,
    blob_read_url,
    call,
    call_as,
    caller,
    query_int,
    service_of,
)


async def objects(request: Request) -> Response:
    """A page of a reference's objects: `prefix`, `after` (cursor), `limit`, `delimiter=/`;
    `read_urls_over=N`: each object larger than N bytes comes with the read URL of its blob
    (`read_url`, valid until the page's `read_expires`), so that its first read too costs
    no lookup (a client reading such files one request each)."""
    actor = await caller(request)
    q = request.query_params
    delimiter = q.get("delimiter", "")
    if delimiter not in ("", "/"):
        raise errors.InvalidArgument(f"delimiter {delimiter!r} must be '/' or empty")
    addr, ref = asset_addr(request), request.path_params["ref"]
    prefix, after = q.get("prefix", ""), q.get("after", "")
    limit = query_int(request, "limit", 1000)
    over = query_int(request, "read_urls_over", -1)
    seen = request.headers.get("if-none-match")

    service = service_of(request)
    rendered_pages: RenderedPages = request.app.state.rendered_pages
    served = request.app.state.metrics.listing_pages

    def listed() -> tuple[str, bytes | None]:
        """The page's ETag and its rendering (None: the client has it), in the worker
        thread: a page of 10,000 objects takes tens of milliseconds to render, which the
        event loop would spend not serving. A page with read URLs is never "not modified":
        its URLs expire. A page rendered before for this query of this commit is sent again
        (:mod:`rendered_pages`), once the caller was found allowed to view it."""
        commit = service.listed_commit(actor, addr, ref, prefix, after, limit)
        etag = '"' + hashlib.sha256(f"{commit.id}?{q}".encode()).hexdigest()[:32] + '"'
        if seen == etag and over < 0:
            return etag, None
        # Grants name their user: a page with read URLs is kept for its caller alone, and
        # for the host it reached (the data plane's URLs name it).
        reader = f"{actor.id}@{request.url.hostname}" if over >= 0 else ""
        key = (commit.id, prefix, after, limit, delimiter, over, reader)
        kept = rendered_pages.get(key)
        if kept is not None:
            served.labels("kept").inc()
            return etag, kept
        page = service.list_commit(commit, prefix, after, limit, bool(delimiter))
        grants = service.read_grants_listed(
            actor, [o.sha256 for o in page.objects if o.size > over]) if over >= 0 else {}
        objects = [o.as_json() for o in page.objects]
        for shown, entry in zip(objects, page.objects, strict=True):
            grant = grants.get(entry.sha256)
            if grant is not None:
                shown["read_url"] = blob_read_url(request, grant)
        body: dict[str, Any] = {
            "commit": page.commit,
            "objects": objects,
            "dirs": page.dirs,
            "next_after": page.next_after,
        }
        until = float("inf")
        if grants:
            body["read_expires"] = min(g.expires for g in grants.values())
            until = body["read_expires"] - URLS_LEFT
        # pydantic's JSON encoder (a dependency already): the same bytes as JSONResponse's
        # json.dumps for these plain values, three times as fast.
        rendered = pydantic_core.to_json(body)
        rendered_pages.keep(key, rendered, until)
        served.labels("rendered").inc()
        return etag, rendered

    etag, rendered = await call(listed)
    if rendered is None:
        return Response(status_code=304, headers={"etag": etag})
    return Response(rendered, media_type="application/json", headers={"etag": etag})


@authenticates_itself
async def file(request: Request) -> Response:
    """GET/HEAD an object's bytes; honours Range and If-None-Match (the ETag is the sha256).
    A small object (a block a mount misses, a file of a small-file dataset) costs one
    worker-thread hand-off: authentication, resolution and the read together. A GET served
    here also hands out a read URL of the object's blob (`X-Ah-Read-Url`, valid until
    `X-Ah-Read-Expires`) for its later ranges: see ``blob_content``."""
    service = service_of(request)
    name, path = request.path_params["ref"], request.path_params["path"]
    get = request.method == "GET"
    redirect = request.query_params.get("redirect") == "1"
    # Local stores: the lookup (and a small read) on the event loop, as blob_content does.
    # Under concurrent requests a hand-off doubled what each cost the hub (4 KiB GETs from
    # 8 clients: 2.1 ms of CPU each against 1.1 inline).
    inline = service.local_reads
    read_now = INLINE_READ if inline else WHOLE_BODY  # read with the lookup

    def open_and_read(actor: Actor) -> tuple[ReadableObject, str | None, bytes | None,
                                             Grant | None]:
        """The object, the presigned URL to redirect to (None: serve it here), its
        requested bytes when they are few (None: stream them, or send none), and the grant
        of a read URL when its bytes are served here."""
        found = service.open_object(actor, asset_addr(request), name, path)
        entry = found.entry
        if not get or request.headers.get("if-none-match") == f'"{entry.sha256}"':
            return found, None, None, None
        # Computed locally, no I/O: the client then reads from the blob store (data plane).
        url = found.presigned_url() if redirect and entry.size else None
        if url is not None:
            return found, url, None, None
        grant = service.read_grant(actor, found)
        start, end = parse_range(request.headers.get("range"), entry.size) or (0, entry.size)
        if end - start > read_now:
            return found, None, None, grant
        return found, None, b"".join(found.read(start, end)), grant

    found, url, body, grant = await call_as(request, open_and_read, inline)
    commit, entry = found.commit, found.entry
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
    if url is not None:
        return Response(status_code=307, headers={**headers, "location": url})
    if grant is not None:
        headers["x-ah-read-url"] = blob_read_url(request, grant)
        headers["x-ah-read-expires"] = str(grant.expires)
    status, start, end = answer_range(request.headers.get("range"), entry.size, headers)
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers)
    if body is None and end - start <= WHOLE_BODY:  # one body, not a hand-off per chunk
        body = await whole_body(found, start, end, inline)
    if body is not None:
        return Response(body, status_code=status, headers=headers)
    chunks = await call(found.read, start, end)
    return StreamingResponse(iterate(chunks), status_code=status, headers=headers)


MAX_BATCH_READ = 256 << 20


async def files_batch(request: Request) -> Response:
    """POST {paths: [...]}: many objects of one commit in one response — for each, a JSON
    line `{path, size, sha256, mtime}` and then exactly `size` bytes. Asked with the header
    `x-ah-batch: grouped`: for each group of objects a JSON line that is the array of their
    headers, then their bytes back to back (answered with `x-ah-batch: grouped`)."""
    actor = await caller(request)
    paths = (await json_body(request, schemas.Paths)).paths
    # Asked for in a header: a hub that predates it ignores the header (a body field
    # would be refused as unknown) and answers a line per object.
    grouped = request.headers.get("x-ah-batch") == "grouped"
    commit, found = await call(service_of(request).open_objects, actor, asset_addr(request),
                               request.path_params["ref"], paths)
    total = sum(f.entry.size for f in found)
    if total > MAX_BATCH_READ:
        raise errors.InvalidArgument(
            f"a batch read of {total} bytes is over {MAX_BATCH_READ}; fetch large objects one "
            "by one")

    def header(group: list[ReadableObject]) -> bytes:
        if grouped:
            return json.dumps([_header_fields(each.entry) for each in group]).encode() + b"\n"
        return b"".join(json.dumps(_header_fields(each.entry)).encode() + b"\n"
                        for each in group)

    async def stream() -> AsyncIterator[bytes]:
        # Small objects are read a group at a time in one worker thread (a thread hand-off
        # per object and per chunk cost more than reading 100 bytes); large ones stream.
        for group in _read_groups(found):
            if len(group) == 1 and group[0].entry.size > BATCH_GROUP_OBJECT:
                yield header(group)
                async for chunk in iterate(await call(group[0].read)):
                    yield chunk
                continue
            contents = await call(ReadableObject.read_all, group)
            if grouped:
                yield b"".join((header(group), *contents))
            else:
                yield b"".join(part for data, each in zip(contents, group, strict=True)
                               for part in (header([each]), data))

    headers = {"x-ah-commit": commit.id}
    if grouped:
        headers["x-ah-batch"] = "grouped"
    return StreamingResponse(stream(), headers=headers,
                             media_type="application/octet-stream")


def _header_fields(entry: ObjectEntry) -> dict[str, Any]:
    return {"path": entry.path, "size": entry.size, "sha256": entry.sha256,
            "mtime": entry.mtime}


#: Objects up to this size travel in groups read by one worker thread each, up to
#: BATCH_GROUP_BYTES or BATCH_GROUP_FILES a group.
BATCH_GROUP_OBJECT = 256 << 10
BATCH_GROUP_BYTES = 4 << 20
BATCH_GROUP_FILES = 256


def _read_groups(found: list[ReadableObject]) -> Iterator[list[ReadableObject]]:
    """The first object alone (a mount asks for the file being opened first, and its reader
    waits for it, not for the group after it), then groups."""
    if found:
        yield found[:1]
    group: list[ReadableObject] = []
    size = 0
    for each in found[1:]:
        if each.entry.size > BATCH_GROUP_OBJECT:
            if group:
                yield group
                group, size = [], 0
            yield [each]
            continue
        if group and (len(group) >= BATCH_GROUP_FILES or
                      size + each.entry.size > BATCH_GROUP_BYTES):
            yield group
            group, size = [], 0
        group.append(each)
        size += each.entry.size
    if group:
        yield group


A = API + "/assets/{owner}/{kind}/{folder}/{asset}"
ROUTES: Routes = [
    (A + "/refs/{ref}/objects", objects, ["GET"]),
    (A + "/refs/{ref}/files/{path:path}", file, ["GET", "HEAD"]),
    (A + "/refs/{ref}/batch", files_batch, ["POST"]),
]
BODIES: Bodies = {(files_batch, "POST"): schemas.Paths}
