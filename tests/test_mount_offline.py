"""Listings that persist and a mount that works with the hub away: a remount lists a tag it
knew without asking the hub again (the feed replays what changed meanwhile); a mount started
with the hub stopped serves what was cached — tags fully, the branch at its last known head,
EIO at once for what it never fetched — says it is offline, queues writes, and commits them
once the hub is back."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ahmount.client.hub_client import HubClient
from tests.conftest import HubProcess, MountProcess, command, wait_until
from tests.test_ahfs import requests_seen
from tests.test_mount_feed import commit_file, make_asset
from tests.test_mount_write import run_ah

Mounter = Callable[..., MountProcess]


def test_remount_offline_and_back(mount_factory: Mounter, tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "data")
    key = server.add_user("alice")
    server.start()
    mount_args = ("--hub", server.url, "--api-key", key, "--cache-dir", str(tmp_path / "c"))
    try:
        addr = make_asset(server, key, "alice", "off")
        for i in range(20):
            commit_file(server, key, addr, f"t/{i:02d}.txt", f"tagged {i}".encode(), tmp_path)
        commit_file(server, key, addr, "never-read.bin", b"x" * 5000, tmp_path)

        async def tag() -> None:
            async with HubClient(server.url, api_key=key) as hub:
                await hub.create_tag(addr, "v1", "main")

        trio.run(tag)
        m = mount_factory(*mount_args)
        wait_until(lambda: m.control("status")["changes"] == "live", what="the feed")
        tagdir = m.mountpoint / "model/off/m/v1/t"
        branch = m.mountpoint / "model/off/m/main"
        seen = {p.name: p.read_bytes() for p in sorted(tagdir.iterdir())}
        assert len(seen) == 20
        assert (branch / "t/00.txt").read_bytes() == b"tagged 0"
        m.stop()

        # A remount lists the tag it knew without asking the hub for listings again.
        before = requests_seen(server)
        m = mount_factory(*mount_args, mountpoint=m.mountpoint)
        wait_until(lambda: m.control("status")["changes"] == "live", what="the feed")
        assert sorted(p.name for p in tagdir.iterdir()) == sorted(seen)
        asked = requests_seen(server) - before
        for endpoint in ("objects", "folders", "assets", "ref", "branches", "tags"):
            assert asked[endpoint] == 0, asked
        m.stop()

        # The hub goes away; a new mount starts anyway and serves what is cached.
        port = server.port
        server.stop()
        m = mount_factory(*mount_args, mountpoint=m.mountpoint)
        state = m.control("status")["hub_state"]
        assert state.startswith("offline, as of ")
        assert os.getxattr(branch, "user.ah.hub").decode() == state
        assert {p.name: p.read_bytes() for p in sorted(tagdir.iterdir())} == seen
        assert (branch / "t/00.txt").read_bytes() == b"tagged 0"
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            (branch / "never-read.bin").read_bytes()
        assert info.value.errno == errno.EIO and time.monotonic() - start < 10
        (branch / "written-offline.txt").write_text("queued while away")
        out = run_ah("status", cwd=branch)
        assert "offline, as of" in out and "1 added/changed" in out

        # The hub is back: the queued write commits.
        server.start(port)
        outputs: list[str] = []

        def committed() -> bool:
            result = subprocess.run([command("ah"), "commit", "-m", "from offline"],
                                    capture_output=True, text=True, cwd=branch, timeout=120)
            outputs.append(result.stdout + result.stderr)
            return result.returncode == 0

        wait_until(committed, timeout=60, what="the commit to land")
        assert "written-offline.txt" not in run_ah("status", cwd=branch)

        async def listing() -> list[str]:
            async with HubClient(server.url, api_key=key) as hub:
                _, entries = await hub.list_objects(addr, "main")
                return [e.path for e in entries]

        assert "written-offline.txt" in trio.run(listing)
        assert m.control("status")["hub_state"] == "online"
    finally:
        server.stop()


def test_a_hub_never_reached_cannot_start_offline(tmp_path: Path) -> None:
    from tests.conftest import free_port

    m = MountProcess(tmp_path / "mnt", "--hub", f"http://127.0.0.1:{free_port()}",
                     "--api-key", "ah_x", "--cache-dir", str(tmp_path / "c"))
    with pytest.raises(AssertionError, match="never reached it"):
        m.start()


def test_ah_urls_read_immutable_refs_offline(tmp_path: Path) -> None:
    from ahmount.ahfs import AhFileSystem
    from ahmount.ahfs.runtime import stop_all

    server = HubProcess(tmp_path / "data")
    key = server.add_user("alice")
    server.start()
    try:
        addr = make_asset(server, key, "alice", "offurl")
        commit_file(server, key, addr, "w.bin", b"weights" * 1000, tmp_path)
        commit_file(server, key, addr, "other.bin", b"o" * 3000, tmp_path)

        async def tag() -> None:
            async with HubClient(server.url, api_key=key) as hub:
                await hub.create_tag(addr, "v1", "main")

        trio.run(tag)
        options = {"hub": server.url, "api_key": key, "cache_dir": str(tmp_path / "c")}
        port = server.port
        url = "ah://model/offurl/m@v1/w.bin"
        assert AhFileSystem(**options, skip_instance_cache=True).cat(url) == b"weights" * 1000
        stop_all()
    finally:
        server.stop()
    fs = AhFileSystem(**options, skip_instance_cache=True)  # a new process, hub away
    assert fs.cat(url) == b"weights" * 1000
    assert fs.info(url)["size"] == 7000
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        fs.cat("ah://model/offurl/m@v1/other.bin")
    assert info.value.errno == errno.EIO and time.monotonic() - start < 15

    # ah.download, offline, from the same cache (ah login's hub, the default cache directory)
    from ahmount import ah
    from ahmount.config import make_config, save_config
    from ahmount.errors import HubUnavailable

    save_config(make_config(server.url, None, key))
    stop_all()
    warm = AhFileSystem(hub=server.url, api_key=key, skip_instance_cache=True)
    server.start(port)
    try:
        assert warm.cat(url) == b"weights" * 1000  # read once, online, into the cache
        stop_all()
    finally:
        server.stop()
    ah.download("model/offurl/m:v1", objects=["w.bin"], save_dir=str(tmp_path / "out"))
    assert (tmp_path / "out/w.bin").read_bytes() == b"weights" * 1000
    with pytest.raises(HubUnavailable, match="'other.bin' .* never read on this machine"):
        ah.download("model/offurl/m:v1", save_dir=str(tmp_path / "all"))
    assert not (tmp_path / "all").exists()  # nothing half-written
