"""Several stateless ah-server replicas on one PostgreSQL + S3 hub."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess, PostgresCluster, S3Server, command, scale_args


@pytest.fixture
def replicas(tmp_path: Path, postgres: PostgresCluster,
             s3: S3Server) -> Iterator[tuple[HubProcess, HubProcess, list[str]]]:
    args = scale_args(postgres, s3, tmp_path.name)
    a = HubProcess(tmp_path / "a", args)
    b = HubProcess(tmp_path / "b", [*args, "--s3-presign"])
    a.add_users(["alice", "bob"])
    b.keys.update(a.keys)
    a.start()
    b.start()
    yield a, b, args
    a.stop()
    b.stop()


async def _asset(hub: HubClient, name: str) -> AssetAddr:
    folder = FolderAddr("alice", "dataset", name)
    await hub.create_folder(folder)
    addr = AssetAddr(folder, "d")
    await hub.create_asset(addr)
    return addr


async def _blob(hub: HubClient, tmp: Path, data: bytes) -> ObjectEntry:
    path = tmp / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    sha, size = hash_file(path)
    await hub.upload_file(path, sha, size)
    return ObjectEntry("x", sha, size, 1.0)


async def test_concurrent_commits_through_two_replicas_all_land(
        replicas: tuple[HubProcess, HubProcess, list[str]], tmp_path: Path) -> None:
    a, b, _ = replicas
    async with HubClient(a.url, api_key=a.keys["alice"]) as hub:
        addr = await _asset(hub, "race")
        blob = await _blob(hub, tmp_path, b"shared bytes")

    async def writer(server: HubProcess, n: int) -> None:
        async with HubClient(server.url, api_key=server.keys["alice"]) as hub:
            for i in range(8):
                entry = ObjectEntry(f"w{n}/{i}", blob.sha256, blob.size, 1.0)
                assert await hub.commit(addr, "main", f"{n}.{i}", adds=[entry]) is not None

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(writer, a if n % 2 else b, n)
    async with HubClient(b.url, api_key=b.keys["alice"]) as hub:
        _, objects = await hub.list_objects(addr, "main")
        assert len(objects) == 32
        assert len(await hub.log(addr, "main")) == 33


async def test_a_replica_killed_mid_commit_leaves_no_partial_commit(
        replicas: tuple[HubProcess, HubProcess, list[str]], tmp_path: Path) -> None:
    a, b, _ = replicas
    async with HubClient(a.url, api_key=a.keys["alice"]) as hub:
        addr = await _asset(hub, "crash")
        blob = await _blob(hub, tmp_path, b"bytes")
    batches = 0

    async def committer() -> None:
        nonlocal batches
        async with HubClient(a.url, api_key=a.keys["alice"], retries=0) as hub:
            for batch in range(1000):
                entries = [ObjectEntry(f"batch{batch:03d}/{i:04d}", blob.sha256, blob.size, 1.0)
                           for i in range(3000)]
                try:
                    await hub.commit(addr, "main", f"batch {batch}", adds=entries)
                except (HubUnavailable, httpx.HTTPError):
                    return
                batches += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer)
        while batches < 3:
            await trio.sleep(0.05)
        await trio.sleep(0.13)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    async with HubClient(b.url, api_key=b.keys["alice"]) as hub:
        _, objects = await hub.list_objects(addr, "main")
        per_batch: dict[str, int] = {}
        for o in objects:
            per_batch[o.path.split("/")[0]] = per_batch.get(o.path.split("/")[0], 0) + 1
        assert per_batch and set(per_batch.values()) == {3000}, "a commit landed in part"
        log = await hub.log(addr, "main")
        assert len(log) == len(per_batch) + 1 >= batches + 1
        assert await hub.missing_blobs([o.sha256 for o in objects]) == set()


async def test_gc_keeps_what_commits_staging_and_uploads_need(
        replicas: tuple[HubProcess, HubProcess, list[str]], tmp_path: Path) -> None:
    a, b, args = replicas
    committed, staged, orphan = os.urandom(1000), os.urandom(1001), os.urandom(1002)
    async with HubClient(a.url, api_key=a.keys["alice"]) as hub:
        addr = await _asset(hub, "gc")
        c = await _blob(hub, tmp_path, committed)
        s = await _blob(hub, tmp_path, staged)
        o = await _blob(hub, tmp_path, orphan)
        await hub.commit(addr, "main", "c", adds=[ObjectEntry("c", c.sha256, c.size, 1.0)])
        await hub.stage(addr, "main", "sess", adds=[ObjectEntry("s", s.sha256, s.size, 1.0)])
        in_progress = os.urandom(3000)
        sha = hashlib.sha256(in_progress).hexdigest()
        started = await hub.http.json("POST", "/api/v1/uploads", json={"sha256": sha, "size": 3000})
        await hub.http.json("PATCH", f"/api/v1/uploads/{started['id']}", content=in_progress[:1000],
                        headers={"upload-offset": "0"})
    result = subprocess.run([command("ah-server"), "--data", str(tmp_path / "gc"), *args, "gc",
                             "--grace", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "removed 1 blobs" in result.stdout
    async with HubClient(b.url, api_key=b.keys["alice"]) as hub:
        assert await hub.missing_blobs([c.sha256, s.sha256, o.sha256]) == {o.sha256}
        # The upload in progress survived and finishes through the other replica.
        await hub.http.json("PATCH", f"/api/v1/uploads/{started['id']}", content=in_progress[1000:],
                        headers={"upload-offset": "1000"})
        await hub.http.json("POST", f"/api/v1/uploads/{started['id']}/finish")
        assert await hub.missing_blobs([sha]) == set()


async def test_presigned_reads_go_straight_to_the_store(
        replicas: tuple[HubProcess, HubProcess, list[str]], tmp_path: Path,
        s3: S3Server) -> None:
    _, b, _ = replicas
    data = os.urandom(200_000)
    async with HubClient(b.url, api_key=b.keys["alice"]) as hub:
        addr = await _asset(hub, "presign")
        e = await _blob(hub, tmp_path, data)
        await hub.commit(addr, "main", "p", adds=[ObjectEntry("p.bin", e.sha256, e.size, 1.0)])
        assert await hub.read_range(addr, "main", "p.bin", 1000, 2000) == data[1000:2000]
        # A read straight into a buffer follows the same redirect (without our key).
        direct = bytearray()

        def keep(view: memoryview, offset: int) -> bool:
            direct.extend(view)
            return True

        await trio.to_thread.run_sync(hub.read_into, addr, "main", "p.bin", 1000, 150_000,
                                      memoryview(bytearray(1 << 16)), keep)
        assert direct == data[1000:150_000]
        await hub.download(addr, "main", ObjectEntry("p.bin", e.sha256, e.size, 1.0),
                           tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    url = f"{b.url}/api/v1/assets/alice/dataset/presign/d/refs/main/files/p.bin?redirect=1"
    response = httpx.get(url, headers={"authorization": f"Bearer {b.keys['alice']}"})
    assert response.status_code == 307
    assert response.headers["location"].startswith(s3.url)
    assert "alice" not in response.headers["location"]
