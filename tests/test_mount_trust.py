"""The mount tells the truth and never dies: listings of nested trees, supervised background
tasks, one owner per cache directory, a queue that explains every file it holds."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ahmount import ah
from ahmount.config import dirs
from ahmount.mount.control import socket_path
from ahmount.vfs.change_queue import ChangeQueue
from tests.conftest import MountProcess, command, run_command, wait_until

Mounter = Callable[..., MountProcess]


pytestmark = pytest.mark.usefixtures("gpt2_v1")


def mount_log() -> str:
    path = dirs().cache / "logs/ah-mount.log"
    return path.read_text() if path.exists() else ""


def ah_unmount(*args: str) -> subprocess.CompletedProcess[str]:
    return run_command("ah", "unmount", *args, check=False)


@contextlib.contextmanager
def a_job_in(branch: Path, script: str) -> Iterator[subprocess.Popen[str]]:
    """A shell job working in ``branch`` (its working directory there), which runs
    ``script`` once it reads a line; killed on the way out if still running."""
    job = subprocess.Popen(["sh", "-c", f"read line; {script}"], cwd=branch,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


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


def test_sigusr1_logs_where_every_thread_of_the_daemon_is_and_it_goes_on(
        mount_factory: Mounter) -> None:
    m = mount_factory()
    assert m.pid is not None
    os.kill(m.pid, signal.SIGUSR1)
    wait_until(lambda: "Current thread" in mount_log(), what="the stacks in the log")
    stacks = mount_log()
    assert "ahmount/mount/daemon.py" in stacks and "trio/_core" in stacks  # its loop
    assert m.alive() and m.control("status")["pid"] == m.pid
    assert "v1" in os.listdir(m.mountpoint / "model/llm/gpt2")


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
    assert result.returncode == 6  # a conflict, as ah exits for one
    assert f"pid {m.pid}, which is mounted at {m.mountpoint}; unmount it first " \
        f"(`ah unmount {m.mountpoint}`, with --force if its daemon hangs)" in result.stderr
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


def test_a_mount_on_a_cache_whose_indexes_a_power_loss_damaged_starts_and_reads(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """Damaged cache indexes (listings, objects, packs: "file is not a database") failed
    every start of the mount until the user found and removed them by hand. They are
    dropped and started empty; the files read as before, fetched again."""
    import getpass

    from ahmount.vfs.cache_dir import state_dir
    from ahmount.vfs.object_cache import object_indexes
    from tests.test_disposable_cache import damage

    data = os.urandom(300_000)
    (tmp_path / "w.bin").write_bytes(data)
    ah.commit("model/llm/gpt2:v1", msg="w", add=[str(tmp_path / "w.bin")])
    m = mount_factory()
    assert (m.mountpoint / "model/llm/gpt2/v1/w.bin").read_bytes() == data
    m.stop()
    root = state_dir(dirs().cache, None, getpass.getuser())
    for index in [root / "listings", *object_indexes(root / "objects")]:
        damage(index / "cache.db")
    m = mount_factory()
    assert (m.mountpoint / "model/llm/gpt2/v1/w.bin").read_bytes() == data
    log = (dirs().cache / "logs/ah-mount.log").read_text()
    assert f"the listings cache at {root / 'listings'} is damaged" in log
    assert f"the object cache at {root / 'objects'} is damaged" in log


def test_different_hubs_never_share_a_cache_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from ahmount.vfs import cache_dir
    from ahmount.vfs.cache_dir import claim, hub_id

    monkeypatch.setattr(cache_dir, "SHUTDOWN_WAIT", 0.2)  # /a is no mount: "shutting down"
    assert hub_id(None) != hub_id("http://127.0.0.1:8000") != hub_id("http://127.0.0.1:8001")
    base = dirs().cache
    a = claim(base, "http://127.0.0.1:8000", "alice", Path("/a"))
    b = claim(base, "http://127.0.0.1:8001", "alice", Path("/b"))
    c = claim(base, "http://127.0.0.1:8000", "bob", Path("/c"))
    try:
        assert len({a.root, b.root, c.root}) == 3
        assert oct(a.root.stat().st_mode & 0o777) == "0o700"
        from ahmount.errors import Conflict

        with pytest.raises(Conflict, match="still shutting down after its unmount from /a"):
            claim(base, "http://127.0.0.1:8000", "alice", Path("/d"))
    finally:
        for claimed in (a, b, c):
            claimed.release()
    claim(base, "http://127.0.0.1:8000", "alice", Path("/d")).release()


def test_a_new_mount_waits_for_the_unmounted_one_to_exit() -> None:
    """`fusermount3 -u ~/assets && ah-mount ~/assets`: the old daemon, unmounted, still
    holds the cache while it flushes its index. The new mount waits for it (the holder's
    mountpoint is no mount any more) instead of failing with "unmount it first"."""
    import threading

    from ahmount.vfs.cache_dir import claim

    base = dirs().cache
    leaving = claim(base, None, "alice", Path("/was/mounted/here"))
    threading.Timer(0.3, leaving.release).start()
    claim(base, None, "alice", Path("/new")).release()


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


@pytest.mark.parametrize("host, shown", [
    (None, "embedded"),
    ("http://127.0.0.1:8080", "127.0.0.1:8080"),
    ("https://user:secret@hub.example.com/ah/", "hub.example.com/ah"),
    ("http://[::1]:9000", "[::1]:9000"),
    ("http://a,b", "a%2Cb"),
])
def test_the_mount_table_names_the_hub_and_no_password(host: str | None, shown: str) -> None:
    from ahmount.mount.daemon import _fsname_hub

    assert _fsname_hub(host) == shown


def test_df_and_mount_show_which_hub_a_mount_is_of(mount_factory: Mounter,
                                                   tmp_path: Path) -> None:
    """The source was a bare "ahmount", which mount(8) shows as a path where the current
    directory has an entry of that name (a checkout of this project)."""
    (tmp_path / "ahmount").mkdir()
    m = mount_factory()
    fields = next(line.split(" - ")[1].split() for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(m.mountpoint))
    assert fields[:2] == ["fuse.ahmount", "ahmount:embedded"]
    shown = subprocess.run(["mount"], capture_output=True, text=True, cwd=tmp_path).stdout
    assert f"ahmount:embedded on {m.mountpoint} type fuse.ahmount" in shown


def test_thousands_of_files_open_at_once_under_a_login_shells_limit(
        mount_factory: Mounter) -> None:
    """A login shell and systemd give programs a soft limit of 1,024 descriptors; the
    daemon holds one per file open through it, so a program holding ~1,000 files open got
    EMFILE while its own limit was 20 times that. The daemon raises its soft limit to the
    hard one, as Go programs (rclone) do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    many = 2_500
    if hard != resource.RLIM_INFINITY and hard < 2 * many + 100:
        pytest.skip(f"the hard limit of open files here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the daemon inherits
    try:
        m = mount_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * many + 100), hard))
    try:
        limits = Path(f"/proc/{m.pid}/limits").read_text()
        assert re.search(r"Max open files\s+(\d+)\s+\1\s", limits), limits
        branch = m.mountpoint / "model/llm/gpt2/v1"
        fds = [os.open(branch / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(many)]
        for i, fd in enumerate(fds):
            os.write(fd, f"file {i}".encode())
        for fd in fds:
            os.close(fd)
        m.control("commit", path=["model", "llm", "gpt2", "v1"], message="many", force=False)
        fds = [os.open(branch / f"f{i}", os.O_RDONLY) for i in range(many)]
        assert [os.read(fd, 100) for fd in fds] == [f"file {i}".encode() for i in range(many)]
        for fd in fds:
            os.close(fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "out of file descriptors" not in mount_log()


def test_an_unmount_while_a_huge_file_is_hashed_ends_the_daemon_at_once(
        mount_factory: Mounter) -> None:
    """Upload-ahead hashes a closed file in a worker thread; an unmount waited for that
    hash to end (2.5 minutes for 10 GiB), holding the cache lock meanwhile, so mounting
    again failed with "in use by ah-mount pid N ... unmount it first"."""
    from tests.test_cli import _bytes_read

    m = mount_factory()
    with (m.mountpoint / "model/llm/gpt2/v1/huge.bin").open("wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of holes: hashed at memory speed, for many minutes
    assert m.pid is not None
    pid = m.pid
    wait_until(lambda: _bytes_read(pid) > (256 << 20), timeout=60,
               what="upload-ahead to be hashing the file")
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
    wait_until(lambda: not m.alive(), timeout=30, what="the daemon to exit")
    again = mount_factory(mountpoint=m.mountpoint)
    assert "huge.bin" in os.listdir(again.mountpoint / "model/llm/gpt2/v1")  # still queued


def test_an_open_file_outlives_its_name(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "head.txt").write_text("head bytes")
    m.control("commit", path=["model", "llm", "gpt2", "v1"], message="head", force=False)
    # A queued file, open read-write, unlinked: everything keeps working on the open file.
    (branch / "q.txt").write_text("queued")
    fd = os.open(branch / "q.txt", os.O_RDWR)
    os.unlink(branch / "q.txt")
    assert os.fstat(fd).st_size == 6
    os.pwrite(fd, b"more", 6)
    assert os.pread(fd, 100, 0) == b"queuedmore"
    os.ftruncate(fd, 3)
    assert os.fstat(fd).st_size == 3
    os.close(fd)
    # A head object open read-only, unlinked; and the atomic-save pattern over an open file.
    fd = os.open(branch / "head.txt", os.O_RDONLY)
    os.unlink(branch / "head.txt")
    assert os.fstat(fd).st_size == 10 and os.pread(fd, 100, 0) == b"head bytes"
    os.close(fd)
    (branch / "t.txt").write_text("target")
    fd = os.open(branch / "t.txt", os.O_RDWR)
    (branch / "new.txt").write_text("replacement")
    os.rename(branch / "new.txt", branch / "t.txt")
    os.pwrite(fd, b"late write to the old file", 0)
    assert os.fstat(fd).st_size == 26
    os.close(fd)
    assert (branch / "t.txt").read_text() == "replacement"
    assert sorted(os.listdir(branch)) == ["t.txt"]
    status = m.control("branch_status", path=["model", "llm", "gpt2", "v1"])
    assert [(c["op"], c["path"]) for c in status["changes"]] == [("new", "t.txt"),
                                                                ("delete", "head.txt")]
    m.control("commit", path=["model", "llm", "gpt2", "v1"], message="after", force=False)
    assert {o["path"]: o["size_bytes"] for o in ah.list("model/llm/gpt2:v1")} == {"t.txt": 11}


def test_opening_read_write_without_writing_is_no_change(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    segments = ["model", "llm", "gpt2", "v1"]
    (branch / "db.bin").write_bytes(b"database pages")
    m.control("commit", path=segments, message="db", force=False)
    mtime = os.stat(branch / "db.bin").st_mtime_ns
    for _ in range(2):
        fd = os.open(branch / "db.bin", os.O_RDWR)
        assert os.pread(fd, 8, 0) == b"database"
        os.close(fd)
    assert m.control("branch_status", path=segments)["changes"] == []
    assert os.stat(branch / "db.bin").st_mtime_ns == mtime
    # Written back byte for byte: no change either, and the commit says so.
    (branch / "db.bin").write_bytes(b"database pages")
    assert m.control("branch_status", path=segments)["changes"] == []
    assert m.control("commit", path=segments, message="nothing", force=False)["commit"] is None
    out = subprocess.run([command("ah"), "status"], cwd=branch, capture_output=True,
                         text=True, check=True).stdout
    assert "0 added/changed" in out


def test_status_says_new_file_and_modified_as_git_does(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "old.txt").write_text("1")
    m.control("commit", path=["model", "llm", "gpt2", "v1"], message="one", force=False)
    (branch / "old.txt").write_text("2")
    (branch / "fresh.txt").write_text("3")
    out = subprocess.run([command("ah"), "status"], cwd=branch, capture_output=True,
                         text=True, check=True).stdout
    assert "new file:  fresh.txt" in out and "modified:  old.txt" in out
    done = subprocess.run([command("ah"), "commit", "-m", "two"], cwd=branch,
                          capture_output=True, text=True, check=True).stderr
    assert "(2 queued changes)" in done


def test_remote_changes_to_queued_paths_refuse_the_commit(mount_factory: Mounter,
                                                          tmp_path: Path) -> None:
    m = mount_factory("--refresh", "0.2")
    segments = ["model", "llm", "gpt2", "v1"]
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "shared.txt").write_text("mine")
    (tmp_path / "theirs.txt").write_text("theirs")
    ah.commit("model/llm/gpt2:v1", msg="remote", add={str(tmp_path / "theirs.txt"):
                                                       "shared.txt"})
    from ahmount.errors import Conflict
    from ahmount.mount.control import call

    with pytest.raises(Conflict, match="shared.txt"):
        call(m.mountpoint, "commit", {"path": segments, "message": "mine", "force": False})
    assert {o["path"]: o["size_bytes"] for o in ah.list("model/llm/gpt2:v1")} == \
        {"shared.txt": 6}
    m.control("commit", path=segments, message="mine", force=True)
    assert {o["path"]: o["size_bytes"] for o in ah.list("model/llm/gpt2:v1")} == \
        {"shared.txt": 4}


def test_commits_succeed_while_a_queued_file_keeps_changing(mount_factory: Mounter) -> None:
    import threading

    m = mount_factory()
    segments = ["model", "llm", "gpt2", "v1"]
    branch = m.mountpoint / "model/llm/gpt2/v1"
    big, small = os.urandom(4 << 20), b"small"
    (branch / "hot").write_bytes(big)
    stop = threading.Event()

    def churn() -> None:  # a user's `cp big hot; cp small hot` loop, at a human pace
        while not stop.is_set():
            for data in (big, small):
                with open(branch / "hot", "wb") as handle:
                    handle.write(data)
                stop.wait(0.005)

    worker = threading.Thread(target=churn)
    worker.start()
    commits = 0
    try:
        for i in range(8):
            done = m.control("commit", path=segments, message=f"busy {i}", force=False)
            commits += done["commit"] is not None
    finally:
        stop.set()
        worker.join()
    assert commits >= 1
    # Every commit that was made holds one whole version of the file.
    for commit in ah.list("model/llm/gpt2:v1", resource="commit")[:commits]:
        objects = ah.list(f"model/llm/gpt2:{commit['id'][:12]}")
        assert [(o["path"], o["size_bytes"]) in [("hot", len(big)), ("hot", len(small))]
                for o in objects] == [True], objects
    m.control("commit", path=segments, message="settled", force=False)
    data = (branch / "hot").read_bytes()
    assert data in (big, small)
    assert m.control("branch_status", path=segments)["changes"] == []
    assert m.alive()


def test_control_characters_in_names_are_refused(mount_factory: Mounter) -> None:
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    for name in ("a\nb", "\x1b[31mred", "tab\there", "del\x7f"):
        with pytest.raises(OSError) as info:
            (branch / name).write_text("x")
        assert info.value.errno == errno.EINVAL, name
    assert os.listdir(branch) == []


def test_modes_are_kept_shown_and_committed(mount_factory: Mounter, tmp_path: Path) -> None:
    import stat as stat_module

    m = mount_factory()
    segments = ["model", "llm", "gpt2", "v1"]
    branch = m.mountpoint / "model/llm/gpt2/v1"

    def mode(path: Path) -> int:
        return stat_module.S_IMODE(os.stat(path).st_mode)

    fd = os.open(branch / "secret.txt", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"private")
    os.close(fd)
    assert mode(branch / "secret.txt") == 0o600  # as asked (less the umask), not 0644
    (branch / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(branch / "run.sh", 0o755)
    assert mode(branch / "run.sh") == 0o755
    os.chmod(branch / "run.sh", 0o755)  # to what it is: no change, no error
    with pytest.raises(PermissionError):
        os.chmod(branch / "run.sh", 0o4755)  # setuid is not a permission bit
    (branch / "d").mkdir()
    (branch / "d/f").write_text("x")
    os.chmod(branch / "d", 0o755)  # what a directory shows: fine
    # Directories are implied by paths and keep no mode: on a mount only its user sees,
    # a chmod of one is accepted and not kept (as tar x and rsync -a need).
    os.chmod(branch / "d", 0o700)
    assert stat.S_IMODE((branch / "d").stat().st_mode) == 0o755
    m.control("commit", path=segments, message="modes", force=False)
    head = ah.list("model/llm/gpt2:v1", resource="commit")[0]["id"][:12]
    assert mode(m.mountpoint / "model/llm/gpt2" / head / "run.sh") == 0o555  # read-only
    assert mode(m.mountpoint / "model/llm/gpt2" / head / "secret.txt") == 0o400
    ah.download("model/llm/gpt2:v1", save_dir=str(tmp_path / "out"))
    assert mode(tmp_path / "out/run.sh") == 0o755 and mode(tmp_path / "out/secret.txt") == 0o600
    # A chmod alone is a change, committed as one.
    os.chmod(branch / "secret.txt", 0o640)
    status = m.control("branch_status", path=segments)
    assert [(c["op"], c["path"]) for c in status["changes"]] == [("modified", "secret.txt")]
    m.control("commit", path=segments, message="group may read", force=False)
    m.stop()
    again = mount_factory(mountpoint=m.mountpoint)
    assert mode(again.mountpoint / "model/llm/gpt2/v1/secret.txt") == 0o640


def test_a_corrupt_blob_fails_its_read_and_the_mount_stays_up(mount_factory: Mounter,
                                                              tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(300_000)
    (tmp_path / "w.bin").write_bytes(data)
    ah.commit("model/llm/gpt2:v1", msg="w", add=[str(tmp_path / "w.bin")])
    sha = hashlib.sha256(data).hexdigest()
    [blob] = list((dirs().data / "hub").rglob(sha))  # the embedded hub's copy
    blob.write_bytes(bytes(len(data)))  # rot on the hub's disk, same length
    m = mount_factory()
    with pytest.raises(OSError) as info:
        (m.mountpoint / "model/llm/gpt2/v1/w.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert m.alive() and m.control("status")["pid"] == m.pid
    assert m.control("cache")["objects"] == 0  # the bad copy was not kept
    blob.write_bytes(data)  # repaired: the next read fetches it again
    assert (m.mountpoint / "model/llm/gpt2/v1/w.bin").read_bytes() == data


def test_a_file_open_across_a_commit_keeps_what_it_writes_after(mount_factory: Mounter) -> None:
    # Found by the model-checking test: the commit dropped the row of a file still open
    # for writing (its bytes equal to the head), and the writes that followed went nowhere.
    m = mount_factory()
    segments = ["model", "llm", "gpt2", "v1"]
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "e").write_bytes(b"committed")
    m.control("commit", path=segments, message="e", force=False)
    fd = os.open(branch / "e", os.O_RDWR)
    m.control("commit", path=segments, message="nothing", force=False)
    os.pwrite(fd, b"CHANGED", 0)
    os.close(fd)
    assert (branch / "e").read_bytes() == b"CHANGEDed"
    m.stop()
    again = mount_factory(mountpoint=m.mountpoint)
    assert (again.mountpoint / "model/llm/gpt2/v1/e").read_bytes() == b"CHANGEDed"
    status = again.control("branch_status", path=segments)
    assert [(c["op"], c["path"]) for c in status["changes"]] == [("modified", "e")]


def test_unmount_force_frees_what_waits_on_a_stopped_daemon_and_keeps_the_queue(
        mount_factory: Mounter) -> None:
    """A daemon that does not answer (here stopped; hung alike) leaves every process that
    touches the mount waiting, and ``umount -l`` frees none of them. ``ah unmount`` says so
    and names ``--force``, which aborts the FUSE connection: the waiting reader gets an
    error at once, the mount point is free, the daemon exits when it runs again, and what
    was queued is there at the next mount."""
    from ahmount.mount import fuse_abort
    from ahmount.mount_table import ahmount_mounted_at

    m = mount_factory()
    assert m.pid is not None
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "closed.txt").write_text("queued before the hang")
    os.kill(m.pid, signal.SIGSTOP)
    reader = None
    try:
        # A separate process: one of ours with a descriptor there would hang our forks.
        reader = subprocess.Popen(["cat", str(branch / "closed.txt")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: fuse_abort.requests_waiting(m.mountpoint) > 0,
                   what="the reader to wait on the stopped daemon")
        polite = ah_unmount("--timeout", "1", str(m.mountpoint))
        assert polite.returncode == 6, polite.stderr  # a conflict
        assert "did not answer in 1s" in polite.stderr and "--force" in polite.stderr
        assert ahmount_mounted_at(m.mountpoint) and reader.poll() is None
        forced = ah_unmount("--force", "--timeout", "1", str(m.mountpoint))
        assert forced.returncode == 0, forced.stderr
        assert "FUSE connection was aborted" in forced.stdout
        _, err = reader.communicate(timeout=30)  # freed at once, with an error
        assert reader.returncode != 0
        assert re.search("not connected|connection abort", err), err
        assert not ahmount_mounted_at(m.mountpoint)
    finally:
        os.kill(m.pid, signal.SIGCONT)
        if reader is not None and reader.poll() is None:
            reader.kill()
    wait_until(lambda: not m.alive(), what="the daemon to exit once it runs again")
    # It ended cleanly: the unmount asked for while it was stopped found its FUSE session
    # closed already (ending that session again was a segfault).
    log = mount_log()
    assert "queued changes kept for the next mount" in log
    assert f"unmounted {m.mountpoint}" in log
    mount_factory(mountpoint=m.mountpoint)
    assert (branch / "closed.txt").read_text() == "queued before the hang"


def test_unmount_force_of_a_healthy_mount_is_an_unmount(mount_factory: Mounter) -> None:
    m = mount_factory()
    result = ah_unmount("--force", str(m.mountpoint))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{m.mountpoint} unmounted"
    wait_until(lambda: not m.alive(), what="the daemon to exit")
    nowhere = ah_unmount("--force", str(m.mountpoint))
    assert nowhere.returncode != 0 and "is not inside an ah-mount" in nowhere.stderr


def test_a_hung_daemon_fails_its_test_instead_of_hanging_the_run(
        mount_factory: Mounter) -> None:
    """The test suite's own guard (a deadlock found by a stress test must fail it, not hang
    CI): this process holds a descriptor on the mount and a thread of it waits on the
    daemon, which does not answer. Stopping the mount aborts its connection, frees the
    thread with an error, kills the daemon and fails, in seconds."""
    import threading

    from ahmount.mount import fuse_abort

    m = mount_factory()
    assert m.pid is not None
    (m.mountpoint / "model/llm/gpt2/v1/f.txt").write_text("read while hung")
    held = os.open(m.mountpoint / "model/llm/gpt2/v1/f.txt", os.O_RDONLY | os.O_DIRECT)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(os.pread(held, 1 << 20, 0))
        except OSError as exc:
            outcome.append(exc)

    os.kill(m.pid, signal.SIGSTOP)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        wait_until(lambda: fuse_abort.requests_waiting(m.mountpoint) > 0,
                   what="the read to wait on the stopped daemon")
        with pytest.raises(AssertionError, match="stopped answering .*connection was aborted"):
            m.stop(hung_after=1)
        thread.join(30)
        assert not thread.is_alive() and isinstance(outcome[0], OSError)
        assert not m.alive()
    finally:
        if m.alive():
            os.kill(m.pid, signal.SIGCONT)
        with contextlib.suppress(OSError):
            os.close(held)  # no flush waits: the connection is gone


def test_ending_the_fuse_loop_when_no_fuse_session_is_open_is_a_no_op(
        tmp_path: Path) -> None:
    """An unmount request, a signal or a background bug may arrive before the daemon's
    FUSE session opens or after it closed (its connection aborted, the daemon shutting
    down): ``pyfuse3.terminate()`` then dereferenced a freed session and the daemon died of
    a segfault. In a child process, which a regression kills."""
    script = ("import sys; from pathlib import Path; "
              "from ahmount.config import ClientConfig; from ahmount.mount.daemon import Mount; "
              "m = Mount(Path(sys.argv[1]), ClientConfig(), 1 << 20, 3.0, False); "
              "m._end_fuse_loop(); m._stop_for_bug(RuntimeError('late')); print('alive')")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "mnt")],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "alive"), result.stderr


def test_another_user_can_neither_abort_a_mount_nor_mount_fusectl(
        mount_factory: Mounter) -> None:
    """``fuse_abort`` run as another user (nobody): the mount's abort file refuses them
    and the mount goes on answering; and where fusectl is not mounted, the error says the
    one command that mounts it (mount(2) needs root)."""
    from ahmount.mount import fuse_abort

    m = mount_factory()
    (m.mountpoint / "model/llm/gpt2/v1/f.txt").write_text("still here")
    fuse_abort.requests_waiting(m.mountpoint)  # mounts fusectl (as root) where it is not
    script = ("import sys; from pathlib import Path; from ahmount.mount import fuse_abort\n"
              "for step in (lambda: fuse_abort.abort(Path(sys.argv[1])),"
              " fuse_abort._mount_fusectl):\n"
              "    try:\n        step()\n        print('done')\n"
              "    except Exception as exc:\n        print(type(exc).__name__, exc)\n")
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                             "--clear-groups", sys.executable, "-c", script,
                             str(m.mountpoint)], capture_output=True, text=True, timeout=60,
                            cwd="/")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stderr
    assert lines[0] == (f"PermissionDenied {m.mountpoint} is another user's mount: only "
                        "they or root may abort it")
    assert lines[1].startswith("PermissionDenied the FUSE control file system is not "
                               "mounted at /sys/fs/fuse/connections, and mounting it needs "
                               "root: run `mount -t fusectl fusectl /sys/fs/fuse/connections`")
    assert (m.mountpoint / "model/llm/gpt2/v1/f.txt").read_text() == "still here"
    assert m.alive() and m.control("status")["pid"] == m.pid


def test_unmount_refuses_a_mount_in_use_and_it_goes_on_serving(mount_factory: Mounter) -> None:
    """``ah unmount`` while a job works in the mount (here its working directory; an open
    file alike) is refused, as ``umount`` refuses: it detached the mount lazily and the
    daemon exited, so the job's next access failed although ``ah unmount`` said
    "unmounted". Once the job is gone, it unmounts."""
    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "data.txt").write_text("the job's input")
    with a_job_in(branch, "cat data.txt") as job:
        refused = ah_unmount(str(m.mountpoint))
        assert refused.returncode == 6, refused.stderr  # a conflict
        assert f"{m.mountpoint} is in use" in refused.stderr and "--force" in refused.stderr
        out, _ = job.communicate("go on\n", timeout=30)
        assert (job.returncode, out) == (0, "the job's input")
    assert m.alive() and os.path.ismount(m.mountpoint)
    done = ah_unmount(str(m.mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{m.mountpoint} unmounted"
    wait_until(lambda: not m.alive(), what="the daemon to exit")
    assert f"unmounted {m.mountpoint}" in mount_log()


def test_unmount_lazy_detaches_at_once_and_serves_the_job_until_it_ends(
        mount_factory: Mounter) -> None:
    """``ah unmount --lazy`` (as ``umount -l``): the path is free at once, the job working
    in the mount reads on, and the daemon exits when the job lets go."""
    from ahmount.mount_table import ahmount_mounted_at

    m = mount_factory()
    branch = m.mountpoint / "model/llm/gpt2/v1"
    (branch / "data.txt").write_text("read after the detach")
    with a_job_in(branch, "cat data.txt; ls") as job:
        lazy = ah_unmount("--lazy", str(m.mountpoint))
        assert lazy.returncode == 0, lazy.stderr
        assert lazy.stdout.startswith(f"{m.mountpoint} detached")
        assert not ahmount_mounted_at(m.mountpoint) and m.alive()
        out, _ = job.communicate("go on\n", timeout=30)
        assert (job.returncode, out) == (0, "read after the detach" + "data.txt\n")
    wait_until(lambda: not m.alive(), what="the daemon to exit once the job let go")
    assert "queued changes kept for the next mount" in mount_log()
    both = ah_unmount("--lazy", "--force", str(m.mountpoint))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
