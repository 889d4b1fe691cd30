"""The change queue in-process, below any mount: rows, seq stamps, pins, rebases, crash
repairs, and a queue database from before modes were kept."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahmount.errors import Conflict
from ahmount.vfs.change_queue import ChangeQueue, Row, _decode_log, _encode_row
from tests.conftest import small_disk

BRANCH = "alice/model/llm/gpt2:main"


def write_local(queue: ChangeQueue, data: bytes) -> str:
    local, fd = queue.create_local()
    os.write(fd, data)
    os.close(fd)
    return local


def test_a_commit_takes_only_rows_it_saw(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    a = write_local(queue, b"a")
    b = write_local(queue, b"b")
    queue.put_file(BRANCH, "a", "base", local=a, size=1)
    queue.put_file(BRANCH, "b", "base", local=b, size=1)
    taken = queue.snapshot(BRANCH)
    queue.touch_file(BRANCH, "b", size=2)  # written while the commit ran
    assert queue.committed(BRANCH, taken) == 1
    assert sorted(queue.branch(BRANCH).files) == ["b"]
    assert not queue.local_path(a).exists() and queue.local_path(b).exists()
    queue.rebase(BRANCH, ["b"], "new-head")
    assert queue.branch(BRANCH).files["b"].base == "new-head"
    queue.close()
    again = ChangeQueue(tmp_path / "q")  # and durable as such
    assert again.branch(BRANCH).files["b"].base == "new-head"
    again.close()


def test_a_commit_drops_the_directories_made_here_that_its_files_now_fill(
        tmp_path: Path) -> None:
    """``mkdir -p d/e && cp x d/e/`` then a commit: the head shows ``d`` and ``d/e`` now, so
    they are no longer queued (they stayed, and ``ah reset`` then counted changes no status
    showed). A directory still empty, or holding only files written during the commit,
    stays queued: it exists only here."""
    queue = ChangeQueue(tmp_path / "q")
    for directory in ("d", "d/e", "empty", "late"):
        queue.add_dir(BRANCH, directory, "base")
    queue.put_file(BRANCH, "d/e/x", "base", local=write_local(queue, b"x"), size=1)
    queue.put_file(BRANCH, "late/y", "base", local=write_local(queue, b"y"), size=1)
    taken = queue.snapshot(BRANCH)
    queue.touch_file(BRANCH, "late/y", size=2)  # written while the commit ran
    assert queue.committed(BRANCH, taken) == 1
    assert queue.branch(BRANCH).dirs == {"empty", "late"}
    queue.close()
    again = ChangeQueue(tmp_path / "q")  # and durable as such
    assert again.branch(BRANCH).dirs == {"empty", "late"}
    assert sorted(again.branch(BRANCH).files) == ["late/y"]
    assert again.reset(BRANCH) == 1  # the file; directories made here are no change
    again.close()


def test_a_deleted_head_objects_directory_stays_until_a_commit_shows_it(
        tmp_path: Path) -> None:
    """Deleting an object of the head queues its directory (it outlives its last file, as
    a local directory does); the commit drops that row once the new head still has objects
    there (``filled``), and keeps it where the commit took the last of them."""
    queue = ChangeQueue(tmp_path / "q")
    queue.delete(BRANCH, "full/a", "base", in_head=True)
    queue.delete(BRANCH, "emptied/b", "base", in_head=True)
    queue.delete(BRANCH, "top", "base", in_head=True)  # the root needs no row
    queue.delete(BRANCH, "gone/c", "base", in_head=True)
    queue.delete(BRANCH, "gone/", "base", in_head=True)  # rmdir: no row for a deleted dir
    queue.delete(BRANCH, "local-only/d", "base", in_head=False)
    assert queue.branch(BRANCH).dirs == {"full", "emptied"}
    taken = queue.snapshot(BRANCH)
    assert queue.committed(BRANCH, taken, filled=lambda d: d == "full") == 5
    assert queue.branch(BRANCH).dirs == {"emptied"}
    queue.close()
    again = ChangeQueue(tmp_path / "q")  # and durable as such
    assert again.branch(BRANCH).dirs == {"emptied"} and again.reset(BRANCH) == 0
    again.close()


def test_renamed_branches_take_their_rows_along_or_are_refused(tmp_path: Path) -> None:
    """A folder (or asset) renamed: its branches' rows move to the new keys in one
    transaction, durably; with rows under the new name already, nothing moves."""
    queue = ChangeQueue(tmp_path / "q")
    for key in ("alice/model/llm/gpt2:main", "alice/model/llm/gpt2:dev",
                "alice/model/llm2/x:main", "alice/model/vision/vit:main"):
        queue.put_file(key, "f", "base", local=write_local(queue, key.encode()), size=1)
    queue.delete("alice/model/llm/gpt2:dev", "old", "base", in_head=True)
    assert queue.rename_branches("alice/model/llm/", "alice/model/lang/") == 3
    assert queue.branches() == ["alice/model/lang/gpt2:dev", "alice/model/lang/gpt2:main",
                                "alice/model/llm2/x:main", "alice/model/vision/vit:main"]
    with pytest.raises(Conflict, match="queued under alice/model/vision/vit already"):
        queue.rename_branches("alice/model/lang/gpt2:", "alice/model/vision/vit:")
    queue.close()
    again = ChangeQueue(tmp_path / "q")  # durable, and the refused rename changed nothing
    assert again.branches() == ["alice/model/lang/gpt2:dev", "alice/model/lang/gpt2:main",
                                "alice/model/llm2/x:main", "alice/model/vision/vit:main"]
    assert again.branch("alice/model/lang/gpt2:dev").deleted == {"old"}
    again.close()


def test_the_feeds_report_of_a_rename_made_here_is_not_followed_again(
        tmp_path: Path) -> None:
    now = [0.0]
    queue = ChangeQueue(tmp_path / "q", clock=lambda: now[0])
    queue.put_file("alice/model/a/x:main", "f", "base", local=write_local(queue, b"1"), size=1)
    queue.rename_branches("alice/model/a/", "alice/model/b/")  # made here: mv a b
    queue.rename_branches("alice/model/b/", "alice/model/a/")  # and back: mv b a
    # The feed reports both, in order: neither moves anything (the rows moved then).
    assert queue.follow_rename("alice/model/a/", "alice/model/b/") == 0
    assert queue.follow_rename("alice/model/b/", "alice/model/a/") == 0
    assert queue.branches() == ["alice/model/a/x:main"]
    # A rename made elsewhere is followed, once.
    assert queue.follow_rename("alice/model/a/", "alice/model/c/") == 1
    assert queue.branches() == ["alice/model/c/x:main"]
    assert queue.follow_rename("alice/model/a/", "alice/model/c/") == 0
    # One made here whose report never came is not waited for forever.
    queue.rename_branches("alice/model/c/", "alice/model/d/")
    now[0] += 601
    queue.rename_branches("alice/model/d/", "alice/model/c/", here=False)
    assert queue.follow_rename("alice/model/c/", "alice/model/d/") == 1
    # Rows under both names: none move (the old name's are set aside by the caller).
    queue.put_file("alice/model/e/x:main", "g", "base", local=write_local(queue, b"2"), size=1)
    assert queue.follow_rename("alice/model/d/", "alice/model/e/") is None
    assert queue.branches() == ["alice/model/d/x:main", "alice/model/e/x:main"]
    queue.close()


def test_a_stranded_branch_leaves_its_bytes_and_a_list_in_lost_found(
        tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    other = "alice/model/llm/gpt2:dev"
    new = write_local(queue, b"new bytes")
    queue.put_file(BRANCH, "sub/new.txt", "c1", local=new, size=9, mode=0o600)
    queue.put_file(BRANCH, "moved.bin", "c1", sha256="a" * 64, size=5, origin="c1/old.bin")
    queue.delete(BRANCH, "gone.txt", "c1", in_head=True)
    queue.delete(BRANCH, "olddir/", "c1", in_head=True)
    queue.add_dir(BRANCH, "empty", "c1")
    queue.put_file(other, "kept", "c1", local=write_local(queue, b"k"), size=1)
    where = queue.strand(BRANCH, "deleted on the hub")
    assert where is not None and where.parent == tmp_path / "q" / "lost+found"
    assert (where / "sub/new.txt").read_bytes() == b"new bytes"
    assert not queue.local_path(new).exists()
    manifest = json.loads((where / "changes.json").read_text())
    assert manifest["branch"] == BRANCH and manifest["why"] == "deleted on the hub"
    files = {f["path"]: f for f in manifest["files"]}
    assert files["sub/new.txt"]["bytes"] == "sub/new.txt" and files["sub/new.txt"]["mode"] == 0o600
    assert files["moved.bin"]["bytes"] is None and files["moved.bin"]["origin"] == "c1/old.bin"
    assert files["moved.bin"]["sha256"] == "a" * 64
    assert manifest["deleted"] == ["gone.txt", "olddir/"]
    assert "empty" in manifest["directories"]
    # The branch starts from nothing (made again under its name, it inherits nothing), the
    # other branch keeps its rows, and so does the next start.
    assert queue.branches() == [other] and queue.branch(BRANCH).empty()
    assert queue.strand(BRANCH, "again") is None
    queue.close()
    again = ChangeQueue(tmp_path / "q")
    assert again.branches() == [other]
    assert (where / "sub/new.txt").read_bytes() == b"new bytes"  # not taken as a stray
    again.close()


def test_a_pinned_local_file_outlives_its_row_until_unpinned(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    old = write_local(queue, b"old bytes")
    queue.put_file(BRANCH, "w", "base", local=old, size=9)
    queue.pin([old])
    new = write_local(queue, b"new")
    queue.put_file(BRANCH, "w", "base", local=new, size=3)  # a writer's copy of its own
    assert queue.local_path(old).read_bytes() == b"old bytes"  # the commit still reads it
    queue.delete(BRANCH, "w", "base", in_head=False)
    assert queue.local_path(old).exists() and not queue.local_path(new).exists()
    queue.unpin([old])
    assert not queue.local_path(old).exists()
    queue.close()


def test_modes_and_their_changes_are_rows(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    row = queue.put_file(BRANCH, "run.sh", "base", sha256="0" * 64, size=3, mode=0o755)
    touched = queue.touch_file(BRANCH, "run.sh", mode=0o700, content_changed=False)
    assert touched.mode == 0o700 and touched.seq > row.seq and touched.sha256 == "0" * 64
    queue.close()
    assert ChangeQueue(tmp_path / "q").branch(BRANCH).files["run.sh"].mode == 0o700


def test_a_queue_from_before_modes_opens_with_the_default(tmp_path: Path) -> None:
    root = tmp_path / "q"
    (root / "files").mkdir(parents=True)
    db = sqlite3.connect(root / "queue.db")
    db.executescript("""
        CREATE TABLE changes (branch TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
            local TEXT, sha256 TEXT, size INTEGER NOT NULL DEFAULT 0,
            mtime REAL NOT NULL DEFAULT 0, base TEXT NOT NULL, seq INTEGER NOT NULL,
            uploaded INTEGER NOT NULL DEFAULT 0, origin TEXT, PRIMARY KEY (branch, path));
        CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER);
        INSERT INTO counter VALUES (1, 7);
    """)
    db.execute("INSERT INTO changes VALUES (?, 'old', 'file', NULL, ?, 1, 0, 'b', 7, 1, "
               "'c/old')", (BRANCH, "0" * 64))
    db.commit()
    db.close()
    queue = ChangeQueue(root)
    assert queue.branch(BRANCH).files["old"].mode == 0o644
    assert queue.branch(BRANCH).files["old"].failed is None
    assert queue.put_file(BRANCH, "new", "b", sha256="1" * 64).seq == 8  # counter kept
    queue.close()


def test_seqs_only_grow_across_restarts_and_rollbacks(tmp_path: Path) -> None:
    """The counter is written once per reservation, not per change: a reopened queue (also
    one whose last transaction rolled back) still hands out seqs above every earlier one."""
    from ahmount.vfs.change_queue import SEQ_RESERVE

    queue = ChangeQueue(tmp_path / "q")
    seqs = [queue.put_file(BRANCH, f"f{i}", "b", sha256="1" * 64).seq
            for i in range(SEQ_RESERVE + 5)]  # past the first reservation
    assert seqs == sorted(set(seqs))
    queue.close()
    again = ChangeQueue(tmp_path / "q")
    after = again.put_file(BRANCH, "g", "b", sha256="2" * 64).seq
    assert after > seqs[-1]
    again.close()


def test_a_rolled_back_reservation_is_made_again(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The change that passes the reservation fails inside its transaction (the counter's
    new reservation rolls back with it): the next change reserves again, so a reopened
    queue still hands out seqs above it."""
    queue = ChangeQueue(tmp_path / "q")
    last = 0
    while queue._seq < queue._reserved:  # up to the edge of the first reservation
        last = queue.put_file(BRANCH, f"f{last}", "b", sha256="1" * 64).seq
    write = queue._write

    def failing(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(queue, "_write", failing)
    with pytest.raises(sqlite3.OperationalError):
        queue.add_dir(BRANCH, "lost", "b")  # a transaction (it folds the logged rows first)
    assert "lost" not in queue.branch(BRANCH).dirs
    monkeypatch.setattr(queue, "_write", write)
    kept = queue.put_file(BRANCH, "kept", "b", sha256="1" * 64).seq
    assert kept > last
    queue.close()
    again = ChangeQueue(tmp_path / "q")
    assert again.put_file(BRANCH, "g", "b", sha256="2" * 64).seq > kept
    again.close()


def test_a_second_opener_of_an_open_queue_is_refused(tmp_path: Path) -> None:
    """The queue's database is held exclusively by the process that opened it."""
    queue = ChangeQueue(tmp_path / "q")
    queue.put_file(BRANCH, "f", "b", sha256="1" * 64)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ChangeQueue(tmp_path / "q")
    queue.close()
    ChangeQueue(tmp_path / "q").close()


def test_a_row_whose_file_grew_after_its_last_record_takes_the_file_size(
        tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    local = write_local(queue, b"abc")
    queue.put_file(BRANCH, "f", "base", local=local, size=3, sha256=None)
    with open(queue.local_path(local), "ab") as handle:  # written, then the daemon died
        handle.write(b"def")
    queue.close()
    again = ChangeQueue(tmp_path / "q")
    row = again.branch(BRANCH).files["f"]
    assert row.size == 6 and row.sha256 is None and not row.uploaded
    again.close()


def test_an_interrupted_commits_copies_are_cleared_and_rows_kept(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    local = write_local(queue, b"abc")
    queue.put_file(BRANCH, "f", "base", local=local, size=3)
    copy = queue.commit_copy(local)
    assert copy.read_bytes() == b"abc"
    queue.close()  # the daemon died mid-commit
    again = ChangeQueue(tmp_path / "q")
    assert not copy.exists() and "f" in again.branch(BRANCH).files
    assert not (tmp_path / "q/lost+found").exists()
    again.close()


def test_spare_files_are_handed_out_refilled_and_taken_up_again_at_load(tmp_path: Path) -> None:
    """Files made ahead for creates: taken first, made back once half are gone; unused
    ones outlive a close (and a crash) empty and are spares again at the next load."""
    from ahmount.vfs.change_queue import SPARE_LOW, SPARE_PREFIX

    queue = ChangeQueue(tmp_path / "q")
    assert queue.make_spares() == SPARE_LOW
    local, fd = queue.create_local()
    os.close(fd)
    assert local.startswith(SPARE_PREFIX) and not queue.spares_taken.is_set()
    queue.put_file("b", "kept.bin", "c0", local=local)
    for _ in range(SPARE_LOW // 2):  # refilled once half of them are gone
        taken, fd = queue.create_local()
        os.close(fd)
        queue.local_path(taken).unlink()
    assert queue.spares_taken.is_set()
    assert queue.make_spares() == SPARE_LOW // 2 + 1  # topped up again
    queue.close()
    left = {p.name for p in (tmp_path / "q/files").iterdir()}
    assert local in left and len(left) == SPARE_LOW + 1  # the spares stay, empty
    crashed = tmp_path / "q/files" / f"{SPARE_PREFIX}crash"
    crashed.touch()  # a spare a killed daemon left
    again = ChangeQueue(tmp_path / "q")
    assert not (tmp_path / "q/lost+found").exists()
    assert again.make_spares() == 0  # the pool is full from what the last one left
    assert again.branch("b").files["kept.bin"].local == local
    handed = set()
    for _ in range(SPARE_LOW + 1):
        taken, fd = again.create_local()
        os.close(fd)
        handed.add(taken)
    assert crashed.name in handed and local not in handed
    again.close()


def test_a_spare_removed_behind_the_queues_back_is_made_anew(tmp_path: Path) -> None:
    queue = ChangeQueue(tmp_path / "q")
    queue.make_spares()
    for spare in (tmp_path / "q/files").iterdir():
        spare.unlink()
    local, fd = queue.create_local()
    assert os.fstat(fd).st_size == 0 and queue.local_path(local).exists()
    os.close(fd)
    queue.close()


def test_the_spare_pool_grows_to_a_burst_and_tops_up_only_in_a_pause(tmp_path: Path) -> None:
    """A burst of creates longer than the pool raises its target to the next power of two
    (at most SPARE_MAX); past SPARE_LOW it is made back only once creates paused."""
    from ahmount.vfs.change_queue import SPARE_IDLE, SPARE_LOW, SPARE_MAX

    now = [100.0]
    queue = ChangeQueue(tmp_path / "q", clock=lambda: now[0])
    queue.make_spares()

    def burst(n: int) -> None:
        for _ in range(n):
            now[0] += SPARE_IDLE / 10
            os.close(queue.create_local()[1])

    burst(SPARE_LOW + 10)  # more creates than the pool had: some made a file themselves
    assert queue.spare_target == 2 * SPARE_LOW
    assert queue.make_spares() == SPARE_LOW  # back to SPARE_LOW at once, mid-burst
    burst(1)
    assert queue.make_spares() == 1  # still below SPARE_LOW
    assert queue.make_spares() == 0  # at SPARE_LOW; creates have not paused
    now[0] += SPARE_IDLE
    assert queue.make_spares() == SPARE_LOW  # the pause: up to the burst's size
    now[0] += SPARE_IDLE  # a pause ends a burst: the next one counts from one
    burst(SPARE_LOW)
    assert queue.spare_target == 2 * SPARE_LOW
    now[0] += SPARE_IDLE
    burst(SPARE_MAX + 1)  # never past the cap
    assert queue.spare_target == SPARE_MAX
    queue.close()


def test_keep_spares_tops_up_in_a_pause_and_returns_at_close(tmp_path: Path) -> None:
    """The refiller thread: the pool reaches its grown target once creates pause (real
    clock, polled with a deadline), and the thread ends when the queue closes."""
    from ahmount.vfs.change_queue import SPARE_LOW

    queue = ChangeQueue(tmp_path / "q")
    queue.spare_target = 2 * SPARE_LOW
    thread = threading.Thread(target=queue.keep_spares)
    thread.start()
    deadline = time.monotonic() + 30
    while len(list((tmp_path / "q/files").iterdir())) < 2 * SPARE_LOW:
        assert time.monotonic() < deadline, "the pool never reached its target"
        time.sleep(0.01)
    queue.close()
    thread.join(timeout=30)
    assert not thread.is_alive()


# -- the log: the two changes of every written file, appended instead of a transaction -------

def _killed_after(root: Path, script: str) -> None:
    """Run ``script`` (``queue`` is a ChangeQueue at ``root``) in a process that then kills
    itself with SIGKILL: nothing of the queue's close runs, as when the daemon is killed."""
    code = textwrap.dedent("""
        import os, signal, sys
        from ahmount.vfs.change_queue import ChangeQueue
        queue = ChangeQueue(__import__("pathlib").Path(sys.argv[1]))
    """) + textwrap.dedent(script) + "\nos.kill(os.getpid(), signal.SIGKILL)\n"
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                          timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def _rows_in_database(root: Path) -> dict[str, int]:
    db = sqlite3.connect(root / "queue.db")
    try:
        return dict(db.execute("SELECT path, size FROM changes"))
    finally:
        db.close()


def test_rows_a_killed_daemon_only_logged_are_replayed(tmp_path: Path) -> None:
    """Creates and closes are appended to the log, not written to the database; after a
    kill -9 the next open folds them in, the later of two records of a path winning, and
    hands out seqs above theirs."""
    root = tmp_path / "q"
    _killed_after(root, """
        for i in range(3):
            queue.put_file("b", f"f{i}", "base", sha256=str(i) * 64)
        queue.touch_file("b", "f1", size=7)
    """)
    assert _rows_in_database(root) == {}  # only the log has them
    queue = ChangeQueue(root)
    files = queue.branch("b").files
    assert sorted(files) == ["f0", "f1", "f2"] and files["f1"].size == 7
    assert files["f1"].sha256 is None and files["f0"].sha256 == "0" * 64
    assert queue.put_file("b", "g", "base", sha256="9" * 64).seq > files["f1"].seq
    queue.close()
    assert _rows_in_database(root) == {"f0": 0, "f1": 7, "f2": 0, "g": 0}


def test_a_transaction_after_logged_rows_keeps_their_order_across_a_kill(
        tmp_path: Path) -> None:
    """A delete after a logged create folds the create first and removes it; killed right
    after (its log not yet emptied: that waits for the next append), the next open must not
    bring the deleted row back. Rows logged after the delete are a new generation and are."""
    root = tmp_path / "q"
    _killed_after(root, """
        queue.put_file("b", "gone", "base", sha256="1" * 64)
        queue.put_file("b", "kept", "base", sha256="2" * 64)
        queue.delete("b", "gone", "base", in_head=False)
    """)
    queue = ChangeQueue(root)
    assert sorted(queue.branch("b").files) == ["kept"]
    queue.close()
    _killed_after(root, """
        queue.put_file("b", "before", "base", sha256="3" * 64)
        queue.delete("b", "kept", "base", in_head=False)
        queue.put_file("b", "after", "base", sha256="4" * 64)
        queue.touch_file("b", "before", size=5)
    """)
    queue = ChangeQueue(root)
    files = queue.branch("b").files
    assert sorted(files) == ["after", "before"] and files["before"].size == 5
    queue.close()


def test_a_log_cut_short_or_damaged_keeps_the_records_before(tmp_path: Path) -> None:
    """A power loss can leave the log's last record partly written: the records before it
    are replayed, the rest is dropped, and the log starts over."""
    root = tmp_path / "q"
    _killed_after(root, """
        for name in ("a", "b", "c"):
            queue.put_file("b", name, "base", sha256="1" * 64)
    """)
    log_file = root / "queue.log"
    data = log_file.read_bytes()
    log_file.write_bytes(data[:-3])  # c cut short
    queue = ChangeQueue(root)
    assert sorted(queue.branch("b").files) == ["a", "b"]
    assert log_file.stat().st_size == 0
    queue.close()
    _killed_after(root, """
        queue.put_file("b", "d", "base", sha256="1" * 64)
        queue.put_file("b", "e", "base", sha256="1" * 64)
    """)
    data = bytearray(log_file.read_bytes())
    data[-2] ^= 0xFF  # e damaged
    log_file.write_bytes(bytes(data))
    queue = ChangeQueue(root)
    assert sorted(queue.branch("b").files) == ["a", "b", "d"]
    queue.close()


def test_a_full_disk_under_the_log_refuses_the_change_and_keeps_the_log_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append the disk takes only part of (or none of) fails with ENOSPC, changes
    nothing in memory, and leaves no partial record to end the log early: what comes after
    it is replayed too."""
    from ahmount.vfs import change_queue as module

    queue = ChangeQueue(tmp_path / "q")
    queue.put_file("b", "before", "base", sha256="1" * 64)
    append = module._append

    def partly(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "_append", partly)
    with pytest.raises(OSError) as refused:
        queue.put_file("b", "refused", "base", sha256="2" * 64)
    assert refused.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        queue.touch_file("b", "before", size=9)
    assert sorted(queue.branch("b").files) == ["before"]
    assert queue.branch("b").files["before"].size == 0
    monkeypatch.setattr(module, "_append", append)
    queue.put_file("b", "after", "base", sha256="3" * 64)
    # Read as the next open would after a kill: both whole records, nothing else.
    _, rows = module._decode_log((tmp_path / "q/queue.log").read_bytes())
    assert [row.path for _, row in rows] == ["before", "after"]
    queue.close()


def test_the_log_is_folded_once_it_is_long(tmp_path: Path) -> None:
    """Every FOLD_ROWS logged rows go into the database in one transaction and the log starts
    over: its replay at load stays short."""
    from ahmount.vfs.change_queue import FOLD_ROWS, _decode_log

    root = tmp_path / "q"
    queue = ChangeQueue(root)
    for i in range(FOLD_ROWS + 2):
        queue.put_file("b", f"f{i}", "base", sha256="1" * 64)
    generation, rows = _decode_log((root / "queue.log").read_bytes())
    assert generation == 2 and [row.path for _, row in rows] == [f"f{FOLD_ROWS}",
                                                                   f"f{FOLD_ROWS + 1}"]
    queue.close()  # folds the last two: the database has them all, the log is not replayed
    assert len(_rows_in_database(root)) == FOLD_ROWS + 2
    again = ChangeQueue(root)
    assert len(again.branch("b").files) == FOLD_ROWS + 2
    again.close()


_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1)


@given(st.builds(
    Row, path=_text, kind=st.sampled_from(["file", "delete", "dir"]),
    local=st.none() | _text, sha256=st.none() | st.text("0123456789abcdef", min_size=64,
                                                         max_size=64),
    size=st.integers(0, 2**63), mtime=st.floats(allow_nan=False, allow_infinity=False),
    base=_text, seq=st.integers(0, 2**62), uploaded=st.booleans(), origin=st.none() | _text,
    mode=st.integers(0, 0o777), failed=st.none() | _text), _text)
def test_every_row_reads_back_from_the_log_as_it_was_written(row: Row, key: str) -> None:
    """Any path (no NUL: POSIX has none), id, size, time and mode survives the log's
    encoding unchanged, two records in a row included."""
    from ahmount.vfs.change_queue import _LOG_HEADER, LOG_MAGIC

    data = _LOG_HEADER.pack(LOG_MAGIC, 3) + _encode_row(key, row) + _encode_row("k", row)
    assert _decode_log(data) == (3, [(key, row), ("k", row)])


def test_an_incomplete_file_stays_so_across_a_kill_and_a_reopen_until_it_starts_over(
        tmp_path: Path) -> None:
    """A failed write marks its file (``failed``): in the log first (a kill replays it),
    then the database; a rename takes it along; a size or time change keeps it; a new
    start (truncated to nothing: ``failed=""``) or new content (``put_file``) ends it."""
    root = tmp_path / "q"
    queue = ChangeQueue(root)
    local = write_local(queue, b"half")
    queue.put_file(BRANCH, "w.bin", "base", local=local, size=4)
    queue.touch_file(BRANCH, "w.bin", failed="a write failed: No space left on device")
    queue.touch_file(BRANCH, "w.bin", size=4, mtime=5.0)  # the writer's close
    assert queue.branch(BRANCH).files["w.bin"].failed == \
        "a write failed: No space left on device"
    _, logged = _decode_log((root / "queue.log").read_bytes())  # what a kill leaves
    assert logged[-1][1].failed == "a write failed: No space left on device"
    queue.move_file(BRANCH, "w.bin", "moved.bin", "base", old_in_head=False)
    queue.close()
    again = ChangeQueue(root)
    assert again.branch(BRANCH).files["moved.bin"].failed == \
        "a write failed: No space left on device"
    again.touch_file(BRANCH, "moved.bin", size=0, failed="")
    assert again.branch(BRANCH).files["moved.bin"].failed is None
    again.touch_file(BRANCH, "moved.bin", failed="a write failed: Input/output error")
    again.put_file(BRANCH, "moved.bin", "base", local=write_local(again, b"whole"), size=5)
    assert again.branch(BRANCH).files["moved.bin"].failed is None
    again.close()


def test_a_log_record_from_before_failed_writes_reads_as_complete() -> None:
    from ahmount.vfs.change_queue import _LOG_HEADER, _RECORD_HEADER, LOG_MAGIC

    payload = "\0".join((BRANCH, "p", "file", "local-1", "", "3", "1.5", "base", "9", "",
                         "", "420")).encode()  # twelve fields: no ``failed``
    record = _RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload
    _, [(key, row)] = _decode_log(_LOG_HEADER.pack(LOG_MAGIC, 1) + record)
    assert key == BRANCH and row == Row("p", "file", "local-1", None, 3, 1.5, "base", 9,
                                        False, None, 0o644, None)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB disk."""
    with small_disk(tmp_path / "disk", "4m") as mounted:
        yield mounted


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; returns it (delete it to free them)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"z" * 4096)
    finally:
        os.close(fd)
    return filler


def overlay(queue: ChangeQueue) -> tuple[object, ...]:
    """What the branch shows: its files, deletes and directories."""
    shown = queue.branch(BRANCH)
    return (sorted(shown.files), sorted(shown.deleted), list(shown.deleted_dirs),
            sorted(shown.dirs))


def test_on_a_full_disk_a_change_that_cannot_be_recorded_is_not_made(
        disk: Path) -> None:
    """A transaction whose commit the full disk refuses (SQLite rolls it back) changes
    nothing in memory either, and says ENOSPC: the rm of a queued file shows it still there,
    as a restart would; once there is room the same rm works."""
    queue = ChangeQueue(disk / "q")
    for i in range(40):
        queue.put_file(BRANCH, f"f{i}", "base", sha256=f"{i:064x}")
    queue.delete(BRANCH, "f0", "base", in_head=True)  # folds the log's rows
    filler = fill(disk)
    with pytest.raises(OSError) as refused:
        for i in range(1, 40):  # a transaction each; the disk refuses one of them
            queue.delete(BRANCH, f"f{i}/", "base", in_head=True)
            queue.remove_dir(BRANCH, "x")
            queue.add_dir(BRANCH, f"made-{i}" * 20, "base")
    assert refused.value.errno == errno.ENOSPC
    shown = overlay(queue)
    filler.unlink()
    queue.close()
    again = ChangeQueue(disk / "q")
    assert overlay(again) == shown
    again.delete(BRANCH, "f39", "base", in_head=True)
    assert "f39" not in again.branch(BRANCH).files
    again.close()


def test_written_bytes_leave_the_disk_its_headroom(disk: Path) -> None:
    """A writer that asks ``room_for`` before each write fills a small disk up to its last
    twentieth (the queue's records need it) and no further; once room is made it may write
    again. Free space is looked at again once half of what was left is written, so a disk
    others filled is noticed within that."""
    queue = ChangeQueue(disk / "q")
    local, fd = queue.create_local()
    chunk = b"w" * (64 << 10)
    written = 0
    while queue.room_for(len(chunk)):
        written += os.write(fd, chunk)
    os.close(fd)
    room = os.statvfs(disk)
    free = room.f_bavail * room.f_frsize
    headroom = room.f_blocks * room.f_frsize // 20
    assert headroom <= free < headroom + 2 * len(chunk)
    assert written > 3 << 20
    queue.local_path(local).unlink()
    assert queue.room_for(1 << 20)
    filler = fill(disk)
    asked = 0
    while queue.room_for(len(chunk)):
        asked += 1
        assert asked * len(chunk) < 4 << 20
    filler.unlink()
    assert queue.room_for(len(chunk))
    queue.close()
