"""What SQLite says when a database file is damaged, for every store kept in SQLite: the
caches' indexes (dropped and made again: :mod:`ahmount.disposable_cache`), the change queue
and the hub's metadata (refused by name: they hold what nobody else has)."""

from __future__ import annotations

import sqlite3


def damaged(exc: BaseException | None) -> bool:
    """Whether ``exc`` is SQLite saying a database file is damaged (not one, or corrupt),
    rather than busy, locked or failing to read it."""
    return isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", None) \
        in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
