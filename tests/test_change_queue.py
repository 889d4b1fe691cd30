"""The change queue in-process, below any mount: rows, seq stamps, pins, rebases, crash
repairs, and a queue database from before modes were kept."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from ahmount.vfs.change_queue import ChangeQueue

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
        queue.put_file(BRANCH, "lost", "b", sha256="1" * 64)
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


def test_spare_files_are_handed_out_and_never_outlive_the_queue(tmp_path: Path) -> None:
    """Files made ahead for creates: taken first; an unused one is removed at close, and
    one a crash left (no row names it, nothing in it) is removed at the next load."""
    from ahmount.vfs.change_queue import SPARE_FILES, SPARE_PREFIX

    queue = ChangeQueue(tmp_path / "q")
    assert queue.make_spares() == SPARE_FILES
    local, fd = queue.create_local()
    os.close(fd)
    assert local.startswith(SPARE_PREFIX) and not queue.spares_taken.is_set()
    queue.put_file("b", "kept.bin", "c0", local=local)
    for _ in range(SPARE_FILES // 2):  # refilled once half of them are gone
        taken, fd = queue.create_local()
        os.close(fd)
        queue.local_path(taken).unlink()
    assert queue.spares_taken.is_set()
    assert queue.make_spares() == SPARE_FILES // 2 + 1  # topped up again
    queue.close()
    left = sorted(p.name for p in (tmp_path / "q/files").iterdir())
    assert left == [local]  # the spares went with the close; the file with a row stays
    crashed = tmp_path / "q/files" / f"{SPARE_PREFIX}crash"
    crashed.touch()  # a spare a killed daemon left
    again = ChangeQueue(tmp_path / "q")
    assert not crashed.exists() and not (tmp_path / "q/lost+found").exists()
    assert again.branch("b").files["kept.bin"].local == local
    again.close()
