"""Reading a whole diskcache index in one query, and writing many rows in three.

diskcache has no bulk read: a walk of every row is ``iterkeys`` and then a ``get`` each, a
query per row (~45 us a row here). The cache's indexes are read whole at each start of a
process (what is where), so a kept cache of 100,000 small objects took 5 s before a mount
answered anything. One ``SELECT`` of the table, decoded the way diskcache's own ``get`` does
(its ``Disk`` turns stored keys and values back into objects), reads the same in ~0.3 s.

It reads diskcache's table directly: written against diskcache 5.6 (``Cache`` table columns
``key, raw, mode, filename, value``; ``Disk.get`` and ``Disk.fetch``). Its tests compare it
with the key-by-key walk, so a diskcache that changes them fails there, not in a mount.

Writing is the same story: ``set`` is ~25 us a row (a ``SELECT`` then an ``INSERT`` or
``UPDATE``, each through Python), and a batch of 256 small files read for a data loader is
indexed 256 rows at a time, in a worker thread that holds the GIL the mount's event loop
needs for most of it. :func:`set_rows` writes what ``set`` would with one ``DELETE`` and one
``INSERT`` statement for all of them (diskcache's own triggers keep its count and size).
Its tests compare every row it writes with what ``set`` writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import diskcache


def all_rows(index: diskcache.Cache) -> Iterator[tuple[Any, Any]]:
    """Every ``(key, value)`` of ``index``, as ``index.get`` would give them. One statement:
    SQLite's snapshot of the table when it began, though other processes write meanwhile.
    A row whose value file is gone (removed since) is left out, as ``get`` would miss it."""
    disk = index._disk  # diskcache's own decoding: see the module's docstring
    rows = index._sql("SELECT key, raw, mode, filename, value FROM Cache")
    for key, raw, mode, filename, value in rows:
        try:
            yield disk.get(key, raw), disk.fetch(mode, filename, value, False)
        except OSError:
            continue


def set_rows(index: diskcache.Cache, items: Iterable[tuple[Any, Any]]) -> None:
    """Each ``(key, value)`` of ``items`` set in ``index`` as ``index.set`` would (replacing
    a row of the same key), all in one transaction. For indexes of small values, which
    diskcache keeps in the row: one large enough for a file of its own goes through ``set``,
    and a row replaced here must not have had one (its file would be left behind). Keys are
    text or bytes (the caches key by sha256): SQLite takes ``0`` and ``0.0`` for one key,
    where ``set`` would keep the stored key's type and this would not."""
    disk = index._disk  # diskcache's own encoding: see the module's docstring
    now = time.time()
    # By (db key, raw): the last of a key given twice, as a row to insert or, for a value
    # kept in a file of its own, an item that goes through set.
    rows: dict[tuple[Any, Any], tuple[Any, ...]] = {}
    large: dict[tuple[Any, Any], tuple[Any, Any]] = {}
    for key, value in items:
        db_key, raw = disk.put(key)
        size, mode, filename, db_value = disk.store(value, False, key=key)
        rows.pop((db_key, raw), None)
        large.pop((db_key, raw), None)
        if filename is not None:
            disk.remove(filename)
            large[db_key, raw] = (key, value)
        else:
            rows[db_key, raw] = (db_key, raw, now, None, now, 0, None, size, mode, None,
                                 db_value)
    with index.transact():
        con = index._con
        # A delete, not INSERT OR REPLACE: SQLite runs no delete trigger for the rows a
        # REPLACE removes, and diskcache's count would drift.
        con.executemany("DELETE FROM Cache WHERE key = ? AND raw = ?", list(rows))
        con.executemany(
            "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
            " tag, size, mode, filename, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            list(rows.values()))
        for key, value in large.values():
            index.set(key, value)


def data_version(index: diskcache.Cache) -> int:
    """SQLite's ``PRAGMA data_version`` of this thread's connection to ``index``: it changes
    when any other connection (another process, another cache object) commits, and only
    then. One statement, no table read: what tells a reader that a row it read before
    cannot have changed meanwhile."""
    return int(index._sql("PRAGMA data_version").fetchone()[0])
