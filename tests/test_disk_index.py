"""Reading a whole diskcache index in one query (``ahmount.vfs.disk_index``): the same rows
as diskcache's own key-by-key walk, whatever the keys and values."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import diskcache
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ahmount.vfs.disk_index import all_rows, data_version, set_rows

keys = st.one_of(st.text(max_size=70), st.binary(max_size=40), st.integers(),
                 st.floats(allow_nan=False))
values = st.one_of(
    st.none(), st.integers(), st.text(max_size=30), st.binary(max_size=100),
    st.tuples(st.text(max_size=20), st.integers(0, 1 << 40), st.integers(0, 1 << 20)),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=4),
    st.binary(min_size=40_000, max_size=40_001),  # over diskcache's 32 KiB: kept in a file
)


def walked(index: diskcache.Cache) -> Counter[str]:
    """Each row as diskcache's walk gives it (a key, then a get of it)."""
    return Counter(repr((key, index.get(key))) for key in index.iterkeys())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.dictionaries(keys, values, max_size=25), dropped=st.sets(keys, max_size=5))
def test_every_row_is_what_a_get_of_its_key_gives(
        tmp_path_factory: pytest.TempPathFactory, rows: dict[object, object],
        dropped: set[object]) -> None:
    with diskcache.Cache(str(tmp_path_factory.mktemp("index")), eviction_policy="none",
                         cull_limit=0) as index:
        for key, value in rows.items():
            index.set(key, value)
        for key in dropped:
            index.delete(key)
        assert Counter(repr(row) for row in all_rows(index)) == walked(index)


def test_a_row_whose_value_file_is_gone_is_left_out(tmp_path: Path) -> None:
    with diskcache.Cache(str(tmp_path), eviction_policy="none", cull_limit=0) as index:
        index.set("small", (1, 2, 3))
        index.set("large", b"x" * 100_000)
        [value_file] = [p for p in tmp_path.rglob("*.val")]
        value_file.unlink()
        assert dict(all_rows(index)) == {"small": (1, 2, 3)}
        assert index.get("large") is None  # as a get misses it


small_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=30), st.binary(max_size=100),
    st.tuples(st.text(max_size=20), st.integers(0, 1 << 40), st.integers(0, 1 << 20)))
#: Over diskcache's 32 KiB, kept in a file: cheap to draw (one byte, repeated).
large_values = st.integers(0, 255).map(lambda b: bytes([b]) * 40_000)


def table(index: diskcache.Cache) -> tuple[Counter[str], list[tuple[object, ...]]]:
    """What a reader of ``index`` sees: its rows by key (the stored columns but for times
    and value file names), and diskcache's own count and size."""
    rows = index._sql("SELECT key, raw, expire_time, access_count, tag, size, mode, value,"
                      " filename IS NULL FROM Cache").fetchall()
    settings = index._sql(
        "SELECT key, value FROM Settings WHERE key IN ('count', 'size') ORDER BY key").fetchall()
    return Counter(repr(row) for row in rows), settings


#: What set_rows is given (its docstring): numbers equal across types (0, 0.0) would be one
#: key to SQLite but replaced in place by set.
row_keys = st.one_of(st.text(max_size=70), st.binary(max_size=40))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.dictionaries(row_keys, small_values, max_size=10),
       items=st.lists(st.tuples(row_keys, small_values | large_values), max_size=20))
def test_set_rows_writes_what_a_set_of_each_would(
        tmp_path_factory: pytest.TempPathFactory, before: dict[object, object],
        items: list[tuple[object, object]]) -> None:
    """Over any rows already there (small values: a row it replaces must have no file),
    keys given twice (the last wins) and values kept in files of their own."""
    indexes = [diskcache.Cache(str(tmp_path_factory.mktemp("index")), eviction_policy="none",
                               cull_limit=0) for _ in range(2)]
    try:
        for index in indexes:
            for key, value in before.items():
                index.set(key, value)
        one_by_one, together = indexes
        for key, value in items:
            one_by_one.set(key, value)
        set_rows(together, items)
        assert walked(together) == walked(one_by_one)
        assert table(together) == table(one_by_one)
        assert len(together) == len(one_by_one)
        files = [sorted(p.name for p in Path(i.directory).rglob("*.val")) for i in indexes]
        assert len(files[0]) == len(files[1])  # no value file left behind, none missing
    finally:
        for index in indexes:
            index.close()


def test_set_rows_with_a_value_that_cannot_be_stored_changes_nothing(tmp_path: Path) -> None:
    with diskcache.Cache(str(tmp_path), eviction_policy="none", cull_limit=0) as index:
        index.set("kept", 1)
        with pytest.raises((pickle.PicklingError, AttributeError)):
            set_rows(index, [("a", 1), ("kept", 2), ("b", lambda: None)])
        assert dict(all_rows(index)) == {"kept": 1}


def test_the_data_version_moves_when_another_connection_writes_and_only_then(
        tmp_path: Path) -> None:
    mine = diskcache.Cache(str(tmp_path / "index"))
    other = diskcache.Cache(str(tmp_path / "index"))  # another process's connection
    try:
        seen = data_version(mine)
        mine.set("a", 1)
        set_rows(mine, [("b", 2)])
        assert mine.get("a") == 1 and data_version(mine) == seen  # our own writes
        other.set("a", 3)
        moved = data_version(mine)
        assert moved != seen
        assert data_version(mine) == moved  # asking again changes nothing
        other.get("a")  # another's read is no write
        assert data_version(mine) == moved
    finally:
        mine.close()
        other.close()
