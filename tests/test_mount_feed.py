"""Mounts follow the hub's change feed: a commit made through the API shows in a mount's
``ls`` and ``cat`` of the branch long before its polling period (``--refresh 60``), the
mount says which mode it is in, falls back to polling while the hub is away, and applies
what changed meanwhile when the feed is back."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess, MountProcess, wait_until

Mounter = Callable[..., MountProcess]
#: Far below the polling period: only the feed can make a change show this fast.
FAST = 5.0


def commit_file(server: HubProcess, key: str, addr: AssetAddr, path: str, data: bytes,
                tmp: Path) -> None:
    async def run() -> None:
        local = tmp / f"blob-{time.monotonic_ns()}"
        local.write_bytes(data)
        async with HubClient(server.url, api_key=key) as hub:
            import hashlib

            sha = hashlib.sha256(data).hexdigest()
            await hub.upload_file(local, sha, len(data))
            await hub.commit(addr, "main", f"write {path}",
                             adds=[ObjectEntry(path, sha, len(data), time.time())])

    trio.run(run)


def make_asset(server: HubProcess, key: str, owner: str, name: str) -> AssetAddr:
    async def run() -> AssetAddr:
        async with HubClient(server.url, api_key=key) as hub:
            folder = FolderAddr(owner, "model", name)
            await hub.create_folder(folder)
            addr = AssetAddr(folder, "m")
            await hub.create_asset(addr)
            return addr

    return trio.run(run)


def test_a_commit_elsewhere_shows_at_once(mount_factory: Mounter, tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "data")
    key = server.add_user("alice")
    server.start()
    try:
        addr = make_asset(server, key, "alice", "live")
        commit_file(server, key, addr, "a.txt", b"one", tmp_path)
        m = mount_factory("--hub", server.url, "--api-key", key, "--refresh", "60")
        wait_until(lambda: m.control("status")["changes"] == "live", what="the feed")
        branch = m.mountpoint / "model/live/m/main"
        assert (branch / "a.txt").read_bytes() == b"one"
        assert sorted(p.name for p in branch.iterdir()) == ["a.txt"]  # cached now
        start = time.monotonic()
        here = os.getcwd()
        os.chdir(branch)  # a shell inside the branch while it changes elsewhere
        try:
            commit_file(server, key, addr, "a.txt", b"two", tmp_path)
            commit_file(server, key, addr, "b.txt", b"new", tmp_path)
            wait_until(lambda: (branch / "a.txt").read_bytes() == b"two", timeout=FAST,
                       what="the new content of a.txt")
            wait_until(lambda: sorted(p.name for p in branch.iterdir()) == ["a.txt", "b.txt"],
                       timeout=FAST, what="b.txt in the listing")
            assert time.monotonic() - start < FAST
            assert os.getcwd() == str(branch)  # its directory was not pulled from under it
            assert Path("b.txt").read_bytes() == b"new"
        finally:
            os.chdir(here)

        # the hub goes away: the mount says it polls, and catches up once it is back
        port = server.port
        server.stop()
        wait_until(lambda: m.control("status")["changes"] == "polling", timeout=30,
                   what="polling mode")
        server.start(port)
        wait_until(lambda: m.control("status")["changes"] == "live", timeout=60,
                   what="the feed again")
        commit_file(server, key, addr, "c.txt", b"after", tmp_path)
        wait_until(lambda: (branch / "c.txt").exists(), timeout=FAST, what="c.txt")
        from tests.test_mount_write import run_ah

        shown = run_ah("stats", str(m.mountpoint))
        assert "changes: live" in shown and "hub_state: online" in shown
        text = (Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log").read_text()
        assert text.count("change feed connected") == 2
        assert "change feed lost" in text and "polling the hub every 60.0 s" in text
    finally:
        server.stop()


def test_a_file_that_grew_elsewhere_shows_whole_when_polling(mount_factory: Mounter,
                                                             tmp_path: Path) -> None:
    """The kernel keeps a cached file's size under writeback caching whatever getattr says;
    a file rewritten elsewhere must not read cut to its old length (it gets a new inode)."""
    server = HubProcess(tmp_path / "data")
    key = server.add_user("alice")
    server.start()
    try:
        addr = make_asset(server, key, "alice", "grow")
        commit_file(server, key, addr, "g.txt", b"aaaa", tmp_path)
        m = mount_factory("--hub", server.url, "--api-key", key, "--refresh", "1",
                          "--no-change-feed")
        assert m.control("status")["changes"] == "off"
        path = m.mountpoint / "model/grow/m/main/g.txt"
        assert path.read_bytes() == b"aaaa"
        commit_file(server, key, addr, "g.txt", b"bbbb", tmp_path)  # same size, new bytes
        wait_until(lambda: path.read_bytes() == b"bbbb", timeout=10, what="bbbb")
        commit_file(server, key, addr, "g.txt", b"cccccccc", tmp_path)
        wait_until(lambda: path.read_bytes() == b"cccccccc", timeout=10, what="all of it")
        assert path.stat().st_size == 8
    finally:
        server.stop()


def test_the_embedded_hub_feeds_a_mount_of_another_process(mount_factory: Mounter,
                                                          tmp_path: Path) -> None:
    """Several processes on one embedded hub (SQLite): a commit by this one shows in the
    mount's process at once."""
    from ahmount import ah

    (tmp_path / "e.txt").write_text("first")
    ah.create("model/emb")
    ah.create("model/emb/m")
    ah.commit("model/emb/m", msg="1", add=[str(tmp_path / "e.txt")])
    m = mount_factory("--refresh", "60")
    wait_until(lambda: m.control("status")["changes"] == "live", what="the feed")
    path = m.mountpoint / "model/emb/m/main/e.txt"
    assert path.read_text() == "first"
    (tmp_path / "e.txt").write_text("second, longer")
    ah.commit("model/emb/m", msg="2", add=[str(tmp_path / "e.txt")])
    wait_until(lambda: path.read_text() == "second, longer", timeout=FAST, what="the commit")
