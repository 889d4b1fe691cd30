"""Read URLs: a blob's later ranges read with no key and no lookup.

Layers: the grant's signature and expiry (pure, property-based: no change to any part of a
grant passes); the client's table of URLs (pure); the service opening a granted blob on
both store pairs; a client against a real ``ah-server`` (sqlite + local disk, PostgreSQL +
S3): its first read of an object goes through the object's path and its later ranges
through the read URL (counted by the hub's own metrics), by both ways of reading, and a URL
the hub refuses costs a fallback, never a failed read.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.client.read_urls import KEEP, MARGIN, ReadUrls
from ahmount.errors import NotFound, PermissionDenied
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.hub.read_grants import ReadGrants
from ahmount.hub.service import Actor, HubService
from ahmount.server.rendered_pages import RenderedPages
from tests.conftest import HubProcess
from tests.test_ahfs import requests_seen
from tests.test_direct_reads import store_object
from tests.test_service import obj

SHA = "ab" * 32
KEY = b"k" * 32


# -- grants (pure) ---------------------------------------------------------------------------

def test_a_grant_reads_its_blob_until_it_expires() -> None:
    now = [1_000_000.0]
    grants = ReadGrants(KEY, ttl=900, clock=lambda: now[0])
    grant = grants.issue(SHA, "u1")
    assert grant.expires == 1_000_900
    grants.check(SHA, "u1", str(grant.expires), grant.signature)
    now[0] = 1_000_899.0
    grants.check(SHA, "u1", str(grant.expires), grant.signature)
    now[0] = 1_000_900.0
    with pytest.raises(PermissionDenied, match="expired at 1970-01-12T14:01:40Z"):
        grants.check(SHA, "u1", str(grant.expires), grant.signature)


def test_a_grant_of_another_key_or_with_parts_missing_is_refused_by_name() -> None:
    grant = ReadGrants(b"o" * 32).issue(SHA, "u1")
    mine = ReadGrants(KEY)
    with pytest.raises(PermissionDenied, match="no valid signature"):
        mine.check(SHA, "u1", str(grant.expires), grant.signature)
    with pytest.raises(PermissionDenied, match="lacks user, signature"):
        mine.check(SHA, "", str(grant.expires), "")
    for expires in ("-5", "1e9", "9" * 13, "١٢٣"):
        with pytest.raises(PermissionDenied, match="malformed"):
            mine.check(SHA, "u1", expires, grant.signature)
    with pytest.raises(ValueError, match="16 bytes"):
        ReadGrants(b"short")


@given(part=st.sampled_from(["sha256", "user", "expires", "signature"]),
       replacement=st.text(min_size=1, max_size=80))
def test_no_change_to_any_part_of_a_grant_passes(part: str, replacement: str) -> None:
    grants = ReadGrants(KEY, clock=lambda: 1000.0)
    grant = grants.issue(SHA, "0f7c2a1e-0000-4000-8000-000000000001")
    parts = {"sha256": grant.sha256, "user": grant.user, "expires": str(grant.expires),
             "signature": grant.signature}
    if replacement == parts[part]:
        return
    parts[part] = replacement
    with pytest.raises(PermissionDenied) as refused:
        grants.check(parts["sha256"], parts["user"], parts["expires"], parts["signature"])
    assert str(refused.value).startswith(f"read URL of blob {parts['sha256']}")


# -- the client's table (pure) ---------------------------------------------------------------

def headers(sha: str, url: str, expires: str) -> dict[str, str]:
    return {"x-ah-sha256": sha, "x-ah-read-url": url, "x-ah-read-expires": expires}


def test_the_client_keeps_paths_of_its_hub_only_and_stops_before_they_expire() -> None:
    now = [1000.0]
    urls = ReadUrls(clock=lambda: now[0])
    urls.learn(headers(SHA, "/api/v1/blobs/x/content?s=1", "2000").get)
    assert urls.get(SHA) == "/api/v1/blobs/x/content?s=1"
    assert urls.get(None) is None and urls.get("cd" * 32) is None
    now[0] = 2000 - MARGIN + 1  # a run read through it could outlive it
    assert urls.get(SHA) is None
    for url, expires in (("https://elsewhere.example/x", "9999"), ("//elsewhere/x", "9999"),
                         ("/api/x", "soon"), ("", "9999")):
        urls.learn(headers(SHA, url, expires).get)
        assert urls.get(SHA) is None, url
    urls.learn({"x-ah-sha256": SHA}.get)  # an answer without one changes nothing
    assert urls.get(SHA) is None


def test_the_client_forgets_a_refused_url_and_keeps_a_bounded_number() -> None:
    urls = ReadUrls(clock=lambda: 0.0)
    for i in range(KEEP + 10):
        urls.learn(headers(f"{i:064x}", f"/u/{i}", "9999").get)
    assert urls.get(f"{0:064x}") is None  # the least recently used went first
    assert urls.get(f"{KEEP + 9:064x}") == f"/u/{KEEP + 9}"
    urls.forget(f"{KEEP + 9:064x}")
    assert urls.get(f"{KEEP + 9:064x}") is None


# -- the service, on both store pairs -----------------------------------------------------

def test_the_service_opens_a_granted_blob_without_the_caller(service: HubService,
                                                              alice: Actor) -> None:
    data = os.urandom(3000)
    sha = hashlib.sha256(data).hexdigest()
    folder = FolderAddr("alice", "dataset", "g")
    service.create_folder(alice, folder)
    addr = AssetAddr(folder, "a")
    service.create_asset(alice, addr)
    service.commit(alice, addr, "main", "c", adds=[obj(service, alice, "f", data)])
    found = service.open_object(alice, addr, "main", "f")
    assert not service.grant_key_loaded  # a read URL's route then checks it in a thread
    grant = service.read_grant(alice, found)
    assert grant.user == alice.id and service.grant_key_loaded
    blob = service.open_granted_blob(sha, grant.user, str(grant.expires), grant.signature)
    assert blob.size == len(data)
    assert b"".join(blob.read(100, 2000)) == data[100:2000]
    with pytest.raises(PermissionDenied):
        service.open_granted_blob(sha, grant.user, str(grant.expires + 1), grant.signature)
    service.blobs.delete(sha)  # collected since: the grant finds nothing
    with pytest.raises(NotFound, match="not stored"):
        service.open_granted_blob(sha, grant.user, str(grant.expires), grant.signature)


# -- a client against a real ah-server -------------------------------------------------------

DATA = os.urandom(3 * (1 << 20) + 777)


@pytest.fixture
async def stored(hub_server: HubProcess, unique: str, tmp_path: Path) -> tuple[AssetAddr, str]:
    return await store_object(hub_server, unique, tmp_path, DATA, "big.bin")


def counted(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """The object reads the hub answered between two looks at its metrics: through the
    object's path ("file") and through read URLs ("blob": the API's ``blob_content``, or the
    data plane's ``blob_data`` where the hub has one)."""
    seen: Counter[str] = Counter()
    for route, n in (after - before).items():
        if route in ("file", "blob_content", "blob_data"):
            seen["file" if route == "file" else "blob"] += n
    return dict(seen)


def read_into(hub: HubClient, addr: AssetAddr, sha: str, start: int, end: int) -> bytes:
    got = bytearray()

    def consume(view: memoryview, offset: int) -> bool:
        got.extend(view)
        return True

    hub.read_into(addr, "main", "big.bin", start, end, memoryview(bytearray(1 << 20)),
                  consume, sha)
    return bytes(got)


async def test_later_ranges_of_a_blob_go_through_its_read_url(
        hub_server: HubProcess, stored: tuple[AssetAddr, str]) -> None:
    addr, sha = stored
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        before = requests_seen(hub_server)
        async with hub.open_object(addr, "main", "big.bin", 10, 5000, sha) as first:
            assert await first.aread() == DATA[10:5000]
        assert counted(before, requests_seen(hub_server)) == {"file": 1}
        before = requests_seen(hub_server)
        for start, end in ((0, 1), (65536, 200_000), (len(DATA) - 9, len(DATA))):
            async with hub.open_object(addr, "main", "big.bin", start, end, sha) as later:
                assert await later.aread() == DATA[start:end]
        # The worker-thread path (http.client) takes the same URL.
        got = await trio.to_thread.run_sync(read_into, hub, addr, sha, 1 << 20, len(DATA))
        assert got == DATA[1 << 20:]
        assert counted(before, requests_seen(hub_server)) == {"blob": 4}
        # Without the hash, the object's path as ever.
        assert await hub.read_range(addr, "main", "big.bin", 0, 3) == DATA[:3]
        # The URL needs no key: anyone holding it reads that blob (a bearer capability).
        url = hub.read_urls.get(sha)
        assert url is not None
        answer = httpx.get(urljoin(hub_server.url, url), headers={"range": "bytes=5-9"})
        assert answer.status_code == 206 and answer.content == DATA[5:10]
        assert answer.headers["content-range"] == f"bytes 5-9/{len(DATA)}"
        assert httpx.head(urljoin(hub_server.url, url)).headers["content-length"] == str(len(DATA))


async def test_a_url_the_hub_refuses_costs_a_fallback_not_a_failed_read(
        hub_server: HubProcess, stored: tuple[AssetAddr, str]) -> None:
    addr, sha = stored
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        direct = await trio.to_thread.run_sync(read_into, hub, addr, sha, 0, 100)
        assert direct == DATA[:100]  # learnt by the worker-thread path too
        good = hub.read_urls.get(sha)
        assert good is not None
        forged = re.sub(r"signature=\w+", "signature=" + "0" * 64, good)
        for reader in ("stream", "direct"):
            hub.read_urls._urls[sha] = (forged, time.time() + 900)
            before = requests_seen(hub_server)
            if reader == "stream":
                async with hub.open_object(addr, "main", "big.bin", 7, 70_000, sha) as got:
                    assert await got.aread() == DATA[7:70_000]
            else:
                got_bytes = await trio.to_thread.run_sync(read_into, hub, addr, sha, 7, 70_000)
                assert got_bytes == DATA[7:70_000]
            # The refused URL, then the object's path.
            assert counted(before, requests_seen(hub_server)) == {"blob": 1, "file": 1}
            assert hub.read_urls.get(sha) not in (None, forged)  # a fresh one, learnt again


async def test_a_listing_hands_out_read_urls_of_the_objects_read_one_by_one(
        hub_server: HubProcess, stored: tuple[AssetAddr, str], tmp_path: Path) -> None:
    """``read_urls_over``: the objects larger than that come with their blob's read URL, so
    that their first read too goes there; smaller ones (read in batches) and listings that
    do not ask carry none, and such a page is never answered "not modified"."""
    addr, sha = stored
    small = b"small object"
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        local = tmp_path / "small"
        local.write_bytes(small)
        small_sha, size = hash_file(local)
        await hub.upload_file(local, small_sha, size)
        await hub.commit(addr, "main", "more", adds=[ObjectEntry("small", small_sha, size, 1.0)])
        await hub.list_objects(addr, "main")
        assert hub.read_urls.get(sha) is None  # not asked: none
        before = requests_seen(hub_server)
        _, entries = await hub.list_objects(addr, "main", read_urls_over=len(small))
        assert {e.path for e in entries} == {"big.bin", "small"}
        assert hub.read_urls.get(small_sha) is None and hub.read_urls.get(sha) is not None
        got = await trio.to_thread.run_sync(read_into, hub, addr, sha, 0, 4096)
        assert got == DATA[:4096]
        assert counted(before, requests_seen(hub_server)) == {"blob": 1}
    url = f"{hub_server.url}/api/v1/assets/alice/dataset/{addr.folder.name}/d/refs/main/objects"
    auth = {"authorization": f"Bearer {hub_server.keys['alice']}"}
    plain = httpx.get(url, headers=auth)
    assert "read_url" not in plain.text and "read_expires" not in plain.json()
    assert httpx.get(url, headers={**auth, "if-none-match": plain.headers["etag"]}
                     ).status_code == 304
    asked = httpx.get(url, params={"read_urls_over": 0}, headers=auth)
    again = httpx.get(url, params={"read_urls_over": 0},
                      headers={**auth, "if-none-match": asked.headers["etag"]})
    assert again.status_code == 200 and again.json()["read_expires"] > time.time()
    # A stranger's listing is refused before any grant is made.
    stranger = httpx.get(url, params={"read_urls_over": 0},
                         headers={"authorization": f"Bearer {hub_server.keys['bob']}"})
    assert stranger.status_code == 404 and "read_url" not in stranger.text


def listing_pages(server: HubProcess) -> Counter[str]:
    """Listing pages the server has served so far, rendered or kept (its /metrics)."""
    text = httpx.get(server.url + "/metrics").text
    return Counter({m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^ah_listing_pages_total\{source="(\w+)"\} (\S+)$', text, re.MULTILINE)})


async def test_a_listing_page_is_rendered_once_and_never_shown_to_another_user(
        hub_server: HubProcess, stored: tuple[AssetAddr, str]) -> None:
    """A page of a commit's listing is kept once rendered and sent again to whoever may
    view it; one with read URLs only to the user they were issued to; a caller who may not
    view the asset gets nothing from what was kept."""
    addr, sha = stored
    url = f"{hub_server.url}/api/v1/assets/alice/dataset/{addr.folder.name}/d/refs/main/objects"

    def get(user: str, **params: object) -> httpx.Response:
        return httpx.get(url, params=params,
                         headers={"authorization": f"Bearer {hub_server.keys[user]}"})

    def user_of(page: httpx.Response) -> str:
        [shown] = page.json()["objects"]
        return str(httpx.URL(shown["read_url"]).params["user"])

    before = listing_pages(hub_server)
    first, second = get("alice"), get("alice")
    assert first.content == second.content and "read_url" not in first.text
    assert listing_pages(hub_server) - before == Counter(rendered=1, kept=1)
    assert get("alice", limit=5).json() == first.json()  # another query: rendered again
    assert get("bob").status_code == 404  # may not view it: nothing kept is sent
    assert get("bob", read_urls_over=0).status_code == 404
    async with HubClient(hub_server.url, api_key=hub_server.keys["alice"]) as hub:
        await hub.share_folder(addr.folder, "bob", "view")
    assert get("bob").content == first.content  # now bob may: the same bytes
    before = listing_pages(hub_server)
    alice = [get("alice", read_urls_over=0) for _ in range(2)]
    bob = get("bob", read_urls_over=0)
    assert alice[0].content == alice[1].content
    assert listing_pages(hub_server) - before == Counter(rendered=2, kept=1)
    assert user_of(alice[0]) != user_of(bob)
    # Each URL reads the blob; bob's names bob (a grant is signed for its user).
    for page in (alice[0], bob):
        read = httpx.get(urljoin(hub_server.url, page.json()["objects"][0]["read_url"]),
                         headers={"range": "bytes=0-9"})
        assert read.status_code == 206 and read.content == DATA[:10]
    assert sha


def test_kept_pages_are_bounded_in_bytes_and_those_with_read_urls_in_time() -> None:
    now = [1000.0]
    pages = RenderedPages(keep_bytes=100, clock=lambda: now[0])
    pages.keep("a", b"x" * 40)
    pages.keep("b", b"y" * 40, until=1010.0)
    assert pages.get("a") == b"x" * 40  # now the most recently used
    pages.keep("c", b"z" * 40)  # over 100 bytes: b, the least recently used, goes
    assert pages.get("b") is None and pages.get("a") and pages.get("c")
    pages.keep("b", b"y" * 10, until=1010.0)
    now[0] = 1009.9
    assert pages.get("b") == b"y" * 10
    now[0] = 1010.0
    assert pages.get("b") is None and len(pages) == 2  # its URLs would have too little left
    pages.keep("huge", b"h" * 101)
    assert pages.get("huge") is None and len(pages) == 2
    pages.keep("a", b"q")  # kept again: replaced, counted once
    assert pages.get("a") == b"q" and pages._bytes == 41


def test_the_embedded_hub_keeps_few_pages_in_the_process_it_serves(tmp_path: Path) -> None:
    """The embedded hub runs inside its client (a mount's daemon): its kept pages are
    bounded by EMBEDDED_KEEP_PAGES, not the shared hub's KEEP_BYTES."""
    from ahmount.client.embedded import EMBEDDED_KEEP_PAGES, embedded_app
    from ahmount.server.rendered_pages import KEEP_BYTES

    pages: RenderedPages = embedded_app(tmp_path / "hub").state.rendered_pages
    assert EMBEDDED_KEEP_PAGES < KEEP_BYTES
    pages.keep("over", bytes(EMBEDDED_KEEP_PAGES + 1))
    pages.keep("under", bytes(EMBEDDED_KEEP_PAGES // 2))
    assert pages.get("over") is None and pages.get("under") is not None
