"""The hub's metadata store: every table, every query, one SQLAlchemy Core code path.

SQLite (embedded, WAL, several processes at once) and PostgreSQL (at scale) run the same
statements. The service layer never sees SQL: it opens a transaction with
:meth:`MetadataStore.read` or :meth:`MetadataStore.write` and calls the methods of
:class:`MetaTx`, which return plain dicts with JSON columns already decoded.

Concurrency: a branch head only ever moves by compare-and-swap (:meth:`MetaTx.move_ref`), so two
writers that both read the same head cannot both win; the loser re-reads and retries. On SQLite
a write transaction starts with ``BEGIN IMMEDIATE`` so that two processes never deadlock while
upgrading a read lock.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ahmount.errors import HubUnavailable, InternalError, StorageFull
from ahmount.sqlite_damage import damaged

log = logging.getLogger("ahmount.hub")

meta = sa.MetaData()

schema_info = sa.Table(
    "schema_info", meta, sa.Column("version", sa.Integer, nullable=False)
)
users = sa.Table(
    "users",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
)
api_keys = sa.Table(
    "api_keys",
    meta,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(36), nullable=False, index=True),
    sa.Column("created", sa.Float, nullable=False),
)
folders = sa.Table(
    "folders",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner_id", sa.String(36), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("editor", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("modified", sa.Float, nullable=False),
    sa.UniqueConstraint("owner_id", "kind", "name"),
)
shares = sa.Table(
    "shares",
    meta,
    sa.Column("folder_id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(36), primary_key=True, index=True),
    sa.Column("permission", sa.String(8), nullable=False),
)
assets = sa.Table(
    "assets",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("folder_id", sa.String(36), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("root_commit", sa.String(64), nullable=False),
    sa.Column("editor", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("modified", sa.Float, nullable=False),
    sa.UniqueConstraint("folder_id", "name"),
)
refs = sa.Table(
    "refs",
    meta,
    sa.Column("asset_id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("type", sa.String(8), nullable=False),
    sa.Column("commit_id", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
commits = sa.Table(
    "commits",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("asset_id", sa.String(36), nullable=False, index=True),
    sa.Column("tree", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("committer", sa.String(128), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("parents", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
)
nodes = sa.Table(
    "tree_nodes",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
staging = sa.Table(
    "staging",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("asset_id", sa.String(36), nullable=False),
    sa.Column("branch", sa.String(128), nullable=False),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64)),
    sa.Column("size", sa.BigInteger),
    sa.Column("mtime", sa.Float),
    sa.Column("content_type", sa.String(255)),
    sa.Column("mode", sa.Integer),  # schema v4
    sa.Column("created", sa.Float, nullable=False),
    sa.Index("ix_staging_branch", "asset_id", "branch"),
)
blobs = sa.Table(
    "blobs",
    meta,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Index("ix_blobs_created", "created"),  # schema v2: gc scans by age
)
uploads = sa.Table(
    "uploads",
    meta,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("received", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("touched", sa.Float, nullable=False),
)

#: Blobs a user proved to hold by sending their bytes (schema v3): dedup is no capability, so
#: a commit may name a blob only with a grant here or an object of it the user can read.
blob_grants = sa.Table(
    "blob_grants",
    meta,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
)
#: Which assets' history holds a blob (schema v3): "can read an object with this hash".
blob_assets = sa.Table(
    "blob_assets",
    meta,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("asset_id", sa.String(36), primary_key=True, index=True),
)

#: The change feed (schema v5): one row per change a client may want to know of, in commit
#: order (ids are taken under a lock held to the end of the writing transaction, so no
#: reader ever sees id n+1 before id n). ``viewers`` is who could see the folder when it
#: changed (JSON list of user ids); ``public`` whether everyone could.
events = sa.Table(
    "events",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("viewers", sa.Text, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Index("ix_events_created", "created"),
)
#: The hub's own values (schema v6): the key that signs read grants, made on first use.
settings = sa.Table(
    "settings",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
#: Commit requests that carried an ``Idempotency-Key`` (schema v7), kept
#: :data:`REQUESTS_KEPT` seconds: a request sent again (its answer was lost on the way) gets
#: the answer the first one got (``commit_id`` null: the commit changed nothing) instead of
#: committing twice. Written in the transaction that moves the branch.
commit_requests = sa.Table(
    "commit_requests",
    meta,
    sa.Column("asset_id", sa.String(36), primary_key=True),
    sa.Column("committer", sa.String(128), primary_key=True),
    sa.Column("idempotency_key", sa.String(64), primary_key=True),
    sa.Column("branch", sa.String(128), nullable=False),
    sa.Column("commit_id", sa.String(64), nullable=True),
    sa.Column("created", sa.Float, nullable=False),
)
#: How long a commit request's answer is kept for a repeat of it: a day (a client retries
#: within minutes; one back from a long outage finds its commit in the log).
REQUESTS_KEPT = 86400.0
#: The lock that orders event ids across replicas (PostgreSQL advisory lock key).
EVENT_LOCK = 4243

_JSON_COLUMNS = ("labels", "parents", "metadata")

# The statements of the read path every request takes (authentication, then an asset and
# what the caller may do with it, then a ref): built once with bind parameters, because
# building a Core expression per call costs more than executing it (a cached compile still
# needs the expression to look itself up). SQLAlchemy's compiled cache keeps them compiled.
_owner = users.alias("owner")
_KEY_USER = (
    sa.select(users.c.id, users.c.name)
    .join(api_keys, api_keys.c.user_id == users.c.id)
    .where(api_keys.c.key_hash == sa.bindparam("key_hash"))
)
_ASSET_ACCESS = (
    sa.select(*(c.label(f"f_{c.name}") for c in folders.c), shares.c.permission,
              *(c.label(f"a_{c.name}") for c in assets.c))
    .select_from(_owner)
    .join(folders, folders.c.owner_id == _owner.c.id)
    .outerjoin(shares, sa.and_(shares.c.folder_id == folders.c.id,
                               shares.c.user_id == sa.bindparam("actor")))
    .outerjoin(assets, sa.and_(assets.c.folder_id == folders.c.id,
                               assets.c.name == sa.bindparam("asset")))
    .where(_owner.c.name == sa.bindparam("owner"), folders.c.kind == sa.bindparam("kind"),
           folders.c.name == sa.bindparam("folder"))
)
_REF_COMMIT = (
    sa.select(refs.c.type, *commits.c)
    .join(commits, commits.c.id == refs.c.commit_id)
    .where(refs.c.asset_id == sa.bindparam("asset"), refs.c.name == sa.bindparam("name"))
)
_ASSET_COMMIT = sa.select(commits).where(commits.c.id == sa.bindparam("id"),
                                         commits.c.asset_id == sa.bindparam("asset"))


def _row(row: sa.Row[Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return _row_of(dict(row._mapping))


def _row_of(out: dict[str, Any]) -> dict[str, Any]:
    """A row's columns as a dict, its JSON columns decoded."""
    for column in _JSON_COLUMNS:
        if column in out and isinstance(out[column], str):
            out[column] = json.loads(out[column])
    return out


def _rows(result: sa.Result[Any]) -> list[dict[str, Any]]:
    return [r for r in (_row(row) for row in result) if r is not None]


class MetaTx:
    """The queries of one transaction. Obtained from :meth:`MetadataStore.read`/``write``."""

    def __init__(self, conn: Connection) -> None:
        self._c = conn

    def _insert_ignore(self, table: sa.Table, rows: list[dict[str, Any]],
                       key: str | list[str]) -> None:
        if not rows:
            return
        keys = [key] if isinstance(key, str) else key
        dialect = self._c.dialect.name
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
        else:
            stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
        self._c.execute(stmt, rows)

    # -- settings ----------------------------------------------------------------------------

    def setting(self, name: str) -> str | None:
        value: str | None = self._c.execute(
            sa.select(settings.c.value).where(settings.c.name == name)).scalar()
        return value

    def insert_setting_if_absent(self, name: str, value: str) -> None:
        """Sets ``name`` unless it is set (replicas starting together keep the first)."""
        self._insert_ignore(settings, [{"name": name, "value": value}], "name")

    # -- users and keys ----------------------------------------------------------------------

    def insert_user(self, user_id: str, name: str) -> None:
        self._c.execute(users.insert().values(id=user_id, name=name, created=time.time()))

    def user_by_name(self, name: str) -> dict[str, Any] | None:
        return _row(self._c.execute(sa.select(users).where(users.c.name == name)).first())

    def user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return _row(self._c.execute(sa.select(users).where(users.c.id == user_id)).first())

    def user_by_key_hash(self, key_hash: str) -> dict[str, Any] | None:
        """``id`` and ``name`` of the user holding the key."""
        row = self._c.execute(_KEY_USER, {"key_hash": key_hash}).first()
        return None if row is None else {"id": row.id, "name": row.name}

    def insert_key(self, user_id: str, key_hash: str) -> None:
        self._c.execute(
            api_keys.insert().values(key_hash=key_hash, user_id=user_id, created=time.time())
        )

    def list_users(self) -> list[dict[str, Any]]:
        keys = (
            sa.select(sa.func.count())
            .where(api_keys.c.user_id == users.c.id)
            .scalar_subquery()
            .label("keys")
        )
        return _rows(self._c.execute(sa.select(users, keys).order_by(users.c.name)))

    # -- folders and shares ------------------------------------------------------------------

    def insert_folder(self, row: dict[str, Any]) -> None:
        self._c.execute(folders.insert().values(**_encode_json(row)))

    def folder(self, owner_id: str, kind: str, name: str) -> dict[str, Any] | None:
        query = sa.select(folders).where(
            folders.c.owner_id == owner_id, folders.c.kind == kind, folders.c.name == name
        )
        return _row(self._c.execute(query).first())

    def folder_by_id(self, folder_id: str) -> dict[str, Any] | None:
        return _row(self._c.execute(sa.select(folders).where(folders.c.id == folder_id)).first())

    def folders_owned(self, owner_id: str, kind: str) -> list[dict[str, Any]]:
        query = sa.select(folders).where(folders.c.owner_id == owner_id, folders.c.kind == kind)
        return _rows(self._c.execute(query.order_by(folders.c.name)))

    def folders_shared_with(self, user_id: str, kind: str) -> list[dict[str, Any]]:
        query = (
            sa.select(folders, shares.c.permission.label("share"))
            .join(shares, shares.c.folder_id == folders.c.id)
            .where(shares.c.user_id == user_id, folders.c.kind == kind)
            .order_by(folders.c.owner_id, folders.c.name)
        )
        return _rows(self._c.execute(query))

    def folders_public(self, kind: str) -> list[dict[str, Any]]:
        query = sa.select(folders).where(folders.c.public.is_(True), folders.c.kind == kind)
        return _rows(self._c.execute(query.order_by(folders.c.owner_id, folders.c.name)))

    def update_folder(self, folder_id: str, fields: dict[str, Any]) -> None:
        self._c.execute(
            folders.update().where(folders.c.id == folder_id).values(**_encode_json(fields))
        )

    def delete_folder(self, folder_id: str) -> None:
        for asset in self.assets_in(folder_id):
            self.delete_asset(asset["id"])
        self._c.execute(shares.delete().where(shares.c.folder_id == folder_id))
        self._c.execute(folders.delete().where(folders.c.id == folder_id))

    def share(self, folder_id: str, user_id: str) -> str | None:
        query = sa.select(shares.c.permission).where(
            shares.c.folder_id == folder_id, shares.c.user_id == user_id
        )
        value = self._c.execute(query).scalar()
        return None if value is None else str(value)

    def set_share(self, folder_id: str, user_id: str, permission: str | None) -> None:
        self._c.execute(
            shares.delete().where(shares.c.folder_id == folder_id, shares.c.user_id == user_id)
        )
        if permission is not None:
            self._c.execute(
                shares.insert().values(folder_id=folder_id, user_id=user_id, permission=permission)
            )

    def shares_of(self, folder_id: str) -> list[dict[str, Any]]:
        query = (
            sa.select(users.c.name, shares.c.permission)
            .join(users, users.c.id == shares.c.user_id)
            .where(shares.c.folder_id == folder_id)
            .order_by(users.c.name)
        )
        return _rows(self._c.execute(query))

    def share_user_ids(self, folder_id: str) -> list[str]:
        query = sa.select(shares.c.user_id).where(shares.c.folder_id == folder_id)
        return [r.user_id for r in self._c.execute(query)]

    # -- assets ------------------------------------------------------------------------------

    def insert_asset(self, row: dict[str, Any]) -> None:
        self._c.execute(assets.insert().values(**_encode_json(row)))

    def asset_access(self, owner: str, kind: str, folder: str, asset: str, actor_id: str
                     ) -> tuple[dict[str, Any], str | None, dict[str, Any] | None] | None:
        """In one query: the folder ``owner``/``kind``/``folder``, the permission it is shared
        with ``actor_id`` (None: not shared) and its asset ``asset`` (None: no such asset);
        None when there is no such folder."""
        row = self._c.execute(_ASSET_ACCESS, {"owner": owner, "kind": kind, "folder": folder,
                                              "asset": asset, "actor": actor_id}).first()
        if row is None:
            return None
        values = row._mapping
        folder_row = _row_of({c.name: values[f"f_{c.name}"] for c in folders.c})
        asset_row = None
        if values["a_id"] is not None:
            asset_row = _row_of({c.name: values[f"a_{c.name}"] for c in assets.c})
        share = values["permission"]
        return folder_row, None if share is None else str(share), asset_row

    def ref_commit(self, asset_id: str, name: str) -> tuple[str, dict[str, Any]] | None:
        """The type of ref ``name`` of an asset and the row of its commit, in one query."""
        row = _row(self._c.execute(_REF_COMMIT, {"asset": asset_id, "name": name}).first())
        if row is None:
            return None
        return str(row.pop("type")), row

    def asset_commit(self, asset_id: str, commit_id: str) -> dict[str, Any] | None:
        """The commit with this exact id, if it belongs to the asset."""
        return _row(self._c.execute(_ASSET_COMMIT, {"id": commit_id, "asset": asset_id}).first())

    def asset(self, folder_id: str, name: str) -> dict[str, Any] | None:
        query = sa.select(assets).where(assets.c.folder_id == folder_id, assets.c.name == name)
        return _row(self._c.execute(query).first())

    def assets_in(self, folder_id: str) -> list[dict[str, Any]]:
        query = sa.select(assets).where(assets.c.folder_id == folder_id).order_by(assets.c.name)
        return _rows(self._c.execute(query))

    def update_asset(self, asset_id: str, fields: dict[str, Any]) -> None:
        self._c.execute(
            assets.update().where(assets.c.id == asset_id).values(**_encode_json(fields))
        )

    def delete_asset(self, asset_id: str) -> None:
        # Tree nodes and blobs are shared by content; garbage collection reclaims them.
        for table in (staging, refs, commits, commit_requests):
            self._c.execute(table.delete().where(table.c.asset_id == asset_id))
        self._c.execute(assets.delete().where(assets.c.id == asset_id))

    # -- refs and commits --------------------------------------------------------------------

    def ref(self, asset_id: str, name: str) -> dict[str, Any] | None:
        query = sa.select(refs).where(refs.c.asset_id == asset_id, refs.c.name == name)
        return _row(self._c.execute(query).first())

    def refs_of(self, asset_id: str, ref_type: str) -> list[dict[str, Any]]:
        query = sa.select(refs).where(refs.c.asset_id == asset_id, refs.c.type == ref_type)
        return _rows(self._c.execute(query.order_by(refs.c.name)))

    def insert_ref(self, asset_id: str, name: str, ref_type: str, commit_id: str) -> None:
        self._c.execute(
            refs.insert().values(
                asset_id=asset_id, name=name, type=ref_type, commit_id=commit_id,
                created=time.time(),
            )
        )

    def move_ref(self, asset_id: str, name: str, old: str, new: str) -> bool:
        """Compare-and-swap a branch head; False if it no longer points at ``old``."""
        result = self._c.execute(
            refs.update()
            .where(refs.c.asset_id == asset_id, refs.c.name == name, refs.c.commit_id == old)
            .values(commit_id=new)
        )
        return result.rowcount == 1

    def delete_ref(self, asset_id: str, name: str) -> None:
        self._c.execute(refs.delete().where(refs.c.asset_id == asset_id, refs.c.name == name))
        self._c.execute(
            staging.delete().where(staging.c.asset_id == asset_id, staging.c.branch == name)
        )

    def insert_commit(self, row: dict[str, Any]) -> None:
        self._c.execute(commits.insert().values(**_encode_json(row)))

    def commit(self, commit_id: str) -> dict[str, Any] | None:
        return _row(self._c.execute(sa.select(commits).where(commits.c.id == commit_id)).first())

    def commits_by_prefix(self, asset_id: str, prefix: str, limit: int) -> list[dict[str, Any]]:
        query = sa.select(commits).where(
            commits.c.asset_id == asset_id, commits.c.id.startswith(prefix, autoescape=True)
        )
        return _rows(self._c.execute(query.limit(limit)))

    def asset_trees(self) -> list[tuple[str, str]]:
        """Every distinct (asset id, tree) of the commits."""
        query = sa.select(commits.c.asset_id, commits.c.tree).distinct()
        return [(str(a), str(t)) for a, t in self._c.execute(query)]

    def all_trees(self) -> list[str]:
        return [str(t) for t in self._c.execute(sa.select(commits.c.tree).distinct()).scalars()]

    def commit_request(self, asset_id: str, committer: str,
                       key: str) -> dict[str, Any] | None:
        """What a commit request with this idempotency key got, while it is kept; None if
        unknown."""
        query = sa.select(commit_requests).where(
            commit_requests.c.asset_id == asset_id, commit_requests.c.committer == committer,
            commit_requests.c.idempotency_key == key,
            commit_requests.c.created >= time.time() - REQUESTS_KEPT)
        return _row(self._c.execute(query).first())

    def insert_commit_request(self, asset_id: str, committer: str, key: str,
                              branch: str, commit_id: str | None) -> bool:
        """Record a commit request's answer, dropping the asset's requests past their
        keeping; False (nothing recorded) when a request with this key was recorded
        meanwhile (another replica took its repeat)."""
        now = time.time()
        self._c.execute(commit_requests.delete().where(
            commit_requests.c.asset_id == asset_id,
            commit_requests.c.created < now - REQUESTS_KEPT))  # a busy asset's, as it goes
        insert = postgresql.insert if self._c.dialect.name == "postgresql" else sqlite.insert
        # RETURNING says whether the row went in (psycopg's rowcount does not here: -1).
        result = self._c.execute(insert(commit_requests).values(
            asset_id=asset_id, committer=committer, idempotency_key=key, branch=branch,
            commit_id=commit_id, created=now).on_conflict_do_nothing().returning(
                commit_requests.c.idempotency_key))
        return result.first() is not None

    def prune_commit_requests(self, before: float) -> int:
        """Drop the answers of commit requests made before ``before``, every asset's (those of
        an asset no longer committed to would stay otherwise)."""
        result = self._c.execute(commit_requests.delete().where(
            commit_requests.c.created < before))
        return int(result.rowcount or 0)

    # -- staging -----------------------------------------------------------------------------

    def insert_changes(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._c.execute(staging.insert(), rows)

    def changes(self, asset_id: str, branch: str) -> Iterator[dict[str, Any]]:
        """The branch's staged changes in the order staged, one row at a time (consumed
        within the transaction): a commit of a million staged changes then never holds them
        all as rows besides what it makes of them."""
        query = sa.select(staging).where(staging.c.asset_id == asset_id, staging.c.branch == branch)
        for row in self._c.execute(query.order_by(staging.c.id)):
            yield dict(row._mapping)

    def delete_changes(self, ids: Sequence[int]) -> int:
        deleted = 0
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            deleted += self._c.execute(staging.delete().where(staging.c.id.in_(chunk))).rowcount
        return deleted

    def clear_changes(self, asset_id: str, branch: str, session: str | None = None) -> int:
        """Drop the branch's staged changes (only ``session``'s, if given); how many."""
        query = staging.delete().where(staging.c.asset_id == asset_id,
                                       staging.c.branch == branch)
        if session is not None:
            query = query.where(staging.c.session == session)
        return int(self._c.execute(query).rowcount)

    def staged_hashes(self) -> set[str]:
        query = sa.select(staging.c.sha256).where(staging.c.sha256.is_not(None)).distinct()
        return {str(h) for h in self._c.execute(query).scalars()}

    # -- blobs and uploads -------------------------------------------------------------------

    def blob_sizes(self, hashes: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(hashes), 500):
            chunk = list(hashes[start : start + 500])
            query = sa.select(blobs.c.sha256, blobs.c.size).where(blobs.c.sha256.in_(chunk))
            found.update({str(h): int(s) for h, s in self._c.execute(query)})
        return found

    def known_blobs(self, hashes: Sequence[str]) -> set[str]:
        return set(self.blob_sizes(hashes))

    def touch_blobs(self, hashes: Sequence[str]) -> None:
        for start in range(0, len(hashes), 500):
            chunk = list(hashes[start : start + 500])
            self._c.execute(
                blobs.update().where(blobs.c.sha256.in_(chunk)).values(created=time.time())
            )

    def insert_blob(self, sha256: str, size: int) -> None:
        self.insert_blobs([(sha256, size)])

    def insert_blobs(self, items: Sequence[tuple[str, int]]) -> None:
        now = time.time()
        rows = [{"sha256": s, "size": n, "created": now} for s, n in dict(items).items()]
        self._insert_ignore(blobs, rows, "sha256")

    def grant_blobs(self, user_id: str, hashes: Sequence[str]) -> None:
        now = time.time()
        rows = [{"user_id": user_id, "sha256": h, "created": now} for h in sorted(set(hashes))]
        self._insert_ignore(blob_grants, rows, ["user_id", "sha256"])

    def record_blob_assets(self, asset_id: str, hashes: Sequence[str]) -> None:
        rows = [{"sha256": h, "asset_id": asset_id} for h in sorted(set(hashes))]
        self._insert_ignore(blob_assets, rows, ["sha256", "asset_id"])

    def any_blob_assets(self) -> bool:
        return self._c.execute(sa.select(blob_assets.c.sha256).limit(1)).first() is not None

    def possessed_blobs(self, user_id: str, hashes: Sequence[str]) -> set[str]:
        """Of ``hashes``, those ``user_id`` uploaded or can read an object of: in an asset of
        a folder they own, one shared with them, or a public one."""
        found: set[str] = set()
        for start in range(0, len(hashes), 500):
            chunk = list(hashes[start : start + 500])
            granted = sa.select(blob_grants.c.sha256).where(
                blob_grants.c.user_id == user_id, blob_grants.c.sha256.in_(chunk))
            shared = sa.select(shares.c.folder_id).where(shares.c.user_id == user_id)
            readable = (
                sa.select(blob_assets.c.sha256)
                .join(assets, assets.c.id == blob_assets.c.asset_id)
                .join(folders, folders.c.id == assets.c.folder_id)
                .where(blob_assets.c.sha256.in_(chunk),
                       sa.or_(folders.c.owner_id == user_id, folders.c.public.is_(True),
                              folders.c.id.in_(shared)))
            )
            found.update(str(h) for h in self._c.execute(granted).scalars())
            found.update(str(h) for h in self._c.execute(readable).scalars())
        return found

    def delete_blob_grants(self, sha256: str) -> None:
        self._c.execute(blob_grants.delete().where(blob_grants.c.sha256 == sha256))
        self._c.execute(blob_assets.delete().where(blob_assets.c.sha256 == sha256))

    def blobs_older_than(self, cutoff: float) -> list[dict[str, Any]]:
        return _rows(self._c.execute(sa.select(blobs).where(blobs.c.created < cutoff)))

    def delete_blob(self, sha256: str) -> None:
        self._c.execute(blobs.delete().where(blobs.c.sha256 == sha256))

    def insert_upload(self, row: dict[str, Any]) -> None:
        self._c.execute(uploads.insert().values(**row))

    def upload(self, upload_id: str) -> dict[str, Any] | None:
        return _row(self._c.execute(sa.select(uploads).where(uploads.c.id == upload_id)).first())

    def set_upload_received(self, upload_id: str, received: int) -> None:
        self._c.execute(
            uploads.update()
            .where(uploads.c.id == upload_id)
            .values(received=received, touched=time.time())
        )

    def delete_upload(self, upload_id: str) -> None:
        self._c.execute(uploads.delete().where(uploads.c.id == upload_id))

    def uploads_all(self) -> list[dict[str, Any]]:
        return _rows(self._c.execute(sa.select(uploads)))

    def uploads_of(self, user_id: str) -> list[dict[str, Any]]:
        return _rows(self._c.execute(sa.select(uploads).where(uploads.c.user_id == user_id)))

    def uploads_untouched_since(self, cutoff: float) -> list[dict[str, Any]]:
        return _rows(self._c.execute(sa.select(uploads).where(uploads.c.touched < cutoff)))

    # -- tree nodes --------------------------------------------------------------------------

    def nodes(self, ids: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            query = sa.select(nodes.c.id, nodes.c.data).where(nodes.c.id.in_(chunk))
            found.update({str(i): bytes(d) for i, d in self._c.execute(query)})
        return found

    def insert_nodes(self, items: dict[str, bytes]) -> None:
        self._insert_ignore(nodes, [{"id": k, "data": v} for k, v in items.items()], "id")

    def node_ids(self) -> set[str]:
        return {str(i) for i in self._c.execute(sa.select(nodes.c.id)).scalars()}

    def delete_nodes(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), 500):
            self._c.execute(nodes.delete().where(nodes.c.id.in_(list(ids[start : start + 500]))))


    # -- the change feed ---------------------------------------------------------------------

    def insert_event(self, viewers: Sequence[str], public: bool,
                     payload: dict[str, Any]) -> None:
        """Append an event. On PostgreSQL the id is taken under a transaction-scoped lock, so
        ids become visible in increasing order (a reader at cursor n never later meets an
        event below n); SQLite has one writer at a time anyway."""
        if self._c.dialect.name == "postgresql":
            self._c.execute(sa.text(f"SELECT pg_advisory_xact_lock({EVENT_LOCK})"))
        self._c.execute(events.insert().values(
            created=time.time(), viewers=json.dumps(sorted(set(viewers))), public=public,
            payload=json.dumps(payload)))

    def events_after(self, cursor: int, limit: int) -> list[dict[str, Any]]:
        rows = self._c.execute(
            sa.select(events).where(events.c.id > cursor).order_by(events.c.id).limit(limit))
        return [{"id": r.id, "created": r.created, "viewers": json.loads(r.viewers),
                 "public": bool(r.public), "payload": json.loads(r.payload)} for r in rows]

    def event_bounds(self) -> tuple[int, int]:
        """(lowest id kept, highest id), (0, 0) when there are none."""
        row = self._c.execute(sa.select(sa.func.min(events.c.id),
                                        sa.func.max(events.c.id))).one()
        return int(row[0] or 0), int(row[1] or 0)

    def prune_events(self, before: float) -> int:
        """Drop events older than ``before``, always keeping the newest (it holds the cursor
        a new subscriber starts from)."""
        _, newest = self.event_bounds()
        result = self._c.execute(
            events.delete().where(events.c.created < before, events.c.id < newest))
        return int(result.rowcount or 0)


def _encode_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: json.dumps(v) if k in _JSON_COLUMNS and not isinstance(v, str) else v
        for k, v in row.items()
    }


class MetadataStore:
    """Owns the engine. ``url`` is a SQLAlchemy URL (``sqlite:///path`` or ``postgresql+…``).

    Creates the schema on first use. Close with :meth:`close`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite = url.startswith("sqlite")
        if self._sqlite:
            self.engine: Engine = sa.create_engine(
                url, connect_args={"timeout": 60, "check_same_thread": False}
            )
            _configure_sqlite(self.engine)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10)
        self._create_schema()

    def _create_schema(self) -> None:
        from ahmount.hub.migrations import _safe, migrate

        try:
            with self.write() as tx:
                if not self._sqlite:
                    # Replicas starting together: one creates or upgrades, the others wait.
                    tx._c.execute(sa.text("SELECT pg_advisory_xact_lock(4242)"))
                migrate(tx._c, meta, schema_info, self.url)
        except InternalError as exc:
            cause = exc.__cause__  # what _database_errors found
            if not isinstance(cause, sa.exc.DBAPIError) or not damaged(cause.orig):
                raise
            # At start, named: the operator's to restore.
            raise InternalError(f"metadata store {_safe(self.url)} is damaged ({cause.orig}): "
                                "restore it from a backup; nothing was changed in it") \
                from None

    @property
    def local(self) -> bool:
        """A file of this machine (SQLite), not a server: a small read transaction is a
        few hundred microseconds of CPU and never waits for a writer (WAL)."""
        return self._sqlite

    @contextmanager
    def read(self) -> Iterator[MetaTx]:
        """A transaction for reading (no lock taken on SQLite until something is written)."""
        with _database_errors(), self.engine.connect() as conn, conn.begin():
            yield MetaTx(conn)

    @contextmanager
    def write(self) -> Iterator[MetaTx]:
        """A transaction that writes: committed on exit, rolled back if the block raises
        (:class:`StorageFull` if the database's disk is full)."""
        with _database_errors(), self.engine.connect() as conn:
            if self._sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield MetaTx(conn)

    # NodeStore, for the tree store.
    def get_nodes(self, ids: Sequence[str]) -> dict[str, bytes]:
        with self.read() as tx:
            return tx.nodes(ids)

    def put_nodes(self, items: dict[str, bytes]) -> None:
        with self.write() as tx:
            tx.insert_nodes(items)

    def close(self) -> None:
        self.engine.dispose()


@contextmanager
def _database_errors() -> Iterator[None]:
    """The database's failures that are no bug of ours, as domain errors: a full disk
    (:class:`StorageFull`, 507), and a database that cannot be reached or is busy past the
    wait (:class:`HubUnavailable`, 503, which clients retry: a PostgreSQL restart is ridden
    out), instead of a crash of each request with a traceback and a 500."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        if damaged(exc.orig):
            log.error("database damaged: %s", exc.orig)
            raise InternalError("the hub's database is damaged; the hub's operator must "
                                "restore it") from exc
        if _disk_full(exc.orig):
            raise StorageFull("the hub's database has no room left: nothing of this change "
                              "was kept; the hub's operator must free space") from exc
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) and \
                _unreachable(exc.orig):
            # Why, for the operator's log only: the database's address is not the
            # callers' business.
            log.error("database unavailable: %s", str(exc.orig).strip() or type(exc.orig))
            raise HubUnavailable("the hub's database is unavailable; try again shortly") \
                from exc
        raise


def _unreachable(error: BaseException | None) -> bool:
    """Whether a driver's error says the database cannot be reached now: SQLite busy or
    locked past the wait, PostgreSQL's connection failures (no SQLSTATE: the client's own),
    connection exceptions (class 08) and a server shutting down or starting (57P)."""
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY,
                                                            sqlite3.SQLITE_LOCKED)
    if error is None or not type(error).__module__.startswith("psycopg"):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


def _disk_full(error: BaseException | None) -> bool:
    """Whether a driver's error says the database's disk is full: SQLite's SQLITE_FULL,
    PostgreSQL's disk_full (SQLSTATE 53100)."""
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
        getattr(error, "sqlstate", None) == "53100" or getattr(error, "pgcode", None) == "53100"


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling is turned off so that we choose BEGIN vs BEGIN
    # IMMEDIATE ourselves (the recipe from SQLAlchemy's SQLite dialect documentation).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())
