"""The hub's service layer: every operation of the Asset Hub, with its permission checks.

It knows nothing of HTTP and writes no SQL: it works on a :class:`MetadataStore` (through
:class:`MetaTx`), a :class:`TreeStore` and a :class:`BlobStore`. Every method is blocking and
thread-safe; the HTTP layer calls them from worker threads. Every failure is an
:class:`~ahmount.errors.AhError` whose message names the path involved.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ahmount.errors import (
    AlreadyExists,
    Changed,
    ChecksumMismatch,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StorageFull,
    Unauthenticated,
    UnknownChanges,
)
from ahmount.hub.blobs import BlobStore, check_range, hash_mismatch
from ahmount.hub.metadata import REQUESTS_KEPT, MetadataStore, MetaTx
from ahmount.hub.models import (
    DEFAULT_MODE,
    EMPTY_COMMIT_MESSAGE,
    MAX_CHANGES_PER_CALL,
    PUBLIC_OWNER,
    AssetAddr,
    AssetInfo,
    Change,
    CommitInfo,
    Event,
    EventPage,
    FolderAddr,
    FolderInfo,
    ListingPage,
    ObjectEntry,
    Permission,
    RefInfo,
)
from ahmount.hub.read_grants import Grant, ReadGrants
from ahmount.hub.trees import TreeStore
from ahmount.names import (
    Kind,
    check_content_type,
    check_delete_path,
    check_kind,
    check_mode,
    check_mtime,
    check_name,
    check_object_path,
    check_prefix,
    check_ref,
    check_sha256,
    check_size,
    check_text,
    check_user_name,
    is_commit_prefix,
)

log = logging.getLogger("ahmount.hub")

MAX_LIST_LIMIT = 10_000
MAX_LABELS = 64
MAX_DESCRIPTION = 10_000
MAX_METADATA_DEPTH = 16
#: An unfinished upload nobody sent bytes to for this long is expired (its partial bytes
#: deleted) by the next start of an upload by its user, and by ``gc``.
UPLOAD_TTL = 24 * 3600.0
#: Unfinished uploads one user may hold at once (a client runs a few in parallel).
MAX_OPEN_UPLOADS = 256
COMMIT_RETRIES = 50
SHARED_OWNER = "shared"
#: The setting that holds the key read grants are signed with (hex).
GRANT_KEY = "read_grant_key"
_RANK: dict[str, int] = {"view": 1, "edit": 2, "own": 3}


@dataclass(frozen=True)
class Actor:
    """The authenticated caller."""

    id: str
    name: str


def hash_key(api_key: str) -> str:
    """API keys are 256-bit random tokens, so one sha256 is a safe way to store them."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def _labels(value: object, what: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"labels of {what} must be a list of strings")
    if len(value) > MAX_LABELS:
        raise InvalidArgument(f"{what} has {len(value)} labels; at most {MAX_LABELS} allowed")
    for label in value:
        check_text(label, f"label of {what}", max_len=128)
        if not label:
            raise InvalidArgument(f"a label of {what} is empty")
    return list(dict.fromkeys(value))


def _description(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"description of {what} must be a string")
    return check_text(value, f"description of {what}", multiline=True, max_len=MAX_DESCRIPTION)


def _check_metadata(value: object, where: str, depth: int = 0) -> Any:
    """Commit metadata is shown again in every log: JSON of bounded depth whose strings
    are valid text and whose numbers are finite."""
    if depth > MAX_METADATA_DEPTH:
        raise InvalidArgument(f"commit metadata of {where} is nested deeper than "
                              f"{MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        return {check_text(k, f"a commit metadata key of {where}", max_len=256):
                _check_metadata(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_check_metadata(v, where, depth + 1) for v in value]
    if isinstance(value, str):
        return check_text(value, f"a commit metadata value of {where}", multiline=True)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"commit metadata of {where} holds {value!r}, not a finite number")
    if value is None or isinstance(value, bool | int | float):
        return value
    raise InvalidArgument(f"commit metadata of {where} holds a {type(value).__name__}")


def _update_fields(what: str, where: str, name: str | None, labels: Sequence[str] | None,
                   description: str | None) -> dict[str, Any]:
    """The validated columns an update of a folder or an asset changes."""
    fields: dict[str, Any] = {}
    if name is not None:
        fields["name"] = check_name(name, what)
    if labels is not None:
        fields["labels"] = _labels(labels, where)
    if description is not None:
        fields["description"] = _description(description, where)
    return fields


def _permission_of(folder: dict[str, Any], share: str | None, actor: Actor) -> Permission | None:
    """What ``actor`` may do in ``folder``, given the permission it is shared with them."""
    if folder["owner_id"] == actor.id:
        return "own"
    if share == "edit":
        return "edit"
    if share == "view" or folder["public"]:
        return "view"
    return None


def _require(permission: Permission, need: Permission, actor: Actor, where: FolderAddr) -> None:
    """PermissionDenied unless ``permission`` covers ``need``."""
    if _RANK[permission] < _RANK[need]:
        verb = {"edit": "change", "own": "administer"}.get(need, "read")
        raise PermissionDenied(
            f"user {actor.name!r} may not {verb} folder {where} (permission: {permission})",
            path=str(where),
        )


def _parse_expect(expect: object) -> dict[str, str | None]:
    """A commit's ``expect``: object path -> sha256 or None, at most a call's worth."""
    if not isinstance(expect, Mapping):
        raise InvalidArgument("expect must map object paths to sha256 digests or null")
    if len(expect) > MAX_CHANGES_PER_CALL:
        raise InvalidArgument(f"{len(expect)} expectations in one commit; at most "
                              f"{MAX_CHANGES_PER_CALL} are allowed")
    return {check_object_path(path): None if sha is None else check_sha256(sha)
            for path, sha in expect.items()}


def _commit(row: dict[str, Any]) -> CommitInfo:
    return CommitInfo(
        id=row["id"],
        message=row["message"],
        committer=row["committer"],
        created=row["created"],
        parents=list(row["parents"]),
        tree=row["tree"],
        metadata=dict(row["metadata"]),
    )


def _change(row: dict[str, Any]) -> Change:
    entry = None
    if row["op"] == "add":
        entry = ObjectEntry(
            row["path"], row["sha256"], row["size"], row["mtime"], row["content_type"],
            DEFAULT_MODE if row.get("mode") is None else row["mode"],
        )
    return Change(row["id"], row["op"], row["path"], row["session"], entry, row["created"])


def parse_entry(raw: Any) -> ObjectEntry:
    """Validate one object to add, as it arrives from a client."""
    if not isinstance(raw, dict):
        raise InvalidArgument("each object to add must be a mapping")
    path = check_object_path(raw.get("path"))
    sha256 = check_sha256(raw.get("sha256"))
    size = check_size(raw.get("size"), f"object {path!r}")
    mtime = check_mtime(raw.get("mtime", time.time()), f"object {path!r}")
    content_type = check_content_type(raw.get("content_type") or "application/octet-stream",
                                      f"object {path!r}")
    mode = check_mode(raw.get("mode", DEFAULT_MODE), f"object {path!r}")
    return ObjectEntry(path, sha256, size, mtime, content_type, mode)


def _held_blobs(tx: MetaTx, actor: Actor, hashes: Sequence[str]) -> dict[str, int]:
    """Sizes of the blobs of ``hashes`` the hub has and ``actor`` possesses (see
    ``docs/security.md``): to anyone else the rest do not exist."""
    return tx.blob_sizes(sorted(tx.possessed_blobs(actor.id, hashes)))


class KeyedLocks:
    """One lock per key, made on first use and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass(frozen=True)
class ReadableObject:
    """An object a caller was found allowed to read (made only by
    :meth:`HubService.open_object`): its commit, its entry, and its bytes on demand. The HTTP
    layer reads blobs only through these, never from the store."""

    commit: CommitInfo
    entry: ObjectEntry
    _blobs: BlobStore

    def read(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` (``end=None``: to the end) in chunks."""
        stop = self.entry.size if end is None else end
        check_range(self.entry.sha256, self.entry.size, start, stop)
        return self._blobs.read(self.entry.sha256, start, stop)

    def read_cached(self, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` if the page cache holds them (:meth:`BlobStore.read_cached`)."""
        check_range(self.entry.sha256, self.entry.size, start, end)
        return self._blobs.read_cached(self.entry.sha256, start, end)

    @staticmethod
    def read_all(objects: list[ReadableObject]) -> list[bytes]:
        """The whole bytes of each (small) object, read together (:meth:`BlobStore.read_small`)."""
        if not objects:
            return []
        return objects[0]._blobs.read_small([(o.entry.sha256, o.entry.size) for o in objects])

    def presigned_url(self) -> str | None:
        """A URL that reads the blob straight from the blob store, when the store can make one
        and the operator allowed it (``--s3-presign``)."""
        return self._blobs.presign(self.entry.sha256)


@dataclass(frozen=True)
class GrantedBlob:
    """A blob a signed read grant lets anyone read (made only by
    :meth:`HubService.open_granted_blob`): its size, and its bytes on demand."""

    sha256: str
    size: int
    _blobs: BlobStore

    def read(self, start: int, end: int) -> Iterator[bytes]:
        check_range(self.sha256, self.size, start, end)
        return self._blobs.read(self.sha256, start, end)

    def read_cached(self, start: int, end: int) -> bytes | None:
        check_range(self.sha256, self.size, start, end)
        return self._blobs.read_cached(self.sha256, start, end)

    def open_file(self) -> int | None:
        """The blob's file opened for reading (the caller closes it), or None when the store
        keeps no local file (:meth:`BlobStore.open_file`)."""
        return self._blobs.open_file(self.sha256)


class HubService:
    """All hub operations. ``metadata`` and ``blobs`` are owned by the caller."""

    def __init__(self, metadata: MetadataStore, blobs: BlobStore) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.trees = TreeStore(metadata)
        self._branch_turns = KeyedLocks()
        #: Single-request blob writes in progress: token -> the actor writing it.
        self._blob_writes: dict[str, str] = {}
        self._blob_writes_guard = threading.Lock()
        self._index_blob_assets()

    def _index_blob_assets(self) -> None:
        """Fill ``blob_assets`` from the commits of a hub that predates it (schema v3): once,
        idempotent, so replicas starting together do no harm."""
        empty = self.trees.empty_tree()
        with self.metadata.read() as tx:
            if tx.any_blob_assets():
                return
            pairs = [(a, t) for a, t in tx.asset_trees() if t != empty]
        for asset_id, tree in pairs:
            hashes = sorted(self.trees.blob_hashes(tree))
            with self.metadata.write() as tx:
                tx.record_blob_assets(asset_id, hashes)
        if pairs:
            log.info("indexed the blobs of %d commit tree(s) for access checks", len(pairs))

    # == users ================================================================================

    def ensure_user(self, name: str) -> Actor:
        """The user called ``name``, created without a key if new (the embedded hub's OS user)."""
        check_user_name(name)
        with self.metadata.read() as tx:
            row = tx.user_by_name(name)
        if row is None:
            with self.metadata.write() as tx:
                row = tx.user_by_name(name)
                if row is None:
                    tx.insert_user(str(uuid.uuid4()), name)
                    row = tx.user_by_name(name)
        assert row is not None
        return Actor(row["id"], row["name"])

    def add_user(self, name: str) -> tuple[Actor, str]:
        """Create a user with a fresh API key; returns the key (shown once, stored hashed)."""
        check_user_name(name)
        with self.metadata.write() as tx:
            if tx.user_by_name(name) is not None:
                raise AlreadyExists(f"user {name!r} already exists", path=name)
            user_id = str(uuid.uuid4())
            tx.insert_user(user_id, name)
            key = "ah_" + secrets.token_urlsafe(32)
            tx.insert_key(user_id, hash_key(key))
        return Actor(user_id, name), key

    def add_key(self, name: str) -> str:
        with self.metadata.write() as tx:
            row = tx.user_by_name(name)
            if row is None:
                raise NotFound(f"user {name!r} does not exist", path=name)
            key = "ah_" + secrets.token_urlsafe(32)
            tx.insert_key(row["id"], hash_key(key))
        return key

    def authenticate(self, api_key: str) -> Actor:
        with self.metadata.read() as tx:
            row = tx.user_by_key_hash(hash_key(api_key))
        if row is None:
            raise Unauthenticated("the API key is not valid; run 'ah login' with a valid key")
        return Actor(row["id"], row["name"])

    def list_users(self) -> list[dict[str, Any]]:
        with self.metadata.read() as tx:
            return [
                {"name": r["name"], "created": r["created"], "keys": r["keys"]}
                for r in tx.list_users()
            ]

    # == access ===============================================================================

    def _permission(self, tx: MetaTx, actor: Actor, folder: dict[str, Any]) -> Permission | None:
        owner = folder["owner_id"] == actor.id  # an owner needs no share looked up
        return _permission_of(folder, None if owner else tx.share(folder["id"], actor.id), actor)

    def _folder(
        self, tx: MetaTx, actor: Actor, addr: FolderAddr, need: Permission
    ) -> tuple[dict[str, Any], Permission, dict[str, Any]]:
        """The folder row, the caller's permission on it and the owner row.

        A folder the caller may not see is reported as missing, so that private names do not
        leak; one they may see but not change answers PermissionDenied.
        """
        owner = tx.user_by_name(addr.owner)
        row = tx.folder(owner["id"], addr.kind, addr.name) if owner else None
        permission = self._permission(tx, actor, row) if row else None
        if row is None or owner is None or permission is None:
            raise NotFound(f"folder {addr} does not exist", path=str(addr))
        _require(permission, need, actor, addr)
        return row, permission, owner

    def _asset(
        self, tx: MetaTx, actor: Actor, addr: AssetAddr, need: Permission
    ) -> tuple[dict[str, Any], Permission]:
        # One query for what _folder and tx.asset would take three or four: every request
        # to an asset (each block a mount reads) starts here.
        place = addr.folder
        found = tx.asset_access(place.owner, place.kind, place.name, addr.name, actor.id)
        permission: Permission | None = None
        if found is not None:
            folder, share, row = found
            permission = _permission_of(folder, share, actor)
        if found is None or permission is None:
            raise NotFound(f"folder {place} does not exist", path=str(place))
        _require(permission, need, actor, place)
        if row is None:
            raise NotFound(f"asset {addr} does not exist", path=str(addr))
        return row, permission

    def _event(self, tx: MetaTx, folder: dict[str, Any] | str, event: str,
               where: FolderAddr | AssetAddr, also: Sequence[str] = (),
               **fields: Any) -> None:
        """Record a change for the feed, seen by whoever may see the folder now (its owner,
        the users it is shared with, everyone if public) and by ``also``."""
        row = tx.folder_by_id(folder) if isinstance(folder, str) else folder
        assert row is not None
        asset = where if isinstance(where, AssetAddr) else None
        place = asset.folder if asset is not None else where
        assert isinstance(place, FolderAddr)
        payload: dict[str, Any] = {"type": event, "owner": place.owner, "kind": place.kind,
                                   "folder": place.name, **fields}
        if asset is not None:
            payload["asset"] = asset.name
        viewers = [row["owner_id"], *tx.share_user_ids(row["id"]), *also]
        tx.insert_event(viewers, bool(row["public"]), payload)

    def _folder_info(
        self, folder: dict[str, Any], owner: str, permission: Permission
    ) -> FolderInfo:
        return FolderInfo(
            id=folder["id"], owner=owner, kind=check_kind(folder["kind"]), name=folder["name"],
            labels=folder["labels"], description=folder["description"], permission=permission,
            public=bool(folder["public"]), editor=folder["editor"], modified=folder["modified"],
            created=folder["created"],
        )

    def _asset_info(
        self, addr: FolderAddr, asset: dict[str, Any], permission: Permission
    ) -> AssetInfo:
        return AssetInfo(
            id=asset["id"], owner=addr.owner, kind=addr.kind, folder=addr.name,
            name=asset["name"], labels=asset["labels"], description=asset["description"],
            permission=permission, editor=asset["editor"], modified=asset["modified"],
            created=asset["created"],
        )

    # == folders ==============================================================================

    def list_folders(self, actor: Actor, owner: str, kind: Kind) -> list[FolderInfo]:
        """Folders of ``owner`` the caller can see; ``owner`` may be ``shared`` (shared with the
        caller) or ``public``."""
        check_kind(kind)
        with self.metadata.read() as tx:
            if owner == SHARED_OWNER:
                rows = tx.folders_shared_with(actor.id, kind)
            elif owner == PUBLIC_OWNER:
                rows = tx.folders_public(kind)
            else:
                check_user_name(owner)
                user = tx.user_by_name(owner)
                # A user nobody can see folders of reads like one who has none: listings
                # do not tell which user names exist.
                rows = [] if user is None else tx.folders_owned(user["id"], kind)
            out: list[FolderInfo] = []
            names: dict[str, str] = {}
            for row in rows:
                permission = self._permission(tx, actor, row)
                if permission is None:
                    continue
                if row["owner_id"] not in names:
                    user_row = tx.user_by_id(row["owner_id"])
                    names[row["owner_id"]] = user_row["name"] if user_row else "?"
                out.append(self._folder_info(row, names[row["owner_id"]], permission))
            return out

    def create_folder(
        self, actor: Actor, addr: FolderAddr, labels: Sequence[str] = (), description: str = ""
    ) -> FolderInfo:
        check_name(addr.name, "folder")
        check_kind(addr.kind)
        if addr.owner != actor.name:
            raise PermissionDenied(
                f"user {actor.name!r} cannot create folder {addr} for another user",
                path=str(addr),
            )
        clean_labels = _labels(labels, str(addr))
        clean_description = _description(description, str(addr))
        now = time.time()
        with self.metadata.write() as tx:
            if tx.folder(actor.id, addr.kind, addr.name) is not None:
                raise AlreadyExists(f"folder {addr} already exists", path=str(addr))
            row = {
                "id": str(uuid.uuid4()), "owner_id": actor.id, "kind": addr.kind,
                "name": addr.name, "labels": clean_labels, "description": clean_description,
                "public": False, "editor": actor.name, "created": now, "modified": now,
            }
            tx.insert_folder(row)
            self._event(tx, row, "folder.created", addr)
        log.info("folder %s created by %s", addr, actor.name)
        return self._folder_info(row, actor.name, "own")

    def get_folder(self, actor: Actor, addr: FolderAddr) -> FolderInfo:
        with self.metadata.read() as tx:
            row, permission, owner = self._folder(tx, actor, addr, "view")
            return self._folder_info(row, owner["name"], permission)

    def update_folder(
        self,
        actor: Actor,
        addr: FolderAddr,
        name: str | None = None,
        labels: Sequence[str] | None = None,
        description: str | None = None,
    ) -> FolderInfo:
        """Rename (owner only) or relabel/redescribe (editors too) a folder."""
        fields = _update_fields("folder", str(addr), name, labels, description)
        renamed = name is not None and name != addr.name
        with self.metadata.write() as tx:
            # Editors write what is in the folder; the folder itself (its name, its
            # existence, who may see it) is the owner's, as on lakeFS and the HF Hub.
            row, permission, owner = self._folder(tx, actor, addr, "own" if renamed else "edit")
            if renamed and tx.folder(owner["id"], addr.kind, str(name)) is not None:
                target = FolderAddr(addr.owner, addr.kind, str(name))
                raise AlreadyExists(
                    f"cannot rename folder {addr}: folder {target} already exists",
                    path=str(target),
                )
            if fields:
                fields.update(editor=actor.name, modified=time.time())
                tx.update_folder(row["id"], fields)
                row = {**row, **fields}
                renaming: dict[str, Any] = {"name": name} if renamed else {}
                self._event(tx, row, "folder.updated", addr, **renaming)
            return self._folder_info(row, owner["name"], permission)

    def delete_folder(self, actor: Actor, addr: FolderAddr) -> None:
        with self.metadata.write() as tx:
            row, _, _ = self._folder(tx, actor, addr, "own")
            self._event(tx, row, "folder.deleted", addr)
            tx.delete_folder(row["id"])
        log.info("folder %s deleted by %s", addr, actor.name)

    def share_folder(
        self, actor: Actor, addr: FolderAddr, user: str, permission: str | None
    ) -> None:
        """Share with ``user`` (``view`` or ``edit``), or stop sharing (``None``)."""
        if permission not in ("view", "edit", None):
            raise InvalidArgument(f"permission {permission!r} is not one of 'view', 'edit'")
        check_user_name(user)
        with self.metadata.write() as tx:
            row, _, _ = self._folder(tx, actor, addr, "own")
            target = tx.user_by_name(user)
            if target is None:
                raise NotFound(f"user {user!r} does not exist", path=str(addr))
            if target["id"] == actor.id:
                raise InvalidArgument(f"folder {addr} is already owned by {user!r}")
            tx.set_share(row["id"], target["id"], permission)
            # the user it concerns hears of it, also when the share was just taken away
            self._event(tx, row, "folder.shared", addr, also=[target["id"]], user=user,
                        permission=permission)

    def set_public(self, actor: Actor, addr: FolderAddr, public: bool) -> None:
        with self.metadata.write() as tx:
            row, _, _ = self._folder(tx, actor, addr, "own")
            tx.update_folder(row["id"], {"public": bool(public)})
            # everyone hears of it when it becomes public, also when it stops being so
            self._event(tx, {**row, "public": True}, "folder.public", addr,
                        public=bool(public))

    def folder_shares(self, actor: Actor, addr: FolderAddr) -> list[dict[str, Any]]:
        with self.metadata.read() as tx:
            row, _, _ = self._folder(tx, actor, addr, "own")
            return tx.shares_of(row["id"])

    # == assets ===============================================================================

    def list_assets(self, actor: Actor, addr: FolderAddr) -> list[AssetInfo]:
        with self.metadata.read() as tx:
            folder, permission, _ = self._folder(tx, actor, addr, "view")
            return [self._asset_info(addr, a, permission) for a in tx.assets_in(folder["id"])]

    def create_asset(
        self, actor: Actor, addr: AssetAddr, labels: Sequence[str] = (), description: str = ""
    ) -> AssetInfo:
        check_name(addr.name, "asset")
        clean_labels = _labels(labels, str(addr))
        clean_description = _description(description, str(addr))
        tree = self.trees.empty_tree()
        now = time.time()
        with self.metadata.write() as tx:
            folder, permission, _ = self._folder(tx, actor, addr.folder, "edit")
            if tx.asset(folder["id"], addr.name) is not None:
                raise AlreadyExists(f"asset {addr} already exists", path=str(addr))
            asset_id = str(uuid.uuid4())
            root = self._new_commit(tx, asset_id, tree, EMPTY_COMMIT_MESSAGE, actor, [], now)
            row = {
                "id": asset_id, "folder_id": folder["id"], "name": addr.name,
                "labels": clean_labels, "description": clean_description,
                "root_commit": root.id, "editor": actor.name, "created": now, "modified": now,
            }
            tx.insert_asset(row)
            tx.insert_ref(asset_id, "main", "branch", root.id)
            self._event(tx, folder, "asset.created", addr)
        log.info("asset %s created by %s", addr, actor.name)
        return self._asset_info(addr.folder, row, permission)

    def get_asset(self, actor: Actor, addr: AssetAddr) -> AssetInfo:
        with self.metadata.read() as tx:
            row, permission = self._asset(tx, actor, addr, "view")
            return self._asset_info(addr.folder, row, permission)

    def update_asset(
        self,
        actor: Actor,
        addr: AssetAddr,
        name: str | None = None,
        labels: Sequence[str] | None = None,
        description: str | None = None,
    ) -> AssetInfo:
        fields = _update_fields("asset", str(addr), name, labels, description)
        with self.metadata.write() as tx:
            row, permission = self._asset(tx, actor, addr, "edit")
            renamed = name is not None and name != addr.name
            if renamed and tx.asset(row["folder_id"], str(name)) is not None:
                target = AssetAddr(addr.folder, str(name))
                raise AlreadyExists(
                    f"cannot rename asset {addr}: asset {target} already exists",
                    path=str(target),
                )
            if fields:
                fields.update(editor=actor.name, modified=time.time())
                tx.update_asset(row["id"], fields)
                row = {**row, **fields}
                renaming: dict[str, Any] = {"name": name} if renamed else {}
                self._event(tx, row["folder_id"], "asset.updated", addr, **renaming)
            return self._asset_info(addr.folder, row, permission)

    def delete_asset(self, actor: Actor, addr: AssetAddr) -> None:
        with self.metadata.write() as tx:
            row, _ = self._asset(tx, actor, addr, "edit")
            self._event(tx, row["folder_id"], "asset.deleted", addr)
            tx.delete_asset(row["id"])
        log.info("asset %s deleted by %s", addr, actor.name)

    # == references ===========================================================================

    def _resolve(self, tx: MetaTx, asset: dict[str, Any], addr: AssetAddr, ref: str) -> RefInfo:
        """Branch first, then tag, then a commit id prefix of at least 4 hex characters."""
        check_ref(ref)
        named = tx.ref_commit(asset["id"], ref)
        if named is not None:
            ref_type, row = named
            return RefInfo("tag" if ref_type == "tag" else "branch", ref, _commit(row))
        if len(ref) == 64 and is_commit_prefix(ref):
            # A whole id (what mounts and pinned clients send): an exact lookup, no prefix scan.
            exact = tx.asset_commit(asset["id"], ref)
            if exact is not None:
                return RefInfo("commit", ref, _commit(exact))
        if is_commit_prefix(ref):
            found = tx.commits_by_prefix(asset["id"], ref, 2)
            if len(found) > 1:
                raise InvalidArgument(
                    f"commit prefix {ref!r} of {addr} is ambiguous; give more characters",
                    path=addr.at(ref),
                )
            if found:
                return RefInfo("commit", found[0]["id"], _commit(found[0]))
            raise NotFound(f"no branch, tag or commit {ref!r} in {addr}", path=addr.at(ref))
        if len(ref) < 4 and all(c in "0123456789abcdef" for c in ref):
            raise NotFound(
                f"no branch or tag {ref!r} in {addr} (a commit prefix needs at least 4 "
                "hex characters)",
                path=addr.at(ref),
            )
        raise NotFound(f"no branch, tag or commit {ref!r} in {addr}", path=addr.at(ref))

    def resolve(self, actor: Actor, addr: AssetAddr, ref: str) -> RefInfo:
        with self.metadata.read() as tx:
            asset, _ = self._asset(tx, actor, addr, "view")
            return self._resolve(tx, asset, addr, ref)

    def list_refs(self, actor: Actor, addr: AssetAddr, ref_type: str) -> list[tuple[str, str]]:
        """``(name, commit_id)`` of every branch or tag."""
        if ref_type not in ("branch", "tag"):
            raise InvalidArgument(f"reference type {ref_type!r} is not 'branch' or 'tag'")
        with self.metadata.read() as tx:
            asset, _ = self._asset(tx, actor, addr, "view")
            return [(r["name"], r["commit_id"]) for r in tx.refs_of(asset["id"], ref_type)]

    def create_branch(self, actor: Actor, addr: AssetAddr, name: str) -> RefInfo:
        check_name(name, "branch")
        if addr.folder.kind != "model":
            raise InvalidArgument(
                f"cannot create branch {name!r}: dataset {addr} has only the main branch",
                path=addr.at(name),
            )
        with self.metadata.write() as tx:
            asset, _ = self._asset(tx, actor, addr, "edit")
            self._check_ref_free(tx, asset, addr, name)
            tx.insert_ref(asset["id"], name, "branch", asset["root_commit"])
            self._event(tx, asset["folder_id"], "ref.created", addr, ref=name,
                        ref_type="branch", new=asset["root_commit"])
            commit = tx.commit(asset["root_commit"])
            assert commit is not None
        log.info("branch %s created by %s", addr.at(name), actor.name)
        return RefInfo("branch", name, _commit(commit))

    def create_tag(self, actor: Actor, addr: AssetAddr, name: str, source: str) -> RefInfo:
        check_name(name, "tag")
        with self.metadata.write() as tx:
            asset, _ = self._asset(tx, actor, addr, "edit")
            self._check_ref_free(tx, asset, addr, name)
            target = self._resolve(tx, asset, addr, source)
            tx.insert_ref(asset["id"], name, "tag", target.commit.id)
            self._event(tx, asset["folder_id"], "ref.created", addr, ref=name, ref_type="tag",
                        new=target.commit.id)
        log.info("tag %s created at %s by %s", addr.at(name), target.commit.id[:8], actor.name)
        return RefInfo("tag", name, target.commit)

    def _check_ref_free(
        self, tx: MetaTx, asset: dict[str, Any], addr: AssetAddr, name: str
    ) -> None:
        existing = tx.ref(asset["id"], name)
        if existing is not None:
            raise AlreadyExists(
                f"{existing['type']} {addr.at(name)} already exists", path=addr.at(name)
            )

    def delete_ref(self, actor: Actor, addr: AssetAddr, name: str) -> None:
        with self.metadata.write() as tx:
            asset, _ = self._asset(tx, actor, addr, "edit")
            row = tx.ref(asset["id"], check_ref(name))
            if row is None:
                raise NotFound(f"no branch or tag {addr.at(name)}", path=addr.at(name))
            if row["type"] == "branch" and name == "main":
                raise InvalidArgument(f"branch {addr.at(name)} cannot be deleted",
                                      path=addr.at(name))
            tx.delete_ref(asset["id"], name)
            self._event(tx, asset["folder_id"], "ref.deleted", addr, ref=name,
                        ref_type=row["type"], old=row["commit_id"])
        log.info("%s %s deleted by %s", row["type"], addr.at(name), actor.name)

    def get_commit(self, actor: Actor, addr: AssetAddr, prefix: str) -> CommitInfo:
        if not is_commit_prefix(prefix):
            raise InvalidArgument(
                f"{prefix!r} is not a commit id prefix (4 to 64 lowercase hex characters)",
                path=addr.at(prefix),
            )
        with self.metadata.read() as tx:
            asset, _ = self._asset(tx, actor, addr, "view")
            found = tx.commits_by_prefix(asset["id"], prefix, 2)
        if not found:
            raise NotFound(f"no commit {prefix!r} in {addr}", path=addr.at(prefix))
        if len(found) > 1:
            raise InvalidArgument(f"commit prefix {prefix!r} of {addr} is ambiguous",
                                  path=addr.at(prefix))
        return _commit(found[0])

    def log(
        self, actor: Actor, addr: AssetAddr, ref: str, limit: int = 1000
    ) -> list[CommitInfo]:
        """History from ``ref``, newest first (a merge's parents interleaved by date)."""
        limit = _limit(limit)
        with self.metadata.read() as tx:
            asset, _ = self._asset(tx, actor, addr, "view")
            head = self._resolve(tx, asset, addr, ref).commit
            out: list[CommitInfo] = []
            seen = {head.id}
            heap: list[tuple[float, str, CommitInfo]] = [(-head.created, head.id, head)]
            while heap and len(out) < limit:
                _, _, commit = heapq.heappop(heap)
                out.append(commit)
                for parent_id in commit.parents:
                    if parent_id in seen:
                        continue
                    seen.add(parent_id)
                    row = tx.commit(parent_id)
                    if row is not None:
                        parent = _commit(row)
                        heapq.heappush(heap, (-parent.created, parent.id, parent))
            return out

    # == objects ==============================================================================

    def list_objects(
        self,
        actor: Actor,
        addr: AssetAddr,
        ref: str,
        prefix: str = "",
        after: str = "",
        limit: int = 1000,
        delimiter: bool = False,
    ) -> ListingPage:
        commit = self.listed_commit(actor, addr, ref, prefix, after, limit)
        return self.list_commit(commit, prefix, after, limit, delimiter)

    def listed_commit(self, actor: Actor, addr: AssetAddr, ref: str, prefix: str, after: str,
                      limit: int) -> CommitInfo:
        """The commit a listing of ``ref`` shows, once ``actor`` may view it and the
        listing's query is valid (what :meth:`list_objects` checks before it lists)."""
        check_prefix(prefix)
        _limit(limit)
        if not isinstance(after, str) or "\x00" in after:
            raise InvalidArgument("listing cursor 'after' must be a string without NUL")
        with self.metadata.read() as tx:
            asset, _ = self._asset(tx, actor, addr, "view")
            return self._resolve(tx, asset, addr, ref).commit

    def list_commit(self, commit: CommitInfo, prefix: str = "", after: str = "",
                    limit: int = 1000, delimiter: bool = False) -> ListingPage:
        """A page of the objects of a commit :meth:`listed_commit` gave."""
        objects, dirs, cursor = self.trees.list_page(
            commit.tree, check_prefix(prefix), after, _limit(limit), delimiter)
        return ListingPage(commit.id, objects, dirs, cursor)

    def stat_object(
        self, actor: Actor, addr: AssetAddr, ref: str, path: str
    ) -> tuple[CommitInfo, ObjectEntry]:
        check_object_path(path)
        commit = self.resolve(actor, addr, ref).commit
        entry = self.trees.get(commit.tree, path)
        if entry is None:
            raise NotFound(f"no object {path!r} in {addr.at(ref)}", path=f"{addr.at(ref)}/{path}")
        return commit, entry

    def stat_objects(
        self, actor: Actor, addr: AssetAddr, ref: str, paths: Sequence[Any]
    ) -> tuple[CommitInfo, list[ObjectEntry]]:
        """Entries of many objects of one commit (one resolution, one permission check)."""
        if not isinstance(paths, list | tuple) or len(paths) > MAX_LIST_LIMIT:
            raise InvalidArgument(f"paths must be a list of at most {MAX_LIST_LIMIT}")
        clean = [check_object_path(p) for p in paths]
        commit = self.resolve(actor, addr, ref).commit
        entries: list[ObjectEntry] = []
        for path in clean:
            entry = self.trees.get(commit.tree, path)
            if entry is None:
                raise NotFound(f"no object {path!r} in {addr.at(ref)}",
                               path=f"{addr.at(ref)}/{path}")
            entries.append(entry)
        return commit, entries

    def open_object(self, actor: Actor, addr: AssetAddr, ref: str,
                    path: str) -> ReadableObject:
        """The object at ``path`` of ``ref``, for ``actor`` to read."""
        commit, entry = self.stat_object(actor, addr, ref, path)
        return ReadableObject(commit, entry, self.blobs)

    def open_objects(self, actor: Actor, addr: AssetAddr, ref: str,
                     paths: Sequence[Any]) -> tuple[CommitInfo, list[ReadableObject]]:
        """Many objects of one commit, for ``actor`` to read (one resolution, one check)."""
        commit, entries = self.stat_objects(actor, addr, ref, paths)
        return commit, [ReadableObject(commit, e, self.blobs) for e in entries]

    # == read grants (ahmount.hub.read_grants) ===============================================

    @functools.cached_property
    def _grants(self) -> ReadGrants:
        """The grants signed with this hub's key, made on first use and kept in the
        metadata store (every replica checks every other's grants). Two threads may both
        load it the first time: they load the same key."""
        with self.metadata.write() as tx:
            tx.insert_setting_if_absent(GRANT_KEY, secrets.token_hex(32))
            key = tx.setting(GRANT_KEY)
        assert key is not None
        return ReadGrants(bytes.fromhex(key))

    def read_grant(self, actor: Actor, found: ReadableObject) -> Grant:
        """A grant to read ``found``'s blob without a key, for a caller that was just let
        read it (:meth:`open_object`)."""
        return self._grants.issue(found.entry.sha256, actor.id)

    @property
    def local_blob_reads(self) -> bool:
        """Blob reads are local file reads (a small one costs less than a thread hand-off)."""
        return self.blobs.local_reads

    @property
    def local_reads(self) -> bool:
        """Reading an object touches only local files (SQLite metadata, a blob directory):
        a read of a few of its bytes costs less than a worker-thread hand-off, which under
        concurrent requests costs as much again as the read (the thread and the event loop
        contend for the GIL)."""
        return self.metadata.local and self.blobs.local_reads

    @property
    def grant_key_loaded(self) -> bool:
        """True once the read-grant key is in memory: checking a grant then touches no store
        (before, the first check reads, or makes, the key in a write transaction)."""
        return "_grants" in self.__dict__  # where functools.cached_property keeps it

    def read_grants_listed(self, actor: Actor, hashes: Sequence[str]) -> dict[str, Grant]:
        """Grants for blobs of objects ``actor`` was just shown in a listing (which checked
        that they may read them): a client then reads each object's bytes without an
        authentication, resolution and lookup, the first time too."""
        return {sha: self._grants.issue(sha, actor.id) for sha in hashes}

    def open_granted_blob(self, sha256: str, user: str, expires: str,
                          signature: str) -> GrantedBlob:
        """The blob a read grant names, once its signature and expiry check out: no lookup
        in the metadata store. Raises PermissionDenied (a bad or expired grant) or NotFound
        (a blob collected since)."""
        check_sha256(sha256)
        self._grants.check(sha256, user, expires, signature)
        size = self.blobs.size(sha256)
        if size is None:
            raise NotFound(f"blob {sha256} is not stored")
        return GrantedBlob(sha256, size, self.blobs)

    def check_health(self) -> None:
        """Raises unless the metadata store answers (readiness)."""
        self.metadata.get_nodes([])

    # == staging and commits ==================================================================

    def _branch(
        self, tx: MetaTx, actor: Actor, addr: AssetAddr, branch: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        asset, _ = self._asset(tx, actor, addr, "edit")
        row = tx.ref(asset["id"], check_ref(branch))
        if row is not None and row["type"] == "tag":
            raise PermissionDenied(
                f"{addr.at(branch)} is a tag: tags are read-only; commit to a branch",
                path=addr.at(branch))
        if row is None or row["type"] != "branch":
            raise NotFound(f"{addr.at(branch)} is not a branch", path=addr.at(branch))
        return asset, row

    def _parse_changes(
        self, actor: Actor, deletes: Sequence[Any], adds: Sequence[Any]
    ) -> tuple[list[str], list[ObjectEntry]]:
        if not isinstance(deletes, list | tuple) or not isinstance(adds, list | tuple):
            raise InvalidArgument("deletes and adds must be lists")
        if len(deletes) + len(adds) > MAX_CHANGES_PER_CALL:
            raise InvalidArgument(
                f"{len(deletes) + len(adds)} changes in one call; at most "
                f"{MAX_CHANGES_PER_CALL} are allowed"
            )
        clean_deletes = [check_delete_path(p) for p in deletes]
        clean_adds = [parse_entry(a) for a in adds]
        self._check_blobs(actor, clean_adds)
        return clean_deletes, clean_adds

    def _check_blobs(self, actor: Actor, adds: Sequence[ObjectEntry]) -> None:
        if adds:
            with self.metadata.read() as tx:
                self._check_blobs_in(tx, actor, adds)

    def _check_blobs_in(self, tx: MetaTx, actor: Actor, adds: Sequence[ObjectEntry]) -> None:
        """Every added object must name a blob the actor possesses (uploaded its bytes, or
        can read an object of it); one that is not is answered exactly like one that does
        not exist, so the hub reveals neither existence nor size of others' blobs."""
        sizes = _held_blobs(tx, actor, sorted({a.sha256 for a in adds}))
        for entry in adds:
            if entry.sha256 not in sizes:
                raise InvalidArgument(
                    f"object {entry.path!r} names blob {entry.sha256}, which was never "
                    "uploaded", path=entry.path,
                )
            if sizes[entry.sha256] != entry.size:
                raise InvalidArgument(
                    f"object {entry.path!r} says {entry.size} bytes but blob "
                    f"{entry.sha256} has {sizes[entry.sha256]}", path=entry.path,
                )

    def stage(
        self,
        actor: Actor,
        addr: AssetAddr,
        branch: str,
        session: str,
        deletes: Sequence[Any] = (),
        adds: Sequence[Any] = (),
    ) -> int:
        """Record uncommitted changes of a branch under ``session``; returns how many."""
        _check_token(session, "session")
        clean_deletes, clean_adds = self._parse_changes(actor, deletes, adds)
        now = time.time()
        rows: list[dict[str, Any]] = [
            {"op": "delete", "path": p, "sha256": None, "size": None, "mtime": None,
             "content_type": None, "mode": None}
            for p in clean_deletes
        ] + [
            {"op": "add", "path": e.path, "sha256": e.sha256, "size": e.size, "mtime": e.mtime,
             "content_type": e.content_type, "mode": e.mode}
            for e in clean_adds
        ]
        with self.metadata.write() as tx:
            asset, ref = self._branch(tx, actor, addr, branch)
            for row in rows:
                row.update(asset_id=asset["id"], branch=ref["name"], session=session, created=now)
            tx.insert_changes(rows)
        return len(rows)

    def list_changes(self, actor: Actor, addr: AssetAddr, branch: str) -> list[Change]:
        with self.metadata.read() as tx:
            asset, ref = self._branch(tx, actor, addr, branch)
            return [_change(r) for r in tx.changes(asset["id"], ref["name"])]

    def reset(self, actor: Actor, addr: AssetAddr, branch: str,
              session: str | None = None) -> int:
        """Drop every uncommitted change of the branch, or only those staged under
        ``session`` (a client undoing what it staged for a commit that did not happen);
        returns how many were dropped."""
        if session is not None:
            _check_token(session, "session")
        with self.metadata.write() as tx:
            asset, ref = self._branch(tx, actor, addr, branch)
            return tx.clear_changes(asset["id"], ref["name"], session)

    def commit(
        self,
        actor: Actor,
        addr: AssetAddr,
        branch: str,
        message: str,
        session: str = "",
        deletes: Sequence[Any] = (),
        adds: Sequence[Any] = (),
        force: bool = False,
        metadata: dict[str, Any] | None = None,
        expect: Mapping[str, str | None] | None = None,
        idempotency_key: str = "",
    ) -> CommitInfo | None:
        """Commit the changes staged under ``session`` plus ``deletes``/``adds``: first every
        delete, then every add, atomically.

        ``idempotency_key`` (the request's ``Idempotency-Key``, chosen by the client, unique
        to it) makes the request safe to send again when its answer was lost: a repeat by
        the same user on the same asset, for a day, gets what the first got (the same
        commit, or None) and commits nothing.

        ``expect`` maps object paths to the sha256 each must have in the head the commit is
        made on (None: no object there). If one does not, the commit raises
        :class:`Changed` and changes nothing: a writer that read a file, or saw it missing,
        commits only if no one changed it since (an append, an exclusive create, a commit
        of edits based on what it saw), in the same step as the commit itself.

        Staged changes of other sessions are *unknown changes*: they make the commit fail with
        :class:`UnknownChanges` unless ``force``, which takes them too. Returns the new commit,
        or ``None`` when the tree would not change (the consumed changes are cleared anyway).
        If the branch moves meanwhile (another writer), the changes are applied again on the
        new head: path-level changes, so nothing either writer did is lost.
        """
        check_text(message, f"commit message for {addr.at(branch)}", multiline=True)
        if not message.strip():
            raise InvalidArgument(f"commit message for {addr.at(branch)} is empty")
        metadata = _check_metadata(metadata or {}, addr.at(branch))
        if not isinstance(metadata, dict):
            raise InvalidArgument(f"commit metadata of {addr.at(branch)} must be an object")
        if session:
            _check_token(session, "session")
        if idempotency_key:
            _check_token(idempotency_key, "Idempotency-Key", ascii_only=True)
        extra_deletes, extra_adds = self._parse_changes(actor, deletes, adds)
        expected = _parse_expect(expect or {})
        # Commits to one branch through this process take turns: racing them optimistically
        # only to have all but one retry burns the CPU the winner needs (32 clients on one
        # branch collapsed to a retry storm). Other replicas still race through the ref's
        # compare-and-swap below.
        with self._branch_turns.hold(f"{addr}:{branch}"):
            for _attempt in range(COMMIT_RETRIES):
                with self.metadata.read() as tx:
                    asset, ref = self._branch(tx, actor, addr, branch)
                    if idempotency_key:
                        done = tx.commit_request(asset["id"], actor.name, idempotency_key)
                        if done is not None:
                            return _answered(tx, done, idempotency_key, addr, branch)
                    staged = [_change(r) for r in tx.changes(asset["id"], ref["name"])]
                    head_row = tx.commit(ref["commit_id"])
                assert head_row is not None
                head = _commit(head_row)
                unknown = [c for c in staged if c.session != session or not session]
                if unknown and not force:
                    raise UnknownChanges(
                        f"branch {addr.at(branch)} has {len(unknown)} uncommitted change(s) this "
                        f"commit did not make (first: {unknown[0].op} {unknown[0].path!r}); "
                        "commit with force=True to include them, or reset the branch",
                        path=addr.at(branch),
                    )
                self._check_expected(head.tree, expected, addr.at(branch))
                taken = staged
                all_deletes = [c.path for c in taken if c.op == "delete"] + extra_deletes
                all_adds = [c.entry for c in taken if c.entry is not None] + extra_adds
                tree = self.trees.apply(head.tree, all_deletes, all_adds)
                try:
                    with self.metadata.write() as tx:
                        if tx.delete_changes([c.id for c in taken]) != len(taken):
                            raise _Retry()  # a reset or another commit took some of them
                        if tree == head.tree:
                            if idempotency_key and not tx.insert_commit_request(
                                    asset["id"], actor.name, idempotency_key, branch, None):
                                raise _Retry()  # its repeat was answered meanwhile
                            return None
                        # Staged adds were checked against their stager when staged.
                        self._check_blobs_in(tx, actor, extra_adds)
                        commit = self._new_commit(tx, asset["id"], tree, message, actor,
                                                  [head.id], time.time(), metadata)
                        tx.record_blob_assets(asset["id"], [e.sha256 for e in all_adds])
                        if not tx.move_ref(asset["id"], ref["name"], head.id, commit.id):
                            raise _Retry()  # it moved: roll back and apply on the new head
                        if idempotency_key and not tx.insert_commit_request(
                                asset["id"], actor.name, idempotency_key, branch, commit.id):
                            raise _Retry()  # its repeat was answered meanwhile
                        tx.update_asset(asset["id"],
                                        {"modified": time.time(), "editor": actor.name})
                        self._event(tx, asset["folder_id"], "branch.moved", addr,
                                    ref=ref["name"], old=head.id, new=commit.id)
                except _Retry:
                    continue
                log.info("commit %s on %s by %s", commit.id[:8], addr.at(branch), actor.name)
                return commit
        raise Conflict(
            f"branch {addr.at(branch)} kept moving; gave up after {COMMIT_RETRIES} attempts",
            path=addr.at(branch),
        )

    def _check_expected(self, tree: str, expected: dict[str, str | None], where: str) -> None:
        for path, sha in expected.items():
            entry = self.trees.get(tree, path)
            found = None if entry is None else entry.sha256
            if found != sha:
                now = "is gone" if found is None else (
                    "was made" if sha is None else "holds other bytes")
                raise Changed(
                    f"{where}: {path!r} {now} since this commit's writer looked (another "
                    "writer changed it); nothing was committed", path=path)

    def merge(self, actor: Actor, addr: AssetAddr, branch: str) -> CommitInfo | None:
        """Make main's tree equal to ``branch``'s in one commit whose parents are both heads."""
        if addr.folder.kind != "model":
            raise InvalidArgument(f"only models can be merged; {addr} is a dataset", path=str(addr))
        if branch == "main":
            raise InvalidArgument(f"cannot merge {addr.at('main')} into itself",
                                  path=addr.at(branch))
        for _attempt in range(COMMIT_RETRIES):
            with self.metadata.read() as tx:
                asset, source = self._branch(tx, actor, addr, branch)
                _, main = self._branch(tx, actor, addr, "main")
                source_row = tx.commit(source["commit_id"])
                main_row = tx.commit(main["commit_id"])
            assert source_row is not None and main_row is not None
            if source_row["tree"] == main_row["tree"]:
                return None
            try:
                with self.metadata.write() as tx:
                    commit = self._new_commit(
                        tx, asset["id"], source_row["tree"],
                        f"Merge branch {branch!r} into main", actor,
                        [main_row["id"], source_row["id"]], time.time(),
                    )
                    if not tx.move_ref(asset["id"], "main", main_row["id"], commit.id):
                        raise _Retry()
                    self._event(tx, asset["folder_id"], "branch.moved", addr, ref="main",
                                old=main_row["id"], new=commit.id)
            except _Retry:
                continue
            log.info("merged %s into main as %s", addr.at(branch), commit.id[:8])
            return commit
        raise Conflict(f"main of {addr} kept moving; merge gave up", path=addr.at("main"))

    def _new_commit(
        self,
        tx: MetaTx,
        asset_id: str,
        tree: str,
        message: str,
        actor: Actor,
        parents: list[str],
        created: float,
        metadata: dict[str, Any] | None = None,
    ) -> CommitInfo:
        body = {
            "asset": asset_id, "tree": tree, "parents": parents, "message": message,
            "committer": actor.name, "created": created, "nonce": secrets.token_hex(8),
        }
        commit_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        row = {
            "id": commit_id, "asset_id": asset_id, "tree": tree, "message": message,
            "committer": actor.name, "created": created, "parents": parents,
            "metadata": metadata or {},
        }
        tx.insert_commit(row)
        return _commit(row)

    # == blobs ================================================================================

    def missing_blobs(self, actor: Actor, hashes: Sequence[Any]) -> list[str]:
        if not isinstance(hashes, list | tuple) or len(hashes) > MAX_CHANGES_PER_CALL:
            raise InvalidArgument(f"hashes must be a list of at most {MAX_CHANGES_PER_CALL}")
        wanted = sorted({check_sha256(h) for h in hashes})
        with self.metadata.write() as tx:
            # Missing *for this caller*: a blob they cannot prove to hold reads as missing,
            # and sending its bytes is the proof.
            known = set(_held_blobs(tx, actor, wanted))
            # A blob reported present gets a fresh grace period, so gc cannot remove it
            # between this answer and the commit that uses it.
            tx.touch_blobs(sorted(known))
        return [h for h in wanted if h not in known]

    def start_upload(self, actor: Actor, sha256: str, size: int) -> tuple[str | None, int]:
        """Begin (or skip) an upload. Returns ``(upload_id, received)``; ``upload_id`` is
        ``None`` when the hub already has the blob."""
        check_sha256(sha256)
        check_size(size, f"blob {sha256}")
        with self.metadata.write() as tx:
            if _held_blobs(tx, actor, [sha256]):
                tx.touch_blobs([sha256])
                return None, size
        now = time.time()
        with self.metadata.read() as tx:
            mine = tx.uploads_of(actor.id)
        stale = [u for u in mine if u["touched"] < now - UPLOAD_TTL]
        self._drop_uploads(stale)
        if len(mine) - len(stale) >= MAX_OPEN_UPLOADS:
            raise Conflict(
                f"user {actor.name!r} has {len(mine) - len(stale)} unfinished uploads, the most "
                f"allowed; finish or abort some (an upload untouched for "
                f"{UPLOAD_TTL / 3600:.0f} h expires)", path=sha256)
        upload_id = str(uuid.uuid4())
        self.blobs.start_upload(upload_id)
        with self.metadata.write() as tx:
            tx.insert_upload({
                "id": upload_id, "user_id": actor.id, "sha256": sha256, "size": size,
                "received": 0, "created": now, "touched": now,
            })
        return upload_id, 0

    def _drop_uploads(self, rows: Sequence[dict[str, Any]]) -> None:
        """Forget unfinished uploads: their rows, then their partial bytes."""
        for row in rows:
            with self.metadata.write() as tx:
                tx.delete_upload(row["id"])
            self.blobs.abort_upload(row["id"])
        if rows:
            log.info("expired %d unfinished upload(s)", len(rows))

    def _upload(self, tx: MetaTx, actor: Actor, upload_id: str) -> dict[str, Any]:
        row = tx.upload(upload_id)
        if row is None or row["user_id"] != actor.id:
            raise NotFound(f"upload {upload_id} does not exist", path=upload_id)
        return row

    def upload_status(self, actor: Actor, upload_id: str) -> tuple[str, int, int]:
        """``(sha256, size, received)`` of an upload in progress."""
        with self.metadata.read() as tx:
            row = self._upload(tx, actor, upload_id)
        return row["sha256"], row["size"], self.blobs.upload_received(upload_id)

    def append_upload(self, actor: Actor, upload_id: str, offset: int, data: bytes) -> int:
        with self.metadata.read() as tx:
            row = self._upload(tx, actor, upload_id)
        if offset + len(data) > row["size"]:
            raise InvalidArgument(
                f"upload {upload_id} of blob {row['sha256']} would exceed its {row['size']} bytes"
            )
        try:
            received = self.blobs.append(upload_id, offset, data)
        except StorageFull:
            # A full store takes no more of it soon: the space its earlier segments hold
            # is given back now (the client starts again), not when the upload expires;
            # the bytes first, since the database may be on the same full disk.
            self.blobs.abort_upload(upload_id)
            with self.metadata.write() as tx:
                tx.delete_upload(upload_id)
            raise
        with self.metadata.write() as tx:  # alive: not expired while bytes keep coming
            tx.set_upload_received(upload_id, received)
        return received

    def finish_upload(self, actor: Actor, upload_id: str) -> str:
        """Verify and publish the blob; the upload is gone afterwards either way."""
        with self.metadata.read() as tx:
            row = self._upload(tx, actor, upload_id)
        try:
            self.blobs.finish_upload(upload_id, row["sha256"], row["size"])
        finally:
            with self.metadata.write() as tx:
                tx.delete_upload(upload_id)
        with self.metadata.write() as tx:
            tx.insert_blob(row["sha256"], row["size"])
            tx.grant_blobs(actor.id, [row["sha256"]])
        return str(row["sha256"])

    def abort_upload(self, actor: Actor, upload_id: str) -> None:
        with self.metadata.write() as tx:
            self._upload(tx, actor, upload_id)
            tx.delete_upload(upload_id)
        self.blobs.abort_upload(upload_id)

    # Single-request uploads (one blob per PUT, or many small ones in a batch) keep no upload
    # row: the bytes go to a private temp object and become a blob only once verified.

    def begin_blob(self, actor: Actor, sha256: str, size: int) -> str:
        """Start writing a blob in one go for ``actor``; returns a token for write_blob /
        end_blob / drop_blob_write, which only that actor may use."""
        check_sha256(sha256)
        check_size(size, f"blob {sha256}")
        token = str(uuid.uuid4())
        self.blobs.start_upload(token, local=True)
        with self._blob_writes_guard:
            self._blob_writes[token] = actor.id
        return token

    def _writing(self, actor: Actor, token: str) -> None:
        with self._blob_writes_guard:
            owner = self._blob_writes.get(token)
        if owner != actor.id:
            raise NotFound(f"no blob write {token!r} of yours is in progress")

    def write_blob(self, actor: Actor, token: str, offset: int, data: bytes) -> int:
        self._writing(actor, token)
        return self.blobs.append(token, offset, data)

    def end_blob(self, actor: Actor, token: str, sha256: str, size: int,
                 durable: bool = True) -> None:
        """Verify and publish in the blob store (not yet known to the metadata store:
        :meth:`register_blobs` records it). With ``durable=False``, :meth:`register_blobs`
        makes it durable (batches)."""
        self._writing(actor, token)
        try:
            self.blobs.finish_upload(token, sha256, size, durable)
        finally:
            with self._blob_writes_guard:
                self._blob_writes.pop(token, None)

    def store_bytes(self, actor: Actor, sha256: str, data: bytes,
                    durable: bool = True) -> None:
        """A whole small blob already in memory, verified and published in one call (one
        worker-thread hand-off per blob instead of three)."""
        token = self.begin_blob(actor, sha256, len(data))
        try:
            self.write_blob(actor, token, 0, data)
            self.end_blob(actor, token, sha256, len(data), durable)
        except BaseException:
            self.drop_blob_write(actor, token)
            raise

    def store_small_blobs(self, actor: Actor, blobs: list[tuple[str, bytes]]
                          ) -> tuple[list[tuple[str, int]], ChecksumMismatch | None]:
        """Verify and publish whole small blobs already in memory (a batch upload's), many
        in one worker-thread hand-off. Those before the first whose bytes do not hash to its
        name are published (not yet durable nor recorded: :meth:`register_blobs` does
        both); returns them, and the mismatch that stopped the rest, if one did."""
        good: list[tuple[str, bytes]] = []
        failure: ChecksumMismatch | None = None
        for sha256, data in blobs:
            check_sha256(sha256)
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                failure = hash_mismatch(actual, sha256)
                break
            good.append((sha256, data))
        self.blobs.store_small(good)
        return [(sha256, len(data)) for sha256, data in good], failure

    def drop_blob_write(self, actor: Actor, token: str) -> None:
        """Discard a blob write (no error if it is gone)."""
        with self._blob_writes_guard:
            if self._blob_writes.get(token) not in (None, actor.id):
                return
            self._blob_writes.pop(token, None)
        self.blobs.abort_upload(token)

    def register_blobs(self, actor: Actor, blobs: Sequence[tuple[str, int]],
                       durable: bool = False) -> None:
        """Make verified blobs durable (unless they are already), then record them in the
        metadata store in one transaction: a blob is never known before its bytes are safe.
        ``actor`` sent their bytes, so they hold a grant for each from now on."""
        if not durable:
            self.blobs.sync()
        with self.metadata.write() as tx:
            tx.insert_blobs(blobs)
            tx.grant_blobs(actor.id, [sha for sha, _ in blobs])

    def gc(self, grace_seconds: float = 3600.0) -> dict[str, int]:
        """Delete blobs and tree nodes that no commit, staging area or upload needs.

        Blobs younger than ``grace_seconds`` are kept: a client may have uploaded them and not
        yet staged or committed them. Returns counts of what was removed.
        """
        cutoff = time.time() - grace_seconds
        with self.metadata.read() as tx:
            expired = tx.uploads_untouched_since(time.time() - UPLOAD_TTL)
        self._drop_uploads(expired)
        with self.metadata.read() as tx:
            trees = tx.all_trees()
            live_hashes = tx.staged_hashes()
            live_hashes.update(u["sha256"] for u in tx.uploads_all())
            candidates = tx.blobs_older_than(cutoff)
            all_nodes = tx.node_ids()
        live_nodes: set[str] = set()
        for tree in trees:
            live_nodes.update(self.trees.node_ids(tree))
            live_hashes.update(self.trees.blob_hashes(tree))
        dead_blobs = [b["sha256"] for b in candidates if b["sha256"] not in live_hashes]
        for sha256 in dead_blobs:
            with self.metadata.write() as tx:
                # Re-checked inside the transaction: a commit may have just started using it.
                if sha256 in tx.staged_hashes():
                    continue
                tx.delete_blob(sha256)
                tx.delete_blob_grants(sha256)
            self.blobs.delete(sha256)
        dead_nodes = sorted(all_nodes - live_nodes - {self.trees.empty_tree()})
        with self.metadata.write() as tx:
            tx.delete_nodes(dead_nodes)
            events = tx.prune_events(time.time() - EVENT_RETENTION)
            requests = tx.prune_commit_requests(time.time() - REQUESTS_KEPT)
        return {"blobs": len(dead_blobs), "nodes": len(dead_nodes), "trees": len(trees),
                "uploads": len(expired), "events": events, "commit_requests": requests}

    # == the change feed ======================================================================

    def newest_event(self) -> int:
        """The newest event's cursor (what a feed's waiters poll; never sent to a caller)."""
        with self.metadata.read() as tx:
            return tx.event_bounds()[1]

    def events(self, actor: Actor, after: int | None, limit: int = 1000) -> EventPage:
        """What changed after cursor ``after`` that ``actor`` could see when it changed;
        ``after=None`` starts at the newest event (nothing older is sent)."""
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)
                                  or after < 0):
            raise InvalidArgument(f"event cursor {after!r} must be a non-negative integer")
        limit = _limit(limit)
        with self.metadata.read() as tx:
            oldest, newest = tx.event_bounds()
            if after is None:
                return EventPage([], newest, False)
            if after > newest:  # a cursor this database never gave out
                return EventPage([], newest, True)
            reset = newest > 0 and after < oldest - 1
            rows = tx.events_after(after, limit)
        seen = [Event(r["id"], r["created"], r["payload"]) for r in rows
                if r["public"] or actor.id in r["viewers"]]
        return EventPage(seen, rows[-1]["id"] if rows else after, reset)


#: How long the change feed keeps events: a client away for longer starts over (``reset``).
EVENT_RETENTION = 7 * 86400.0


class _Retry(Exception):
    """Raised inside a write transaction to roll it back; caught by the retry loop."""


def _limit(limit: Any) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit {limit!r} must be an integer from 1 to {MAX_LIST_LIMIT}")
    return limit


def _answered(tx: MetaTx, done: dict[str, Any], key: str, addr: AssetAddr,
              branch: str) -> CommitInfo | None:
    """The answer a commit request with the idempotency ``key`` got the first time
    (``done``, its record), for its repeat."""
    if done["branch"] != branch:
        raise InvalidArgument(
            f"Idempotency-Key {key!r} was used for a commit to {addr.at(done['branch'])}, "
            f"not {addr.at(branch)}; a new commit needs a new key", path=addr.at(branch))
    if done["commit_id"] is None:
        return None
    row = tx.commit(done["commit_id"])
    assert row is not None  # kept with its asset, like its request
    return _commit(row)


def _check_token(value: Any, what: str, ascii_only: bool = False) -> str:
    """A client's name for something of its own (a staging session, a request's
    ``Idempotency-Key``): a printable string of 1 to 64 characters (ASCII, for a header)."""
    kind = "printable ASCII string" if ascii_only else "printable string"
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable() or \
            (ascii_only and not value.isascii()):
        raise InvalidArgument(f"{what} must be a {kind} of 1 to 64 characters")
    return value
