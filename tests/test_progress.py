"""Progress you can see: the control socket's progress lines in-process (a real unix socket,
no FUSE), then ``ah commit``/``ah sync`` in a real mount drawing a bar on a pty, one summary
line when piped, nothing with ``-q``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from ahmount.errors import InvalidArgument
from ahmount.mount.control import ControlServer, call, socket_path
from ahmount.transfer.progress import Progress, RemoteProgress, State
from tests.conftest import MountProcess, run_command

Mounter = Callable[..., MountProcess]


async def _serve(mountpoint: Path, ops: dict[str, Any], nursery: trio.Nursery) -> None:
    server = ControlServer(socket_path(mountpoint), ops, os.getuid())
    await nursery.start(server.serve)


async def test_a_control_operation_streams_the_progress_of_its_transfers(tmp_path: Path
                                                                          ) -> None:
    async def upload(args: dict[str, Any]) -> dict[str, Any]:
        progress = Progress("Uploading", 3, 3000)
        for _ in range(3):
            await trio.sleep(0.15)  # a transfer that takes a while, not a wait for a condition
            await trio.to_thread.run_sync(progress.add_bytes, 1000)  # as a worker thread does
            progress.file_done()
        progress.close()
        return {"uploaded": 3}

    seen: list[State] = []
    async with trio.open_nursery() as nursery:
        await _serve(tmp_path, {"upload": upload}, nursery)
        result = await trio.to_thread.run_sync(
            lambda: call(tmp_path, "upload", {}, 10, seen.append))
        plain = await trio.to_thread.run_sync(lambda: call(tmp_path, "upload", {}, 10))
        nursery.cancel_scope.cancel()
    assert result == plain == {"uploaded": 3}  # a client that asks for none gets only that
    assert len(seen) >= 2, seen  # lines while it runs, not only at the end
    done = [s["bytes_done"] for s in seen]
    assert done == sorted(done) and seen[-1]["bytes_done"] == 3000
    assert seen[-1]["files_done"] == 3 and {s["what"] for s in seen} == {"Uploading"}


async def test_a_client_that_hangs_up_mid_progress_leaves_the_operation_running(
        tmp_path: Path) -> None:
    finished = trio.Event()

    async def upload(args: dict[str, Any]) -> dict[str, Any]:
        progress = Progress("Uploading", 1, 10)
        for _ in range(5):
            await trio.sleep(0.05)
            progress.add_bytes(2)
        progress.close()
        finished.set()
        return {}

    async with trio.open_nursery() as nursery:
        await _serve(tmp_path, {"upload": upload, "ping": _ping}, nursery)

        def hang_up() -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(socket_path(tmp_path)))
                sock.sendall(b'{"op": "upload", "args": {}, "progress": true}\n')
                sock.recv(1)  # the first progress line, then gone

        await trio.to_thread.run_sync(hang_up)
        with trio.fail_after(10):
            await finished.wait()
        assert await trio.to_thread.run_sync(lambda: call(tmp_path, "ping")) == "pong"
        nursery.cancel_scope.cancel()


async def test_an_operation_that_fails_answers_its_own_error_with_progress_too(
        tmp_path: Path) -> None:
    async def refuse(args: dict[str, Any]) -> None:
        Progress("Uploading", 1, 10).add_bytes(5)
        raise InvalidArgument("model/llm is not inside a branch")

    async with trio.open_nursery() as nursery:
        await _serve(tmp_path, {"commit": refuse}, nursery)
        for progress in (None, RemoteProgress()):
            with pytest.raises(InvalidArgument, match="not inside a branch"):
                await trio.to_thread.run_sync(
                    lambda p=progress: call(tmp_path, "commit", {}, 10, p))
        nursery.cancel_scope.cancel()


async def _ping(args: dict[str, Any]) -> str:
    return "pong"


def test_remote_progress_starts_a_bar_per_operation(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Piped, each operation the daemon reported ends in its own summary line."""
    import logging

    caplog.set_level(logging.INFO, logger="ahmount.ah")
    remote = RemoteProgress()
    for state in ({"id": 1, "what": "Uploading", "files": 2, "files_done": 1, "bytes": 10,
                   "bytes_done": 4},
                  {"id": 1, "what": "Uploading", "files": 2, "files_done": 2, "bytes": 10,
                   "bytes_done": 10},
                  {"id": 2, "what": "Uploading", "files": 1, "files_done": 1, "bytes": 5,
                   "bytes_done": 5}):
        remote(state)
    remote.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ahmount.ah"]
    assert [line.split(",")[0] for line in lines] == ["Uploaded 2 files", "Uploaded 1 file"]


@pytest.mark.usefixtures("gpt2_v1")
def test_mount_commit_and_sync_draw_a_bar_on_a_terminal(mount_factory: Mounter) -> None:
    m = mount_factory("--write-back", "off")  # the bytes wait for the commit
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "big.bin").write_bytes(os.urandom(8 << 20))
    tty = run_command("ah", "sync", cwd=branch, stderr_tty=True)
    assert "Uploading 1/1 files" in tty.stderr and "100%" in tty.stderr, tty.stderr
    assert "1 file uploaded ahead (8.0 MiB sent)" in tty.stderr
    (branch / "second.bin").write_bytes(os.urandom(4 << 20))
    piped = run_command("ah", "commit", "-m", "two", cwd=branch)
    assert "Uploaded 1 file, 4.0 MiB in" in piped.stderr, piped.stderr
    assert "\r" not in piped.stderr and "Commit" in piped.stderr
    (branch / "third.bin").write_bytes(os.urandom(1 << 20))
    quiet = run_command("ah", "commit", "-q", "-m", "three", cwd=branch, stderr_tty=True)
    assert "Uploading" not in quiet.stderr and "%" not in quiet.stderr, quiet.stderr


def test_a_bad_write_back_value_is_refused_naming_it(tmp_path: Path) -> None:
    bad = run_command("ah-mount", str(tmp_path / "mnt"), "--write-back", "soon", check=False)
    assert bad.returncode == 2 and "--write-back 'soon'" in bad.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_mounting_over_a_non_empty_directory_warns(mount_factory: Mounter,
                                                   tmp_path: Path) -> None:
    point = tmp_path / "full"
    point.mkdir()
    (point / "notes.txt").write_text("hidden while mounted")
    result = run_command("ah-mount", str(point))
    try:
        assert "warning: " in result.stderr and "its 1 entry is hidden" in result.stderr
    finally:
        MountProcess(point).stop()
    assert (point / "notes.txt").read_text() == "hidden while mounted"


def test_a_bad_fill_random_value_is_refused_naming_it(tmp_path: Path) -> None:
    bad = run_command("ah-mount", str(tmp_path / "mnt"), "--fill-random", "soon", check=False)
    assert bad.returncode == 2 and "--fill-random 'soon'" in bad.stderr
    assert not os.path.ismount(tmp_path / "mnt")
