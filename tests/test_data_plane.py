"""The data plane (:mod:`ahmount.server.data_plane`): read URLs answered with ``sendfile``
on a second port of a real ``ah-server``, and the client's use of it (:mod:`read_urls`).

Layers: pure units (``--data-listen`` parsing, which URLs a client keeps), HTTP against a
real server (reads, ranges, keep-alive, every kind of bad input, idle and slow clients,
shutdown), and a client against it (the key never travels there; a plane that cannot be
reached costs a fallback through the API, not a failed read).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ahmount import errors
from ahmount.client.hub_client import HubClient
from ahmount.client.read_urls import ReadUrls, on_data_plane
from ahmount.hub.models import AssetAddr
from ahmount.hub.open import open_hub
from ahmount.hub.service import HubService
from ahmount.server.data_plane import MAX_HEAD, DataPlane, parse_listen
from ahmount.server.observed import HubMetrics
from tests.conftest import HubProcess, command, free_port, wait_until
from tests.test_ahfs import requests_seen
from tests.test_direct_reads import store_object
from tests.test_read_urls import read_into
from tests.test_service import granted_object

DATA = os.urandom(5 * (1 << 20) + 321)


# -- units -----------------------------------------------------------------------------------

def test_data_listen_is_parsed_or_refused_by_name() -> None:
    assert parse_listen("off", "127.0.0.1:8080") is None
    assert parse_listen("auto", "127.0.0.1:8080") == ("127.0.0.1", 0)
    assert parse_listen("auto", "[::1]:8080") == ("::1", 0)
    assert parse_listen("auto", "unix:/run/ah.sock") is None
    assert parse_listen("0.0.0.0:9000", "unix:/x") == ("0.0.0.0", 9000)
    assert parse_listen(":9000", "127.0.0.1:1") == ("0.0.0.0", 9000)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert parse_listen("auto", f"fd://{sock.fileno()}") == ("127.0.0.1", 0)
        sock.getsockname()  # still open: the API's descriptor is not closed
    for bad in ("9000", "host:port", "h:70000", "nowhere"):
        with pytest.raises(errors.InvalidArgument, match=re.escape(repr(bad))):
            parse_listen(bad, "127.0.0.1:8080")


PLANE = "http://127.0.0.1:41000/blobs/" + "a" * 64 + "?user=u&expires=9&signature=s"


def test_a_client_keeps_urls_of_its_hubs_data_plane_only() -> None:
    urls = ReadUrls(plane_host="127.0.0.1")
    far = time.time() + 900
    urls.keep("a" * 64, PLANE, int(far))
    assert urls.get("a" * 64) == PLANE and on_data_plane(PLANE)
    refused = [
        PLANE.replace("127.0.0.1", "127.0.0.2"),  # another host
        PLANE.replace("http://", "https://"),  # a scheme the hub was not reached by
        PLANE.replace("http://", "http://user:pw@"),  # credentials in the URL
        PLANE.replace("/blobs/", "/api/v1/"),  # not a read of a blob
        PLANE.replace(":41000", ""),  # no port: the API's own
        "http://127.0.0.1:99999/blobs/x",  # not a port
        "//127.0.0.1:41000/blobs/x",  # scheme-relative
    ]
    for url in refused:
        urls.keep("b" * 64, url, int(far))
        assert urls.get("b" * 64) is None, url
    # A hub reached over HTTPS or a Unix socket has no data plane URLs kept at all.
    paths_only = ReadUrls(plane_host=None)
    paths_only.keep("a" * 64, PLANE, int(far))
    assert paths_only.get("a" * 64) is None


@given(st.text(max_size=80))
def test_no_url_a_hub_could_send_is_kept_unless_it_is_ours(url: str) -> None:
    urls = ReadUrls(plane_host="127.0.0.1")
    urls.keep("c" * 64, url, int(time.time()) + 900)
    kept = urls.get("c" * 64)
    if kept is not None:
        parts = urllib.parse.urlsplit(kept)
        assert (kept.startswith("/") and not kept.startswith("//")) or (
            parts.scheme == "http" and parts.hostname == "127.0.0.1"
            and parts.path.startswith("/blobs/"))


def test_after_the_plane_failed_its_urls_rest_and_paths_stay() -> None:
    now = [1000.0]
    urls = ReadUrls(clock=lambda: now[0], plane_host="127.0.0.1")
    urls.keep("a" * 64, PLANE, 5000)
    urls.keep("b" * 64, "/api/v1/blobs/b/content?x", 5000)
    urls.plane_failed()
    assert urls.get("a" * 64) is None and urls.get("b" * 64) is not None
    now[0] += 61
    assert urls.get("a" * 64) == PLANE  # tried again after a while


# -- HTTP against a real ah-server -----------------------------------------------------------

@pytest.fixture
def stored(sqlite_server: HubProcess, unique: str, tmp_path: Path) -> tuple[AssetAddr, str, str]:
    """A 5 MiB object of alice's, and its blob's read URL on the data plane."""
    addr, sha = trio.run(store_object, sqlite_server, unique, tmp_path, DATA, "big.bin")
    folder = addr.folder.name
    answer = httpx.get(f"{sqlite_server.url}/api/v1/assets/alice/dataset/{folder}/d/refs/main/"
                       "files/big.bin", headers=_auth(sqlite_server, "alice"))
    assert answer.status_code == 200 and answer.content == DATA
    return addr, sha, answer.headers["x-ah-read-url"]


def _auth(server: HubProcess, user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {server.keys[user]}"}


def _raw(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port, f"{parts.path}?{parts.query}"


def test_read_urls_point_at_the_data_plane_which_serves_bytes_ranges_and_heads(
        sqlite_server: HubProcess, stored: tuple[AssetAddr, str, str]) -> None:
    _, sha, url = stored
    host, port, target = _raw(url)
    assert host == "127.0.0.1" and port != sqlite_server.port and target.startswith(
        f"/blobs/{sha}?")
    before = requests_seen(sqlite_server)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        # Several requests on one connection (keep-alive), each exact.
        for headers, status, want in (
                ({}, 200, DATA),
                ({"range": "bytes=10-19"}, 206, DATA[10:20]),
                ({"range": f"bytes={len(DATA) - 5}-"}, 206, DATA[-5:]),
                ({"range": "bytes=-7"}, 206, DATA[-7:]),
                ({"range": "bytes=1048570-3145740"}, 206, DATA[1048570:3145741])):
            conn.request("GET", target, headers=headers)
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (status, want), headers
            assert answer.getheader("etag") == f'"{sha}"'
            assert answer.getheader("content-length") == str(len(want))
            if status == 206:
                assert answer.getheader("content-range", "").endswith(f"/{len(DATA)}")
        sock = conn.sock
        conn.request("HEAD", target)
        head = conn.getresponse()
        assert head.status == 200 and head.getheader("content-length") == str(len(DATA))
        assert head.read() == b"" and conn.sock is sock  # the same connection throughout
    finally:
        conn.close()
    assert {k: n for k, n in (requests_seen(sqlite_server) - before).items()} == \
        {"blob_data": 6}
    # Counted in the API's metrics and logged, but the signature never is.
    log = sqlite_server.log_path.read_text()
    assert f'path=/blobs/{sha}' in log and re.search(r"signature=\w{64}", log) is None


def _exchange(host: str, port: int, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
    """Send ``raw`` and read one answer (status, body, headers) with http.client's parser."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(raw)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, answer.read(), {k.lower(): v for k, v in answer.getheaders()}


def test_bad_requests_get_an_error_naming_what_was_wrong(
        sqlite_server: HubProcess, stored: tuple[AssetAddr, str, str]) -> None:
    _, sha, url = stored
    host, port, target = _raw(url)
    forged = re.sub(r"signature=\w+", "signature=" + "0" * 64, target)
    cases: list[tuple[bytes, int, str]] = [
        (f"GET {forged} HTTP/1.1\r\nhost: x\r\n\r\n".encode(), 403, "no valid signature"),
        (f"GET /blobs/{sha} HTTP/1.1\r\nhost: x\r\n\r\n".encode(), 403,
         "lacks user, expires, signature"),
        (b"GET /blobs/nothex HTTP/1.1\r\nhost: x\r\n\r\n", 400, "sha256"),
        (f"GET /other/{sha} HTTP/1.1\r\nhost: x\r\n\r\n".encode(), 404, "not a blob's read URL"),
        (f"DELETE {target} HTTP/1.1\r\nhost: x\r\n\r\n".encode(), 405, "only reads"),
        (f"GET {target} HTTP/1.1\r\nhost: x\r\nrange: bytes=9999999999-\r\n\r\n".encode(), 416,
         "outside"),
        (f"GET {target} HTTP/1.1\r\nhost: x\r\nrange: bytes=0-1,4-5\r\n\r\n".encode(), 416,
         "single byte range"),
        (f"GET {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc".encode(), 400,
         "takes no body"),
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (f"GET {target} HTTP/1.1\r\n\r\n".encode(), 400, "malformed request"),  # no Host
        (f"GET {target} HTTP/1.1\r\nhost: x\r\nx-pad: {'a' * MAX_HEAD}\r\n\r\n".encode(), 431,
         "malformed request"),
    ]
    for raw, status, words in cases:
        got, body, headers = _exchange(host, port, raw)
        assert got == status, (raw[:60], body)
        assert headers["content-type"] == "application/json"
        assert words in httpx.Response(200, content=body).json()["error"]["message"], body
    assert _exchange(host, port, f"DELETE {target} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
                     )[2]["allow"] == "GET, HEAD"
    # None of it hurt the plane: the next read is whole.
    assert httpx.get(url).content == DATA


def test_idle_and_slow_clients_are_cut_off_and_stop_waits_for_no_idle_one(
        tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "data", ["--idle-timeout", "1"])
    server.add_users(["alice"])
    server.start()
    try:
        url = trio.run(_stored_url, server, tmp_path)
        host, port, target = _raw(url)
        slow = socket.create_connection((host, port), timeout=10)
        slow.sendall(f"GET {target} HTTP/1.1\r\nhost: x\r\n".encode())  # the head never ends
        idle = socket.create_connection((host, port), timeout=10)
        idle.sendall(f"GET {target} HTTP/1.1\r\nhost: x\r\nrange: bytes=0-0\r\n\r\n".encode())
        answer = http.client.HTTPResponse(idle)
        answer.begin()
        assert answer.read() == DATA[:1]
        for sock in (slow, idle):  # both closed by the server within its idle timeout
            sock.settimeout(5)
            assert sock.recv(1) == b""
            sock.close()
        # A connection kept idle does not hold up a shutdown.
        kept = http.client.HTTPConnection(host, port, timeout=10)
        kept.request("GET", target, headers={"range": "bytes=0-0"})
        assert kept.getresponse().read() == DATA[:1]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        # Within the 10 s the server would give a read in flight: no read is waited for.
        server.proc.wait(timeout=8)
        kept.close()
    finally:
        server.stop()


async def _stored_url(server: HubProcess, tmp_path: Path) -> str:
    addr, sha = await store_object(server, "f", tmp_path, DATA, "big.bin")
    async with HubClient(server.url, api_key=server.keys["alice"]) as hub:
        async with hub.open_object(addr, "main", "big.bin", 0, 1, sha) as answer:
            await answer.aread()
        url = hub.read_urls.get(sha)
    assert url is not None and on_data_plane(url)
    return url


def test_a_read_in_flight_at_shutdown_ends_whole(tmp_path: Path) -> None:
    """SIGTERM while a reader is halfway through a large blob: its answer ends whole (the
    API's graceful period covers the data plane's reads too), and no new one is taken."""
    big = os.urandom(64 << 20)
    server = HubProcess(tmp_path / "data")
    server.add_users(["alice"])
    server.start()
    try:
        addr, sha = trio.run(store_object, server, "f", tmp_path, big, "big.bin")

        async def url() -> str:
            async with HubClient(server.url, api_key=server.keys["alice"]) as hub:
                async with hub.open_object(addr, "main", "big.bin", 0, 1, sha) as answer:
                    await answer.aread()
                found = hub.read_urls.get(sha)
                assert found is not None
                return found

        host, port, target = _raw(trio.run(url))
        conn = http.client.HTTPConnection(host, port, timeout=20)
        conn.request("GET", target)
        answer = conn.getresponse()
        first = answer.read(1 << 20)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "finishing requests in flight" in server.log_path.read_text(),
                   what="the server to start shutting down")
        assert first + answer.read() == big
        server.proc.wait(timeout=15)
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=2).close()
    finally:
        server.stop()


def test_data_listen_off_keeps_read_urls_on_the_api(tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "data", ["--data-listen", "off"])
    server.add_users(["alice"])
    server.start()
    try:
        _, sha = trio.run(store_object, server, "f", tmp_path, DATA[:1000], "small.bin")
        answer = httpx.get(f"{server.url}/api/v1/assets/alice/dataset/f/d/refs/main/files/"
                           "small.bin", headers=_auth(server, "alice"))
        assert answer.headers["x-ah-read-url"].startswith(f"/api/v1/blobs/{sha}/content?")
    finally:
        server.stop()


# -- a client against it ---------------------------------------------------------------------

class HeadCatcher:
    """A listener on 127.0.0.1 that records the first request head it gets and then
    closes the connection unanswered (a data plane gone wrong)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.heads.append(data)

    def close(self) -> None:
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def catcher() -> Iterator[HeadCatcher]:
    found = HeadCatcher()
    yield found
    found.close()


async def test_the_client_reads_through_the_plane_without_its_key_and_falls_back(
        sqlite_server: HubProcess, stored: tuple[AssetAddr, str, str],
        catcher: HeadCatcher) -> None:
    addr, sha, url = stored
    async with HubClient(sqlite_server.url, api_key=sqlite_server.keys["alice"]) as hub:
        hub.read_urls.keep(sha, url, int(time.time()) + 900)
        before = requests_seen(sqlite_server)
        got = await trio.to_thread.run_sync(read_into, hub, addr, sha, 0, len(DATA))
        async with hub.open_object(addr, "main", "big.bin", 5, 50_000, sha) as answer:
            assert await answer.aread() == DATA[5:50_000]
        assert got == DATA
        assert Counter(requests_seen(sqlite_server) - before) == Counter({"blob_data": 2})
        # A plane that answers nothing: each reader falls back through the API, once.
        broken = re.sub(r":\d+/blobs/", f":{catcher.port}/blobs/", url)
        for reader in ("direct", "stream"):
            hub.read_urls = ReadUrls(plane_host="127.0.0.1")
            hub.read_urls.keep(sha, broken, int(time.time()) + 900)
            before = requests_seen(sqlite_server)
            if reader == "direct":
                got = await trio.to_thread.run_sync(read_into, hub, addr, sha, 7, 70_000)
            else:
                async with hub.open_object(addr, "main", "big.bin", 7, 70_000, sha) as answer:
                    got = await answer.aread()
            assert got == DATA[7:70_000]
            assert Counter(requests_seen(sqlite_server) - before) == Counter({"file": 1})
            assert hub.read_urls.get(sha) is None  # the plane rests; the API is read
        assert len(catcher.heads) == 2
        for head in catcher.heads:
            assert head.startswith(b"GET /blobs/") and b"authorization" not in head.lower()
        assert hub.http.reachable  # the plane's failure said nothing of the hub's API


def test_a_kept_listing_page_names_the_host_each_client_reached(
        sqlite_server: HubProcess, stored: tuple[AssetAddr, str, str]) -> None:
    addr, sha, _ = stored
    path = f"/api/v1/assets/alice/dataset/{addr.folder.name}/d/refs/main/objects"
    for _ in range(2):  # the second time, each from the kept pages
        for host in ("127.0.0.1", "localhost"):
            page = httpx.get(f"http://{host}:{sqlite_server.port}{path}",
                             params={"read_urls_over": 0}, headers=_auth(sqlite_server, "alice"))
            url = page.json()["objects"][0]["read_url"]
            assert urllib.parse.urlsplit(url).hostname == host and sha in url


def test_pipelined_reads_are_answered_in_order(
        sqlite_server: HubProcess, stored: tuple[AssetAddr, str, str]) -> None:
    """Requests sent back to back before any answer (HTTP/1.1 pipelining) are each
    answered, in order, on the one connection."""
    _, _, url = stored
    host, port, target = _raw(url)
    ranges = [(0, 9), (4096, 4099), (len(DATA) - 3, len(DATA) - 1)]
    raw = b"".join(f"GET {target} HTTP/1.1\r\nhost: x\r\nrange: bytes={a}-{b}\r\n\r\n".encode()
                   for a, b in ranges)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(raw)
        with sock.makefile("rb") as stream:  # one buffer for all answers: none read past
            for a, b in ranges:
                status = stream.readline().split()[1]
                head = dict(line.decode().rstrip().split(": ", 1)
                            for line in iter(stream.readline, b"\r\n"))
                body = stream.read(int(head["content-length"]))
                assert (status, body) == (b"206", DATA[a:b + 1])


async def test_every_address_of_the_plane_listens_on_the_one_port_urls_name() -> None:
    """A host with several addresses (here every address: 0.0.0.0 and ::) listens on one
    port on all of them: the read URLs name a single port."""
    plane = DataPlane(cast(HubService, None), HubMetrics(), 5.0)
    address = await plane.listen(None, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(plane.serve)
        for family, local in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            client = trio.socket.socket(family)
            await client.connect((local, address.port))  # refused on any other port
            client.close()
        plane.stop()


def test_a_port_in_use_is_named_and_the_server_exits_cleanly(tmp_path: Path) -> None:
    """Either of the server's ports already taken: one line naming it, exit code 2, no
    traceback and nothing left listening."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        free = f"127.0.0.1:{free_port()}"
        for args, words in ((["--listen", busy], f"cannot listen on {busy}: "),
                            (["--listen", free, "--data-listen", busy],
                             f"cannot listen on {busy} for the data plane (--data-listen)")):
            done = subprocess.run([command("ah-server"), "--data", str(tmp_path / "hub"), *args],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            assert f"ah-server: {words}" in done.stderr and "Address already in use" in \
                done.stderr
            assert "Traceback" not in done.stderr
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", int(free.rsplit(":")[1])), timeout=2)


async def test_a_blob_collected_after_its_grant_was_checked_is_a_404(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plane in-process on the embedded stores: the blob goes between the grant's
    check (which finds it) and its opening; the reader gets a 404 in the API's shape and
    the connection stays usable, not a crash with no answer."""
    with open_hub(tmp_path / "hub") as service:
        grant = granted_object(service, DATA[:5000])
        plane = DataPlane(service, HubMetrics(), 5.0)
        address = await plane.listen("127.0.0.1", 0)
        url = address.read_url("127.0.0.1", grant)
        async with trio.open_nursery() as nursery:
            await nursery.start(plane.serve)
            async with httpx.AsyncClient() as client:
                assert (await client.get(url)).content == DATA[:5000]
                blobs = service.blobs
                opening = blobs.open_file

                def collected_first(sha: str) -> int | None:
                    blobs.delete(sha)  # garbage collection, just before the open
                    return opening(sha)

                monkeypatch.setattr(blobs, "open_file", collected_first)
                gone = await client.get(url)
                assert gone.status_code == 404, gone.text
                assert "not stored" in gone.json()["error"]["message"]
                assert (await client.head(url)).status_code == 404  # the same connection
            plane.stop()


@pytest.mark.parametrize(("size", "disk_answers", "threads"), [
    (4096, True, 0),  # a random reader's page: the loop waits for the disk
    (64 << 10, True, 0),  # a random reader's miss (a run of pages)
    (64 << 10, False, 1),  # a disk slower than the wait: a worker thread sends it
    ((64 << 10) + 1, True, 1),  # larger than a wait on the loop is for
])
async def test_a_cold_range_is_sent_on_the_loop_when_small_and_the_disk_is_quick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, disk_answers: bool,
        threads: int) -> None:
    """A range not in the page cache: a small one is asked of the disk and waited for on
    the loop (a thread hand-off costs more than the read), any other goes through a
    worker thread; the bytes are right either way."""
    from ahmount.server import data_plane

    with open_hub(tmp_path / "hub") as service:
        grant = granted_object(service, DATA)
        fd = service.blobs.open_file(grant.sha256)
        assert fd is not None
        os.fsync(fd)  # clean pages: the advice below drops them
        sent_by_thread: list[int] = []
        to_thread = trio.to_thread.run_sync

        async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if fn is os.sendfile:
                sent_by_thread.append(args[3])
            return await to_thread(fn, *args, **kwargs)

        monkeypatch.setattr(data_plane.trio.to_thread, "run_sync", counted)
        # However slow this machine's disk is now: the case under test decides.
        monkeypatch.setattr(data_plane, "WAIT_INLINE_SECONDS", 30.0)
        if not disk_answers:  # the range is still not there when the wait is over
            monkeypatch.setattr(data_plane, "_arrived", _never)
        plane = DataPlane(service, HubMetrics(), 5.0)
        address = await plane.listen("127.0.0.1", 0)
        url = address.read_url("127.0.0.1", grant)
        start = 3 << 20
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(plane.serve)
                async with httpx.AsyncClient() as client:
                    # Cold (its pages were written back above); no probe here: a probe
                    # with RWF_NOWAIT starts the very read it declines to wait for.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    got = await client.get(
                        url, headers={"range": f"bytes={start}-{start + size - 1}"})
                    assert got.status_code == 206 and got.content == DATA[start:start + size]
                plane.stop()
        finally:
            os.close(fd)
        assert len(sent_by_thread) == threads


async def _never(*_: object) -> bool:
    return False
