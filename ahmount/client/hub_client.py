"""``HubClient``: the one async client of the hub, used by the Python API, the CLI and the mount.

It speaks the HTTP API of ``ahmount.server.app`` through httpx: to a remote ``ah-server``, or
in-process to the embedded hub (the same service code behind a streaming ASGI transport,
wired in :mod:`ahmount.client.embedded`, which this module never imports). It
returns the hub's model records, retries transient failures with backoff, and maps every
error response to the domain exception tree in one place (:func:`raise_for_response`).

Resource handling: use it as ``async with HubClient(...) as hub``; streams it returns must be
consumed or closed inside that block.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import httpcore
import httpx

from ahmount import errors
from ahmount.hub.models import (
    AssetAddr,
    AssetInfo,
    Change,
    CommitInfo,
    FolderAddr,
    FolderInfo,
    ListingPage,
    ObjectEntry,
    RefInfo,
)

log = logging.getLogger("ahmount.client")

CHUNK = 1 << 20

# httpcore reads the socket 64 KiB at a time, and every read is a trip through h11 and four
# async iterators: streaming a multi-GiB object that way costs more CPU than the bytes do.
# A read returns what the socket has, so a larger bound only means fewer trips.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20
#: Blobs above this size go through a resumable upload in segments of this size.
SEGMENT = 64 << 20
MAX_RESYNCS = 5  # offset corrections per upload before giving up
RETRYABLE_STATUS = {502, 503, 504}
Progress = Callable[[int], None]


def raise_for_response(response: httpx.Response, body: bytes | None = None) -> None:
    """The one mapping from an HTTP error response to a domain exception."""
    if response.status_code < 400:
        return
    raw = body if body is not None else response.content
    code, message, path = "internal", "", None
    try:
        error = json.loads(raw)["error"]
        code, message, path = error["code"], error["message"], error.get("path")
    except (ValueError, KeyError, TypeError):
        message = f"hub answered {response.status_code} to {response.request.method} " \
                  f"{response.request.url.path}"
        if response.status_code in RETRYABLE_STATUS:
            code = "unavailable"
    cls = errors.ERRORS_BY_CODE.get(code, errors.InternalError)
    raise cls(message, path=path)


def hash_file(path: Path) -> tuple[str, int]:
    """``(sha256, size)`` of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _folder(raw: dict[str, Any]) -> FolderInfo:
    return FolderInfo(**{k: v for k, v in raw.items() if k != "path"})


def _asset(raw: dict[str, Any]) -> AssetInfo:
    return AssetInfo(**{k: v for k, v in raw.items() if k != "path"})


def _commit(raw: dict[str, Any]) -> CommitInfo:
    return CommitInfo(**raw)


def _entry(raw: dict[str, Any]) -> ObjectEntry:
    return ObjectEntry(**raw)


def _ref(raw: dict[str, Any]) -> RefInfo:
    return RefInfo(raw["type"], raw["name"], _commit(raw["commit"]))


class HubClient:
    """An async client of one hub.

    ``base_url`` is the hub's URL (``http://host:port`` or ``unix:/path/to/socket``);
    ``transport`` overrides how requests travel (the embedded hub passes its in-process
    transport). Requests that fail on the way (connection refused, reset, timeouts, 502/503/504)
    are retried ``retries`` times with exponential backoff; then :class:`HubUnavailable`.
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
        headers = {"user-agent": "ahmount"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        if base_url.startswith("unix:"):
            transport = transport or httpx.AsyncHTTPTransport(uds=base_url[len("unix:"):])
            base_url = "http://hub"
        self.base_url = base_url
        self.data_url = data_url or base_url
        self.retries = retries
        self.backoff = backoff
        #: After retries are exhausted, fail at once for this many seconds instead of retrying
        #: every request again (a mount would otherwise stall each syscall on a dead hub).
        self.down_for = down_for
        self._down_until = 0.0
        key_id = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
        self._unfinished = UnfinishedUploads(upload_ids, f"{base_url} {key_id}")
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        #: The caller's user name once known (``whoami`` fills it; callers may preset it).
        self.known_user: str | None = None

    async def __aenter__(self) -> HubClient:
        await self._http.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._unfinished.close()
        await self._http.__aexit__(*exc_info)

    # -- transport ---------------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, stream: bool = False,
                    **kwargs: Any) -> httpx.Response:
        """Send with retries; returns a successful response (streamed if ``stream``)."""
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        if self._down_until > time.monotonic():
            raise errors.HubUnavailable(
                f"hub at {self.base_url} is unreachable (failing fast for a moment)", path=url)
        attempt = 0
        while True:
            try:
                follow = kwargs.pop("follow_redirects", False)
                request = self._http.build_request(method, url, **kwargs)
                response = await self._http.send(request, stream=stream,
                                                 follow_redirects=follow)
                kwargs["follow_redirects"] = follow
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure: Exception = exc
            except (httpx.ReadError, httpx.ReadTimeout, httpx.WriteError,
                    httpx.RemoteProtocolError) as exc:
                if not idempotent:
                    raise errors.HubUnavailable(
                        f"{method} {url} failed on the way and is not safe to repeat: {exc}",
                        path=url,
                    ) from exc
                failure = exc
            else:
                if response.status_code in RETRYABLE_STATUS and attempt < self.retries:
                    await response.aclose()
                    failure = errors.HubUnavailable(f"hub answered {response.status_code}")
                else:
                    if response.status_code >= 400:
                        body = await response.aread()
                        await response.aclose()
                        raise_for_response(response, body)
                    return response
            attempt += 1
            if attempt > self.retries or ("content" in kwargs and not isinstance(
                kwargs["content"], bytes | str
            )):
                self._down_until = time.monotonic() + self.down_for
                raise errors.HubUnavailable(
                    f"hub at {self.base_url} is unreachable ({method} {url}): {failure}",
                    path=url,
                ) from failure
            delay = self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s %s failed (%s); retry %d in %.1fs", method, url, failure,
                        attempt, delay)
            await anyio.sleep(delay)

    async def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self._send(method, url, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # -- addressing --------------------------------------------------------------------------

    @staticmethod
    def _f(addr: FolderAddr) -> str:
        return f"/api/v1/folders/{addr.owner}/{addr.kind}/{addr.name}"

    @staticmethod
    def _a(addr: AssetAddr) -> str:
        f = addr.folder
        return f"/api/v1/assets/{f.owner}/{f.kind}/{f.name}/{addr.name}"

    async def whoami(self) -> str:
        if self.known_user is None:
            self.known_user = str((await self._json("GET", "/api/v1/whoami"))["name"])
        return self.known_user

    async def healthz(self) -> bool:
        await self._json("GET", "/healthz")
        return True

    # -- folders -----------------------------------------------------------------------------

    async def list_folders(self, owner: str, kind: str) -> list[FolderInfo]:
        body = await self._json("GET", f"/api/v1/folders/{owner}/{kind}")
        return [_folder(f) for f in body["folders"]]

    async def create_folder(self, addr: FolderAddr, labels: Sequence[str] = (),
                            description: str = "") -> FolderInfo:
        body = await self._json("POST", f"/api/v1/folders/{addr.owner}/{addr.kind}", json={
            "name": addr.name, "labels": list(labels), "description": description})
        return _folder(body)

    async def get_folder(self, addr: FolderAddr) -> FolderInfo:
        return _folder(await self._json("GET", self._f(addr)))

    async def update_folder(self, addr: FolderAddr, name: str | None = None,
                            labels: Sequence[str] | None = None,
                            description: str | None = None) -> FolderInfo:
        body = {"name": name, "labels": None if labels is None else list(labels),
                "description": description}
        return _folder(await self._json("PATCH", self._f(addr), json=body))

    async def delete_folder(self, addr: FolderAddr) -> None:
        await self._json("DELETE", self._f(addr))

    async def share_folder(self, addr: FolderAddr, user: str, permission: str | None) -> None:
        url = f"{self._f(addr)}/shares/{user}"
        if permission is None:
            await self._json("DELETE", url)
        else:
            await self._json("PUT", url, json={"permission": permission})

    async def set_public(self, addr: FolderAddr, public: bool) -> None:
        await self._json("PUT", f"{self._f(addr)}/public", json={"public": public})

    async def folder_shares(self, addr: FolderAddr) -> list[dict[str, Any]]:
        return list((await self._json("GET", f"{self._f(addr)}/shares"))["shares"])

    # -- assets ------------------------------------------------------------------------------

    async def list_assets(self, addr: FolderAddr) -> list[AssetInfo]:
        body = await self._json("GET", f"{self._f(addr)}/assets")
        return [_asset(a) for a in body["assets"]]

    async def create_asset(self, addr: AssetAddr, labels: Sequence[str] = (),
                           description: str = "") -> AssetInfo:
        body = await self._json("POST", f"{self._f(addr.folder)}/assets", json={
            "name": addr.name, "labels": list(labels), "description": description})
        return _asset(body)

    async def get_asset(self, addr: AssetAddr) -> AssetInfo:
        return _asset(await self._json("GET", self._a(addr)))

    async def update_asset(self, addr: AssetAddr, name: str | None = None,
                           labels: Sequence[str] | None = None,
                           description: str | None = None) -> AssetInfo:
        body = {"name": name, "labels": None if labels is None else list(labels),
                "description": description}
        return _asset(await self._json("PATCH", self._a(addr), json=body))

    async def delete_asset(self, addr: AssetAddr) -> None:
        await self._json("DELETE", self._a(addr))

    # -- references --------------------------------------------------------------------------

    async def list_refs(self, addr: AssetAddr, ref_type: str) -> list[tuple[str, str]]:
        key = {"branch": "branches", "tag": "tags"}.get(ref_type)
        if key is None:
            raise errors.InvalidArgument(f"reference type {ref_type!r} is not branch or tag")
        body = await self._json("GET", f"{self._a(addr)}/{key}")
        return [(r["name"], r["commit_id"]) for r in body[key]]

    async def create_branch(self, addr: AssetAddr, name: str) -> RefInfo:
        return _ref(await self._json("POST", f"{self._a(addr)}/branches", json={"name": name}))

    async def create_tag(self, addr: AssetAddr, name: str, source: str) -> RefInfo:
        body = await self._json("POST", f"{self._a(addr)}/tags",
                                json={"name": name, "source": source})
        return _ref(body)

    async def resolve(self, addr: AssetAddr, ref: str) -> RefInfo:
        return _ref(await self._json("GET", f"{self._a(addr)}/refs/{ref}"))

    async def delete_ref(self, addr: AssetAddr, ref: str) -> None:
        await self._json("DELETE", f"{self._a(addr)}/refs/{ref}")

    async def get_commit(self, addr: AssetAddr, prefix: str) -> CommitInfo:
        return _commit(await self._json("GET", f"{self._a(addr)}/commits/{prefix}"))

    async def log(self, addr: AssetAddr, ref: str, limit: int = 1000) -> list[CommitInfo]:
        body = await self._json("GET", f"{self._a(addr)}/refs/{ref}/log",
                                params={"limit": limit})
        return [_commit(c) for c in body["commits"]]

    # -- objects -----------------------------------------------------------------------------

    async def list_page(self, addr: AssetAddr, ref: str, prefix: str = "", after: str = "",
                        limit: int = 1000, delimiter: bool = False) -> ListingPage:
        params: dict[str, Any] = {"prefix": prefix, "after": after, "limit": limit}
        if delimiter:
            params["delimiter"] = "/"
        body = await self._json("GET", f"{self._a(addr)}/refs/{ref}/objects", params=params)
        return ListingPage(body["commit"], [_entry(o) for o in body["objects"]], body["dirs"],
                           body["next_after"])

    async def list_objects(self, addr: AssetAddr, ref: str,
                           prefix: str = "") -> tuple[str, list[ObjectEntry]]:
        """Every object under ``prefix`` of one commit: ``(commit_id, entries)``. Pages after
        the first are read from the commit the first page resolved, so a branch that moves
        meanwhile cannot mix two trees."""
        page = await self.list_page(addr, ref, prefix, limit=10_000)
        commit, out = page.commit, list(page.objects)
        while page.next_after is not None:
            page = await self.list_page(addr, commit, prefix, page.next_after, limit=10_000)
            out.extend(page.objects)
        return commit, out

    @contextlib.asynccontextmanager
    async def open_object(
        self, addr: AssetAddr, ref: str, path: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response with bytes ``[start, end)`` of an object."""
        headers = {}
        if start or end is not None:
            headers["range"] = f"bytes={start}-{'' if end is None else end - 1}"
        url = f"{self._a(addr)}/refs/{ref}/files/{path}"
        # redirect=1: a hub that lets clients read blobs from its store answers 307 with a
        # presigned URL (httpx drops our API key on the way to another host).
        response = await self._send("GET", url, stream=True, headers=headers,
                                    params={"redirect": "1"}, follow_redirects=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def read_range(self, addr: AssetAddr, ref: str, path: str, start: int,
                         end: int) -> bytes:
        async with self.open_object(addr, ref, path, start, end) as response:
            return await response.aread()

    async def download(self, addr: AssetAddr, ref: str, entry: ObjectEntry, dest: Path,
                       progress: Progress | None = None) -> None:
        """Write an object to ``dest`` atomically (temp file, rename) after checking its
        sha256; on any failure nothing is left under ``dest``."""
        tmp = _partial_path(dest)
        digest = hashlib.sha256()
        with local_names(entry.path, dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with tmp.open("wb") as handle:
                    if entry.size:
                        async with self.open_object(addr, ref, entry.path) as response:
                            async for chunk in response.aiter_bytes(CHUNK):
                                digest.update(chunk)
                                await anyio.to_thread.run_sync(handle.write, chunk)
                                if progress:
                                    progress(len(chunk))
                # No fsync: like cp, a download is made visible atomically (rename), and its
                # durability is left to the file system; fsync per file made many small
                # files slow.
                if digest.hexdigest() != entry.sha256:
                    raise errors.ChecksumMismatch(
                        f"download of {entry.path!r} hashed to {digest.hexdigest()}, "
                        f"expected {entry.sha256}", path=entry.path,
                    )
                os.utime(tmp, (entry.mtime, entry.mtime))
                os.chmod(tmp, entry.mode)  # as committed (git keeps the executable bit too)
                os.replace(tmp, dest)
            except BaseException:
                _remove_partial(tmp)
                raise

    async def download_batch(self, addr: AssetAddr, ref: str,
                             items: Sequence[tuple[ObjectEntry, Path]],
                             progress: Progress | None = None) -> None:
        """Download many (small) objects of one commit with one request, each written
        atomically to its destination after its sha256 checked out."""
        by_path = {e.path: (e, dest) for e, dest in items}
        body = {"paths": [e.path for e, _ in items]}
        response = await self._send("POST", f"{self._a(addr)}/refs/{ref}/batch", json=body,
                                    stream=True)
        try:
            chunks = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
            async with contextlib.aclosing(chunks) as raw:
                reader = _StreamReader(raw)
                for _ in range(len(items)):
                    header = json.loads(await reader.readline())
                    entry, dest = by_path[header["path"]]
                    data = await reader.readexactly(int(header["size"]))
                    if hashlib.sha256(data).hexdigest() != entry.sha256:
                        raise errors.ChecksumMismatch(
                            f"download of {entry.path!r} did not hash to {entry.sha256}",
                            path=entry.path)
                    await anyio.to_thread.run_sync(_write_atomically, dest, data, entry.mtime,
                                                   entry.mode)
                    if progress:
                        progress(len(data))
        finally:
            await response.aclose()

    # -- staging and commits -----------------------------------------------------------------

    async def stage(self, addr: AssetAddr, branch: str, session: str,
                    deletes: Sequence[str] = (), adds: Sequence[ObjectEntry] = ()) -> int:
        body = {"session": session, "deletes": list(deletes),
                "adds": [e.__dict__ for e in adds]}
        result = await self._json("POST", f"{self._a(addr)}/branches/{branch}/changes", json=body)
        return int(result["staged"])

    async def changes(self, addr: AssetAddr, branch: str) -> list[Change]:
        body = await self._json("GET", f"{self._a(addr)}/branches/{branch}/changes")
        return [
            Change(c["id"], c["op"], c["path"], c["session"],
                   None if c["entry"] is None else _entry(c["entry"]), c["created"])
            for c in body["changes"]
        ]

    async def reset(self, addr: AssetAddr, branch: str) -> int:
        body = await self._json("DELETE", f"{self._a(addr)}/branches/{branch}/changes")
        return int(body["dropped"])

    async def commit(self, addr: AssetAddr, branch: str, message: str, *, session: str = "",
                     deletes: Sequence[str] = (), adds: Sequence[ObjectEntry] = (),
                     force: bool = False,
                     metadata: dict[str, Any] | None = None) -> CommitInfo | None:
        body = {"message": message, "session": session, "deletes": list(deletes),
                "adds": [e.__dict__ for e in adds], "force": force, "metadata": metadata or {}}
        result = await self._json("POST", f"{self._a(addr)}/branches/{branch}/commits",
                                  json=body)
        return None if result["commit"] is None else _commit(result["commit"])

    async def merge(self, addr: AssetAddr, branch: str) -> CommitInfo | None:
        result = await self._json("POST", f"{self._a(addr)}/branches/{branch}/merge")
        return None if result["commit"] is None else _commit(result["commit"])

    # -- blobs -------------------------------------------------------------------------------

    async def missing_blobs(self, hashes: Sequence[str]) -> set[str]:
        missing: set[str] = set()
        unique = sorted(set(hashes))
        for start in range(0, len(unique), 50_000):
            body = await self._json("POST", "/api/v1/blobs/missing",
                                    json={"hashes": unique[start:start + 50_000]})
            missing.update(body["missing"])
        return missing

    async def upload_batch(self, files: Sequence[tuple[Path, str, int]],
                           progress: Progress | None = None) -> None:
        """Upload many small files as blobs in one request: ``(path, sha256, size)`` each."""
        total = sum(size for _, _, size in files)
        body = _batch_body(files, progress)
        await self._send("POST", "/api/v1/blobs/batch", content=body,
                         headers={"x-ah-batch-bytes": str(total)})

    async def upload_file(self, path: Path, sha256: str, size: int,
                          progress: Progress | None = None) -> None:
        """Upload a local file as blob ``sha256``: one streamed PUT for small files, a
        resumable upload in segments for large ones (resumed where the hub says it stopped)."""
        if size <= SEGMENT:
            content = _file_chunks(path, 0, size, progress)
            await self._send("PUT", f"/api/v1/blobs/{sha256}", content=content,
                             headers={"x-ah-size": str(size), "content-length": str(size)})
            return
        upload_id, received = await self._resume_or_start(sha256, size)
        if upload_id is None:
            if progress:
                progress(size)
            return
        try:
            failures = resyncs = 0
            while received < size:
                end = min(received + SEGMENT, size)
                try:
                    result = await self._json(
                        "PATCH", f"/api/v1/uploads/{upload_id}",
                        content=_file_chunks(path, received, end, progress),
                        headers={"upload-offset": str(received),
                                 "content-length": str(end - received)},
                    )
                    received = int(result["received"])
                    failures = 0
                except (errors.HubUnavailable, errors.Conflict) as exc:
                    # A dropped connection, or the hub holding other bytes than we thought
                    # (the tail of a request cut earlier landed after we asked): ask it.
                    if isinstance(exc, errors.Conflict):
                        resyncs += 1
                        if resyncs > MAX_RESYNCS:
                            raise
                    else:
                        failures += 1
                        if failures > self.retries:
                            raise
                    status = await self._json("GET", f"/api/v1/uploads/{upload_id}")
                    log.warning("upload of %s interrupted at %d bytes; resuming at %d", path,
                                received, status["received"])
                    received = int(status["received"])
            await self._json("POST", f"/api/v1/uploads/{upload_id}/finish")
        except BaseException:
            # A later upload of the same blob through this client continues this one.
            self._unfinished.keep(sha256, upload_id)
            raise

    async def _resume_or_start(self, sha256: str, size: int) -> tuple[str | None, int]:
        """An unfinished upload of ``sha256`` this client began (and where the hub says it
        stopped), or a new one; ``(None, size)`` when the hub has the blob already. Taking
        the id out of the map keeps two concurrent uploads of one blob apart."""
        upload_id = self._unfinished.take(sha256)
        if upload_id is not None:
            try:
                status = await self._json("GET", f"/api/v1/uploads/{upload_id}")
            except errors.NotFound:
                pass  # finished, aborted or collected meanwhile: start again
            except BaseException:
                self._unfinished.keep(sha256, upload_id)  # still ours to resume next time
                raise
            else:
                log.info("resuming upload of blob %s at %d bytes", sha256, status["received"])
                return upload_id, int(status["received"])
        started = await self._json("POST", "/api/v1/uploads",
                                   json={"sha256": sha256, "size": size})
        if started["id"] is None:
            return None, size
        return str(started["id"]), int(started.get("received", 0))


class UnfinishedUploads:
    """Ids of resumable uploads a client began and did not finish, by blob, per hub and API
    key: in memory, or in a directory (a diskcache, safe across processes) so that ``ah
    commit`` run again after Ctrl-C, or a restarted mount, continues them. Taking an id removes
    it, which keeps two concurrent uploads of one blob apart."""

    def __init__(self, where: Path | None, scope: str) -> None:
        self._scope = scope
        self._memory: dict[str, str] = {}
        self._disk: Any = None
        if where is not None:
            import diskcache

            self._disk = diskcache.Cache(str(where), size_limit=16 << 20)

    def _key(self, sha256: str) -> str:
        return f"{self._scope} {sha256}"

    def take(self, sha256: str) -> str | None:
        if self._disk is None:
            return self._memory.pop(self._key(sha256), None)
        found = self._disk.pop(self._key(sha256), None)
        return found if isinstance(found, str) else None

    def keep(self, sha256: str, upload_id: str) -> None:
        if self._disk is None:
            self._memory[self._key(sha256)] = upload_id
        else:
            self._disk.set(self._key(sha256), upload_id, expire=7 * 86400)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()


class _StreamReader:
    """Exact reads from a response body (lines and byte counts)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        try:
            self._buffer += await self._chunks.__anext__()
            return True
        except StopAsyncIteration:
            return False

    async def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            if not await self._fill():
                raise errors.HubUnavailable("batch download ended early")
        line, _, _ = bytes(self._buffer).partition(b"\n")
        del self._buffer[: len(line) + 1]
        return line

    async def readexactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._fill():
                raise errors.HubUnavailable("batch download ended early")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def _partial_path(dest: Path) -> Path:
    """Where a download is written before its rename to ``dest``: a short name of its own,
    so it fits wherever ``dest`` does (a suffix on a 250-byte name would not)."""
    return dest.parent / f".ah-partial-{os.getpid()}-{random.getrandbits(48):012x}"


@contextlib.contextmanager
def local_names(object_path: str, dest: Path) -> Iterator[None]:
    """A name the local file system cannot hold becomes an error naming the object."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise OSError(errno.ENAMETOOLONG,
                      f"object {object_path!r} cannot be saved as {str(dest)[:200]!r}: the "
                      "local file system refuses a name or path that long") from None


def _write_atomically(dest: Path, data: bytes, mtime: float, mode: int = 0o644) -> None:
    tmp = _partial_path(dest)
    with local_names(dest.name, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_bytes(data)
            os.utime(tmp, (mtime, mtime))
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            _remove_partial(tmp)
            raise


def _remove_partial(tmp: Path) -> None:
    with contextlib.suppress(OSError):  # a path too long to make is too long to remove
        tmp.unlink(missing_ok=True)


async def _batch_body(files: Sequence[tuple[Path, str, int]],
                      progress: Progress | None) -> AsyncIterator[bytes]:
    manifest = {"blobs": [{"sha256": sha, "size": size} for _, sha, size in files]}
    yield json.dumps(manifest).encode() + b"\n"
    for path, _, size in files:
        async with contextlib.aclosing(_file_chunks(path, 0, size, progress)) as chunks:
            async for chunk in chunks:
                yield chunk


async def _file_chunks(path: Path, start: int, end: int,
                       progress: Progress | None) -> AsyncGenerator[bytes, None]:
    handle = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        await anyio.to_thread.run_sync(handle.seek, start)
        remaining = end - start
        while remaining > 0:
            chunk = await anyio.to_thread.run_sync(handle.read, min(CHUNK, remaining))
            if not chunk:
                raise errors.InvalidArgument(f"{path} shrank while it was being uploaded")
            remaining -= len(chunk)
            if progress:
                progress(len(chunk))
            yield chunk
    finally:
        handle.close()
