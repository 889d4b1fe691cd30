"""The hub over real HTTP: a real ah-server process on 127.0.0.1, driven through HubClient."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from ahmount.client import files, uploads
from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.errors import (
    AlreadyExists,
    Changed,
    ChecksumMismatch,
    HubUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RangeNotSatisfiable,
    StorageFull,
    Unauthenticated,
    UnknownChanges,
)
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import (
    HubProcess,
    PostgresCluster,
    S3Server,
    scale_args,
    small_disk,
    wait_until,
)
from tests.proxies import BodyCutter, Scripted, scripted_server
from tests.test_file_io import evict_from_memory


def client(server: HubProcess, user: str) -> HubClient:
    return HubClient(server.url, api_key=server.keys[user], retries=1)


async def upload(hub: HubClient, data: bytes, tmp: Path) -> tuple[str, int]:
    path = tmp / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    sha, size = hash_file(path)
    await hub.upload_file(path, sha, size)
    return sha, size


async def entry(hub: HubClient, path: str, data: bytes, tmp: Path) -> ObjectEntry:
    sha, size = await upload(hub, data, tmp)
    return ObjectEntry(path, sha, size, 1000.0)


@pytest.fixture
async def alice(hub_server: HubProcess) -> AsyncIterator[HubClient]:
    async with client(hub_server, "alice") as hub:
        yield hub


@pytest.fixture
async def bob(hub_server: HubProcess) -> AsyncIterator[HubClient]:
    async with client(hub_server, "bob") as hub:
        yield hub


@pytest.fixture
async def model(alice: HubClient, unique: str) -> AssetAddr:
    folder = FolderAddr("alice", "model", unique)
    await alice.create_folder(folder, ["nlp"], "test folder")
    addr = AssetAddr(folder, "gpt2")
    await alice.create_asset(addr, ["PyTorch"], "a model")
    return addr


async def test_health_openapi_and_auth(hub_server: HubProcess) -> None:
    async with httpx.AsyncClient(base_url=hub_server.url) as raw:
        assert (await raw.get("/healthz")).json() == {"status": "ok"}
        doc = (await raw.get("/api/v1/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        assert "/api/v1/assets/{owner}/{kind}/{folder}/{asset}/branches/{branch}/commits" in \
            doc["paths"]
        response = await raw.get("/api/v1/whoami")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
        response = await raw.get("/api/v1/folders/alice/model",
                                 headers={"authorization": "Bearer wrong"})
        assert response.status_code == 401
        response = await raw.post("/api/v1/folders/alice/model", content=b"{not json",
                                  headers={"authorization": f"Bearer {hub_server.keys['alice']}"})
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]
    async with HubClient(hub_server.url, api_key="nope", retries=0) as hub:
        with pytest.raises(Unauthenticated):
            await hub.whoami()
    async with client(hub_server, "alice") as hub:
        assert await hub.whoami() == "alice"


async def test_folders_and_assets_over_http(alice: HubClient, unique: str) -> None:
    folder = FolderAddr("alice", "dataset", unique)
    created = await alice.create_folder(folder, ["a"], "d")
    assert created.path == f"/alice/t9k-assethub/dataset/{unique}"
    with pytest.raises(AlreadyExists, match=created.path):
        await alice.create_folder(folder)
    assert unique in [f.name for f in await alice.list_folders("alice", "dataset")]
    updated = await alice.update_folder(folder, labels=["b", "c"], description="new")
    assert (updated.labels, updated.description) == (["b", "c"], "new")
    asset = AssetAddr(folder, "cifar10")
    await alice.create_asset(asset, description="images")
    assert [a.name for a in await alice.list_assets(folder)] == ["cifar10"]
    renamed = await alice.update_asset(asset, name="cifar100")
    assert renamed.path.endswith("/cifar100")
    with pytest.raises(NotFound, match="cifar10 does not exist"):
        await alice.get_asset(asset)
    await alice.delete_asset(AssetAddr(folder, "cifar100"))
    assert await alice.list_assets(folder) == []
    await alice.delete_folder(folder)
    with pytest.raises(NotFound, match=unique):
        await alice.get_folder(folder)


async def test_commit_flow_over_http(alice: HubClient, model: AssetAddr, tmp_path: Path) -> None:
    a = await entry(alice, "weights/a.bin", b"A" * 5000, tmp_path)
    b = await entry(alice, "config.json", b"{}", tmp_path)
    first = await alice.commit(model, "main", "first", adds=[a, b])
    assert first is not None
    assert await alice.missing_blobs([a.sha256, b.sha256]) == set()
    commit_id, objects = await alice.list_objects(model, "main")
    assert commit_id == first.id
    assert [o.path for o in objects] == ["config.json", "weights/a.bin"]
    page = await alice.list_page(model, "main", delimiter=True)
    assert ([o.path for o in page.objects], page.dirs) == (["config.json"], ["weights/"])
    assert await alice.read_range(model, "main", "weights/a.bin", 10, 20) == b"A" * 10
    # Staging under a session, refused with someone else's session, committed with its own.
    await alice.stage(model, "main", "mine", deletes=["config.json"])
    assert [c.path for c in await alice.changes(model, "main")] == ["config.json"]
    with pytest.raises(UnknownChanges, match="uncommitted"):
        await alice.commit(model, "main", "other", session="theirs")
    second = await alice.commit(model, "main", "second", session="mine")
    assert second is not None and second.parents == [first.id]
    assert await alice.commit(model, "main", "nothing") is None
    await alice.stage(model, "main", "x", deletes=["weights/"])
    assert await alice.reset(model, "main") == 1
    # Branch, tag, commit prefix, log, merge.
    branch = await alice.create_branch(model, "v1")
    assert branch.commit.message == "Repository created"
    await alice.commit(model, "v1", "on v1", adds=[b])
    tag = await alice.create_tag(model, "20220101", "v1")
    assert (await alice.resolve(model, "20220101")).commit.id == tag.commit.id
    assert (await alice.get_commit(model, tag.commit.id[:4])).id == tag.commit.id
    assert [n for n, _ in await alice.list_refs(model, "branch")] == ["main", "v1"]
    assert [n for n, _ in await alice.list_refs(model, "tag")] == ["20220101"]
    merged = await alice.merge(model, "v1")
    assert merged is not None and merged.parents == [second.id, tag.commit.id]
    assert [o.path for o in (await alice.list_objects(model, "main"))[1]] == ["config.json"]
    log = await alice.log(model, "main")
    assert log[0].id == merged.id and log[-1].message == "Repository created"
    await alice.delete_ref(model, "v1")
    with pytest.raises(InvalidArgument, match="cannot be deleted"):
        await alice.delete_ref(model, "main")


async def test_a_stale_expectation_is_refused_over_http(hub_server: HubProcess,
                                                        alice: HubClient, model: AssetAddr,
                                                        tmp_path: Path) -> None:
    a = await entry(alice, "log", b"1\n", tmp_path)
    b = await entry(alice, "log", b"1\n2\n", tmp_path)
    await alice.commit(model, "main", "first", adds=[a])
    with pytest.raises(Changed, match="'log' holds other bytes since"):
        await alice.commit(model, "main", "stale", adds=[b], expect={"log": b.sha256})
    with pytest.raises(Changed, match="'log' was made since"):
        await alice.commit(model, "main", "create", adds=[b], expect={"log": None})
    assert [o.sha256 for o in (await alice.list_objects(model, "main"))[1]] == [a.sha256]
    assert await alice.commit(model, "main", "append", adds=[b], expect={"log": a.sha256})
    async with httpx.AsyncClient(base_url=hub_server.url) as raw:  # what any client sees
        response = await raw.post(
            f"{alice._a(model)}/branches/main/commits",
            json={"message": "m", "adds": [], "expect": {"log": a.sha256}},
            headers={"authorization": f"Bearer {hub_server.keys['alice']}"})
    assert (response.status_code, response.json()["error"]["code"]) == (412, "changed")


async def test_an_answer_given_halfway_through_a_body_reaches_the_client(
        hub_server: HubProcess, alice: HubClient) -> None:
    """A PATCH at a wrong upload offset is refused once the first 8 MiB of its body are
    read. hypercorn then waited for room in the app's full body queue forever: the client,
    which reads the answer only after sending its body, hung until its write timed out
    (every other such request, by the keep-alive race). Several in a row, on one client."""
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url + "/api/v1", headers=headers,
                                 timeout=30) as raw:
        for i in range(6):
            started = await raw.post("/uploads", json={"sha256": f"{i:02x}" * 32,
                                                        "size": 100 << 20})
            upload_id = started.json()["id"]
            refused = await raw.patch(f"/uploads/{upload_id}", content=b"\0" * (20 << 20),
                                      headers={"upload-offset": "12345"})
            assert refused.status_code == 409, refused.text
            assert "a write at offset 12345 would leave a gap" in refused.json()["error"][
                "message"]
            assert (await raw.delete(f"/uploads/{upload_id}")).status_code == 204
    assert await alice.whoami() == "alice"


async def test_a_full_blob_store_is_a_clear_refusal_that_keeps_nothing(
        tmp_path: Path) -> None:
    """The hub's disk filled during an upload: the server logged a crash, answered 500,
    and the client hung until its write timed out. Now the client hears 507 naming what
    is full, the half-written upload is gone, and smaller blobs still fit."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        server = HubProcess(disk / "hub")
        server.add_user("carol")
        server.start()
        try:
            async with HubClient(server.url, api_key=server.keys["carol"], retries=0) as hub:
                for size in (24 << 20, 70 << 20):  # one request, and resumable segments
                    with pytest.raises(StorageFull, match="the hub's (blob store|database) "
                                                          "has no room left"):
                        await upload(hub, os.urandom(size), tmp_path)
                    assert list((disk / "hub/blobs/uploads").iterdir()) == []
                sha, _ = await upload(hub, b"small enough", tmp_path)
                assert await hub.missing_blobs([sha]) == set()
        finally:
            server.stop()
        log = server.log_path.read_text()
        assert "Traceback" not in log and "no room left" in log


async def test_a_database_that_goes_away_is_a_503_and_the_hub_comes_back_with_it(
        tmp_path: Path) -> None:
    """PostgreSQL stopped under a running hub: every request crashed (a traceback each in
    the log, 500 'internal error'). Now they answer 503, which clients retry, without the
    database's address; the hub answers again once the database is back."""
    from tests.conftest import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    server = HubProcess(tmp_path / "hub", ["--db", cluster.new_database()])
    try:
        (tmp_path / "hub").mkdir()
        server.add_user("dave")
        server.start()
        headers = {"authorization": f"Bearer {server.keys['dave']}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as raw:
            assert (await raw.get("/api/v1/folders/dave/model")).status_code == 200
            cluster.stop_server()
            for url in ("/api/v1/folders/dave/model", "/healthz"):
                answer = await raw.get(url)
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"] == {
                    "code": "unavailable", "path": None,
                    "message": "the hub's database is unavailable; try again shortly"}
            cluster.start_server()
            assert (await raw.get("/api/v1/folders/dave/model")).status_code == 200
    finally:
        server.stop()
        cluster.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "database unavailable: connection failed" in log


async def test_a_blob_store_that_goes_away_is_a_503(tmp_path: Path,
                                                   postgres: PostgresCluster) -> None:
    """The S3 store stopped under a running hub: reads and uploads of blobs crashed (a
    traceback each, 500). Now they answer 503 (clients retry it), naming no address."""
    s3 = S3Server(tmp_path)  # a private one: stopping the session's would hit other tests
    s3.start()
    server = HubProcess(tmp_path / "hub", scale_args(postgres, s3, "outage"))
    try:
        server.add_user("erin")
        server.start()
        async with HubClient(server.url, api_key=server.keys["erin"], retries=0) as hub:
            await upload(hub, b"stored before the outage", tmp_path)
            s3.stop()
            with pytest.raises(HubUnavailable):
                await upload(hub, b"new bytes", tmp_path)
        headers = {"authorization": f"Bearer {server.keys['erin']}"}
        answer = httpx.put(f"{server.url}/api/v1/blobs/{hashlib.sha256(b'x').hexdigest()}",
                           content=b"x", headers=headers, timeout=60)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["message"] == (
            "the hub's blob store is unavailable; try again shortly")
    finally:
        server.stop()
        s3.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "blob store unavailable" in log


@pytest.mark.parametrize("size", [1 << 20, 5 * (1 << 20) + 3], ids=["streamed", "direct"])
async def test_download_verifies_and_is_atomic(alice: HubClient, model: AssetAddr,
                                               tmp_path: Path, size: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ahmount.client import files

    direct_calls: list[str] = []
    real = files._download_directly

    def spy(*args: object) -> None:
        direct_calls.append("x")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "_download_directly", spy)
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    e = await entry(alice, "x/data.bin", data, tmp_path)
    await alice.commit(model, "main", "x", adds=[e])
    dest = tmp_path / "out" / "data.bin"
    told: list[int] = []
    await alice.download(model, "main", e, dest, told.append)
    assert dest.read_bytes() == data and sum(told) == size
    assert dest.stat().st_mtime == 1000.0
    assert len(direct_calls) == (size >= files.DIRECT_DOWNLOAD)
    # A wrong expected hash: ChecksumMismatch and no file under the final name.
    wrong = ObjectEntry(e.path, "f" * 64, e.size, e.mtime)
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(ChecksumMismatch, match="x/data.bin"):
        await alice.download(model, "main", wrong, bad)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["data.bin"]


async def test_a_cancelled_download_stops_and_leaves_nothing(
        alice: HubClient, model: AssetAddr, tmp_path: Path) -> None:
    data = os.urandom(9 << 20)  # read directly, in a worker thread, 4 MiB a piece
    e = await entry(alice, "big.bin", data, tmp_path)
    await alice.commit(model, "main", "big", adds=[e])
    dest = tmp_path / "out" / "big.bin"
    told: list[int] = []

    def progress(n: int) -> None:
        told.append(n)
        scope.cancel()

    with trio.CancelScope() as scope:
        await alice.download(model, "main", e, dest, progress)
    assert scope.cancelled_caught and told == [4 << 20]  # stopped at the next piece
    assert list(dest.parent.iterdir()) == []


async def test_range_etag_and_head(hub_server: HubProcess, alice: HubClient, model: AssetAddr,
                                   tmp_path: Path) -> None:
    e = await entry(alice, "r.bin", b"0123456789", tmp_path)
    c = await alice.commit(model, "main", "r", adds=[e])
    assert c is not None
    f = model.folder
    url = f"/api/v1/assets/alice/model/{f.name}/gpt2/refs/{c.id[:8]}/files/r.bin"
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        r = await raw.get(url, headers={"range": "bytes=2-4"})
        assert (r.status_code, r.content, r.headers["content-range"]) == \
            (206, b"234", "bytes 2-4/10")
        assert (await raw.get(url, headers={"range": "bytes=-3"})).content == b"789"
        assert (await raw.get(url, headers={"range": "bytes=50-"})).status_code == 416
        etag = r.headers["etag"]
        assert etag == f'"{e.sha256}"'
        assert (await raw.get(url, headers={"if-none-match": etag})).status_code == 304
        head = await raw.head(url)
        assert (head.status_code, head.headers["content-length"]) == (200, "10")
        listing = f"/api/v1/assets/alice/model/{f.name}/gpt2/refs/main/objects"
        first = await raw.get(listing)
        again = await raw.get(listing, headers={"if-none-match": first.headers["etag"]})
        assert again.status_code == 304
    with pytest.raises(RangeNotSatisfiable):
        await alice.read_range(model, "main", "r.bin", 20, 30)


def evict_blobs(server: HubProcess) -> None:
    """Drop the hub's blob files from the page cache: the next read waits for the disk."""
    for path in (server.data_dir / "blobs").rglob("*"):
        if path.is_file():
            evict_from_memory(path)


async def test_bodies_read_cached_or_waiting_are_the_same_bytes(
        hub_server: HubProcess, alice: HubClient, model: AssetAddr, tmp_path: Path) -> None:
    """Object and read-URL bodies of each size class (read with the lookup; one body read on
    the event loop when the page cache holds it, or in a worker thread; streamed), warm and
    evicted: the hub reads on its event loop only what cannot wait, and gives the same
    bytes either way."""
    sizes = {"small.bin": 100 << 10, "mid.bin": (1 << 20) + 7, "big.bin": (5 << 20) + 3}
    datas = {name: os.urandom(size) for name, size in sizes.items()}
    entries = [await entry(alice, name, data, tmp_path) for name, data in datas.items()]
    assert await alice.commit(model, "main", "sizes", adds=entries) is not None
    base = f"/api/v1/assets/alice/model/{model.folder.name}/gpt2/refs/main/files"
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        for evicted in (False, True):
            for name, data in datas.items():
                if evicted:
                    evict_blobs(hub_server)
                whole = await raw.get(f"{base}/{name}")
                assert whole.status_code == 200 and whole.content == data, (name, evicted)
                if evicted:
                    evict_blobs(hub_server)
                part = await raw.get(f"{base}/{name}", headers={"range": "bytes=3-"})
                assert part.content == data[3:], (name, evicted)
                if evicted:
                    evict_blobs(hub_server)
                granted = await raw.get(whole.headers["x-ah-read-url"],
                                        headers={"range": f"bytes=1-{len(data) - 2}"})
                assert granted.content == data[1:-1], (name, evicted)


async def test_permissions_over_http(alice: HubClient, bob: HubClient, model: AssetAddr,
                                     tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await bob.get_folder(model.folder)
    with pytest.raises(NotFound):
        await bob.list_objects(model, "main")
    assert model.folder.name not in [f.name for f in await bob.list_folders("alice", "model")]
    e = await entry(bob, "bob.bin", b"bob", tmp_path)
    with pytest.raises(NotFound):
        await bob.commit(model, "main", "intrusion", adds=[e])
    await alice.share_folder(model.folder, "bob", "view")
    assert (await bob.get_folder(model.folder)).permission == "view"
    with pytest.raises(PermissionDenied, match="may not change"):
        await bob.commit(model, "main", "viewer", adds=[e])
    with pytest.raises(PermissionDenied):
        await bob.create_folder(FolderAddr("alice", "model", "bobs"))
    await alice.share_folder(model.folder, "bob", "edit")
    assert await bob.commit(model, "main", "editor", adds=[e]) is not None
    await alice.share_folder(model.folder, "bob", None)
    with pytest.raises(NotFound):
        await bob.get_asset(model)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("/api/v1/folders/alice/model/%2E%2E", "not allowed"),
        ("/api/v1/folders/alice/weights/x", "kind 'weights'"),
        ("/api/v1/folders/alice/model/" + "x" * 200, "at most 128"),
        ("/api/v1/folders/alice/model/a%00b", "NUL"),
    ],
)
async def test_bad_urls_name_what_is_wrong(hub_server: HubProcess, url: str,
                                           fragment: str) -> None:
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        response = await raw.get(url)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


async def test_unknown_routes_answer_json(hub_server: HubProcess) -> None:
    async with httpx.AsyncClient(base_url=hub_server.url) as raw:
        missing = await raw.get("/api/v1/nothing/here")
        wrong_method = await raw.delete("/api/v1/whoami")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert "DELETE" in wrong_method.json()["error"]["message"]


async def test_bad_refs_and_prefixes(alice: HubClient, model: AssetAddr) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        await alice.resolve(model, "nope")
    with pytest.raises(InvalidArgument, match="4 to 64"):
        await alice.get_commit(model, "abc")
    with pytest.raises(NotFound, match="at least 4"):
        await alice.list_objects(model, "abc")


async def test_blob_upload_rejections(hub_server: HubProcess, alice: HubClient,
                                      tmp_path: Path) -> None:
    data = b"z" * 10_000
    sha = hashlib.sha256(data).hexdigest()
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        wrong = await raw.put(f"/api/v1/blobs/{sha}", content=data[:-1] + b"y")
        assert wrong.status_code == 422
        assert sha in wrong.json()["error"]["message"]
        bad = await raw.put("/api/v1/blobs/xyz", content=b"1")
        assert bad.status_code == 400
    assert await alice.missing_blobs([sha]) == {sha}
    # A body cut short by a client that goes away: nothing becomes visible.
    host, port = "127.0.0.1", hub_server.port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            f"PUT /api/v1/blobs/{sha} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {hub_server.keys['alice']}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:1000]
        )
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    assert await alice.missing_blobs([sha]) == {sha}


async def test_batch_upload_keeps_the_intact_blobs(hub_server: HubProcess,
                                                   alice: HubClient, tmp_path: Path) -> None:
    good = [os.urandom(100 + i) for i in range(3)]
    bad = b"corrupt me"
    manifest = {"blobs": [{"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for d in [*good, bad]]}
    body = json.dumps(manifest).encode() + b"\n" + b"".join(good) + b"corrupt it"
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        response = await raw.post("/api/v1/blobs/batch", content=body)
        assert response.status_code == 422
        assert manifest["blobs"][3]["sha256"] in response.json()["error"]["message"]
        bad_manifest = await raw.post("/api/v1/blobs/batch", content=b"{nope\n")
        assert bad_manifest.status_code == 400
    hashes = [b["sha256"] for b in manifest["blobs"]]
    assert await alice.missing_blobs(hashes) == {hashes[3]}
    # A bad blob between good ones: those before it stay, it and those after it do not.
    later = [os.urandom(64) for _ in range(2)]
    middle = {"blobs": [{"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                        for d in [later[0], bad, later[1]]]}
    body = json.dumps(middle).encode() + b"\n" + later[0] + b"corrupt it" + later[1]
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        assert (await raw.post("/api/v1/blobs/batch", content=body)).status_code == 422
        # Truncated: the blobs that arrived whole stay.
        cut = json.dumps(middle).encode() + b"\n" + later[0]
        response = await raw.post("/api/v1/blobs/batch", content=cut)
        assert response.status_code == 400 and "truncated" in response.text
    assert await alice.missing_blobs([b["sha256"] for b in middle["blobs"]]) == {
        hashes[3], middle["blobs"][2]["sha256"]}
    # Through the client: files travel in one request.
    paths = []
    for i in range(5):
        p = tmp_path / f"small{i}"
        p.write_bytes(os.urandom(50))
        paths.append((p, *hash_file(p)))
    await alice.upload_batch(paths)
    assert await alice.missing_blobs([sha for _, sha, _ in paths]) == set()


async def test_a_batch_of_many_files_travels_whole_and_a_shrunk_file_is_named(
        alice: HubClient, model: AssetAddr, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "READ_TOGETHER_FILES", 7)  # groups of the read, not of 64
    files = []
    for i in range(150):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(i * 13))
        files.append((p, *hash_file(p)))
    sent: list[int] = []
    await alice.upload_batch(files, sent.append)
    assert sum(sent) == sum(size for _, _, size in files)
    assert await alice.missing_blobs([sha for _, sha, _ in files]) == set()
    adds = [ObjectEntry(f"d/{p.name}", sha, size, 1.0) for p, sha, size in files]
    await alice.commit(model, "main", "many", adds=adds)
    assert await alice.read_range(model, "main", "d/f149", 0, 149 * 13) == \
        files[149][0].read_bytes()
    # A file that shrank after it was hashed: refused, naming it.
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    entry_of = (victim, *hash_file(victim))
    victim.write_bytes(b"x" * 10)
    with pytest.raises(InvalidArgument, match="victim shrank"):
        await alice.upload_batch([files[0], entry_of])


async def test_resumable_upload_of_a_large_blob(alice: HubClient, model: AssetAddr,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "SEGMENT", 1 << 20)
    data = bytes(range(256)) * (5 * 4096 + 7)
    sha, size = await upload(alice, data, tmp_path)
    assert size > 5 * (1 << 20)
    assert await alice.missing_blobs([sha]) == set()
    c = await alice.commit(model, "main", "big", adds=[ObjectEntry("big.bin", sha, size, 1.0)])
    assert c is not None
    assert await alice.read_range(model, "main", "big.bin", size - 5, size) == data[-5:]


class CuttingProxy:
    """A TCP proxy to the hub that can cut every connection once ``cut_after`` bytes went
    upstream in total: a network that fails in the middle of an upload; and cut the
    connections of the next ``drop_answers`` answers instead of passing them on: a request
    the hub carried out whose answer was lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.upstream = 0
        self.cut_after: int | None = None
        self.drop_answers = 0

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        hub = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, hub, trio.open_nursery() as nursery:
            async def up() -> None:
                async for data in client:
                    if self.cut_after is not None and \
                            self.upstream + len(data) > self.cut_after:
                        nursery.cancel_scope.cancel()  # both sides see a dead connection
                        return
                    self.upstream += len(data)
                    await hub.send_all(data)

            async def down() -> None:
                async for data in hub:
                    if self.drop_answers:
                        self.drop_answers -= 1
                        break
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)


async def test_a_commit_whose_answer_was_lost_is_sent_again_and_made_once(
        hub_server: HubProcess, model: AssetAddr, tmp_path: Path) -> None:
    """An append (a commit expecting the file it read) whose answer never arrived: the
    client sends it again with its Idempotency-Key and gets the commit the hub made. It
    used to fail as not safe to repeat, and a retry by hand appended a second time. A key
    the hub cannot take is refused by name, and a hub that predates keys ignores them (a
    header, where its body schema would refuse a new field)."""
    proxy = CuttingProxy(hub_server.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with HubClient(f"http://127.0.0.1:{port}", api_key=hub_server.keys["alice"],
                             retries=2) as hub:
            first = await entry(hub, "log.txt", b"one\n", tmp_path)
            await hub.commit(model, "main", "first", adds=[first])
            both = await entry(hub, "log.txt", b"one\ntwo\n", tmp_path)
            proxy.drop_answers = 1
            made = await hub.commit(model, "main", "append", adds=[both],
                                    expect={"log.txt": first.sha256})
            assert proxy.drop_answers == 0  # the answer was lost once
            log = await hub.log(model, "main")
            assert made is not None and made.id == log[0].id
            assert [c.message for c in log[:3]] == ["append", "first", "Repository created"]
            assert await hub.read_range(model, "main", "log.txt", 0, 8) == b"one\ntwo\n"
        nursery.cancel_scope.cancel()
    answer = httpx.post(
        f"{hub_server.url}/api/v1/assets/alice/model/{model.folder.name}/{model.name}/"
        "branches/main/commits", json={"message": "m"}, timeout=60,
        headers={"authorization": f"Bearer {hub_server.keys['alice']}",
                 "idempotency-key": "x" * 65})
    assert answer.status_code == 400, answer.text
    assert "Idempotency-Key must be a printable ASCII string" in answer.json()["error"]["message"]


async def small_files(hub: HubClient, model: AssetAddr, tmp_path: Path,
                      count: int) -> dict[ObjectEntry, bytes]:
    """``count`` files of 4 KiB committed to ``model``'s main in one batch: entry -> bytes."""
    made: dict[ObjectEntry, bytes] = {}
    local = []
    for i in range(count):
        data = os.urandom(4096)
        path = tmp_path / f"small-{i}"
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        local.append((path, sha, len(data)))
        made[ObjectEntry(f"d/{i:03d}.bin", sha, len(data), 1.0)] = data
    await hub.upload_batch(local)
    await hub.commit(model, "main", "small files", adds=list(made))
    return made


async def test_a_batch_that_breaks_off_is_resumed_with_the_objects_not_sent(
        hub_server: HubProcess, model: AssetAddr, alice: HubClient, tmp_path: Path) -> None:
    """A batch answer (many small objects in one response) cut in the middle: the client
    asks for the objects it did not get, and each arrives once; ``ah download`` of them
    is whole. It used to fail the whole batch."""
    made = await small_files(alice, model, tmp_path, 300)
    proxy = BodyCutter(hub_server.port, cut_after=600 << 10, cuts=1)
    try:
        async with HubClient(proxy.url, api_key=hub_server.keys["alice"],
                             backoff=0.01) as hub:
            got = [(e, data) async for e, data in files.read_batch(hub, model, "main",
                                                                  list(made))]
            assert proxy.cut == 1
            assert len(got) == len(made) and dict(got) == made
            out = tmp_path / "out"
            proxy.cuts_left = 1
            await hub.download_batch(model, "main", [(e, out / e.path) for e in made])
            assert proxy.cut == 2
            assert {e: (out / e.path).read_bytes() for e in made} == made
    finally:
        proxy.close()


async def test_a_batch_that_keeps_breaking_off_fails_after_its_resumes(
        hub_server: HubProcess, model: AssetAddr, alice: HubClient, tmp_path: Path) -> None:
    made = await small_files(alice, model, tmp_path, 300)
    proxy = BodyCutter(hub_server.port, cut_after=100 << 10, cuts=None)
    try:
        async with HubClient(proxy.url, api_key=hub_server.keys["alice"],
                             backoff=0.01) as hub:
            with pytest.raises(HubUnavailable, match="a batch of .* broke off"):
                async for _ in files.read_batch(hub, model, "main", list(made)):
                    pass
        assert proxy.cut == 4  # the first answer and three resumes
    finally:
        proxy.close()


def six_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes, str, int]:
    """A file that a resumable upload sends in six 1 MiB segments: ``(path, data, sha, size)``."""
    monkeypatch.setattr(uploads, "SEGMENT", 1 << 20)
    data = os.urandom(6 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    sha, size = hash_file(path)
    return path, data, sha, size


async def test_an_interrupted_upload_resumes_on_the_next_attempt(
        hub_server: HubProcess, model: AssetAddr, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path, data, sha, size = six_segments(tmp_path, monkeypatch)
    proxy = CuttingProxy(hub_server.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        async with HubClient(f"http://127.0.0.1:{port}", api_key=hub_server.keys["alice"],
                             retries=0) as hub:
            proxy.cut_after = (5 << 20) // 2  # mid-way through the third segment
            with pytest.raises(httpx.TransportError):
                await hub.upload_file(path, sha, size)
            proxy.cut_after, before = None, proxy.upstream
            await hub.upload_file(path, sha, size)
            resent = proxy.upstream - before
            assert await hub.missing_blobs([sha]) == set()
        nursery.cancel_scope.cancel()
    # The second attempt sent what the hub lacked (it keeps the part of a segment that arrived
    # before the cut), never the two whole segments it had; at most one segment is sent twice
    # (when the cut request's tail lands after the client asked where to resume).
    assert size - (5 << 20) // 2 <= resent < size - (1 << 20) + (64 << 10), resent
    async with client(hub_server, "alice") as alice:
        await alice.commit(model, "main", "big", adds=[ObjectEntry("b.bin", sha, size, 1.0)])
        assert await alice.read_range(model, "main", "b.bin", 0, 1 << 20) == data[:1 << 20]


async def test_the_next_process_resumes_an_interrupted_upload(
        hub_server: HubProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that kept its upload ids in a directory (as ``ah`` and ``ah-mount`` do) lets a
    new client, e.g. ``ah commit`` run again after Ctrl-C, continue the upload."""
    path, _, sha, size = six_segments(tmp_path, monkeypatch)
    proxy = CuttingProxy(hub_server.port)
    ids = tmp_path / "upload-ids"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        url, key = f"http://127.0.0.1:{port}", hub_server.keys["alice"]
        proxy.cut_after = (7 << 20) // 2
        async with HubClient(url, api_key=key, retries=0, upload_ids=ids) as first:
            with pytest.raises(httpx.TransportError):
                await first.upload_file(path, sha, size)
        proxy.cut_after, before = None, proxy.upstream
        async with HubClient(url, api_key=key, retries=0, upload_ids=ids) as second:
            await second.upload_file(path, sha, size)
            assert await second.missing_blobs([sha]) == set()
        nursery.cancel_scope.cancel()
    resent = proxy.upstream - before
    assert size - (7 << 20) // 2 <= resent < size - (2 << 20) + (64 << 10), resent


async def test_two_clients_commit_to_one_branch_at_once(hub_server: HubProcess,
                                                        model: AssetAddr,
                                                        tmp_path: Path) -> None:
    async def writer(user: str, n: int) -> None:
        async with client(hub_server, user) as hub:
            for i in range(6):
                e = await entry(hub, f"{user}/{i}", f"{user}{n}{i}".encode(), tmp_path)
                assert await hub.commit(model, "main", f"{user} {i}", adds=[e]) is not None

    async with client(hub_server, "alice") as hub:
        await hub.share_folder(model.folder, "bob", "edit")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "alice", 1)
        nursery.start_soon(writer, "bob", 2)
    async with client(hub_server, "alice") as hub:
        _, objects = await hub.list_objects(model, "main")
        assert len(objects) == 12
        assert len(await hub.log(model, "main")) == 13


async def test_transport_failure_is_an_httpx_error(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with HubClient(f"http://127.0.0.1:{port}", api_key="k", retries=1,
                         backoff=0.01) as hub:
        with pytest.raises(httpx.HTTPError, match="unreachable"):
            await hub.whoami()


class _Portal(Scripted):
    """What a captive portal or a misrouted proxy answers to anything: 200 and a page."""

    def do_GET(self) -> None:
        self.answer(200, b"<html><body>Sign in to continue</body></html>",
                    {"content-type": "text/html"})


async def test_a_page_in_place_of_the_hubs_answer_is_the_hub_failing() -> None:
    """A proxy's page answered with 200 raised the JSON parser's ValueError: ``ah`` printed
    a parser message, and a mount's background task took it for a bug and shut the mount
    down. Now it is HubUnavailable, naming the answer and asking what answers there."""
    with scripted_server(_Portal) as url:
        async with HubClient(url, api_key="k", retries=0) as hub:
            with pytest.raises(HubUnavailable, match=r"the answer is not JSON \(text/html, "
                               r"b'<html><body>Sign in.*is something other than the hub "
                               f"answering at {url}"):
                await hub.whoami()


class _Twice(Scripted):
    """A batch answer (grouped) that sends its first object twice: no real hub does."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        body = b"".join(json.dumps([{"path": p, "size": 1}]).encode() + b"\n" + p.encode()
                        for p in ("a", "a", "b"))
        self.answer(200, body, {"x-ah-batch": "grouped"})


async def test_a_batch_that_sends_an_object_twice_still_gives_each_one() -> None:
    """Taking what arrived out of what is left raised KeyError at the repeat (in a mount's
    sibling fetch, a bug that ends the mount)."""
    wanted = [ObjectEntry(p, hashlib.sha256(p.encode()).hexdigest(), 1, 1.0) for p in "ab"]
    addr = AssetAddr(FolderAddr("alice", "model", "f"), "m")
    with scripted_server(_Twice) as url:
        async with HubClient(url, api_key="k", retries=0) as hub:
            got = [(e.path, data) async for e, data in files.read_batch(hub, addr, "main",
                                                                      wanted)]
    assert got == [("a", b"a"), ("a", b"a"), ("b", b"b")]


async def test_batch_download_of_small_objects(hub_server: HubProcess, alice: HubClient,
                                               model: AssetAddr, tmp_path: Path) -> None:
    from ahmount.transfer.download import download_objects

    small = [await entry(alice, f"s/{i}.txt", f"small {i}".encode(), tmp_path)
             for i in range(30)]
    big = await entry(alice, "big.bin", os.urandom(3 << 20), tmp_path)
    await alice.commit(model, "main", "mixed", adds=[*small, big])
    written = await download_objects(alice, model, "main", None, tmp_path / "out")
    assert len(written) == 31
    for i in range(30):
        assert (tmp_path / "out" / "s" / f"{i}.txt").read_text() == f"small {i}"
    assert (tmp_path / "out/big.bin").stat().st_size == 3 << 20
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    f = model.folder
    url = f"/api/v1/assets/alice/model/{f.name}/gpt2/refs/main/batch"
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        missing = await raw.post(url, json={"paths": ["s/0.txt", "nope.txt"]})
        assert missing.status_code == 404 and "nope.txt" in missing.text
        bad = await raw.post(url, json={"paths": ["../x"]})
        assert bad.status_code == 400


async def test_a_batch_mixes_grouped_small_and_streamed_large_objects(
        hub_server: HubProcess, alice: HubClient, model: AssetAddr, tmp_path: Path) -> None:
    """Small objects travel in groups read at once, large ones streamed, empty ones as a
    header alone: every one arrives whole, hash-checked, in the order asked."""
    from ahmount.client.files import read_batch

    sizes = [0, 100, 300 << 10, 50, 2 << 20, 0, *([7] * 300), 10]
    blobs = {f"mix/{i:04d}.bin": os.urandom(n) for i, n in enumerate(sizes)}
    entries = [await entry(alice, p, data, tmp_path) for p, data in blobs.items()]
    await alice.commit(model, "main", "mix", adds=entries)
    got = [(e.path, data) async for e, data in read_batch(alice, model, "main", entries)]
    assert got == list(blobs.items())


async def test_a_grouped_batch_has_a_header_line_per_group(
        hub_server: HubProcess, alice: HubClient, model: AssetAddr, tmp_path: Path) -> None:
    """Asked with `x-ah-batch: grouped`, the hub sends the first object alone, then the
    small ones under one header line, a large one alone; asked without, a line per object.
    The client reads both answers to the same objects."""
    from ahmount.client.files import read_batch_groups

    sizes = [10, 20, 30, 300 << 10, 40, 0]
    blobs = {f"grp/{i}.bin": os.urandom(n) for i, n in enumerate(sizes)}
    entries = [await entry(alice, p, data, tmp_path) for p, data in blobs.items()]
    await alice.commit(model, "main", "groups", adds=entries)
    url = f"/api/v1/assets/alice/model/{model.folder.name}/gpt2/refs/main/batch"
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw:
        grouped = await raw.post(url, json={"paths": list(blobs)},
                                 headers={"x-ah-batch": "grouped"})
        plain = await raw.post(url, json={"paths": list(blobs)})
    assert grouped.headers["x-ah-batch"] == "grouped" and "x-ah-batch" not in plain.headers
    body, groups = grouped.content, []
    while body:
        line, _, body = body.partition(b"\n")
        group = json.loads(line)
        size = sum(h["size"] for h in group)
        groups.append(([h["path"] for h in group], body[:size]))
        body = body[size:]
    names = list(blobs)
    assert groups == [(names[:1], blobs[names[0]]),
                      (names[1:3], blobs[names[1]] + blobs[names[2]]),
                      (names[3:4], blobs[names[3]]),
                      (names[4:], blobs[names[4]] + blobs[names[5]])]
    first = json.loads(plain.content.partition(b"\n")[0])
    assert first["path"] == names[0] and first["sha256"] == entries[0].sha256
    for ask_grouped, shapes in ((True, [1, 2, 1, 2]), (False, [1] * 6)):
        got = [group async for group in read_batch_groups(alice, model, "main", entries,
                                                          grouped=ask_grouped)]
        assert [len(group) for group in got] == shapes
        assert [(e.path, data) for group in got for e, data in group] == list(blobs.items())


@pytest.mark.parametrize(("line", "grouped", "named"), [
    (b"{nope", False, "bad header line"),
    (b'{"path": "a"}', False, "bad header line"),
    (b'{"path": "a", "size": 1}', True, "bad header line"),
    (b'[{"path": "a", "size": "x"}]', True, "bad header line"),
    (b'[{"path": "a", "size": 1}, {"path": "b", "size": 2}]', True, "'b', which was not asked"),
])
def test_a_bad_batch_header_is_the_hub_failing(line: bytes, grouped: bool,
                                               named: str) -> None:
    """An answer the request did not ask for fails the batch as the hub's fault (its readers
    fetch their own), never as a bug that would end the mount."""
    from ahmount.client.files import _batch_headers

    asked = {"a": ObjectEntry("a", "0" * 64, 1, 0.0)}
    with pytest.raises(HubUnavailable, match=named):
        _batch_headers(line, grouped, asked)
    assert _batch_headers(b'[{"path": "a", "size": 1}]', True, asked) == [("a", 1)]


async def test_knowing_a_hash_reads_nothing_over_http(hub_server: HubProcess, alice: HubClient,
                                                      model: AssetAddr, unique: str,
                                                      tmp_path: Path) -> None:
    """The report: carol commits alice's private blob by its hash and downloads it."""
    secret = f"alice's private file {unique}".encode()
    await alice.commit(model, "main", "private",
                       adds=[await entry(alice, "secret.txt", secret, tmp_path)])
    sha = hashlib.sha256(secret).hexdigest()
    carol = {"authorization": f"Bearer {hub_server.keys['carol']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=carol) as raw:
        api = "/api/v1"
        made = await raw.post(f"{api}/folders/carol/model", json={"name": f"cf{unique}"})
        assert made.status_code == 201, made.text
        made = await raw.post(f"{api}/folders/carol/model/cf{unique}/assets",
                              json={"name": "c"})
        assert made.status_code == 201, made.text
        answers = []
        for size in (len(secret), 29):
            stolen = await raw.post(
                f"{api}/assets/carol/model/cf{unique}/c/branches/main/commits",
                json={"message": "x", "adds": [{"path": "stolen", "sha256": sha,
                                                "size": size}]})
            answers.append((stolen.status_code, stolen.json()["error"]["message"]))
        assert {code for code, _ in answers} == {400}
        assert all("never uploaded" in message and str(size) not in message.split(sha)[-1]
                   for (_, message), size in zip(answers, (len(secret), 29), strict=True))
        missing = await raw.post(f"{api}/blobs/missing", json={"hashes": [sha]})
        assert missing.json()["missing"] == [sha]
        started = await raw.post(f"{api}/uploads", json={"sha256": sha, "size": len(secret)})
        assert started.json()["id"] is not None
        empty = await raw.put(f"{api}/blobs/{sha}", content=b"", headers={"x-ah-size": "0"})
        assert empty.status_code >= 400 and "existed" not in empty.text
        listed = await raw.get(f"{api}/assets/carol/model/cf{unique}/c/refs/main/objects")
        assert listed.status_code == 200 and sha not in listed.text


@pytest.mark.parametrize("path", ["/api/v1/folders/bad..name/model",
                                  "/api/v1/folders/alice/nokind",
                                  "/api/v1/assets/alice/model/x/y/refs/%00/objects",
                                  "/api/v1/folders/alice/model/f/assets",
                                  "/api/v1/folders/alice/model/bad..name",
                                  "/api/v1/assets/alice/model/f/bad..name",
                                  # the object route authenticates in its own first step
                                  "/api/v1/assets/alice/model/bad..f/y/refs/%00/files/x",
                                  "/api/v1/assets/alice/model/f/y/refs/main/files/..%2Fx"])
async def test_no_key_is_401_before_any_validation(hub_server: HubProcess, path: str) -> None:
    async with httpx.AsyncClient(base_url=hub_server.url) as raw:
        for method in ("GET", "POST"):
            answer = await raw.request(method, path, content=b"{not json")
            assert answer.status_code in (401, 405), (method, path, answer.text)
            if answer.status_code == 401:
                assert answer.json()["error"]["code"] == "unauthenticated"


async def test_an_answer_before_the_body_was_read_closes_the_connection(
        hub_server: HubProcess) -> None:
    """The hub answers 401 without reading the body, so it cannot reuse the connection: it
    says so (``Connection: close``) rather than let a keep-alive client send its next request
    into a connection being closed (that request then gets no answer at all)."""
    host, port = "127.0.0.1", hub_server.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST /api/v1/blobs/missing HTTP/1.1\r\nHost: {host}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 9\r\n\r\n".encode())
        answer = b""  # the body is never sent: the answer must not wait for it
        while chunk := sock.recv(65536):  # ends when the hub closes the connection
            answer += chunk
    head = answer.decode("latin-1").lower()
    assert head.startswith("http/1.1 401"), head[:200]
    assert "\r\nconnection: close\r\n" in head
    key = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=key) as raw:
        read = await raw.post("/api/v1/blobs/missing", json={"hashes": []})  # body read
        plain = await raw.get("/api/v1/whoami")  # no body
        early = await raw.request("GET", "/api/v1/whoami", content=b"{not json",
                                  headers={"authorization": "Bearer nope"})
        after = await raw.get("/api/v1/whoami")  # a new connection, answered
    assert (read.status_code, plain.status_code, early.status_code, after.status_code) == \
        (200, 200, 401, 200)
    assert "connection" not in read.headers and "connection" not in plain.headers
    assert early.headers["connection"] == "close"


async def test_folder_listings_of_unknown_users_look_empty(alice: HubClient) -> None:
    assert await alice.list_folders("nosuchuser", "model") == []


BAD_BODIES = [
    # (route under the asset or folder, body as raw JSON text, the field the error names)
    ("folders", '{"name": "f", "labels": ["x\\udc80"]}', "lone"),
    ("folders", '{"name": "f", "labels": "abc"}', "labels"),
    ("folders", '{"name": "f", "labels": {"a": 1}}', "labels"),
    ("folders", '{"name": "f", "description": "d\\ud800"}', "not valid JSON"),
    ("commits", '{"message": "m", "metadata": {"k": "\\udc80"}}', "lone"),
    ("commits", '{"message": "m\\udc80"}', "lone"),
    ("commits", '{"message": "m", "adds": [{"path": "a", "sha256": "%s", "size": 1, '
                '"content_type": "text/plain\\r\\nX-Evil: 1"}]}', "content_type"),
    ("commits", '{"message": "m", "adds": [{"path": "a", "sha256": "%s", "size": 1, '
                '"mtime": Infinity}]}', "adds.0.mtime"),
    ("commits", '{"message": "m", "adds": [{"path": "a", "sha256": "%s", "size": 1, '
                '"mtime": NaN}]}', "adds.0.mtime"),
    ("commits", '{"message": "m", "adds": [{"path": "a", "sha256": "%s", "size": 1, '
                '"mtime": 1e300}]}', "mtime"),
    ("commits", '{"message": "m", "adds": [{"path": "a\\nb", "sha256": "%s", "size": 1}]}',
     "control character"),
    ("commits", '{"message": "m", "adds": [{"path": "\\u001b[31mred", "sha256": "%s", '
                '"size": 1}]}', "control character"),
    ("commits", '{"message": "m", "metadata": ' + '{"a": ' * 1000 + '1' + '}' * 1000 + '}',
     "JSON"),
    ("uploads", '{"sha256": "%s", "size": 1000000000000000000000000000000}', "size"),
    ("commits", '{"message": "m", "surprise": 1}', "surprise"),
]


@pytest.mark.parametrize(("route", "raw", "named"), BAD_BODIES)
async def test_bad_bodies_are_400_naming_the_field_and_change_nothing(
        hub_server: HubProcess, alice: HubClient, model: AssetAddr, route: str, raw: str,
        named: str) -> None:
    urls = {"folders": "/api/v1/folders/alice/model",
            "commits": f"/api/v1/assets/alice/model/{model.folder.name}/gpt2/branches/main/"
                       "commits",
            "uploads": "/api/v1/uploads"}
    body = raw.replace("%s", "a" * 64)
    headers = {"authorization": f"Bearer {hub_server.keys['alice']}",
               "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=hub_server.url, headers=headers) as raw_client:
        answer = await raw_client.post(urls[route], content=body.encode())
        assert answer.status_code == 400, answer.text
        assert named in answer.json()["error"]["message"]
        # Nothing was stored, and every listing still answers.
        for url in ("/api/v1/folders/alice/model",
                    f"/api/v1/assets/alice/model/{model.folder.name}/gpt2/refs/main/log",
                    f"/api/v1/assets/alice/model/{model.folder.name}/gpt2/refs/main/objects"):
            listed = await raw_client.get(url)
            assert listed.status_code == 200, (url, listed.text)
    assert [c.message for c in await alice.log(model, "main")] == ["Repository created"]


async def test_a_declared_body_over_the_limit_is_413_before_it_is_read(
        hub_server: HubProcess) -> None:
    host, port = "127.0.0.1", hub_server.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/v1/blobs/missing HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {hub_server.keys['alice']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n{".encode())
        answer = ""  # no 2 GiB were sent: the answer comes at once
        while "}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "too_large" in answer


def test_sigusr1_shows_where_every_thread_of_the_hub_is_and_it_goes_on(
        tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "hub")
    server.start()
    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: "Current thread" in server.log_path.read_text(),
                   what="the stacks in the hub's log")
        stacks = server.log_path.read_text()
        assert "ahmount/server/main.py" in stacks and "trio/_core" in stacks  # its loop
        assert server.proc.poll() is None
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


def test_slow_and_idle_clients_are_cut_off(tmp_path: Path) -> None:
    import time

    server = HubProcess(tmp_path / "data", ["--idle-timeout", "1"])
    server.start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        started = time.monotonic()
        for sock in (idle, slow):
            with sock:  # recv ends (b"") once the server closes it, after any 408 it sends
                while sock.recv(65536):
                    pass
        assert time.monotonic() - started < 8
    finally:
        server.stop()
