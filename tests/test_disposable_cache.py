"""Damaged indexes on disk (a power loss, a bad disk): what can be made again is dropped and
started empty; the change queue is refused by name and kept. In process here; a real mount
on a damaged cache is in ``test_mount_trust.py``."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import diskcache
import pytest

from ahmount.disposable_cache import clear_if_damaged, open_index
from ahmount.errors import InternalError
from ahmount.sqlite_damage import damaged
from ahmount.vfs.change_queue import ChangeQueue
from ahmount.vfs.object_cache import ObjectCache, object_indexes


def damage(database: Path) -> None:
    """Overwrite the SQLite header of ``database``: "file is not a database"."""
    with database.open("r+b") as handle:
        handle.write(b"\xde\xad" * 50)


def test_a_damaged_index_is_made_anew_empty(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    where = tmp_path / "hashes"
    with diskcache.Cache(str(where)) as kept:
        kept["a"] = 1
    damage(where / "cache.db")
    with pytest.raises(Exception, match="not a database"):
        diskcache.Cache(str(where))  # what a process met at every start
    with caplog.at_level(logging.WARNING, "ahmount.cache"):
        index = open_index(where, "the file hash cache")
    with index:
        assert "a" not in index
        index["b"] = 2
        assert index["b"] == 2
    assert f"the file hash cache at {where} is damaged" in caplog.text
    # A sound one is opened as it is.
    with open_index(where, "the file hash cache") as again:
        assert again["b"] == 2


def test_an_object_cache_with_a_damaged_index_is_removed_whole(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    ObjectCache(root, 1 << 20).close()
    assert not clear_if_damaged(root, object_indexes(root), "the object cache")
    (root / "data" / "stray").write_bytes(b"x")  # what its records describe
    for index in object_indexes(root):
        assert (index / "cache.db").exists()
    damage(object_indexes(root)[1] / "cache.db")  # the packs' index
    assert clear_if_damaged(root, object_indexes(root), "the object cache")
    assert not root.exists()
    cache = ObjectCache(root, 1 << 20)  # its owner starts it empty
    assert cache.object_count() == 0
    cache.close()
    # The object cache does it itself when opened: no opener has to remember to.
    (root / "data" / "stray").write_bytes(b"x")
    damage(object_indexes(root)[0] / "cache.db")  # its records' index
    cache = ObjectCache(root, 1 << 20)
    assert cache.object_count() == 0 and not (root / "data" / "stray").exists()
    cache.close()


def test_a_damaged_queue_is_refused_by_name_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    ChangeQueue(root).close()
    damage(root / "queue.db")
    with pytest.raises(InternalError, match=f"the change queue's database {root}/queue.db "
                       "is damaged .*nothing was removed.*move .* aside"):
        ChangeQueue(root)
    assert (root / "queue.db").exists()


def test_only_a_damaged_file_counts_as_damage_not_a_busy_one(tmp_path: Path) -> None:
    broken = tmp_path / "broken.db"
    with sqlite3.connect(broken) as made:
        made.execute("CREATE TABLE t (x)")
    made.close()
    damage(broken)
    with pytest.raises(sqlite3.DatabaseError) as not_a_database:
        sqlite3.connect(broken).execute("SELECT * FROM t")
    assert damaged(not_a_database.value)

    busy = tmp_path / "busy.db"
    holder = sqlite3.connect(busy, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            sqlite3.connect(busy, timeout=0).execute("SELECT * FROM t")
        assert not damaged(locked.value)  # in use by another process: not damage
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not damaged(None) and not damaged(OSError(5, "I/O error"))
