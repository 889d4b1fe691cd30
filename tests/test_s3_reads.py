"""Reads from an S3 blob store whose connections break off mid-body: the store in process
against moto's S3 server behind a proxy that cuts them, then a real ``ah-server`` on it.

boto3 retries a request that fails, but not a body cut short: such a read used to end the
hub's answer mid-stream (a traceback in its log, a short download for the client)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable
from ahmount.hub import s3_blobs
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.hub.s3_blobs import S3BlobStore, S3Location, make_s3_client
from tests.conftest import HubProcess, S3Server
from tests.proxies import BodyCutter
from tests.test_http import upload


@pytest.fixture
def blob(s3: S3Server) -> tuple[S3Location, str, bytes]:
    """A 3 MiB blob stored under a prefix of its own: (location, sha256, bytes)."""
    location = S3Location.parse(f"s3://ahmount-test/cut-{uuid.uuid4().hex}")
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()
    S3BlobStore(s3.client(), location).store_small([(sha, data)])
    return location, sha, data


@pytest.fixture
def cutter(s3: S3Server, request: pytest.FixtureRequest) -> Iterator[BodyCutter]:
    """A cutter in front of the session's S3 server: the first connection that passes more
    than 1 MiB is cut, unless the test asks otherwise (``(cut_after, cuts)``)."""
    cut_after, cuts = getattr(request, "param", (1 << 20, 1))
    proxy = BodyCutter(s3.port, cut_after=cut_after, cuts=cuts)
    yield proxy
    proxy.close()


def through(cutter: BodyCutter, location: S3Location) -> S3BlobStore:
    return S3BlobStore(make_s3_client(cutter.url, "us-east-1", "test", "test"), location)


def test_a_body_cut_short_is_resumed_where_it_broke_off(
        cutter: BodyCutter, blob: tuple[S3Location, str, bytes]) -> None:
    location, sha, data = blob
    got = b"".join(through(cutter, location).read(sha, 0, len(data)))
    assert cutter.cut == 1
    assert got == data
    # The second request asked for the rest, not the whole blob again.
    assert cutter.downstream < len(data) + (64 << 10), cutter.downstream


def test_a_range_cut_short_is_resumed(cutter: BodyCutter,
                                      blob: tuple[S3Location, str, bytes]) -> None:
    location, sha, data = blob
    start, end = 12345, len(data) - 7
    assert b"".join(through(cutter, location).read(sha, start, end)) == data[start:end]
    assert cutter.cut == 1


@pytest.mark.parametrize("cutter", [(256 << 10, None)], indirect=True,
                         ids=["every-connection"])
def test_a_store_that_keeps_breaking_off_is_unavailable(
        cutter: BodyCutter, blob: tuple[S3Location, str, bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_blobs, "RESUME_PAUSE", 0.01)
    location, sha, data = blob
    # Each attempt brings 256 KiB of the 3 MiB, so the resumes run out first.
    with pytest.raises(HubUnavailable, match="the hub's blob store is unavailable"):
        b"".join(through(cutter, location).read(sha, 0, len(data)))
    assert cutter.cut == s3_blobs.READ_RESUMES + 1


async def test_a_download_from_a_hub_whose_store_breaks_off_is_whole(
        tmp_path: Path, s3: S3Server, cutter: BodyCutter) -> None:
    """Through a real ``ah-server``: the client gets every byte, and the hub's log says what
    happened instead of showing a traceback."""
    server = HubProcess(tmp_path / "hub", [
        "--blobs", f"s3://ahmount-test/cut-{uuid.uuid4().hex}", "--s3-endpoint", cutter.url,
        "--s3-region", "us-east-1", "--s3-access-key", "test", "--s3-secret-key", "test"])
    server.add_user("erin")
    cutter.cuts_left = 0  # the upload passes untouched
    server.start()
    try:
        data = os.urandom(3 << 20)
        async with HubClient(server.url, api_key=server.keys["erin"], retries=0) as hub:
            sha, size = await upload(hub, data, tmp_path)
            model = AssetAddr(FolderAddr("erin", "model", "f"), "m")
            await hub.create_folder(model.folder)
            await hub.create_asset(model)
            await hub.commit(model, "main", "add", adds=[ObjectEntry("w.bin", sha, size, 1.0)])
            cutter.cuts_left = 1
            assert await hub.read_range(model, "main", "w.bin", 0, size) == data
        assert cutter.cut == 1
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log
    assert "broke off a read of blob" in log
