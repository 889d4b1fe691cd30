"""Versioned schema of the metadata store, and the steps that upgrade an older one.

A new database is created at :data:`SCHEMA_VERSION` from the table definitions. An older one
is upgraded step by step on start, inside the same transaction, with a log line naming both
versions; a database newer than this code is refused (never silently used).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ahmount.errors import InternalError

log = logging.getLogger("ahmount.hub")


def _v2_blobs_created_index(conn: Connection) -> None:
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_blobs_created ON blobs (created)"))


def _v3_blob_possession(conn: Connection) -> None:
    """``blob_grants`` and ``blob_assets`` are made by ``create_all``; the service fills
    ``blob_assets`` from the existing commits on its first start (it reads trees)."""


def _v4_staged_modes(conn: Connection) -> None:
    """Staged objects keep their permission bits (null: the default)."""
    if "mode" not in {c["name"] for c in sa.inspect(conn).get_columns("staging")}:
        conn.execute(sa.text("ALTER TABLE staging ADD COLUMN mode INTEGER"))


def _v5_events(conn: Connection) -> None:
    """The change feed's ``events`` table is made by ``create_all``; it starts empty (what
    changed before the upgrade is not replayed: subscribers start at the newest event)."""


def _v6_settings(conn: Connection) -> None:
    """The ``settings`` table (the read-grant key) is made by ``create_all``; the key is
    made on first use."""


def _v7_commit_requests(conn: Connection) -> None:
    """The ``commit_requests`` table (answers to commit requests with an
    ``Idempotency-Key``, for their repeats) is made by ``create_all``; it starts empty."""


#: STEPS[n] upgrades version n to n + 1.
STEPS: dict[int, Callable[[Connection], None]] = {1: _v2_blobs_created_index,
                                                  2: _v3_blob_possession,
                                                  3: _v4_staged_modes,
                                                  4: _v5_events,
                                                  5: _v6_settings,
                                                  6: _v7_commit_requests}
SCHEMA_VERSION = max(STEPS) + 1


def migrate(conn: Connection, metadata: sa.MetaData, info: sa.Table, where: str) -> int:
    """Create or upgrade the schema; returns the version it is at."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(info.name):
        metadata.create_all(conn)
        conn.execute(info.insert().values(version=SCHEMA_VERSION))
        log.info("metadata store %s created at schema v%d", _safe(where), SCHEMA_VERSION)
        return SCHEMA_VERSION
    version = conn.execute(sa.select(info.c.version)).scalar()
    if version is None:
        raise InternalError(f"metadata store {_safe(where)} has no schema version")
    if version > SCHEMA_VERSION:
        raise InternalError(
            f"metadata store {_safe(where)} is at schema v{version}, newer than this "
            f"ahmount (v{SCHEMA_VERSION}); upgrade ahmount"
        )
    if version < SCHEMA_VERSION:
        log.warning("upgrading metadata store %s from schema v%d to v%d", _safe(where),
                    version, SCHEMA_VERSION)
        metadata.create_all(conn)  # tables added by later versions
        for step in range(version, SCHEMA_VERSION):
            STEPS[step](conn)
        conn.execute(info.update().values(version=SCHEMA_VERSION))
    return SCHEMA_VERSION


def _safe(url: str) -> str:
    """The URL without a password, for logs and errors."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(metadata store)"
