"""Indexes of what can be made again (listings, cached objects, file hashes, upload ids):
one whose database is damaged is removed and started empty, instead of failing every start.

A power loss or a bad disk can leave a diskcache's SQLite file unreadable ("file is not a
database", "database disk image is malformed"). Everything these indexes describe can be
fetched or computed again, so the repair is to drop it: the process logs what it removed
and goes on with an empty index. The change queue is not one of them (it lists changes
nobody else has): :mod:`ahmount.vfs.change_queue` refuses a damaged queue by name instead.

Only damage that SQLite reports when the index is opened is caught here; the indexes are
opened at each start of a process, so a restart repairs what a power loss left.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import diskcache

from ahmount.sqlite_damage import damaged

log = logging.getLogger("ahmount.cache")


def open_index(directory: Path, what: str, **settings: Any) -> diskcache.Cache:
    """The diskcache at ``directory`` (``what`` it holds, for the log); made anew, empty,
    when its database is damaged."""
    try:
        return diskcache.Cache(str(directory), **settings)
    except sqlite3.DatabaseError as exc:
        if not damaged(exc):
            raise
        _remove(directory, what, exc)
    return diskcache.Cache(str(directory), **settings)


def clear_if_damaged(top: Path, indexes: Iterable[Path], what: str) -> bool:
    """Remove the directory ``top`` whole when one of the diskcache ``indexes`` under it is
    damaged (its files are described by them: without them they are strays); its owner then
    starts it empty. True if it was removed."""
    for index in indexes:
        if not (index / "cache.db").exists():
            continue
        try:
            diskcache.Cache(str(index)).close()
        except sqlite3.DatabaseError as exc:
            if not damaged(exc):
                raise
            _remove(top, what, exc)
            return True
    return False


def _remove(directory: Path, what: str, exc: BaseException) -> None:
    log.warning("%s at %s is damaged (%s): removed, starting empty (its contents are "
                "fetched or computed again as needed)", what, directory, exc)
    shutil.rmtree(directory, ignore_errors=True)
