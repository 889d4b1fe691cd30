"""The mount tells the truth and never dies: listings of nested trees, supervised background
tasks, one owner per cache directory, a queue that explains every file it holds."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ahmount import ah
from ahmount.config import dirs
from ahmount.mount.change_queue import ChangeQueue
from ahmount.mount.control import socket_path
from tests.conftest import MountProcess, command, wait_until

Mounter = Callable[..., MountProcess]


@pytest.fixture(autouse=True)
def model() -> None:
    ah._session, ah._logged_out = None, False
    ah._me.clear()
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")


def mount_log() -> str:
    path = dirs().cache / "logs/ah-mount.log"
    return path.read_text() if path.exists() else ""


def walk(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files}


def test_nested_directories_are_listed_on_every_kind_of_ref(mount_factory: Mounter,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "x/y/z").mkdir(parents=True)
    (src / "x/y/z/f").write_text("hi")
    (src / "top").write_text("t")
    for i in range(3):
        (src / f"s4/d{i:02}").mkdir(parents=True)
        (src / f"s4/d{i:02}/f{i}").write_text(str(i))
    ah.commit("model/llm/gpt2", msg="tree", add=[f"{src}/*"])
    ah.create("model/llm/gpt2:t1", create_tag=True, source="main")
    commit = ah.list("model/llm/gpt2", resource="commit")[0]["id"][:8]
    expected = {"x/y/z/f", "top", "s4/d00/f0", "s4/d01/f1", "s4/d02/f2"}
    m = mount_factory()
    asset = m.mountpoint / "model/llm/gpt2"
    for ref in ("main", "t1", commit):
        assert sorted(os.listdir(asset / ref)) == ["s4", "top", "x"], ref
        assert walk(asset / ref) == expected, ref
    (asset / "main/queued.txt").write_text("q")  # a branch with queued edits too
    assert walk(asset / "main") == expected | {"queued.txt"}


def test_a_control_client_that_hangs_up_leaves_the_mount_up(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "big.bin").write_bytes(os.urandom(32 << 20))
    segments = ["model", "llm", "gpt2", "v1"]
    for _ in range(3):  # Ctrl-C on `ah commit`: the client is gone before the answer
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(socket_path(m.mountpoint)))
            sock.sendall(json.dumps({"op": "commit", "args": {
                "path": segments, "message": "interrupted"}}).encode() + b"\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: any(o["path"] == "big.bin" for o in ah.list("model/llm/gpt2:v1")),
               what="the interrupted commit to land")
    assert m.alive() and m.control("status")["pid"] == m.pid
    assert (branch / "big.bin").stat().st_size == 32 << 20
    assert "Traceback" not in mount_log()


@pytest.mark.expect_traceback
def test_a_bug_in_a_background_task_unmounts_cleanly_and_keeps_the_queue(
        mount_factory: Mounter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w.bin").write_bytes(os.urandom(6 << 20))
    ah.commit("model/llm/gpt2:v1", msg="weights", add=[str(tmp_path / "w.bin")])
    monkeypatch.setenv("AHMOUNT_FAULT", "read-ahead")
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "kept.txt").write_text("queued before the bug")
    # The mount goes away under the reader.
    with pytest.raises(OSError), open(branch / "w.bin", "rb") as handle:
        while handle.read(1 << 20):
            pass
    wait_until(lambda: not m.alive(), what="the daemon to stop after the bug")
    assert not os.path.ismount(m.mountpoint)  # unmounted, not "Transport endpoint ..."
    log = mount_log()
    assert "bug in read-ahead" in log and "InjectedFault" in log
    assert "queued changes kept for the next mount" in log
    monkeypatch.delenv("AHMOUNT_FAULT")
    mount_factory(mountpoint=m.mountpoint)
    assert (branch / "kept.txt").read_text() == "queued before the bug"


def test_a_second_mount_of_the_same_hub_and_user_fails_fast(mount_factory: Mounter,
                                                            tmp_path: Path) -> None:
    m = mount_factory()
    (m.mountpoint / "model/llm/gpt2/v1/a.txt").write_text("first mount's")
    second = tmp_path / "second"
    result = subprocess.run([command("ah-mount"), str(second)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert f"pid {m.pid}" in result.stderr and str(m.mountpoint) in result.stderr
    assert not os.path.ismount(second)
    # The first mount lost nothing.
    assert (m.mountpoint / "model/llm/gpt2/v1/a.txt").read_text() == "first mount's"
    assert m.alive()


def test_stray_queue_files_go_to_lost_and_found(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "queue")
    local, fd = queue.create_local()
    os.write(fd, b"bytes whose row a power loss took")
    os.close(fd)
    queue.close()
    again = ChangeQueue(tmp_path / "queue")
    lost = list((tmp_path / "queue/lost+found").iterdir())
    assert len(lost) == 1 and lost[0].name.endswith(local)
    assert lost[0].read_bytes() == b"bytes whose row a power loss took"
    again.close()


def test_different_hubs_never_share_a_cache_directory() -> None:
    from ahmount.mount.cache_dir import claim, hub_id

    assert hub_id(None) != hub_id("http://127.0.0.1:8000") != hub_id("http://127.0.0.1:8001")
    base = dirs().cache
    a = claim(base, "http://127.0.0.1:8000", "alice", Path("/a"))
    b = claim(base, "http://127.0.0.1:8001", "alice", Path("/b"))
    c = claim(base, "http://127.0.0.1:8000", "bob", Path("/c"))
    try:
        assert len({a.root, b.root, c.root}) == 3
        assert oct(a.root.stat().st_mode & 0o777) == "0o700"
        from ahmount.errors import Conflict

        with pytest.raises(Conflict, match="/a"):
            claim(base, "http://127.0.0.1:8000", "alice", Path("/d"))
    finally:
        for claimed in (a, b, c):
            claimed.release()
    claim(base, "http://127.0.0.1:8000", "alice", Path("/d")).release()


def test_names_over_255_bytes_are_refused_as_ext4_does(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    long_name = "n" * 256
    (branch / "ok.txt").write_text("x")
    attempts: list[Callable[[], object]] = [
        lambda: (branch / long_name).write_text("x"),
        lambda: (branch / long_name).mkdir(),
        lambda: os.rename(branch / "ok.txt", branch / long_name),
        lambda: os.stat(branch / long_name),
        lambda: (branch / ("é" * 128)).write_text("x"),  # 256 bytes in 128 characters
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.ENAMETOOLONG
    (branch / ("n" * 255)).write_text("fits")
    assert os.statvfs(branch).f_namemax == 255
    assert sorted(os.listdir(branch)) == sorted(["ok.txt", "n" * 255])
    m.control("commit", path=["model", "llm", "gpt2", "v1"], message="long names",
              force=False)
    assert {o["path"] for o in ah.list("model/llm/gpt2:v1")} == {"ok.txt", "n" * 255}
