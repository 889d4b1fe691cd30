"""The POSIX suite: the file-system behaviour of a branch, written once and run on two drivers
(:mod:`tests.fs_drivers`): in-process on the ``vfs`` core (no FUSE, no kernel) and through a
real FUSE mount. A difference between the two is a bug in the adapter or in the driver's
stand-in for the kernel; a failure on both is a bug in the core.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ahmount import ah
from ahmount.errors import Conflict
from tests.conftest import MountProcess, wait_until
from tests.fs_drivers import (
    Driver,
    OsDriver,
    VfsDriver,
    is_dir,
    read_bytes,
    tree,
    umask,
    write_bytes,
)

B = "model/llm/gpt2/v1"  # the branch every test writes
SEGMENTS = B.split("/")


@pytest.fixture(params=["vfs", "mount"])
def fs(request: pytest.FixtureRequest, gpt2_v1: None, tmp_path: Path) -> Iterator[Driver]:
    """The embedded hub's model/llm/gpt2 (branch v1, plus a tag t1 of main with one file)
    through either driver."""
    ah.commit("model/llm/gpt2:main", msg="seed", add={_seed_file(tmp_path): "seed.txt"})
    ah.create("model/llm/gpt2:t1", create_tag=True, source="main")
    if request.param == "vfs":
        driver: Driver = VfsDriver(tmp_path / "vfs-cache", follow=True)  # as a mount does
    else:
        mounter: Callable[..., MountProcess] = request.getfixturevalue("mount_factory")
        m = mounter()
        driver = OsDriver(m.mountpoint, m.control)
    yield driver
    driver.close_driver()


def _seed_file(tmp_path: Path) -> str:
    path = tmp_path / "seed.txt"
    path.write_bytes(b"seed bytes\n")
    return str(path)


def fails(number: int, action: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno == number, \
        f"{errno.errorcode.get(info.value.errno or 0)} instead of {errno.errorcode[number]}"


def commit(fs: Driver, message: str = "from the suite") -> dict[str, object]:
    return fs.control("commit", path=SEGMENTS, message=message, force=False)


# -- the layout ------------------------------------------------------------------------------


def test_the_root_folders_assets_and_refs_are_directories(fs: Driver) -> None:
    assert fs.listdir("") == ["dataset", "model", "public", "shared"]
    assert fs.listdir("model") == ["llm"]
    assert fs.listdir("model/llm") == ["gpt2"]
    assert fs.listdir("model/llm/gpt2") == ["main", "t1", "v1"]
    assert is_dir(fs, B) and is_dir(fs, "model/llm/gpt2/t1")
    fails(errno.ENOENT, lambda: fs.stat("model/nothing"))
    fails(errno.ENOENT, lambda: fs.stat("model/llm/gpt2/no-such-ref"))


# -- files -----------------------------------------------------------------------------------


def test_create_write_read_stat(fs: Driver) -> None:
    write_bytes(fs, f"{B}/a.txt", b"hello")
    assert read_bytes(fs, f"{B}/a.txt") == b"hello"
    st = fs.stat(f"{B}/a.txt")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5 and st.st_nlink == 1
    assert stat.S_IMODE(st.st_mode) == 0o666 & ~umask()
    assert fs.listdir(B) == ["a.txt"]
    fails(errno.EEXIST, lambda: fs.open(f"{B}/a.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    fails(errno.ENOENT, lambda: fs.open(f"{B}/missing", os.O_RDONLY))


def test_overwrite_truncate_extend_and_holes(fs: Driver) -> None:
    path = f"{B}/f.bin"
    write_bytes(fs, path, b"0123456789")
    fs.truncate(path, 4)
    assert read_bytes(fs, path) == b"0123"
    fs.truncate(path, 6)
    assert read_bytes(fs, path) == b"0123\0\0"
    fd = fs.open(path, os.O_WRONLY)
    fs.pwrite(fd, b"X", 9)  # past the end: a hole of zeros
    fs.close(fd)
    assert read_bytes(fs, path) == b"0123\0\0\0\0\0X"
    fd = fs.open(path, os.O_RDWR)
    fs.ftruncate(fd, 2)
    assert fs.fstat(fd).st_size == 2
    fs.close(fd)
    assert read_bytes(fs, path) == b"01"
    write_bytes(fs, path, b"")
    assert fs.stat(path).st_size == 0


def test_append_and_a_head_object_copied_on_write(fs: Driver) -> None:
    write_bytes(fs, f"{B}/log.txt", b"one\n")
    commit(fs)
    fd = fs.open(f"{B}/log.txt", os.O_WRONLY | os.O_APPEND)
    fs.append(fd, b"two\n")
    fs.close(fd)
    assert read_bytes(fs, f"{B}/log.txt") == b"one\ntwo\n"
    status = fs.control("branch_status", path=SEGMENTS)
    assert [(c["op"], c["path"]) for c in status["changes"]] == [("modified", "log.txt")]


def test_an_open_file_outlives_its_name(fs: Driver) -> None:
    write_bytes(fs, f"{B}/tmp.db", b"abc")
    fd = fs.open(f"{B}/tmp.db", os.O_RDWR)
    fs.unlink(f"{B}/tmp.db")
    fails(errno.ENOENT, lambda: fs.stat(f"{B}/tmp.db"))
    fs.pwrite(fd, b"defg", 3)
    assert fs.fstat(fd).st_size == 7
    assert fs.pread(fd, 100, 0) == b"abcdefg"
    fs.close(fd)
    assert fs.listdir(B) == []
    write_bytes(fs, f"{B}/tmp.db", b"new")  # a new file at the old name
    assert read_bytes(fs, f"{B}/tmp.db") == b"new"


def test_opening_for_writing_and_closing_unwritten_is_no_change(fs: Driver) -> None:
    write_bytes(fs, f"{B}/same.txt", b"same")
    commit(fs)
    fs.close(fs.open(f"{B}/same.txt", os.O_RDWR))
    assert fs.control("branch_status", path=SEGMENTS)["changes"] == []


# -- names -----------------------------------------------------------------------------------


def test_rename_files_and_over_files(fs: Driver) -> None:
    write_bytes(fs, f"{B}/a", b"A")
    write_bytes(fs, f"{B}/b", b"B")
    fails(errno.EEXIST, lambda: fs.rename(f"{B}/a", f"{B}/b", noreplace=True))
    fs.rename(f"{B}/a", f"{B}/b")  # replaces b
    assert fs.listdir(B) == ["b"] and read_bytes(fs, f"{B}/b") == b"A"
    fs.rename(f"{B}/b", f"{B}/b")  # onto itself: nothing happens
    assert read_bytes(fs, f"{B}/b") == b"A"
    fails(errno.ENOENT, lambda: fs.rename(f"{B}/missing", f"{B}/c"))
    fails(errno.ENOENT, lambda: fs.rename(f"{B}/b", f"{B}/no-dir/c"))


def test_rename_directories(fs: Driver) -> None:
    fs.mkdir(f"{B}/d")
    fs.mkdir(f"{B}/d/e")
    write_bytes(fs, f"{B}/d/e/x", b"x")
    write_bytes(fs, f"{B}/f", b"f")
    fs.mkdir(f"{B}/full")
    write_bytes(fs, f"{B}/full/y", b"y")
    fails(errno.EINVAL, lambda: fs.rename(f"{B}/d", f"{B}/d/e/inside"))
    fails(errno.ENOTEMPTY, lambda: fs.rename(f"{B}/d", f"{B}/full"))
    fails(errno.ENOTDIR, lambda: fs.rename(f"{B}/d", f"{B}/f"))
    fails(errno.EISDIR, lambda: fs.rename(f"{B}/f", f"{B}/d"))
    fs.rename(f"{B}/d", f"{B}/moved")
    assert tree(fs, B) == {"moved": None, "moved/e": None, "moved/e/x": b"x", "f": b"f",
                           "full": None, "full/y": b"y"}


def test_unlink_rmdir_mkdir_errnos(fs: Driver) -> None:
    fs.mkdir(f"{B}/d")
    write_bytes(fs, f"{B}/d/x", b"x")
    fails(errno.EEXIST, lambda: fs.mkdir(f"{B}/d"))
    fails(errno.EISDIR, lambda: fs.unlink(f"{B}/d"))
    fails(errno.EISDIR, lambda: fs.truncate(f"{B}/d", 0))
    fails(errno.ENOTDIR, lambda: fs.rmdir(f"{B}/d/x"))
    fails(errno.ENOTEMPTY, lambda: fs.rmdir(f"{B}/d"))
    fails(errno.ENOENT, lambda: fs.unlink(f"{B}/nothing"))
    fails(errno.ENOTDIR, lambda: fs.mkdir(f"{B}/d/x/sub"))
    fs.unlink(f"{B}/d/x")
    assert fs.listdir(f"{B}/d") == []  # an empty directory stays until removed
    fs.rmdir(f"{B}/d")
    assert fs.listdir(B) == []


def test_a_committed_tree_is_removed_deepest_first_as_rm_r_does(fs: Driver) -> None:
    """``rm -r`` of a directory the head has (and ``mv`` across branches, which copies and
    then runs it): every file unlinked, then each directory removed, deepest first. An
    emptied directory of the head stayed listed after its rmdir (nothing was queued for it),
    so rmdir of its parent failed with ENOTEMPTY."""
    fs.mkdir(f"{B}/x")
    fs.mkdir(f"{B}/x/y")
    for path in ("x/y/z", "x/y/w", "x/v", "keep"):
        write_bytes(fs, f"{B}/{path}", path.encode())
    assert commit(fs)["commit"]
    for path in ("x/y/z", "x/y/w"):
        fs.unlink(f"{B}/{path}")
    assert fs.listdir(f"{B}/x/y") == []  # emptied: there until removed
    fails(errno.ENOTEMPTY, lambda: fs.rmdir(f"{B}/x"))
    fs.rmdir(f"{B}/x/y")
    assert fs.listdir(f"{B}/x") == ["v"]
    fails(errno.ENOENT, lambda: fs.stat(f"{B}/x/y"))
    fs.unlink(f"{B}/x/v")
    fs.rmdir(f"{B}/x")
    assert fs.listdir(B) == ["keep"]
    fs.mkdir(f"{B}/x")  # made again: a new directory, none of the head's files in it
    assert fs.listdir(f"{B}/x") == []
    write_bytes(fs, f"{B}/x/new", b"n")
    assert commit(fs)["commit"]
    assert {o["path"] for o in ah.list("model/llm/gpt2:v1")} == {"keep", "x/new"}
    assert tree(fs, B) == {"keep": b"keep", "x": None, "x/new": b"n"}


def test_a_directory_outlives_its_last_file_across_a_commit(fs: Driver) -> None:
    """As on a local disk, a directory stays until rmdir: also once a commit took the last
    of its files away (the head then has no such directory)."""
    fs.mkdir(f"{B}/d")
    fs.mkdir(f"{B}/e")
    for path in ("d/f", "e/1", "e/2"):
        write_bytes(fs, f"{B}/{path}", b"x")
    assert commit(fs)["commit"]
    fs.unlink(f"{B}/d/f")
    fs.unlink(f"{B}/e/1")
    assert commit(fs)["commit"]
    assert {o["path"] for o in ah.list("model/llm/gpt2:v1")} == {"e/2"}
    assert tree(fs, B) == {"d": None, "e": None, "e/2": b"x"}
    fs.rmdir(f"{B}/d")
    assert fs.listdir(B) == ["e"]
    assert fs.control("reset", path=SEGMENTS)["dropped_local"] == 0


def test_names_the_hub_could_never_store_are_refused(fs: Driver) -> None:
    fails(errno.ENAMETOOLONG, lambda: write_bytes(fs, f"{B}/{'n' * 256}", b""))
    fails(errno.ENAMETOOLONG, lambda: fs.mkdir(f"{B}/{'n' * 256}"))
    fails(errno.EINVAL, lambda: write_bytes(fs, f"{B}/bad\x01name", b""))
    write_bytes(fs, f"{B}/{'n' * 255}", b"ok")
    assert fs.listdir(B) == ["n" * 255]


def test_symlinks_are_refused(fs: Driver) -> None:
    fails(errno.EPERM, lambda: fs.symlink("target", f"{B}/link"))


def test_a_move_across_branches_is_refused(fs: Driver) -> None:
    write_bytes(fs, f"{B}/a", b"A")
    fails(errno.EXDEV, lambda: fs.rename(f"{B}/a", "model/llm/gpt2/main/a"))


# -- attributes ------------------------------------------------------------------------------


def test_a_directory_chmod_is_accepted_and_not_kept(fs: Driver) -> None:
    """tar x and rsync -a set the mode of each directory they make (0750, 0775, 1777): it
    keeps no one out of a mount only its user sees, so it is accepted, like the directory's
    times, and the directory shows what it did. Where nothing may change it is EROFS."""
    fs.mkdir(f"{B}/extracted")
    write_bytes(fs, f"{B}/extracted/f", b"f")
    shown = {path: stat.S_IMODE(fs.stat(path).st_mode) for path in (B, f"{B}/extracted")}
    for path in shown:
        for mode in (0o750, 0o700, 0o775, 0o1777):
            fs.chmod(path, mode)
        fs.utime(path, 1_600_000_000.0)
        assert stat.S_IMODE(fs.stat(path).st_mode) == shown[path]
    fails(errno.EPERM, lambda: fs.chmod(f"{B}/extracted/f", 0o4755))  # a file's: kept, or not
    fails(errno.EROFS, lambda: fs.chmod("model/llm/gpt2/t1", 0o700))
    commit(fs)
    assert read_bytes(fs, f"{B}/extracted/f") == b"f"


def test_where_others_see_the_tree_a_directory_chmod_is_refused(tmp_path: Path,
                                                                  gpt2_v1: None) -> None:
    """A mount with ``--allow-other``: the kernel checks mode bits for everyone, and a
    directory shows 0755 whatever it is told, so a chmod meant to keep others out is EPERM
    rather than silently not done. (The mount sets ``private`` from ``--allow-other``: see
    test_mount_write.)"""
    driver = VfsDriver(tmp_path / "vfs-cache")
    try:
        driver.session.vfs.private = False
        driver.mkdir(f"{B}/d")
        fails(errno.EPERM, lambda: driver.chmod(f"{B}/d", 0o700))
        fails(errno.EPERM, lambda: driver.chmod(B, 0o750))
        driver.chmod(B, stat.S_IMODE(driver.stat(B).st_mode))  # to what it shows: no change
    finally:
        driver.close_driver()


def test_modes_and_times_are_kept_and_committed(fs: Driver) -> None:
    write_bytes(fs, f"{B}/run.sh", b"#!/bin/sh\n")
    fs.chmod(f"{B}/run.sh", 0o755)
    fs.utime(f"{B}/run.sh", 1_700_000_000.0)
    st = fs.stat(f"{B}/run.sh")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime == 1_700_000_000.0
    fails(errno.EPERM, lambda: fs.chmod(f"{B}/run.sh", 0o4755))
    head = str(commit(fs)["commit"])
    st = fs.stat(f"model/llm/gpt2/{head[:12]}/run.sh")
    assert stat.S_IMODE(st.st_mode) == 0o555  # no write bits where nothing may change
    assert st.st_mtime == 1_700_000_000.0


def test_xattrs(fs: Driver) -> None:
    write_bytes(fs, f"{B}/w.bin", b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    assert fs.getxattr(f"{B}/w.bin", "user.ah.sha256").decode() == sha  # queued
    assert fs.getxattr(B, "user.ah.ref_type") == b"branch"
    assert fs.getxattr("model/llm/gpt2/t1", "user.ah.ref_type") == b"tag"
    assert "user.ah.path" in fs.listxattr(f"{B}/w.bin")
    fails(errno.ENODATA, lambda: fs.getxattr(f"{B}/w.bin", "user.ah.nothing"))
    for path in (f"{B}/w.bin", B, "model/llm/gpt2/t1"):  # what `ls -l` asks of each entry
        for name in ("security.selinux", "system.posix_acl_access"):
            fails(errno.ENODATA, lambda path=path, name=name: fs.getxattr(path, name))
    fails(errno.ENOTSUP, lambda: fs.setxattr(f"{B}/w.bin", "user.ah.labels", b"x"))
    fs.setxattr("model/llm/gpt2", "user.ah.labels", b"PyTorch, GPT")
    assert fs.getxattr("model/llm/gpt2", "user.ah.labels") == b"PyTorch,GPT"
    head = str(commit(fs)["commit"])
    assert fs.getxattr(f"model/llm/gpt2/{head[:12]}/w.bin", "user.ah.sha256").decode() == sha


# -- read-only places ------------------------------------------------------------------------


def test_tags_and_commits_refuse_every_change(fs: Driver) -> None:
    for ref in ("t1", _main_commit()[:12]):
        _refuses_every_change(fs, f"model/llm/gpt2/{ref}")


def _refuses_every_change(fs: Driver, place: str) -> None:
    assert read_bytes(fs, f"{place}/seed.txt") == b"seed bytes\n"
    assert stat.S_IMODE(fs.stat(f"{place}/seed.txt").st_mode) == 0o444
    fails(errno.EROFS, lambda: fs.open(f"{place}/seed.txt", os.O_WRONLY))
    fails(errno.EROFS, lambda: write_bytes(fs, f"{place}/new.txt", b"x"))
    fails(errno.EROFS, lambda: fs.mkdir(f"{place}/dir"))
    fails(errno.EROFS, lambda: fs.unlink(f"{place}/seed.txt"))
    fails(errno.EROFS, lambda: fs.rename(f"{place}/seed.txt", f"{place}/x.txt"))
    fails(errno.EROFS, lambda: fs.truncate(f"{place}/seed.txt", 0))
    fails(errno.EROFS, lambda: fs.utime(f"{place}/seed.txt", 1.0))


def _main_commit() -> str:
    return str(ah.list("model/llm/gpt2:main", resource="commit")[0]["id"])


# -- commit and reset ------------------------------------------------------------------------


def test_commit_takes_the_queue_and_reset_drops_it(fs: Driver) -> None:
    fs.mkdir(f"{B}/cfg")
    write_bytes(fs, f"{B}/cfg/a.json", b"{}")
    write_bytes(fs, f"{B}/b.bin", b"\x00" * 3000)
    result = commit(fs)
    assert result["commit"] and result["left"] == {"adds": 0, "deletes": 0, "bytes": 0}
    listed = {o["path"]: o["size_bytes"] for o in ah.list("model/llm/gpt2:v1")}
    assert listed == {"cfg/a.json": 2, "b.bin": 3000}
    head = str(result["commit"])
    assert tree(fs, f"model/llm/gpt2/{head[:12]}") == {"cfg": None, "cfg/a.json": b"{}",
                                                        "b.bin": b"\x00" * 3000}
    fs.unlink(f"{B}/b.bin")
    write_bytes(fs, f"{B}/c.txt", b"c")
    assert fs.listdir(B) == ["c.txt", "cfg"]
    dropped = fs.control("reset", path=SEGMENTS)
    assert dropped["dropped_local"] >= 2
    assert tree(fs, B) == {"cfg": None, "cfg/a.json": b"{}", "b.bin": b"\x00" * 3000}


def test_two_commits_of_a_branch_at_once_take_turns(fs: Driver) -> None:
    """``ah commit`` in two terminals: the second waits for the first and finds nothing
    left. Both took the same snapshot, and the second, whose view of the head predates the
    first's commit, was refused as if someone had changed its files on the hub."""
    for i in range(20):
        write_bytes(fs, f"{B}/f{i}.bin", os.urandom(100_000))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda m: commit(fs, m), ["one", "two"]))
    assert sorted(r["taken"] for r in results) == [0, 20]
    assert sorted(bool(r["commit"]) for r in results) == [False, True]
    assert len(ah.list("model/llm/gpt2:v1")) == 20


def test_hub_resources_by_mkdir_rmdir_and_mv(fs: Driver) -> None:
    fs.mkdir("model/vision")
    fs.mkdir("model/vision/vit")
    fs.mkdir("model/vision/vit/dev")
    assert fs.listdir("model/vision/vit") == ["dev", "main"]
    fs.rename("model/vision/vit", "model/vision/vit2")
    assert fs.listdir("model/vision") == ["vit2"]
    fails(errno.EPERM, lambda: fs.rmdir("model/vision/vit2/main"))
    fs.rmdir("model/vision/vit2/dev")
    fs.rmdir("model/vision/vit2")
    fs.rmdir("model/vision")
    assert fs.listdir("model") == ["llm"]



def test_a_branch_removed_by_rmdir_leaves_nothing_queued_to_a_new_one_of_its_name(
        fs: Driver, tmp_path: Path) -> None:
    """A branch emptied here (its objects deleted) and removed by rmdir takes its queued
    deletes with it: a branch made again under its name showed none of its objects, and
    its next commit would have deleted them."""
    (tmp_path / "a").write_bytes(b"a")
    fs.mkdir("model/llm/gpt2/dev")
    ah.commit("model/llm/gpt2:dev", msg="base", add={str(tmp_path / "a"): "x/a"})
    dev = "model/llm/gpt2/dev"
    fs.control("refresh")
    fs.unlink(f"{dev}/x/a")
    fs.rmdir(f"{dev}/x")
    fs.rmdir(dev)
    assert fs.listdir("model/llm/gpt2") == ["main", "t1", "v1"]
    fs.mkdir(dev)
    ah.commit("model/llm/gpt2:dev", msg="again", add={str(tmp_path / "a"): "x/a"})
    fs.control("refresh")
    assert tree(fs, dev) == {"x": None, "x/a": b"a"}
    assert fs.control("reset", path=dev.split("/"))["dropped_local"] == 0


def test_queued_changes_follow_their_folder_and_asset_through_a_rename(fs: Driver) -> None:
    """``mv`` of a folder or an asset takes what its branches queued along, as files of a
    renamed local directory go along (it stayed queued under the old name: it showed
    nowhere, and a commit took nothing)."""
    fs.mkdir("dataset/proj")
    fs.mkdir("dataset/proj/imgs")
    write_bytes(fs, "dataset/proj/imgs/main/q.txt", b"queued")
    fd = fs.open("dataset/proj/imgs/main/open.txt", os.O_WRONLY | os.O_CREAT)
    fs.rename("dataset/proj", "dataset/proj2")
    fs.pwrite(fd, b"written after", 0)  # an open file goes along too
    fs.close(fd)
    assert fs.listdir("dataset/proj2/imgs/main") == ["open.txt", "q.txt"]
    fs.rename("dataset/proj2/imgs", "dataset/proj2/images")
    place = "dataset/proj2/images/main"
    assert tree(fs, place) == {"open.txt": b"written after", "q.txt": b"queued"}
    result = fs.control("commit", path=place.split("/"), message="renamed", force=False)
    assert result["taken"] == 2
    assert {o["path"] for o in ah.list("dataset/proj2/images:main")} == {"open.txt", "q.txt"}


def test_a_file_written_back_as_it_was_under_a_directory_moved_away_is_committed(
        fs: Driver) -> None:
    """``mv d f`` then ``mkdir d`` and ``d/a`` written with the bytes it had: the commit
    deletes ``d/`` and must add ``d/a`` again. It left ``d/a`` out as no change (the head
    has those bytes there), so the commit deleted it (found by the model test)."""
    fs.mkdir(f"{B}/d")
    write_bytes(fs, f"{B}/d/a", b"same bytes")
    assert commit(fs)["commit"]
    fs.rename(f"{B}/d", f"{B}/f")
    fs.mkdir(f"{B}/d")
    write_bytes(fs, f"{B}/d/a", b"same bytes")
    status = fs.control("branch_status", path=SEGMENTS)
    assert {c["path"] for c in status["changes"] if c["op"] != "delete"} == {"d/a", "f/a"}
    assert commit(fs)["commit"]
    assert {o["path"] for o in ah.list("model/llm/gpt2:v1")} == {"d/a", "f/a"}
    assert tree(fs, B) == {"d": None, "d/a": b"same bytes", "f": None, "f/a": b"same bytes"}


def test_a_change_made_on_the_hub_while_a_commit_uploads_refuses_it(
        gpt2_v1: None, tmp_path: Path) -> None:
    """The commit compares what each file was queued on with the head before it uploads;
    a change another writer commits at that path during the upload was overwritten unseen.
    The hub now checks the head's version of each path in the same step as the commit."""
    import trio

    (tmp_path / "base").write_bytes(b"base")
    (tmp_path / "theirs").write_bytes(b"theirs")
    ah.commit("model/llm/gpt2:v1", msg="base", add={str(tmp_path / "base"): "shared.txt"})
    driver = VfsDriver(tmp_path / "vfs-cache")
    try:
        write_bytes(driver, f"{B}/shared.txt", b"mine")
        write_bytes(driver, f"{B}/other.txt", b"other")
        writeback = driver.vfs.writeback
        real_send = writeback.send

        async def send_then_someone_commits(files: Any) -> Any:
            sent = await real_send(files)
            await trio.to_thread.run_sync(lambda: ah.commit(
                "model/llm/gpt2:v1", msg="theirs", add={str(tmp_path / "theirs"): "shared.txt"}))
            return sent

        writeback.send = send_then_someone_commits
        with pytest.raises(Conflict, match="shared.txt changed on the hub while this commit "
                                           "uploaded; nothing was committed"):
            commit(driver)
        writeback.send = real_send
        ah.download("model/llm/gpt2:v1", objects=["shared.txt"],
                    save_dir=str(tmp_path / "got"))
        assert (tmp_path / "got/shared.txt").read_bytes() == b"theirs"
        status = driver.control("branch_status", path=SEGMENTS)
        assert status["changed_remotely"] == ["shared.txt"]
        assert {c["path"] for c in status["changes"]} == {"shared.txt", "other.txt"}
        result = driver.control("commit", path=SEGMENTS, message="mine", force=True)
        assert result["taken"] == 2
        assert read_bytes(driver, f"{B}/shared.txt") == b"mine"
    finally:
        driver.close_driver()


def test_the_same_bytes_committed_elsewhere_are_no_remote_change(gpt2_v1: None,
                                                                 tmp_path: Path) -> None:
    """A daemon killed after its commit landed, before its queue recorded it, comes back
    with the files queued on the old head, which the hub's head now holds as queued. The
    next commit refused them all as "changed on the hub since they were queued" (found by
    tests/test_mount_write.py's kill -9 test, when the commit won the race)."""
    (tmp_path / "same").write_bytes(b"same bytes")
    (tmp_path / "other").write_bytes(b"their bytes")
    driver = VfsDriver(tmp_path / "vfs-cache")
    try:
        write_bytes(driver, f"{B}/same.txt", b"same bytes")
        os.chmod(tmp_path / "same", 0o644)
        ah.commit("model/llm/gpt2:v1", msg="elsewhere", add={str(tmp_path / "same"): "same.txt"})
        driver.control("refresh")
        assert driver.control("branch_status", path=SEGMENTS)["changed_remotely"] == []
        result = driver.control("commit", path=SEGMENTS, message="again", force=False)
        assert result["commit"] is None and result["left"]["adds"] == 0
        assert read_bytes(driver, f"{B}/same.txt") == b"same bytes"
        # Other bytes there are still someone else's change.
        write_bytes(driver, f"{B}/theirs.txt", b"my bytes")
        ah.commit("model/llm/gpt2:v1", msg="theirs",
                  add={str(tmp_path / "other"): "theirs.txt"})
        driver.control("refresh")
        assert driver.control("branch_status", path=SEGMENTS)["changed_remotely"] == [
            "theirs.txt"]
    finally:
        driver.close_driver()


def test_a_closing_writers_times_answer_with_its_mode_and_live_size(gpt2_v1: None,
                                                                   tmp_path: Path) -> None:
    """The mtime the kernel sends for a written file at its close is answered without
    resolving the path (``writer_mtime``): from what the file was last shown as, so a chmod
    since the open must be in it, at the bytes written so far; a writer with nothing
    unrecorded goes the general way (None)."""
    import trio

    driver = VfsDriver(tmp_path / "vfs-cache")
    try:
        fd = driver.open(f"{B}/w.bin", os.O_CREAT | os.O_WRONLY, 0o644)
        driver.pwrite(fd, b"x" * 5000, 0)
        driver.chmod(f"{B}/w.bin", 0o600)
        driver.pwrite(fd, b"y" * 3000, 5000)

        def times(mtime: float) -> Any:
            return trio.from_thread.run_sync(driver.vfs.writer_mtime, driver._fds[fd], mtime,
                                             trio_token=driver._token)

        shown = times(1_600_000_000.0)
        assert shown is not None
        assert (shown.permissions, shown.size, shown.mtime) == (0o600, 8000, 1_600_000_000.0)
        driver.fsync(fd)  # recorded: nothing left for the fast answer
        assert times(1_600_000_001.0) is None
        driver.close(fd)
        assert driver.stat(f"{B}/w.bin").st_mtime == 1_600_000_000.0
    finally:
        driver.close_driver()


def test_a_failure_only_the_session_knows_keeps_its_file_from_going_up(
        gpt2_v1: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write the queue could not record (its log on the same full disk too) is
    known to the session alone (``VFS.incomplete``): the upload that ``ah sync`` and
    upload-ahead share must skip that file, as it skips one the queue marks, instead of
    sending the bytes it has (it sent them: only ``ah commit`` asked the session)."""
    driver = VfsDriver(tmp_path / "vfs-cache")
    try:
        queue = driver.vfs.queue
        fd = driver.open(f"{B}/w.bin", os.O_CREAT | os.O_WRONLY, 0o644)
        driver.pwrite(fd, b"x" * 5000, 0)

        def refused(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as full:
            full.setattr(queue, "room_for", lambda size: False)
            full.setattr(queue, "touch_file", refused)
            with pytest.raises(OSError) as refusal:
                driver.pwrite(fd, b"y" * 3000, 5000)
            assert refusal.value.errno == errno.ENOSPC
            [branch] = queue.branches()
            row = queue.branch(branch).files["w.bin"]
            assert row.failed is None and driver.vfs.incomplete(row)
            assert driver.control("sync", path=SEGMENTS) == {"uploaded": 0, "bytes": 0}
        driver.close(fd)  # the disk has room again: the close records the failure
        with pytest.raises(Conflict, match="w.bin is incomplete"):
            driver.control("commit", path=SEGMENTS, message="m", force=False)
    finally:
        driver.close_driver()


def shown_dir(fs: Driver, path: str) -> bool:
    try:
        return is_dir(fs, path)
    except FileNotFoundError:
        return False


def set_aside(fs: Driver) -> dict[str, Any]:
    found: dict[str, Any] = fs.control("stats")["queue_set_aside"]
    return found


def test_a_branch_deleted_elsewhere_sets_its_queued_changes_aside(fs: Driver) -> None:
    """Rows of a branch the hub no longer has would show nowhere, and a branch made again
    under its name would inherit them: they leave the queue for lost+found, bytes and a
    list, and an open writer goes on writing into the set-aside copy."""
    write_bytes(fs, f"{B}/queued.txt", b"queued bytes")
    fs.mkdir(f"{B}/made")
    fd = fs.open(f"{B}/open.bin", os.O_CREAT | os.O_WRONLY)
    fs.pwrite(fd, b"first ", 0)
    ah.delete("model/llm/gpt2:v1")  # elsewhere: the API, not the mount
    wait_until(lambda: set_aside(fs)["branches"] == 1, what="the rows set aside")
    fs.pwrite(fd, b"and after", 6)
    fs.close(fd)
    ah.create("model/llm/gpt2:v1")  # made again under its name: its own head, nothing else
    wait_until(lambda: shown_dir(fs, B), what="the new branch shown")
    assert fs.listdir(B) == []
    assert fs.control("branch_status", path=SEGMENTS)["changes"] == []
    where = [p for p in Path(set_aside(fs)["where"]).iterdir() if p.is_dir()]
    assert len(where) == 1
    manifest = json.loads((where[0] / "changes.json").read_text())
    assert manifest["branch"].endswith("/model/llm/gpt2:v1")
    assert "no longer has it" in manifest["why"]
    assert {f["path"] for f in manifest["files"]} == {"queued.txt", "open.bin"}
    assert "made" in manifest["directories"]
    assert (where[0] / "queued.txt").read_bytes() == b"queued bytes"
    assert (where[0] / "open.bin").read_bytes() == b"first and after"


def test_a_folder_renamed_elsewhere_takes_its_queued_changes_along(fs: Driver) -> None:
    write_bytes(fs, f"{B}/queued.txt", b"queued bytes")
    ah.update("model/llm", name="lang")  # elsewhere: the API, not the mount
    renamed = "model/lang/gpt2/v1"
    wait_until(lambda: shown_dir(fs, renamed), what="the renamed folder shown")
    assert read_bytes(fs, f"{renamed}/queued.txt") == b"queued bytes"
    status = fs.control("branch_status", path=renamed.split("/"))
    assert [c["path"] for c in status["changes"]] == ["queued.txt"]
    assert set_aside(fs)["branches"] == 0
    assert fs.control("commit", path=renamed.split("/"), message="after the rename")["commit"]
    assert {o["path"] for o in ah.list("model/lang/gpt2:v1")} == {"queued.txt"}


def test_a_branch_deleted_while_no_session_ran_is_found_at_the_next_start(
        gpt2_v1: None, tmp_path: Path) -> None:
    driver = VfsDriver(tmp_path / "vfs-cache")
    write_bytes(driver, f"{B}/queued.txt", b"queued bytes")
    driver.close_driver()
    ah.delete("model/llm/gpt2:v1")  # no session runs: no feed tells anyone
    driver = VfsDriver(tmp_path / "vfs-cache")  # no feed followed: the start's check
    try:
        wait_until(lambda: set_aside(driver)["branches"] == 1, what="the rows set aside")
        ah.create("model/llm/gpt2:v1")
        driver.control("refresh")
        assert driver.listdir(B) == []
        where = next(p for p in Path(set_aside(driver)["where"]).iterdir() if p.is_dir())
        assert (where / "queued.txt").read_bytes() == b"queued bytes"
    finally:
        driver.close_driver()
