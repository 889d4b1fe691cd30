"""``HubClient``: the hub's endpoints, used by the Python API, the CLI and the vfs.

It speaks the HTTP API of ``ahmount.server.app`` through an :class:`HttpSession` (retries,
failing fast, error decoding): to a remote ``ah-server``, or in-process to the embedded hub
(the same service code behind a streaming ASGI transport, wired in
:mod:`ahmount.client.embedded`, which this module never imports). It returns the hub's model
records. Transfers to and from disk are :mod:`files` and :mod:`uploads`, reached through the
methods of the same names here.

Resource handling: use it as ``async with HubClient(...) as hub``; streams it returns must be
consumed or closed inside that block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import anyio
import httpx

from ahmount import errors
from ahmount.client import files
from ahmount.client.direct_reads import Consume, CutShort, Retryable
from ahmount.client.http import READ_RESUMES, HttpSession, Progress
from ahmount.client.read_urls import ReadUrls, on_data_plane
from ahmount.client.uploads import UnfinishedUploads, Uploads
from ahmount.hub.models import (
    MAX_CHANGES_PER_CALL,
    AssetAddr,
    AssetInfo,
    Change,
    CommitInfo,
    Event,
    EventPage,
    FolderAddr,
    FolderInfo,
    ListingPage,
    ObjectEntry,
    RefInfo,
)

log = logging.getLogger("ahmount.client")

#: How long a commit that did not finish spends dropping what it staged.
UNDO_SECONDS = 30.0

#: What a hub answers to a read URL it no longer honours (expired, signed with another key,
#: the blob collected): the read then goes through the object's path.
_REFUSED_URL = (errors.PermissionDenied, errors.Unauthenticated, errors.NotFound,
                errors.InvalidArgument)

#: Query of an object read: a hub that lets clients read blobs from its store answers 307
#: with a presigned URL (both ways of reading drop our API key on the way to another host).
READ_PARAMS = {"redirect": "1"}


def _folder(raw: dict[str, Any]) -> FolderInfo:
    return FolderInfo(**{k: v for k, v in raw.items() if k != "path"})


def _asset(raw: dict[str, Any]) -> AssetInfo:
    return AssetInfo(**{k: v for k, v in raw.items() if k != "path"})


def _commit(raw: dict[str, Any]) -> CommitInfo:
    return CommitInfo(**raw)


#: The fields of an object as the hub sends it.
_ENTRY_FIELDS = {f.name for f in dataclasses.fields(ObjectEntry)}
#: Each field's slot setter. The frozen dataclass's __init__ sets each field through
#: object.__setattr__, 1.3-2.5x slower than these in a listing a mount waits for.
_ENTRY_SETTERS = tuple((name, getattr(ObjectEntry, name).__set__) for name in _ENTRY_FIELDS)


def _entry(raw: dict[str, Any]) -> ObjectEntry:
    if raw.keys() != _ENTRY_FIELDS:
        return ObjectEntry(**raw)  # a field left out (its default) or unknown (TypeError)
    entry = object.__new__(ObjectEntry)
    for name, put in _ENTRY_SETTERS:
        put(entry, raw[name])
    return entry


def _event(raw: dict[str, Any]) -> Event:
    payload = {k: v for k, v in raw.items() if k not in ("id", "created")}
    return Event(int(raw["id"]), float(raw["created"]), payload)


#: What parsing an event the hub mangled raises (JSON that is not, fields missing or of
#: another type).
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError)


def _malformed(cursor: int, exc: BaseException) -> EventPage:
    """A page of the change feed whose events could not be read: a reset at its cursor, so
    a follower forgets what it cached (anything may have changed) and goes on after it,
    instead of stopping at it for good."""
    log.warning("the hub's change feed sent a malformed event up to cursor %d (%r): "
                "taken as a reset", cursor, exc)
    return EventPage([], cursor, True)


def _ref(raw: dict[str, Any]) -> RefInfo:
    return RefInfo(raw["type"], raw["name"], _commit(raw["commit"]))


class HubClient:
    """An async client of one hub.

    ``base_url``, ``transport``, ``retries`` and ``down_for`` are the session's
    (:class:`HttpSession`); ``upload_ids`` is where unfinished resumable uploads are
    remembered across processes (in memory only when None).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        data_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.2,
        down_for: float = 0.0,
        upload_ids: Path | None = None,
    ) -> None:
        self._http = HttpSession(base_url, api_key=api_key, transport=transport,
                                 timeout=timeout, retries=retries, backoff=backoff,
                                 down_for=down_for)
        self.base_url = self._http.base_url
        self.data_url = data_url or base_url
        key_id = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
        self._unfinished = UnfinishedUploads(upload_ids, f"{self.base_url} {key_id}")
        self._uploads = Uploads(self._http, self._unfinished)
        #: The caller's user name once known (``whoami`` fills it; callers may preset it).
        self.known_user: str | None = None
        #: Blobs' read URLs, learnt from object reads (:mod:`read_urls`); a hub reached
        #: over plain HTTP on a network socket may point them at its data plane.
        plane_host = httpx.URL(base_url).host if transport is None and \
            base_url.startswith("http://") else None
        self.read_urls = ReadUrls(plane_host=plane_host or None)

    @property
    def http(self) -> HttpSession:
        """The session, for requests no endpoint method makes (tests, benchmarks)."""
        return self._http

    async def __aenter__(self) -> HubClient:
        await self._http.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._unfinished.close()
        await self._http.__aexit__(exc_type, exc, tb)

    # -- addressing --------------------------------------------------------------------------

    @staticmethod
    def _f(addr: FolderAddr) -> str:
        return f"/api/v1/folders/{addr.owner}/{addr.kind}/{addr.name}"

    @staticmethod
    def _a(addr: AssetAddr) -> str:
        f = addr.folder
        return f"/api/v1/assets/{f.owner}/{f.kind}/{f.name}/{addr.name}"

    def _file_url(self, addr: AssetAddr, ref: str, path: str) -> str:
        return f"{self._a(addr)}/refs/{ref}/files/{path}"

    async def whoami(self) -> str:
        if self.known_user is None:
            self.known_user = str((await self._http.json("GET", "/api/v1/whoami"))["name"])
        return self.known_user

    async def healthz(self) -> bool:
        await self._http.json("GET", "/healthz")
        return True

    # -- folders -----------------------------------------------------------------------------

    async def list_folders(self, owner: str, kind: str) -> list[FolderInfo]:
        body = await self._http.json("GET", f"/api/v1/folders/{owner}/{kind}")
        return [_folder(f) for f in body["folders"]]

    async def create_folder(self, addr: FolderAddr, labels: Sequence[str] = (),
                            description: str = "") -> FolderInfo:
        body = await self._http.json("POST", f"/api/v1/folders/{addr.owner}/{addr.kind}", json={
            "name": addr.name, "labels": list(labels), "description": description})
        return _folder(body)

    async def get_folder(self, addr: FolderAddr) -> FolderInfo:
        return _folder(await self._http.json("GET", self._f(addr)))

    async def update_folder(self, addr: FolderAddr, name: str | None = None,
                            labels: Sequence[str] | None = None,
                            description: str | None = None) -> FolderInfo:
        body = {"name": name, "labels": None if labels is None else list(labels),
                "description": description}
        return _folder(await self._http.json("PATCH", self._f(addr), json=body))

    async def delete_folder(self, addr: FolderAddr) -> None:
        await self._http.json("DELETE", self._f(addr))

    async def share_folder(self, addr: FolderAddr, user: str, permission: str | None) -> None:
        url = f"{self._f(addr)}/shares/{user}"
        if permission is None:
            await self._http.json("DELETE", url)
        else:
            await self._http.json("PUT", url, json={"permission": permission})

    async def set_public(self, addr: FolderAddr, public: bool) -> None:
        await self._http.json("PUT", f"{self._f(addr)}/public", json={"public": public})

    async def folder_shares(self, addr: FolderAddr) -> list[dict[str, Any]]:
        return list((await self._http.json("GET", f"{self._f(addr)}/shares"))["shares"])

    # -- assets ------------------------------------------------------------------------------

    async def list_assets(self, addr: FolderAddr) -> list[AssetInfo]:
        body = await self._http.json("GET", f"{self._f(addr)}/assets")
        return [_asset(a) for a in body["assets"]]

    async def create_asset(self, addr: AssetAddr, labels: Sequence[str] = (),
                           description: str = "") -> AssetInfo:
        body = await self._http.json("POST", f"{self._f(addr.folder)}/assets", json={
            "name": addr.name, "labels": list(labels), "description": description})
        return _asset(body)

    async def get_asset(self, addr: AssetAddr) -> AssetInfo:
        return _asset(await self._http.json("GET", self._a(addr)))

    async def update_asset(self, addr: AssetAddr, name: str | None = None,
                           labels: Sequence[str] | None = None,
                           description: str | None = None) -> AssetInfo:
        body = {"name": name, "labels": None if labels is None else list(labels),
                "description": description}
        return _asset(await self._http.json("PATCH", self._a(addr), json=body))

    async def delete_asset(self, addr: AssetAddr) -> None:
        await self._http.json("DELETE", self._a(addr))

    # -- references --------------------------------------------------------------------------

    async def list_refs(self, addr: AssetAddr, ref_type: str) -> list[tuple[str, str]]:
        key = {"branch": "branches", "tag": "tags"}.get(ref_type)
        if key is None:
            raise errors.InvalidArgument(f"reference type {ref_type!r} is not branch or tag")
        body = await self._http.json("GET", f"{self._a(addr)}/{key}")
        return [(r["name"], r["commit_id"]) for r in body[key]]

    async def create_branch(self, addr: AssetAddr, name: str) -> RefInfo:
        return _ref(await self._http.json("POST", f"{self._a(addr)}/branches", json={"name": name}))

    async def create_tag(self, addr: AssetAddr, name: str, source: str) -> RefInfo:
        body = await self._http.json("POST", f"{self._a(addr)}/tags",
                                json={"name": name, "source": source})
        return _ref(body)

    async def resolve(self, addr: AssetAddr, ref: str) -> RefInfo:
        return _ref(await self._http.json("GET", f"{self._a(addr)}/refs/{ref}"))

    async def delete_ref(self, addr: AssetAddr, ref: str) -> None:
        await self._http.json("DELETE", f"{self._a(addr)}/refs/{ref}")

    async def get_commit(self, addr: AssetAddr, prefix: str) -> CommitInfo:
        return _commit(await self._http.json("GET", f"{self._a(addr)}/commits/{prefix}"))

    async def log(self, addr: AssetAddr, ref: str, limit: int = 1000) -> list[CommitInfo]:
        body = await self._http.json("GET", f"{self._a(addr)}/refs/{ref}/log",
                                params={"limit": limit})
        return [_commit(c) for c in body["commits"]]

    # -- objects -----------------------------------------------------------------------------

    async def list_page(self, addr: AssetAddr, ref: str, prefix: str = "", after: str = "",
                        limit: int = 1000, delimiter: bool = False,
                        read_urls_over: int | None = None) -> ListingPage:
        """One page of a ref's objects. ``read_urls_over``: the read URLs of the objects
        larger than that many bytes come with it and are kept (:attr:`read_urls`)."""
        params: dict[str, Any] = {"prefix": prefix, "after": after, "limit": limit}
        if delimiter:
            params["delimiter"] = "/"
        if read_urls_over is not None:
            params["read_urls_over"] = read_urls_over
        body = await self._http.json("GET", f"{self._a(addr)}/refs/{ref}/objects", params=params)
        expires = body.get("read_expires")
        if expires is not None:  # the page carries read URLs (a 10k listing of small files: none)
            for raw in body["objects"]:
                url = raw.pop("read_url", None)
                if isinstance(url, str) and isinstance(expires, int):
                    self.read_urls.keep(raw["sha256"], url, expires)
        return ListingPage(body["commit"], [_entry(o) for o in body["objects"]], body["dirs"],
                           body["next_after"])

    async def list_objects(self, addr: AssetAddr, ref: str, prefix: str = "",
                           read_urls_over: int | None = None) -> tuple[str, list[ObjectEntry]]:
        """Every object under ``prefix`` of one commit: ``(commit_id, entries)``. Pages after
        the first are read from the commit the first page resolved, so a branch that moves
        meanwhile cannot mix two trees."""
        page = await self.list_page(addr, ref, prefix, limit=10_000,
                                    read_urls_over=read_urls_over)
        commit, out = page.commit, list(page.objects)
        while page.next_after is not None:
            page = await self.list_page(addr, commit, prefix, page.next_after, limit=10_000,
                                        read_urls_over=read_urls_over)
            out.extend(page.objects)
        return commit, out

    @contextlib.asynccontextmanager
    async def open_object(
        self, addr: AssetAddr, ref: str, path: str, start: int = 0, end: int | None = None,
        sha256: str | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response with bytes ``[start, end)`` of an object. Given the object's
        ``sha256``, through its blob's read URL when one is known (:mod:`read_urls`)."""
        headers = {}
        if start or end is not None:
            headers["range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = None
        url = self.read_urls.get(sha256)
        if url is not None:
            try:
                response = await self._http.send("GET", url, stream=True, headers=headers,
                                                 aside=on_data_plane(url))
            except _REFUSED_URL:
                self.read_urls.forget(sha256 or "")
            except Retryable:  # only the data plane's: the API's are retried in send
                self.read_urls.plane_failed()
        if response is None:
            response = await self._http.send("GET", self._file_url(addr, ref, path),
                                             stream=True, headers=headers, params=READ_PARAMS,
                                             follow_redirects=True)
            self.read_urls.learn(response.headers.get)
        try:
            yield response
        finally:
            await response.aclose()

    @property
    def reads_directly(self) -> bool:
        """True when :meth:`read_into` works: the hub is reached over a socket."""
        return self._http.direct is not None

    def read_into(self, addr: AssetAddr, ref: str, path: str, start: int, end: int,
                  buffer: memoryview, consume: Consume, sha256: str | None = None) -> int:
        """Bytes ``[start, end)`` of an object read into ``buffer`` (see
        :mod:`direct_reads`), blocking: for a worker thread, when :attr:`reads_directly`.
        Returns the bytes read; fewer only when ``consume`` returned False. Given the
        object's ``sha256``, through its blob's read URL when one is known.

        An answer that breaks off mid-body is resumed: the rest of the range is asked for
        again (:data:`READ_RESUMES` times), and ``consume`` sees one unbroken stream."""
        got = resumed = 0
        while True:
            def rest(view: memoryview, offset: int, before: int = got) -> bool:
                return consume(view, before + offset)

            try:
                return got + self._read_into_once(addr, ref, path, start + got, end, buffer,
                                                  rest, sha256)
            except CutShort as exc:
                got += exc.done
                resumed += 1
                if resumed > READ_RESUMES:
                    raise
                delay = self._http.retry_delay(resumed)
                log.warning("%s: broke off after %d of %d bytes (%s); asking for the rest "
                            "in %.1fs", addr.at(ref) + "/" + path, got, end - start, exc, delay)
                time.sleep(delay)  # a worker thread's pause, as HttpSession.read_into's

    def _read_into_once(self, addr: AssetAddr, ref: str, path: str, start: int, end: int,
                        buffer: memoryview, consume: Consume, sha256: str | None) -> int:
        headers = {"range": f"bytes={start}-{end - 1}"}
        url = self.read_urls.get(sha256)
        if url is not None:
            try:
                # No params: httpx would drop the URL's own query for them.
                return self._http.read_into(url, end - start, buffer, consume,
                                            headers=headers, aside=on_data_plane(url))
            except _REFUSED_URL:
                self.read_urls.forget(sha256 or "")  # no byte was consumed: the head failed
            except Retryable:  # the data plane's, before a byte of the body
                self.read_urls.plane_failed()
        return self._http.read_into(self._file_url(addr, ref, path), end - start, buffer,
                                    consume, headers=headers, params=READ_PARAMS,
                                    on_head=self.read_urls.learn)

    async def read_range(self, addr: AssetAddr, ref: str, path: str, start: int,
                         end: int) -> bytes:
        async with self.open_object(addr, ref, path, start, end) as response:
            return await response.aread()

    @contextlib.asynccontextmanager
    async def open_batch(self, addr: AssetAddr, ref: str, paths: Sequence[str],
                         grouped: bool = False) -> AsyncIterator[httpx.Response]:
        """One streamed response carrying many objects of one commit, each a JSON header
        line (path, size) followed by its bytes; ``grouped``: a header line per group of
        objects, if the hub answers ``x-ah-batch: grouped`` (one that predates it does not)."""
        response = await self._http.send("POST", f"{self._a(addr)}/refs/{ref}/batch",
                                         json={"paths": list(paths)}, stream=True,
                                         headers={"x-ah-batch": "grouped"} if grouped else None,
                                         repeatable=True)  # a read: safe to send again
        try:
            yield response
        finally:
            await response.aclose()

    async def download(self, addr: AssetAddr, ref: str, entry: ObjectEntry, dest: Path,
                       progress: Progress | None = None) -> None:
        """:func:`files.download`."""
        await files.download(self, addr, ref, entry, dest, progress)

    async def download_batch(self, addr: AssetAddr, ref: str,
                             items: Sequence[tuple[ObjectEntry, Path]],
                             progress: Progress | None = None) -> None:
        """:func:`files.download_batch`."""
        await files.download_batch(self, addr, ref, items, progress)

    # -- staging and commits -----------------------------------------------------------------

    async def stage(self, addr: AssetAddr, branch: str, session: str,
                    deletes: Sequence[str] = (), adds: Sequence[ObjectEntry] = ()) -> int:
        body = {"session": session, "deletes": list(deletes),
                "adds": [e.as_json() for e in adds]}
        result = await self._http.json("POST", f"{self._a(addr)}/branches/{branch}/changes",
                                       json=body)
        return int(result["staged"])

    async def changes(self, addr: AssetAddr, branch: str) -> list[Change]:
        body = await self._http.json("GET", f"{self._a(addr)}/branches/{branch}/changes")
        return [
            Change(c["id"], c["op"], c["path"], c["session"],
                   None if c["entry"] is None else _entry(c["entry"]), c["created"])
            for c in body["changes"]
        ]

    async def reset(self, addr: AssetAddr, branch: str, session: str | None = None) -> int:
        """Drop the branch's uncommitted changes (only those staged under ``session``, if
        given); how many were dropped."""
        params = {} if session is None else {"session": session}
        body = await self._http.json("DELETE", f"{self._a(addr)}/branches/{branch}/changes",
                                     params=params)
        return int(body["dropped"])

    async def commit(self, addr: AssetAddr, branch: str, message: str, *, session: str = "",
                     deletes: Sequence[str] = (), adds: Sequence[ObjectEntry] = (),
                     force: bool = False,
                     metadata: dict[str, Any] | None = None,
                     expect: Mapping[str, str | None] | None = None) -> CommitInfo | None:
        """One atomic commit of ``deletes`` then ``adds`` (plus what ``session`` staged),
        made only if every path of ``expect`` has that sha256 in the head (None: absent),
        else :class:`~ahmount.errors.Changed` and nothing changes.

        More changes than one call may carry (:data:`MAX_CHANGES_PER_CALL`: a dataset of a
        million files) are staged under the session a call's worth at a time, deletes first,
        and the commit then takes them all at once. If that does not finish (an error, a
        cancel), what this call staged is dropped again, so the branch is left as it was."""
        deletes, adds = list(deletes), list(adds)
        if len(deletes) + len(adds) <= MAX_CHANGES_PER_CALL:
            return await self._commit(addr, branch, message, session, deletes, adds, force,
                                      metadata, expect)
        session = session or f"ah-{uuid.uuid4().hex}"
        try:
            for start in range(0, len(deletes), MAX_CHANGES_PER_CALL):
                await self.stage(addr, branch, session,
                                 deletes=deletes[start:start + MAX_CHANGES_PER_CALL])
            for start in range(0, len(adds), MAX_CHANGES_PER_CALL):
                await self.stage(addr, branch, session,
                                 adds=adds[start:start + MAX_CHANGES_PER_CALL])
            return await self._commit(addr, branch, message, session, [], [], force, metadata,
                                      expect)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(UNDO_SECONDS):
                try:
                    await self.reset(addr, branch, session=session)
                except errors.AhError as exc:  # the hub is gone: the staged rows stay
                    log.warning("could not drop the changes staged for a commit of %s: %s",
                                addr.at(branch), exc)
            raise

    async def _commit(self, addr: AssetAddr, branch: str, message: str, session: str,
                      deletes: list[str], adds: list[ObjectEntry], force: bool,
                      metadata: dict[str, Any] | None,
                      expect: Mapping[str, str | None] | None) -> CommitInfo | None:
        body: dict[str, Any] = {
            "message": message, "session": session, "deletes": deletes,
            "adds": [e.as_json() for e in adds], "force": force, "metadata": metadata or {}}
        if expect:
            body["expect"] = dict(expect)
        # A key of its own makes the commit safe to send again when the connection fails
        # before its answer arrives: the hub answers a repeat with what the first got
        # (without it, an append that had been committed would be appended twice). A
        # header: a hub that predates it ignores it (its body schema refuses new fields).
        result = await self._http.json("POST", f"{self._a(addr)}/branches/{branch}/commits",
                                       json=body, headers={"idempotency-key": uuid.uuid4().hex},
                                       repeatable=True)
        return None if result["commit"] is None else _commit(result["commit"])

    async def merge(self, addr: AssetAddr, branch: str) -> CommitInfo | None:
        result = await self._http.json("POST", f"{self._a(addr)}/branches/{branch}/merge")
        return None if result["commit"] is None else _commit(result["commit"])

    # -- the change feed ---------------------------------------------------------------------

    async def event_page(self, after: int | None = None, limit: int = 500) -> EventPage:
        """One page of the changes the caller may see after ``after`` (None: the newest)."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        body = await self._http.json("GET", "/api/v1/events", params=params)
        try:
            cursor = int(body["cursor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.HubUnavailable(f"the hub's change feed sent a page with no cursor "
                                        f"({exc!r})") from None
        try:
            return EventPage([_event(e) for e in body["events"]], cursor, bool(body["reset"]))
        except _MALFORMED as exc:
            return _malformed(cursor, exc)

    async def watch(self, after: int | None = None) -> AsyncGenerator[EventPage, None]:
        """The change feed as it happens (Server-Sent Events): the first page says where the
        stream starts (``reset``: forget what is cached), then a page per change or per
        cursor move. Resumes from ``after`` (``Last-Event-ID``). Ends when the connection
        does; the caller reconnects from the last cursor it saw."""
        headers = {"accept": "text/event-stream"}
        if after is not None:
            headers["last-event-id"] = str(after)
        response = await self._http.send("GET", "/api/v1/events", stream=True,
                                         headers=headers)
        lines = cast("AsyncGenerator[str, None]", response.aiter_lines())
        try:
            fields: dict[str, str] = {}
            async for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    if name:  # a line starting with ':' is a comment (a heartbeat)
                        fields[name] = value[1:] if value.startswith(" ") else value
                    continue
                if "id" in fields and "data" in fields:
                    try:
                        cursor = int(fields["id"])
                    except ValueError:
                        raise errors.HubUnavailable(
                            f"the hub's change feed sent the event id {fields['id'][:40]!r}, "
                            "not a number") from None
                    try:
                        data = json.loads(fields["data"])
                        page = EventPage([_event(data)], cursor, False) \
                            if fields.get("event") == "change" else \
                            EventPage([], int(data.get("cursor", cursor)),
                                      bool(data.get("reset", False)))
                    except _MALFORMED as exc:
                        page = _malformed(cursor, exc)
                    yield page
                fields = {}
        finally:
            await lines.aclose()
            await response.aclose()

    # -- blobs -------------------------------------------------------------------------------

    async def upload_file(self, path: Path, sha256: str, size: int,
                          progress: Progress | None = None) -> None:
        """:meth:`Uploads.upload_file`."""
        await self._uploads.upload_file(path, sha256, size, progress)

    async def upload_batch(self, files: Sequence[tuple[Path, str, int]],
                           progress: Progress | None = None) -> None:
        """:meth:`Uploads.upload_batch`."""
        await self._uploads.upload_batch(files, progress)

    async def missing_blobs(self, hashes: Sequence[str]) -> set[str]:
        missing: set[str] = set()
        unique = sorted(set(hashes))
        for start in range(0, len(unique), 50_000):
            body = await self._http.json("POST", "/api/v1/blobs/missing",
                                    json={"hashes": unique[start:start + 50_000]})
            missing.update(body["missing"])
        return missing

