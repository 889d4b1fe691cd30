"""Editing branches through the mount: ordinary tools, the change queue, ``ah commit``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import getpass
import hashlib
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ahmount import ah
from ahmount.vfs.cache_dir import state_dir
from tests.conftest import HubProcess, MountProcess, command, small_disk, wait_until

Mounter = Callable[..., MountProcess]


pytestmark = pytest.mark.usefixtures("gpt2_v1")


def run_ah(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    result = subprocess.run([command("ah"), *args], capture_output=True, text=True, cwd=cwd,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"ah {' '.join(args)}: {result.stderr}")
    return result.stdout + result.stderr


def objects(path: str) -> dict[str, int]:
    return {o["path"]: o["size_bytes"] for o in ah.list(path)}


def test_write_then_commit_from_the_branch_directory(mount_factory: Mounter,
                                                     tmp_path: Path) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (tmp_path / "w.pt").write_bytes(os.urandom(300_000))
    subprocess.run(["cp", str(tmp_path / "w.pt"), str(branch)], check=True)
    (branch / "configs").mkdir()
    (branch / "configs/a.json").write_text('{"a": 1}')
    status = run_ah("status", cwd=branch)
    assert "2 added/changed" in status and "w.pt" in status
    assert objects("model/llm/gpt2:v1") == {}  # nothing reaches the hub before a commit
    out = run_ah("commit", "-m", "new weights", cwd=branch / "configs")
    assert "Commit" in out
    assert objects("model/llm/gpt2:v1") == {"w.pt": 300_000, "configs/a.json": 8}
    assert "0 added/changed, 0 deleted" in run_ah("status", cwd=branch)
    # Visible at once through the mount itself and through a second mount.
    assert (branch / "w.pt").read_bytes() == (tmp_path / "w.pt").read_bytes()
    other = mount_factory("--cache-dir", str(tmp_path / "second-cache"))
    assert (other.mountpoint / "model/llm/gpt2/v1/configs/a.json").read_text() == '{"a": 1}'
    assert ah.list("model/llm/gpt2:v1", resource="commit")[0]["message"] == "new weights"


def test_ordinary_tools_on_a_branch(mount_factory: Mounter, tmp_path: Path) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "notes.txt").write_text("hello world\n")
    subprocess.run(["sed", "-i", "s/world/there/", str(branch / "notes.txt")], check=True)
    assert (branch / "notes.txt").read_text() == "hello there\n"
    # An editor's save: write a temp file, fsync it, rename it over the original.
    tmp = branch / ".notes.txt.swp"
    with open(tmp, "w") as handle:
        handle.write("saved by an editor\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, branch / "notes.txt")
    assert (branch / "notes.txt").read_text() == "saved by an editor\n"
    with open(branch / "notes.txt", "a") as handle:
        handle.write("appended\n")
    with open(branch / "random.bin", "wb") as handle:
        handle.truncate(10_000)
    with open(branch / "random.bin", "r+b") as handle:
        handle.seek(5000)
        handle.write(b"XYZ")
    subprocess.run(["truncate", "-s", "5003", str(branch / "random.bin")], check=True)
    fd = os.open(branch / "mapped.bin", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096) as mapping:
        mapping[:6] = b"mapped"
        mapping.flush()
    os.close(fd)
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"{i}.txt").write_text(str(i))
    # Directory modes as datasets come: group-writable (umask 002), private, sticky. tar x
    # and rsync -a set each; they are accepted (not kept): both exit 0.
    (src / "d").chmod(0o775)
    (src / "private").mkdir(mode=0o700)
    (src / "private" / "p.txt").write_text("p")
    (src / "scratch").mkdir()
    (src / "scratch").chmod(0o1777)
    subprocess.run(["rsync", "-a", f"{src}/", f"{branch}/synced/"], check=True)
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(tmp_path / "t.tar"), "tree"],
                   check=True)
    subprocess.run(["tar", "-C", str(branch), "-xf", str(tmp_path / "t.tar")], check=True)
    assert (branch / "tree/private/p.txt").read_text() == "p"
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README").write_text("repo\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a",
                    "commit", "-qm", "r"], check=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(branch / "cloned")], check=True)
    assert (branch / "cloned/README").read_text() == "repo\n"
    (branch / "gone.txt").write_text("x")
    os.unlink(branch / "gone.txt")
    run_ah("commit", "-m", "tools", cwd=branch)
    found = objects("model/llm/gpt2:v1")
    assert found["notes.txt"] == len("saved by an editor\nappended\n")
    assert found["random.bin"] == 5003 and found["mapped.bin"] == 4096
    assert {f"synced/d/{i}.txt" for i in range(5)} <= set(found)
    assert {f"tree/d/{i}.txt" for i in range(5)} <= set(found)
    assert "cloned/README" in found and "cloned/.git/HEAD" in found
    assert "gone.txt" not in found and ".notes.txt.swp" not in found
    ah.download("model/llm/gpt2:v1", objects=["random.bin", "mapped.bin"],
                save_dir=str(tmp_path / "out"))
    data = (tmp_path / "out/random.bin").read_bytes()
    assert data[5000:5003] == b"XYZ" and data[:5000] == bytes(5000)
    assert (tmp_path / "out/mapped.bin").read_bytes()[:6] == b"mapped"


def test_renames_deletes_and_directories(mount_factory: Mounter, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/one.txt").write_text("1")
    (tmp_path / "a/two.txt").write_text("2")
    (tmp_path / "big.bin").write_bytes(os.urandom(2 << 20))
    ah.commit("model/llm/gpt2:v1", msg="base", add=[str(tmp_path / "a"),
                                                     str(tmp_path / "big.bin")])
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    os.rename(branch / "a", branch / "b")  # a directory of committed objects
    os.rename(branch / "big.bin", branch / "moved.bin")  # a committed object: no bytes copied
    assert sorted(os.listdir(branch)) == ["b", "moved.bin"]
    assert (branch / "b/two.txt").read_text() == "2"
    assert (branch / "moved.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    (branch / "empty").mkdir()
    (branch / "full").mkdir()
    (branch / "full/x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rmdir(branch / "full")
    assert info.value.errno == errno.ENOTEMPTY
    os.rmdir(branch / "empty")
    # RENAME_NOREPLACE is honoured.
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, noreplace = -100, 1
    result = libc.renameat2(at_fdcwd, str(branch / "full/x").encode(), at_fdcwd,
                            str(branch / "moved.bin").encode(), noreplace)
    assert result == -1 and ctypes.get_errno() == errno.EEXIST
    with pytest.raises(OSError) as info:
        os.symlink("x", branch / "link")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.link(branch / "full/x", branch / "hard")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError) as info:
        os.chown(branch / "full/x", 12345, 12345)
    assert info.value.errno == errno.EPERM
    run_ah("commit", "-m", "moves", cwd=branch)
    assert objects("model/llm/gpt2:v1") == {"b/one.txt": 1, "b/two.txt": 1,
                                            "moved.bin": 2 << 20, "full/x": 1}


def test_folders_assets_branches_and_xattrs_by_mkdir_rmdir_mv(mount_factory: Mounter) -> None:
    m = mount_factory()
    root = m.mountpoint
    (root / "dataset/images").mkdir()
    (root / "dataset/images/cifar10").mkdir()
    (root / "model/llm/gpt2/v2").mkdir()
    assert [b["id"] for b in ah.list("model/llm/gpt2", resource="branch")] == \
        ["main", "v1", "v2"]
    assert [a["name"] for a in ah.list("dataset/images")] == ["cifar10"]
    with pytest.raises(OSError):
        (root / "dataset/images/cifar10/v1").mkdir()  # datasets have only main
    os.rmdir(root / "model/llm/gpt2/v2")
    with pytest.raises(OSError) as info:
        os.rmdir(root / "model/llm/gpt2/main")
    assert info.value.errno in (errno.EPERM, errno.ENOTEMPTY)
    os.rename(root / "dataset/images", root / "dataset/pictures")
    assert [f["name"] for f in ah.list("dataset")] == ["pictures"]
    os.setxattr(root / "model/llm/gpt2", "user.ah.labels", b"PyTorch,GPT")
    os.setxattr(root / "model/llm", "user.ah.description", b"language models")
    assert ah.list("model/llm")[0]["labels"] == ["PyTorch", "GPT"]
    assert ah.list("model")[0]["description"] == "language models"
    wait_until(lambda: os.getxattr(root / "model/llm/gpt2", "user.ah.labels") ==
               b"PyTorch,GPT", what="labels through the mount")
    os.rmdir(root / "dataset/pictures/cifar10")
    os.rmdir(root / "dataset/pictures")
    assert ah.list("dataset") == []


def test_queue_survives_a_killed_daemon_and_an_unmount(mount_factory: Mounter,
                                                       tmp_path: Path) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "closed.txt").write_text("closed before the crash")
    fd = os.open(branch / "synced.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"fsynced before the crash")
    os.fsync(fd)  # still open when the daemon dies
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: not m.alive(), what="daemon death")
    with contextlib.suppress(OSError):
        os.close(fd)
    m2 = mount_factory(mountpoint=m.mountpoint)
    assert (branch / "closed.txt").read_text() == "closed before the crash"
    assert (branch / "synced.txt").read_text() == "fsynced before the crash"
    assert "2 added/changed" in run_ah("status", cwd=branch)
    # A clean unmount keeps them too, and says so.
    subprocess.run(["fusermount3", "-u", str(m2.mountpoint)], check=True)
    wait_until(lambda: not m2.alive(), what="daemon exit")
    log = (Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log").read_text()
    assert "queued changes kept for the next mount" in log
    mount_factory(mountpoint=m.mountpoint)
    run_ah("commit", "-m", "after restarts", cwd=branch)
    assert objects("model/llm/gpt2:v1") == {"closed.txt": 23, "synced.txt": 24}


def test_reset_status_remote_changes_unknown_changes_and_sync(mount_factory: Mounter,
                                                              tmp_path: Path) -> None:
    (tmp_path / "shared.txt").write_text("base")
    ah.commit("model/llm/gpt2:v1", msg="base", add=[str(tmp_path / "shared.txt")])
    m = mount_factory("--refresh", "0.2")
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "shared.txt").write_text("mine")
    (branch / "local.txt").write_text("local")
    # Someone else changes the same path on the hub meanwhile.
    (tmp_path / "theirs.txt").write_text("theirs")
    ah.commit("model/llm/gpt2:v1", msg="remote", add={str(tmp_path / "theirs.txt"):
                                                       "shared.txt"})
    wait_until(lambda: "also changed on the hub" in run_ah("status", cwd=branch),
               what="status to report the remote change")
    assert re.search(r"\d+ files? uploaded ahead", run_ah("sync", cwd=branch))
    # A foreign staged change refuses the commit until forced.
    from ahmount.client.embedded import embedded_client
    from ahmount.hub.models import AssetAddr, FolderAddr
    from ahmount.sync_runner import run_sync

    async def stage() -> None:
        async with embedded_client() as hub:
            addr = AssetAddr(FolderAddr(ah.list("model")[0]["path"].split("/")[1], "model",
                                        "llm"), "gpt2")
            await hub.stage(addr, "v1", "other-client", deletes=["nothing"])

    run_sync(stage)
    # Both a remote change to a queued path and the foreign staged change refuse it.
    refused = run_ah("commit", "-m", "mine", cwd=branch, check=False)
    assert "shared.txt changed on the hub since it was queued" in refused
    assert "overwrite it" in refused
    run_ah("commit", "-m", "mine", "--force", cwd=branch)
    assert (branch / "shared.txt").read_text() == "mine"  # queued changes go on top
    assert objects("model/llm/gpt2:v1") == {"shared.txt": 4, "local.txt": 5}
    (branch / "scratch.txt").write_text("scratch")
    os.unlink(branch / "local.txt")
    assert "Dropped 2 queued changes" in run_ah("reset", cwd=branch)
    assert sorted(os.listdir(branch)) == ["local.txt", "shared.txt"]
    assert "0 added/changed, 0 deleted" in run_ah("status", cwd=branch)


def test_branch_commands_run_elsewhere_act_on_the_queue_of_the_mount(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """``ah status|sync|commit|reset model/llm/gpt2:v1`` run outside the mount act on what a
    running mount queued for that branch. They asked the hub alone, and said "nothing to
    commit" and "0 dropped" while the mount held the user's edits."""
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    me = ah.list("model")[0]["path"].split("/")[1]
    assert "nothing to commit" in run_ah("status", "model/llm/gpt2:v1", cwd=tmp_path)
    (branch / "made-here").mkdir()  # a directory the hub does not have: the mount's
    out = run_ah("status", "model/llm/gpt2:v1", cwd=tmp_path)
    assert "0 added/changed" in out and f"ah-mount at {m.mountpoint}" in out
    (branch / "made-here/a.txt").write_text("a")
    for address in ("model/llm/gpt2:v1", f"/{me}/t9k-assethub/model/llm/gpt2:v1"):
        out = run_ah("status", address, cwd=tmp_path)
        assert "1 added/changed" in out and "made-here/a.txt" in out, out
        assert f"queued in the ah-mount at {m.mountpoint}" in out
    # Another branch of the asset has nothing queued: the hub answers, as before.
    assert "nothing to commit" in run_ah("status", "model/llm/gpt2:main", cwd=tmp_path)
    assert "no running ah-mount has queued changes" in run_ah(
        "sync", "model/llm/gpt2:main", cwd=tmp_path, check=False)
    assert re.search(r"\d+ files? uploaded ahead", run_ah("sync", "model/llm/gpt2:v1",
                                                          cwd=tmp_path))
    assert "Commit" in run_ah("commit", "-m", "elsewhere", "model/llm/gpt2:v1", cwd=tmp_path)
    assert objects("model/llm/gpt2:v1") == {"made-here/a.txt": 1}
    assert "nothing to commit" in run_ah("status", "model/llm/gpt2:v1", cwd=tmp_path)
    (branch / "b.txt").write_text("b")
    assert "Dropped 1 queued change" in run_ah("reset", "model/llm/gpt2:v1", cwd=tmp_path)
    assert not (branch / "b.txt").exists()
    # A mount of another hub or key is never asked which branches hold changes.
    from ahmount.config import hub_identity, load_config
    from ahmount.mount.control import call

    (branch / "c.txt").write_text("c")
    asked = {"address": "model/llm/gpt2:v1", "identity": hub_identity(load_config())}
    assert call(m.mountpoint, "queued_branch", asked) == {
        "path": ["model", "llm", "gpt2", "v1"]}
    assert call(m.mountpoint, "queued_branch", {**asked, "identity": "0" * 32}) == {
        "path": None}
    # Two mounts holding changes of the branch: neither is guessed.
    other = mount_factory("--cache-dir", str(tmp_path / "second-cache"))
    (other.mountpoint / "model/llm/gpt2/v1/d.txt").write_text("d")
    refused = run_ah("commit", "-m", "which", "model/llm/gpt2:v1", cwd=tmp_path, check=False)
    assert "queued changes in 2 mounts" in refused and str(other.mountpoint) in refused
    assert objects("model/llm/gpt2:v1") == {"made-here/a.txt": 1}


def test_a_mount_of_another_home_is_named_not_taken_for_an_api_path(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """``ah`` run with another AHMOUNT_HOME than the mount's (a new shell without the
    export, another user) cannot reach its control socket. Given a path in it, it read the
    path as an API path and said it must look like /<owner>/t9k-assethub/...; in the
    branch directory, that the directory is not inside a mount."""
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "a.txt").write_text("a")
    other_home = {**os.environ, "AHMOUNT_HOME": str(tmp_path / "other-home")}
    for args, cwd in [(["status", str(branch)], tmp_path), (["commit", "-m", "m"], branch),
                      (["status", "."], branch / "..")]:
        result = subprocess.run([command("ah"), *args], capture_output=True, text=True,
                                cwd=cwd, env=other_home, timeout=60)
        assert result.returncode == 2, result.stderr
        assert f"is inside the ah-mount at {m.mountpoint}, which this ah does not control" \
            in result.stderr, result.stderr
    assert "1 added/changed" in run_ah("status", cwd=branch)  # its own home's ah: as before


def test_a_reset_is_seen_at_once_by_what_the_kernel_kept(mount_factory: Mounter,
                                                         tmp_path: Path) -> None:
    """After ``ah reset`` the branch is its head again at once: the kernel's kept entries,
    attributes and pages of the dropped edits are forgotten (``stat`` showed a dropped new
    file, and ``cat`` the dropped bytes of a reset file, until ``--refresh`` ran out)."""
    (tmp_path / "kept.txt").write_text("head bytes\n")
    ah.commit("model/llm/gpt2:v1", msg="base", add={str(tmp_path / "kept.txt"): "d/kept.txt"})
    m = mount_factory("--refresh", "3600", "--no-change-feed")
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "new.txt").write_text("dropped")
    (branch / "d/kept.txt").write_text("edited, then dropped, bytes\n")
    (branch / "made").mkdir()
    assert os.stat(branch / "new.txt").st_size == 7  # all in the kernel's caches now
    assert (branch / "d/kept.txt").read_text() == "edited, then dropped, bytes\n"
    assert sorted(os.listdir(branch)) == ["d", "made", "new.txt"]
    assert "Dropped 2 queued changes" in run_ah("reset", cwd=branch)
    assert not (branch / "new.txt").exists() and not (branch / "made").exists()
    assert os.stat(branch / "d/kept.txt").st_size == 11
    assert (branch / "d/kept.txt").read_text() == "head bytes\n"
    assert sorted(os.listdir(branch)) == ["d"]


def test_a_merge_through_the_mount_shows_on_main_at_once(mount_factory: Mounter,
                                                         tmp_path: Path) -> None:
    """``ah merge`` run in a mount changes ``main`` through no request of the kernel's; main
    shows the merge at once, not after ``--refresh``, also with no change feed (its
    listing is asked again, and an opened file that shows other bytes drops its pages)."""
    (tmp_path / "w.txt").write_text("main's")
    ah.commit("model/llm/gpt2:main", msg="base", add={str(tmp_path / "w.txt"): "w.txt"})
    m = mount_factory("--refresh", "3600", "--no-change-feed")  # no event invalidates it
    main, branch = (m.mountpoint / "model/llm/gpt2" / ref for ref in ("main", "v1"))
    assert (main / "w.txt").read_text() == "main's" and os.listdir(main) == ["w.txt"]
    (branch / "w.txt").write_text("the branch's, longer")
    (branch / "x.txt").write_text("x")
    run_ah("commit", "-m", "on v1", cwd=branch)
    assert "merged into main" in run_ah("merge", cwd=branch)
    assert sorted(os.listdir(main)) == ["w.txt", "x.txt"]
    assert (main / "w.txt").read_text() == "the branch's, longer"


def test_a_listing_gives_the_inode_a_lookup_gives_after_a_dropped_edit(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """A listing of one commit's objects is answered from what an earlier listing of it
    made (``AssetFS._listed``); a path whose inode changed meanwhile (deleted in the branch,
    the deletion then dropped: the same commit shows again) lists with its new inode."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    ah.commit("model/llm/gpt2:v1", msg="two", add=[str(tmp_path / "a.txt"),
                                                   str(tmp_path / "b.txt")])
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"

    def listed() -> dict[str, int]:
        with os.scandir(branch) as entries:
            return {e.name: e.inode() for e in entries}

    first = listed()
    assert listed() == first and first["a.txt"] == os.stat(branch / "a.txt").st_ino
    os.unlink(branch / "a.txt")
    assert "Dropped 1 queued change" in run_ah("reset", cwd=branch)
    again = listed()
    assert again["a.txt"] == os.stat(branch / "a.txt").st_ino != first["a.txt"]
    assert again["b.txt"] == first["b.txt"]
    assert (branch / "a.txt").read_text() == "a.txt"


def test_read_only_places_refuse_writes(mount_factory: Mounter) -> None:
    ah.create("model/llm/gpt2:t1", create_tag=True, source="v1")
    m = mount_factory()
    with pytest.raises(OSError) as info:
        (m.mountpoint / "model/llm/gpt2/t1/new.txt").write_text("x")
    assert info.value.errno == errno.EROFS
    out = run_ah("commit", "-m", "x", cwd=m.mountpoint / "model/llm", check=False)
    assert "not inside a branch" in out


def test_closed_files_upload_ahead_of_the_commit(mount_factory: Mounter) -> None:
    import hashlib

    from ahmount.client.embedded import embedded_client
    from ahmount.sync_runner import run_sync

    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    data = os.urandom(3 << 20)
    (branch / "weights.bin").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    async def missing() -> set[str]:
        async with embedded_client() as hub:
            return await hub.missing_blobs([sha])

    wait_until(lambda: not run_sync(missing), what="the blob to be uploaded ahead")
    assert m.control("stats")["bytes_uploaded"] >= 3 << 20
    assert objects("model/llm/gpt2:v1") == {}  # uploaded, not committed
    run_ah("commit", "-m", "weights", cwd=branch)
    assert objects("model/llm/gpt2:v1") == {"weights.bin": 3 << 20}


def test_upload_ahead_tries_again_until_the_hub_is_back(mount_factory: Mounter,
                                                       tmp_path: Path) -> None:
    from ahmount.client.hub_client import HubClient
    from ahmount.hub.models import AssetAddr, FolderAddr

    server = HubProcess(tmp_path / "hubdata")
    key = server.add_user("erin")
    server.start()
    data = os.urandom(3 << 20)
    sha = hashlib.sha256(data).hexdigest()

    async def on_hub(action: str) -> set[str]:
        async with HubClient(server.url, api_key=key) as hub:
            if action == "create":
                await hub.create_folder(FolderAddr("erin", "model", "f"))
                await hub.create_asset(AssetAddr(FolderAddr("erin", "model", "f"), "a"))
            return await hub.missing_blobs([sha])

    try:
        trio.run(on_hub, "create")
        m = mount_factory("--hub", server.url, "--api-key", key)
        branch = m.mountpoint / "model/f/a/main"
        assert os.listdir(branch) == []
        server.stop()
        (branch / "w.bin").write_bytes(data)  # the queue takes it with the hub down
        wait_until(lambda: m.control("stats")["upload_failures"] >= 1,
                   what="upload-ahead to fail once")
        assert m.control("stats")["uploading"]  # still owed, not given up
        server.start(port=server.port)
        wait_until(lambda: not m.control("stats")["uploading"], timeout=30,
                   what="upload-ahead to try again")
        assert trio.run(on_hub, "missing") == set()
        before = m.control("stats")["bytes_uploaded"]
        run_ah("commit", "-m", "after the outage", cwd=branch)
        assert m.control("stats")["bytes_uploaded"] == before  # a metadata call only
    finally:
        server.stop()


def test_a_daemon_killed_mid_commit_loses_nothing(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    for i in range(300):
        (branch / f"f{i:03d}.txt").write_text(f"file {i}")
    assert m.pid is not None
    proc = subprocess.Popen([command("ah"), "commit", "-m", "interrupted"], cwd=branch,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log"
    wait_until(lambda: "committing 300 queued" in log.read_text(), what="the commit to start")
    os.kill(m.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_until(lambda: not m.alive(), what="daemon death")
    mount_factory(mountpoint=m.mountpoint)
    landed = objects("model/llm/gpt2:v1")
    assert landed == {} or len(landed) == 300, "a commit landed in part"
    # Whatever happened, the queue still holds the changes until a commit takes them.
    run_ah("commit", "-m", "again", cwd=branch)
    assert len(objects("model/llm/gpt2:v1")) == 300
    assert "0 added/changed, 0 deleted" in run_ah("status", cwd=branch)


def test_writes_during_a_commit_stay_queued(mount_factory: Mounter) -> None:
    import threading

    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "big.bin").write_bytes(os.urandom(40 << 20))
    done: list[str] = []
    committer = threading.Thread(
        target=lambda: done.append(run_ah("commit", "-m", "big", cwd=branch)))
    committer.start()
    for i in range(20):
        (branch / f"late{i}.txt").write_text(str(i))
    committer.join()
    first = objects("model/llm/gpt2:v1")
    assert "big.bin" in first
    pending = run_ah("status", cwd=branch)
    for i in range(20):
        # Every late write is in the commit or still queued: never lost.
        assert f"late{i}.txt" in first or f"late{i}.txt" in pending
    run_ah("commit", "-m", "late", cwd=branch)
    assert {f"late{i}.txt" for i in range(20)} <= set(objects("model/llm/gpt2:v1"))


def test_sha256_and_mtime_of_files_still_being_written(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    data = os.urandom(200_000)
    with open(branch / "open.bin", "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        # Not closed, so upload-ahead has not hashed it: the xattr hashes it now.
        assert os.getxattr(branch / "open.bin", "user.ah.sha256").decode() == \
            hashlib.sha256(data).hexdigest()
        handle.write(b"more")
        handle.flush()
        os.utime(handle.fileno(), (1_600_000_000, 1_600_000_000))  # while pages are dirty
    assert os.stat(branch / "open.bin").st_mtime == 1_600_000_000
    assert os.getxattr(branch / "open.bin", "user.ah.sha256").decode() == \
        hashlib.sha256(data + b"more").hexdigest()
    with pytest.raises(OSError) as info:
        os.getxattr(branch / "open.bin", "security.capability")
    assert info.value.errno == errno.ENODATA
    run_ah("commit", "-m", "open", cwd=branch)
    [entry] = ah.list("model/llm/gpt2:v1")
    assert entry["size_bytes"] == len(data) + 4 and entry["mtime"] == 1_600_000_000
    assert (branch / "open.bin").stat().st_mtime == 1_600_000_000


def test_the_times_a_closing_writer_sends_answer_what_the_file_is_now(
        mount_factory: Mounter) -> None:
    """At the close of a written file the kernel sends its mtime (writeback caching), which
    is answered from what the file was last shown as, not resolved again: a chmod and more
    bytes meanwhile must show in that answer (the kernel keeps it as the file's attributes),
    for a new file and for a head file opened for writing alike."""
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "config.json").write_bytes(b"{}")
    run_ah("commit", "-m", "a head file", cwd=branch)
    for name, flags in (("fresh.bin", "wb"), ("config.json", "r+b")):
        with open(branch / name, flags) as handle:
            handle.write(b"x" * 5000)
            handle.flush()
            os.chmod(branch / name, 0o600)  # through the path, while the handle writes
            handle.write(b"y" * 3000)
        st = os.stat(branch / name)
        assert stat.S_IMODE(st.st_mode) == 0o600, name
        assert st.st_size >= 8000 and abs(st.st_mtime - time.time()) < 60, name
        with open(branch / name, "ab") as handle:  # the next writer shows the new mode too
            handle.write(b"z")
        assert stat.S_IMODE(os.stat(branch / name).st_mode) == 0o600, name
    assert (branch / "fresh.bin").read_bytes() == b"x" * 5000 + b"y" * 3000 + b"z"


def test_queued_directories_come_and_go_with_their_files(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    for name in ("a/b/c/1.txt", "a/b/2.txt", "a/3.txt", "d/4.txt"):
        (branch / name).parent.mkdir(parents=True, exist_ok=True)
        (branch / name).write_text(name)
    assert sorted(os.listdir(branch)) == ["a", "d"]
    assert sorted(os.listdir(branch / "a")) == ["3.txt", "b"]
    os.unlink(branch / "a/b/c/1.txt")
    assert os.listdir(branch / "a/b/c") == []  # made by mkdir, so it stays until rmdir
    os.rmdir(branch / "a/b/c")
    assert os.listdir(branch / "a/b") == ["2.txt"]
    os.rename(branch / "a/b/2.txt", branch / "d/2.txt")
    os.rmdir(branch / "a/b")
    assert sorted(os.listdir(branch / "d")) == ["2.txt", "4.txt"]
    shutil.rmtree(branch / "d")
    assert os.listdir(branch) == ["a"]
    run_ah("commit", "-m", "dirs", cwd=branch)
    assert objects("model/llm/gpt2:v1") == {"a/3.txt": 7}


def test_history_verbs_where_you_stand(mount_factory: Mounter, tmp_path: Path) -> None:
    """log, show and diff take a mount path or the current directory, mapped to its API
    path through the mount's layout."""
    (tmp_path / "h.txt").write_text("one")
    ah.commit("model/llm/gpt2:v1", msg="history one", add=[str(tmp_path / "h.txt")])
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    assert "history one" in run_ah("log", "--oneline", cwd=branch)
    assert "history one" in run_ah("log", "-n", "1", str(branch / "h.txt"))
    assert "added:     h.txt" in run_ah("show", cwd=branch)
    (branch / "new.txt").write_text("queued")
    assert "new file:" in run_ah("diff", cwd=branch)
    assert "does not name an asset or a reference" in run_ah(
        "log", str(m.mountpoint / "model"), check=False)


def test_api_verbs_and_tag_take_mount_paths(mount_factory: Mounter, tmp_path: Path) -> None:
    """ls, get, create, download and tag accept a mount path or '.', mapped to the API path
    through the mount's layout."""
    (tmp_path / "t.txt").write_text("tagged")
    ah.commit("model/llm/gpt2:v1", msg="for a tag", add=[str(tmp_path / "t.txt")])
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    assert "t.txt" in run_ah("ls", cwd=branch)
    assert "t.txt" in run_ah("ls", str(branch / "t.txt"))  # a file: its ref
    assert "gpt2" in run_ah("ls", str(m.mountpoint / "model/llm"))
    assert "gpt2" in run_ah("get", str(m.mountpoint / "model/llm/gpt2"))
    out = run_ah("tag", "v1-release", cwd=branch)
    assert "tag v1-release at" in out and "(the head of v1)" in out
    assert ah.get("model/llm/gpt2:v1-release").commit_id == ah.get("model/llm/gpt2:v1").commit_id
    run_ah("create", str(m.mountpoint / "model/llm/gpt2/feature"))  # a branch, by its path
    assert "feature" in run_ah("ls", "--branch", str(m.mountpoint / "model/llm/gpt2"))
    run_ah("download", str(branch), "--save-dir", str(tmp_path / "out"))
    assert (tmp_path / "out/t.txt").read_text() == "tagged"


def test_api_verbs_on_a_mount_of_another_hub_are_refused_not_sent_elsewhere(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """A mount of a team hub while ``ah`` talks to the embedded one: a mount path's API path
    named the same-named asset of the embedded hub, so ``ah log .`` showed another history
    and ``ah delete`` deleted there. Now such a verb is refused, naming both hubs; once ah is
    logged in to the mount's hub with its key, the same verbs work."""
    server = HubProcess(tmp_path / "hubdata")
    key = server.add_user(getpass.getuser())
    server.start()
    try:
        m = mount_factory("--hub", server.url, "--api-key", key)
        asset = m.mountpoint / "model/llm/gpt2"
        asset.mkdir(parents=True)  # the same names as the embedded hub's (gpt2_v1)
        (asset / "main/w.txt").write_text("team")
        run_ah("commit", "-m", "team", cwd=asset / "main")
        for verb in (["log"], ["ls", "."], ["get", "."], ["delete", "-y", str(asset)]):
            out = run_ah(*verb, cwd=asset / "main", check=False)
            assert f"which shows {server.url}, but ah talks to the embedded hub" in out, out
        assert ah.get("model/llm/gpt2").name == "gpt2"  # the embedded hub's is untouched
        run_ah("login", "--host", server.url, "--api-key", key)
        assert "team" in run_ah("log", "--oneline", cwd=asset / "main")
        assert "w.txt" in run_ah("ls", ".", cwd=asset / "main")
    finally:
        server.stop()


def test_listed_attributes_on_a_branch_follow_edits_commits_and_moves(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """readdir's attributes of a branch's entries are kept per commit: a queued edit, a
    commit through the mount and a commit elsewhere each show at once in a listing."""
    def listed_size() -> int:
        return next(e.stat().st_size for e in os.scandir(branch) if e.name == "a.txt")

    (tmp_path / "a.txt").write_text("abc")
    ah.commit("model/llm/gpt2:v1", msg="a", add=[str(tmp_path / "a.txt")])
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    assert listed_size() == 3
    (branch / "a.txt").write_text("0123456789")
    assert listed_size() == 10  # queued
    run_ah("commit", "-m", "ten", cwd=branch)
    assert listed_size() == 10  # committed: the branch's new commit
    (tmp_path / "a.txt").write_text("x" * 20)
    ah.commit("model/llm/gpt2:v1", msg="elsewhere", add=[str(tmp_path / "a.txt")])
    wait_until(lambda: listed_size() == 20, what="the listing to show the commit made elsewhere")


def test_with_allow_other_a_directory_chmod_is_refused(mount_factory: Mounter) -> None:
    """Others see the mount and the kernel checks mode bits for them: a directory's chmod,
    which would not be kept, is EPERM instead of a mode that keeps no one out."""
    m = mount_factory("--allow-other")
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "d").mkdir()
    with pytest.raises(PermissionError):
        (branch / "d").chmod(0o700)
    assert stat.S_IMODE((branch / "d").stat().st_mode) == 0o755


def test_a_write_the_full_disk_refuses_leaves_an_incomplete_file_no_commit_takes(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """The cache disk fills while a file is written (queue files, queue log and all on one
    small disk). The writer hears ENOSPC; the file then shows the bytes it really holds (the
    kernel had kept the larger size it was written to); ``ah status`` calls it incomplete
    and ``ah commit`` refuses it, until it is written again or removed; the mount stays."""
    with small_disk(tmp_path / "small", "24m") as small:
        m = mount_factory("--cache-dir", str(small / "cache"))
        branch = m.mountpoint / "model/llm/gpt2/v1"
        # df tells of the room the disk has, not of the 10 GiB cache's.
        shown, disk = os.statvfs(branch), os.statvfs(small)
        assert 0 < shown.f_bavail * shown.f_frsize <= disk.f_bavail * disk.f_frsize
        data = os.urandom(48 << 20)
        with pytest.raises(OSError) as refused, open(branch / "big.bin", "wb") as handle:
            first_ino = os.fstat(handle.fileno()).st_ino
            handle.write(data)
        assert refused.value.errno == errno.ENOSPC
        # The first failed write was answered only once the kernel forgot the name: at
        # once after the close, the name leads to what the queue holds, which is less than
        # was written (a later write the page cache sent may have landed past a refused one,
        # leaving a hole: the size is the queue file's, and so are the bytes).
        queued = state_dir(small / "cache", None, getpass.getuser()) / "queue" / "files"
        real = max((p.stat() for p in queued.iterdir()), key=lambda st: st.st_size)
        assert real.st_blocks * 512 < len(data)  # not all of it is there
        shown = (branch / "big.bin").stat()
        assert shown.st_ino != first_ino and shown.st_size == real.st_size
        assert len((branch / "big.bin").read_bytes()) == real.st_size
        status = run_ah("status", cwd=branch)
        assert re.search(r"big\.bin\s+\(incomplete: a write failed: No space left", status)
        refusal = run_ah("commit", "-m", "half a file", cwd=branch, check=False)
        assert "big.bin is incomplete" in refusal and "--force" in refusal
        assert "big.bin" not in objects("model/llm/gpt2:v1")
        (branch / "big.bin").unlink()  # the room comes back
        (branch / "small.bin").write_bytes(b"fits")
        run_ah("commit", "-m", "what fits", cwd=branch)
        assert objects("model/llm/gpt2:v1")["small.bin"] == 4
        assert m.alive()
        m.stop()
