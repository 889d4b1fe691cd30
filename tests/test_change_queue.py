"""The change queue in-process, below any mount: rows, seq stamps, pins, rebases, crash
repairs, and a queue database from before modes were kept."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

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
    assert local.startswith(SPARE_PREFIX) and queue.spares_taken.is_set()
    queue.put_file("b", "kept.bin", "c0", local=local)
    assert queue.make_spares() == 1  # topped up again
    queue.close()
    left = sorted(p.name for p in (tmp_path / "q/files").iterdir())
    assert left == [local]  # the spares went with the close; the file with a row stays
    crashed = tmp_path / "q/files" / f"{SPARE_PREFIX}crash"
    crashed.touch()  # a spare a killed daemon left
    again = ChangeQueue(tmp_path / "q")
    assert not crashed.exists() and not (tmp_path / "q/lost+found").exists()
    assert again.branch("b").files["kept.bin"].local == local
    again.close()
