"""Bulk ranges read straight into a buffer (``ahmount.client.direct_reads``): against a real
``ah-server`` on 127.0.0.1 they give the bytes, errors and retries the httpx path gives; a
connection is reused after a whole body, and one the hub closed while idle is replaced
without a retry's wait. A scripted HTTP server stands in only for answers a real hub gives
on no request of ours (a 503 on the way to a good answer)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ahmount.client import direct_reads, hub_client
from ahmount.client.direct_reads import CutShort, DirectReads, Retryable, _redirected
from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.errors import HubUnavailable, NotFound, RangeNotSatisfiable, Unauthenticated
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess
from tests.proxies import BodyCutter, Scripted, scripted_server

DATA = os.urandom(5 * (1 << 20) + 12345)


def read(hub: HubClient, addr: AssetAddr, path: str, start: int, end: int,
         piece: int = 1 << 20, stop_after: int | None = None) -> tuple[bytes, list[int], int]:
    """(the bytes read, the offsets handed to consume, what read_into returned)."""
    got = bytearray()
    offsets: list[int] = []

    def consume(view: memoryview, offset: int) -> bool:
        offsets.append(offset)
        got.extend(view)
        return stop_after is None or len(offsets) < stop_after

    done = hub.read_into(addr, "main", path, start, end, memoryview(bytearray(piece)),
                         consume)
    return bytes(got), offsets, done


async def store_object(server: HubProcess, folder_name: str, tmp_path: Path, data: bytes,
                       path: str) -> tuple[AssetAddr, str]:
    """alice's asset ``d`` in a new folder, holding ``data`` at ``path``: (asset, sha256)."""
    async with HubClient(server.url, api_key=server.keys["alice"]) as hub:
        folder = FolderAddr("alice", "dataset", folder_name)
        await hub.create_folder(folder)
        addr = AssetAddr(folder, "d")
        await hub.create_asset(addr)
        local = tmp_path / "blob"
        local.write_bytes(data)
        sha, size = hash_file(local)
        await hub.upload_file(local, sha, size)
        await hub.commit(addr, "main", "c", adds=[ObjectEntry(path, sha, size, 1.0)])
    return addr, sha


@pytest.fixture
async def stored(hub_server: HubProcess, unique: str, tmp_path: Path) -> AssetAddr:
    addr, _ = await store_object(hub_server, unique, tmp_path, DATA, "dir/a b.bin")
    return addr


async def test_a_direct_read_gives_the_range_in_pieces_on_one_connection(
        hub_server: HubProcess, stored: AssetAddr) -> None:
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        assert hub.reads_directly
        start, end = 1000, len(DATA) - 7
        got, offsets, done = await trio.to_thread.run_sync(
            read, hub, stored, "dir/a b.bin", start, end)
        assert got == DATA[start:end] and done == end - start
        assert offsets == list(range(0, end - start, 1 << 20))
        direct = hub.http.direct
        assert direct is not None
        [kept] = [conn for idle in direct._idle.values() for conn, _ in idle]
        again, _, _ = await trio.to_thread.run_sync(read, hub, stored, "dir/a b.bin", 0, 10)
        assert again == DATA[:10]
        assert [conn for idle in direct._idle.values() for conn, _ in idle] == [kept]
        # The same bytes the streamed path gives.
        assert await hub.read_range(stored, "main", "dir/a b.bin", start, start + 99) == \
            got[:99]


async def test_a_stopped_read_ends_there_and_its_connection_is_not_reused(
        hub_server: HubProcess, stored: AssetAddr) -> None:
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        got, offsets, done = await trio.to_thread.run_sync(
            lambda: read(hub, stored, "dir/a b.bin", 0, len(DATA), stop_after=2))
        assert got == DATA[:2 << 20] and done == 2 << 20 and offsets == [0, 1 << 20]
        assert hub.http.direct is not None and not any(hub.http.direct._idle.values())


async def test_a_connection_the_hub_closed_while_idle_is_replaced_at_once(
        hub_server: HubProcess, stored: AssetAddr, caplog: pytest.LogCaptureFixture) -> None:
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"],
                         backoff=30.0) as hub:
        await trio.to_thread.run_sync(read, hub, stored, "dir/a b.bin", 0, 10)
        direct = hub.http.direct
        assert direct is not None
        [(conn, _)] = [pair for idle in direct._idle.values() for pair in idle]
        assert conn.sock is not None
        conn.sock.shutdown(socket.SHUT_RDWR)  # what the hub's keep-alive timeout leaves
        begun = time.monotonic()
        got, _, _ = await trio.to_thread.run_sync(read, hub, stored, "dir/a b.bin", 5, 50)
        assert got == DATA[5:50]
        assert time.monotonic() - begun < 30  # no backoff (30 s here) was waited
        assert "retry" not in caplog.text


@pytest.fixture
def cutter(hub_server: HubProcess) -> Iterator[BodyCutter]:
    """The session's hub behind a proxy that drops the first connection 2 MiB into an
    answer."""
    proxy = BodyCutter(hub_server.port, cut_after=(2 << 20) + 1000, cuts=1)
    yield proxy
    proxy.close()


async def test_a_read_that_breaks_off_mid_body_is_resumed_where_it_stopped(
        hub_server: HubProcess, stored: AssetAddr, cutter: BodyCutter) -> None:
    """A connection dropped in the middle of a range used to fail the read (the mount's
    ``read`` gave EIO, ``ah download`` gave up): the rest of the range is asked for, and
    the reader sees one unbroken stream."""
    async with HubClient(cutter.url, api_key=hub_server.keys["alice"], backoff=0.01) as hub:
        start, end = 1000, len(DATA) - 7
        got, offsets, done = await trio.to_thread.run_sync(
            read, hub, stored, "dir/a b.bin", start, end)
        assert cutter.cut == 1
        assert got == DATA[start:end] and done == end - start
        assert offsets[:2] == [0, 1 << 20] and offsets == sorted(set(offsets))


async def test_a_download_that_breaks_off_mid_body_is_whole(
        hub_server: HubProcess, stored: AssetAddr, cutter: BodyCutter, tmp_path: Path) -> None:
    async with HubClient(cutter.url, api_key=hub_server.keys["alice"], backoff=0.01) as hub:
        [entry] = [e for e in (await hub.list_objects(stored, "main"))[1]
                   if e.path == "dir/a b.bin"]
        await hub.download(stored, "main", entry, tmp_path / "out.bin")
    assert cutter.cut == 1
    assert (tmp_path / "out.bin").read_bytes() == DATA


async def test_a_read_that_keeps_breaking_off_fails_after_its_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub without a data plane (every read through the proxy), each connection dropped
    256 KiB into its answer: the read gives up after READ_RESUMES resumes, as unavailable."""
    server = HubProcess(tmp_path / "hub", ["--data-listen", "off"])
    server.add_user("alice")
    server.start()
    proxy = BodyCutter(server.port, cut_after=256 << 10, cuts=None)
    try:
        addr, _ = await store_object(server, "f", tmp_path, DATA, "big.bin")
        async with HubClient(proxy.url, api_key=server.keys["alice"], backoff=0.01) as hub:
            with pytest.raises(CutShort, match="hub sent a short range of .*/big.bin"):
                await trio.to_thread.run_sync(read, hub, addr, "big.bin", 0, len(DATA))
        assert proxy.cut == hub_client.READ_RESUMES + 1
    finally:
        proxy.close()
        server.stop()


async def test_direct_read_errors_are_the_domain_errors_of_the_streamed_path(
        hub_server: HubProcess, stored: AssetAddr) -> None:
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub, \
            HubClient(hub_server.url, api_key="not-a-key", retries=0) as stranger:
        cases = [(hub, "missing.bin", 0, 10, NotFound),
                 (hub, "dir/a b.bin", len(DATA) + 5, len(DATA) + 10, RangeNotSatisfiable),
                 (stranger, "dir/a b.bin", 0, 10, Unauthenticated)]
        for client, path, start, end, error in cases:
            with pytest.raises(error):
                await trio.to_thread.run_sync(read, client, stored, path, start, end)
            with pytest.raises(error):
                await client.read_range(stored, "main", path, start, end)
        assert hub.http.reachable


async def test_a_dead_hub_is_unavailable_after_the_retries_then_fails_fast() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    addr = AssetAddr(FolderAddr("alice", "dataset", "f"), "d")
    async with HubClient(f"http://127.0.0.1:{port}", api_key="k", retries=2, backoff=0.01,
                         down_for=60.0) as hub:
        with pytest.raises(HubUnavailable, match="unreachable"):
            await trio.to_thread.run_sync(read, hub, addr, "x", 0, 10)
        assert not hub.http.reachable
        with pytest.raises(HubUnavailable, match="failing fast"):
            await trio.to_thread.run_sync(read, hub, addr, "x", 0, 10)


@pytest.fixture
def flaky_hub() -> Iterator[tuple[str, list[int]]]:
    """An HTTP server answering 503 to the first GET, then the asked range of DATA; the
    statuses it sent are listed."""
    sent: list[int] = []

    class Handler(Scripted):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if not sent:
                sent.append(503)
                self.answer(503, b'{"error": {"code": "unavailable", "message": "busy"}}')
            else:
                first, last = self.headers["range"].removeprefix("bytes=").split("-")
                sent.append(206)
                self.answer(206, DATA[int(first):int(last) + 1])

    with scripted_server(Handler) as url:
        yield url, sent


async def test_a_503_is_sent_again_after_a_backoff(flaky_hub: tuple[str, list[int]]) -> None:
    url, sent = flaky_hub
    addr = AssetAddr(FolderAddr("alice", "dataset", "f"), "d")
    async with HubClient(url, api_key="k", retries=2, backoff=0.01) as hub:
        got, _, _ = await trio.to_thread.run_sync(read, hub, addr, "x", 3, 3 + 4096)
    assert got == DATA[3:3 + 4096] and sent == [503, 206]


def test_a_redirect_elsewhere_drops_our_key_and_one_home_keeps_it() -> None:
    request = httpx.Request("GET", "http://hub.example:8080/api/v1/x?redirect=1",
                            headers={"authorization": "Bearer k", "range": "bytes=0-9"})
    away = _redirected(request, "https://store.example/bucket/blob?X-Amz-Signature=s")
    assert str(away.url) == "https://store.example/bucket/blob?X-Amz-Signature=s"
    assert "authorization" not in away.headers and away.headers["range"] == "bytes=0-9"
    home = _redirected(request, "/api/v1/y")
    assert str(home.url) == "http://hub.example:8080/api/v1/y"
    assert home.headers["authorization"] == "Bearer k"


def test_the_embedded_hub_has_no_direct_reads() -> None:
    from ahmount.client.asgi_transport import StreamingASGITransport

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    hub = HubClient("http://embedded", transport=StreamingASGITransport(app))
    assert not hub.reads_directly


def test_a_host_that_drops_connections_costs_the_connect_timeout_not_the_read_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener whose queue is full drops new connections unanswered, as a firewall's
    DROP does: opening one gives up after the connect timeout, though reads may wait far
    longer once connected."""
    monkeypatch.setattr(direct_reads, "CONNECT_SECONDS", 0.5)
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        queued = []
        for _ in range(3):  # fill the accept queue; later handshakes get no answer
            held = socket.socket()
            held.setblocking(False)
            held.connect_ex(("127.0.0.1", port))
            queued.append(held)
        reads = DirectReads(60.0, ssl.create_default_context())
        request = httpx.Request("GET", f"http://127.0.0.1:{port}/blobs/x")
        started = time.monotonic()
        with pytest.raises(Retryable, match="timed out"):
            reads.read_into(request, 10, memoryview(bytearray(10)), lambda v, o: True)
        assert time.monotonic() - started < 5
        for held in queued:
            held.close()
