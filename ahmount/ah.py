"""The documented ``t9k.ah`` API: ``from ahmount import ah``.

Eleven functions (commit, create, delete, download, get, list, login, logout, merge, reset,
update) with the original signatures and semantics, and the classes ``Folder``, ``Model``,
``Dataset``, ``Branch``, ``Tag`` and ``Commit``. Every function is synchronous and safe from
scripts, threads and Jupyter; each runs the async :class:`HubClient` under trio.

Errors: ``RuntimeError`` (not found, already exists, not logged in, permission),
``ValueError`` (bad arguments), ``httpx.HTTPError`` subclasses (transport failures); the
concrete classes live in :mod:`ahmount.errors` and every message names the path.
"""

from __future__ import annotations

import builtins
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from ahmount.client.embedded import connect
from ahmount.client.hub_client import HubClient
from ahmount.config import ClientConfig, load_config, make_config
from ahmount.errors import (
    AlreadyExists,
    HubUnavailable,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from ahmount.hub.models import AssetInfo, CommitInfo, FolderInfo, ObjectEntry, RefInfo
from ahmount.paths import ApiPath, parse, split_ref_source
from ahmount.sync_runner import run_sync
from ahmount.transfer.download import download_objects
from ahmount.transfer.plan import plan_adds, plan_deletes
from ahmount.transfer.upload import commit_files

__all__ = [
    "Branch", "Commit", "Dataset", "Folder", "Model", "Tag", "commit", "create", "delete",
    "download", "get", "list", "login", "logout", "merge", "reset", "update",
]

log = logging.getLogger("ahmount.ah")


def __dir__() -> builtins.list[str]:
    """The documented API, not the module's imports."""
    return sorted(__all__)


def _console_logging() -> None:
    """The original SDK prints its progress lines ("Commit 29d6f29e created") by default.
    Done at the first call, not at import: an application that configures logging itself
    (before or after importing) still receives them through the root logger."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False

T = TypeVar("T")
_lock = threading.Lock()
_session: ClientConfig | None = None  # set by login() for this process
_logged_out = False
_me: dict[tuple[str | None, str | None], str] = {}


# == plumbing ===================================================================================

def _config() -> ClientConfig:
    with _lock:
        if _logged_out:
            raise Unauthenticated("not logged in: call ah.login() first")
        return _session if _session is not None else load_config()


def _run(fn: Callable[[HubClient], Awaitable[T]]) -> T:
    _console_logging()
    config = _config()
    identity = (config.ah_host, config.api_key)

    async def main() -> T:
        async with connect(config) as hub:
            hub.known_user = _me.get(identity)  # saves a whoami per call
            try:
                return await fn(hub)
            finally:
                if hub.known_user:
                    _me[identity] = hub.known_user

    return run_sync(main)


async def _owned(hub: HubClient, path: ApiPath) -> ApiPath:
    if path.owner is not None:
        return path
    return path.with_owner(await hub.whoami())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _folder_dict(info: FolderInfo) -> dict[str, Any]:
    return {
        "name": info.name, "path": info.path, "type": "Folder", "labels": info.labels,
        "description": info.description, "permission": info.permission, "id": info.id,
        "editor": info.editor, "modifiedTimestamp": _iso(info.modified), "extra": "{}",
    }


def _asset_dict(info: AssetInfo) -> dict[str, Any]:
    return {
        "name": info.name, "path": info.path,
        "type": "Model" if info.kind == "model" else "Dataset", "labels": info.labels,
        "description": info.description, "permission": info.permission, "id": info.id,
        "editor": info.editor, "modifiedTimestamp": _iso(info.modified), "extra": "{}",
    }


def _commit_dict(info: CommitInfo) -> dict[str, Any]:
    return {
        "id": info.id, "message": info.message, "committer": info.committer,
        "creation_date": int(info.created), "parents": info.parents,
        "metadata": info.metadata,
    }


def _object_dict(entry: ObjectEntry) -> dict[str, Any]:
    return {
        "path": entry.path, "size_bytes": entry.size, "checksum": entry.sha256,
        "mtime": int(entry.mtime), "content_type": entry.content_type, "path_type": "object",
    }


def _need(path: ApiPath, level: str, what: str) -> None:
    if path.level != level:
        raise InvalidArgument(f"path {path.original!r} does not name {what}",
                              path=path.original)


# == classes ====================================================================================

class _Resource:
    kind = "Resource"

    def __init__(self, path: ApiPath) -> None:
        self._api_path = path
        self.path = str(path)

    @property
    def name(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Resource) and type(other) is type(self) and (
            other.path == self.path
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.path))


class _Deletable(_Resource):
    """What ``delete`` removes by path: folders, assets, branches and tags (not commits)."""

    def delete(self) -> None:
        delete(self.path)


class _Described(_Deletable):
    """A folder or an asset: labels, description, permission; updated and deleted by path."""

    def __init__(self, path: ApiPath, info: FolderInfo | AssetInfo) -> None:
        super().__init__(path)
        self.id = info.id
        self.labels = info.labels
        self.description = info.description
        self.permission = info.permission
        self.modified = info.modified

    def update(self, name: str | None = None, labels: Sequence[str] | None = None,
               description: str | None = None) -> None:
        update(self.path, name=name, labels=labels, description=description)


class Folder(_Described):
    """A folder of models or datasets (the unit of permission)."""

    kind = "Folder"

    def __init__(self, path: ApiPath, info: FolderInfo) -> None:
        super().__init__(path, info)
        self.owner = info.owner
        self.asset_kind = info.kind

    @property
    def name(self) -> str:
        assert self._api_path.folder is not None
        return self._api_path.folder

    def list_asset(self) -> builtins.list[dict[str, Any]]:
        return list(self.path)

    def create_asset(self, name: str, labels: Sequence[str] | None = None,
                     description: str = "", exist_ok: bool = False) -> Model | Dataset:
        asset = create(f"{self.path}/{name}", labels=labels, description=description,
                       exist_ok=exist_ok)
        assert isinstance(asset, Model | Dataset)
        return asset

    def get_asset(self, name: str) -> Model | Dataset:
        asset = get(f"{self.path}/{name}")
        assert isinstance(asset, Model | Dataset)
        return asset


class _Asset(_Described):

    @property
    def name(self) -> str:
        assert self._api_path.asset is not None
        return self._api_path.asset

    def list_branch(self) -> builtins.list[dict[str, Any]]:
        return list(self.path, resource="branch")

    def get_branch(self, name: str) -> Branch:
        branch = get(f"{self.path}:{name}")
        if not isinstance(branch, Branch):
            raise NotFound(f"{self.path}:{name} is not a branch", path=f"{self.path}:{name}")
        return branch

    def list_tag(self) -> builtins.list[dict[str, Any]]:
        return list(self.path, resource="tag")

    def create_tag(self, name: str, source: str = "main") -> Tag:
        tag = create(f"{self.path}:{name}", create_tag=True, source=source)
        assert isinstance(tag, Tag)
        return tag

    def get_tag(self, name: str) -> Tag:
        tag = get(f"{self.path}:{name}")
        if not isinstance(tag, Tag):
            raise NotFound(f"{self.path}:{name} is not a tag", path=f"{self.path}:{name}")
        return tag

    def list_commit(self) -> builtins.list[dict[str, Any]]:
        return list(self.path, resource="commit")

    def get_commit(self, id: str) -> Commit:
        found = get(f"{self.path}:{id}")
        if not isinstance(found, Commit):
            raise InvalidArgument(f"{id!r} is a branch or tag of {self.path}, not a commit id")
        return found

    def list_object(self, ref: str = "main") -> builtins.list[dict[str, Any]]:
        return list(f"{self.path}:{ref}")

    def download(self, objects: Sequence[str] | None = None, save_dir: str = ".",
                 ref: str = "main") -> None:
        download(f"{self.path}:{ref}", objects=objects, save_dir=save_dir)


class Model(_Asset):
    """A model: branches, tags, commits."""

    kind = "Model"

    def create_branch(self, name: str) -> Branch:
        branch = create(f"{self.path}:{name}")
        assert isinstance(branch, Branch)
        return branch

    def delete_branch(self, name: str) -> None:
        self.get_branch(name).delete()


class Dataset(_Asset):
    """A dataset: the main branch, tags, commits."""

    kind = "Dataset"


class _Ref(_Resource):
    def __init__(self, path: ApiPath, info: RefInfo) -> None:
        super().__init__(path)
        self.ref_name = info.name
        self.commit_id = info.commit.id
        self._commit = info.commit

    @property
    def name(self) -> str:
        return self.ref_name

    @property
    def asset_path(self) -> str:
        return self.path.rsplit(":", 1)[0]

    def list_object(self) -> builtins.list[dict[str, Any]]:
        return list(self.path)

    def list_commit(self) -> builtins.list[dict[str, Any]]:
        return list(self.path, resource="commit")

    def get_commit(self, index: int = 0, id: str | None = None) -> Commit:
        """The ``index``-th commit of this reference's history (0 = newest), or by ``id``."""
        if id is not None:
            found = get(f"{self.asset_path}:{id}")
            if not isinstance(found, Commit):
                raise InvalidArgument(f"{id!r} is not a commit id of {self.asset_path}")
            return found
        commits = self.list_commit()
        if not 0 <= index < len(commits):
            raise InvalidArgument(f"{self.path} has {len(commits)} commits; no index {index}")
        found = get(f"{self.asset_path}:{commits[index]['id']}")
        assert isinstance(found, Commit)
        return found

    def download(self, objects: Sequence[str] | None = None, save_dir: str = ".") -> None:
        download(self.path, objects=objects, save_dir=save_dir)

    def create_tag(self, name: str) -> Tag:
        tag = create(f"{self.asset_path}:{name}", create_tag=True, source=self.ref_name)
        assert isinstance(tag, Tag)
        return tag


class Branch(_Ref, _Deletable):
    """A branch: the only writable reference."""

    kind = "Branch"

    def create_commit(self, msg: str, delete: Sequence[str] | None = None,
                      add: Sequence[str] | Mapping[str, str] | None = None,
                      force: bool = False) -> Commit | None:
        return commit(self.path, msg, delete=delete, add=add, force=force)

    def merge(self) -> None:
        merge(self.path)

    def reset(self) -> None:
        reset(self.path)


class Tag(_Ref, _Deletable):
    """An immutable name for a commit."""

    kind = "Tag"


class Commit(_Ref):
    """An immutable snapshot. ``name`` is the first 8 hex characters of ``id``."""

    kind = "Commit"

    def __init__(self, path: ApiPath, info: RefInfo) -> None:
        super().__init__(path, info)
        self.id = info.commit.id
        self.message = info.commit.message
        self.committer = info.commit.committer
        self.creation_date = int(info.commit.created)
        self.parents = info.commit.parents
        self.metadata = info.commit.metadata

    @property
    def name(self) -> str:
        return self.id[:8]


def _asset_obj(path: ApiPath, info: AssetInfo) -> Model | Dataset:
    return Model(path, info) if info.kind == "model" else Dataset(path, info)


def _ref_obj(path: ApiPath, info: RefInfo) -> Branch | Tag | Commit:
    if info.type == "branch":
        return Branch(path, info)
    if info.type == "tag":
        return Tag(path, info)
    full = ApiPath(path.original, path.owner, path.kind, path.folder, path.asset, info.commit.id)
    return Commit(full, info)


# == the eleven functions =======================================================================

def login(ah_host: str | None = None, ais_host: str | None = None, api_key: str | None = None,
          timeout: int | None = None) -> None:
    """Log in to an Asset Hub server for this process (``ah login`` stores it for all).

    With no ``ah_host``, the configured hub (or the embedded one) is used again. The server is
    contacted once to check the key: an unreachable server raises an ``httpx.HTTPError``, a bad
    key ``RuntimeError``.
    """
    global _session, _logged_out
    config = make_config(ah_host, ais_host, api_key, timeout)
    if config.ah_host is None:
        saved = load_config()
        config = ClientConfig(saved.ah_host, ais_host or saved.ais_host,
                              api_key or saved.api_key, config.timeout or saved.timeout)

    async def main() -> str:
        # One quick retry only: a mistyped host should fail now, not after the backoff.
        async with connect(config, retries=1) as hub:
            return await hub.whoami()

    me = run_sync(main)
    with _lock:
        _session = config
        _logged_out = False
    log.info("Logged in to %s as %s", config.ah_host or "the embedded hub", me)


def logout() -> None:
    """Forget this process's hub: every call fails with "not logged in" until ``login``."""
    global _session, _logged_out
    with _lock:
        _session = None
        _logged_out = True
    _me.clear()


def create(path: str, labels: Sequence[str] | None = None, description: str = "",
           exist_ok: bool = False, create_tag: bool = False,
           source: str = "main") -> Folder | Model | Dataset | Branch | Tag:
    """Create a folder, model, dataset, branch (``asset:name``) or tag (``create_tag=True``
    from ``source``: a branch, tag or commit, bare or as a path of the same asset)."""
    parsed = parse(path)
    labels_list = builtins.list(labels or [])

    async def run(hub: HubClient) -> Folder | Model | Dataset | Branch | Tag:
        p = await _owned(hub, parsed)
        if p.level == "folder":
            addr = p.folder_addr()
            try:
                info = await hub.create_folder(addr, labels_list, description)
            except AlreadyExists:
                if not exist_ok:
                    raise
                return Folder(p, await hub.get_folder(addr))
            log.info("Folder %s created", info.path)
            return Folder(p, info)
        if p.level == "asset":
            asset_addr = p.asset_addr()
            try:
                asset = await hub.create_asset(asset_addr, labels_list, description)
            except AlreadyExists:
                if not exist_ok:
                    raise
                return _asset_obj(p, await hub.get_asset(asset_addr))
            log.info("%s %s created", "Model" if asset.kind == "model" else "Dataset",
                     asset.path)
            return _asset_obj(p, asset)
        if p.level == "ref":
            assert p.ref is not None
            asset_addr = p.asset_addr()
            if create_tag:
                tag = Tag(p, await hub.create_tag(asset_addr, p.ref, split_ref_source(source, p)))
                log.info("Tag %s created", p)
                return tag
            branch = Branch(p, await hub.create_branch(asset_addr, p.ref))
            log.info("Branch %s created", p)
            return branch
        raise InvalidArgument(f"path {path!r} names a kind; create a folder under it",
                              path=path)

    return _run(run)


def get(path: str) -> Folder | Model | Dataset | Branch | Tag | Commit:
    """Get a folder, asset, branch, tag or commit (by an id prefix of at least 4 chars)."""
    parsed = parse(path)

    async def run(hub: HubClient) -> Folder | Model | Dataset | Branch | Tag | Commit:
        p = await _owned(hub, parsed)
        if p.level == "folder":
            return Folder(p, await hub.get_folder(p.folder_addr()))
        if p.level == "asset":
            return _asset_obj(p, await hub.get_asset(p.asset_addr()))
        if p.level == "ref":
            assert p.ref is not None
            return _ref_obj(p, await hub.resolve(p.asset_addr(), p.ref))
        raise InvalidArgument(f"path {path!r} names a kind, not a resource; use ah.list",
                              path=path)

    return _run(run)


def list(path: str, resource: str = "default") -> builtins.list[dict[str, Any]]:
    """List folders (of a kind), assets (of a folder), objects (of a reference, default
    ``:main``), or with ``resource`` 'branch' / 'tag' / 'commit' an asset's references."""
    if resource not in ("default", "branch", "tag", "commit"):
        raise InvalidArgument(
            f"resource {resource!r} must be 'default', 'branch', 'tag' or 'commit'", path=path)
    parsed = parse(path)

    async def run(hub: HubClient) -> builtins.list[dict[str, Any]]:
        p = await _owned(hub, parsed)
        if resource != "default" and p.level not in ("asset", "ref"):
            raise InvalidArgument(f"listing {resource}s needs the path of an asset, "
                                  f"not {path!r}", path=path)
        if p.level == "kind":
            assert p.owner is not None
            return [_folder_dict(f) for f in await hub.list_folders(p.owner, p.kind)]
        if p.level == "folder":
            return [_asset_dict(a) for a in await hub.list_assets(p.folder_addr())]
        addr = p.asset_addr()
        if resource in ("branch", "tag"):
            if p.level == "ref":
                raise InvalidArgument(f"listing {resource}es needs an asset path without "
                                      f"':<ref>', not {path!r}", path=path)
            return [{"id": name, "commit_id": commit_id}
                    for name, commit_id in await hub.list_refs(addr, resource)]
        ref = p.ref or "main"
        if resource == "commit":
            return [_commit_dict(c) for c in await hub.log(addr, ref, limit=10_000)]
        _, entries = await hub.list_objects(addr, ref)
        return [_object_dict(e) for e in entries]

    return _run(run)


def update(path: str, name: str | None = None, labels: Sequence[str] | None = None,
           description: str | None = None) -> None:
    """Rename, relabel (labels are replaced as a whole) or re-describe a folder or asset.
    With none of them given, do nothing."""
    parsed = parse(path)
    if parsed.level not in ("folder", "asset"):
        raise InvalidArgument(f"only folders and assets can be updated, not {path!r}",
                              path=path)
    if name is None and labels is None and description is None:
        return
    labels_list = None if labels is None else builtins.list(labels)

    async def run(hub: HubClient) -> None:
        p = await _owned(hub, parsed)
        if p.level == "folder":
            await hub.update_folder(p.folder_addr(), name, labels_list, description)
        else:
            await hub.update_asset(p.asset_addr(), name, labels_list, description)
        log.info("%s %s updated", "Folder" if p.level == "folder" else "Asset", p)

    _run(run)


def delete(path: str, force: bool = False) -> None:
    """Delete a folder, asset, branch (never ``main``) or tag, and everything in it. With
    ``force``, a missing resource is no error."""
    parsed = parse(path)

    async def run(hub: HubClient) -> None:
        p = await _owned(hub, parsed)
        try:
            if p.level == "folder":
                await hub.delete_folder(p.folder_addr())
            elif p.level == "asset":
                await hub.delete_asset(p.asset_addr())
            elif p.level == "ref":
                assert p.ref is not None
                await hub.delete_ref(p.asset_addr(), p.ref)
            else:
                raise InvalidArgument(f"path {path!r} names a kind; it cannot be deleted",
                                      path=path)
        except NotFound:
            if force:
                return
            raise
        log.info("%s deleted", p)

    _run(run)


def commit(path: str, msg: str, delete: Sequence[str] | None = None,
           add: Sequence[str] | Mapping[str, str] | None = None,
           force: bool = False) -> Commit | None:
    """Commit changes to a branch (default ``:main``): first ``delete``, then ``add``.

    Uploads only blobs the hub lacks. Unknown uncommitted changes on the branch refuse the
    commit unless ``force``. Returns the new :class:`Commit`, or ``None`` if nothing changed.
    """
    parsed = parse(path)
    if parsed.level not in ("asset", "ref"):
        raise InvalidArgument(f"path {path!r} does not name an asset or branch", path=path)
    if not isinstance(msg, str) or not msg.strip():
        raise InvalidArgument(f"commit to {path!r} needs a non-empty message", path=path)
    deletes = plan_deletes(delete)
    files = plan_adds(add)

    async def run(hub: HubClient) -> Commit | None:
        p = await _owned(hub, parsed)
        addr = p.asset_addr()
        branch = p.ref or "main"
        target = await hub.resolve(addr, branch)
        if target.type != "branch":  # before a byte is uploaded
            raise PermissionDenied(
                f"{p} is a {target.type}: {target.type}s are read-only; commit to a branch",
                path=str(p))
        info = await commit_files(hub, addr, branch, msg, deletes, files, force)
        if info is None:
            log.info("No changes to commit on %s", p)
            return None
        log.info("Commit %s created", info.id[:8])
        full = ApiPath(p.original, p.owner, p.kind, p.folder, p.asset, info.id)
        return Commit(full, RefInfo("commit", info.id, info))

    return _run(run)


def download(path: str, objects: Sequence[str] | None = None, save_dir: str = ".") -> None:
    """Download objects of a reference (default ``:main``) into ``save_dir``, keeping their
    paths: all of them, or those named (``a/b`` one object, ``a/b/`` everything under it)."""
    parsed = parse(path)
    if parsed.level not in ("asset", "ref"):
        raise InvalidArgument(f"path {path!r} does not name an asset or reference", path=path)
    if not isinstance(save_dir, str | Path):
        raise InvalidArgument("save_dir must be a path")

    async def run(hub: HubClient) -> None:
        p = await _owned(hub, parsed)
        written = await download_objects(hub, p.asset_addr(), p.ref or "main",
                                                  objects, Path(save_dir))
        log.info("Downloaded %d object(s) of %s to %s", len(written), p, save_dir)

    try:
        _run(run)
    except HubUnavailable as exc:
        _download_cached(parsed, objects, Path(save_dir), exc)


def _download_cached(parsed: ApiPath, objects: Sequence[str] | None, save_dir: Path,
                     unavailable: HubUnavailable) -> None:
    """``download`` with the hub away: the objects from the local cache that the mount and
    ``ah://`` share (what this machine read before, like huggingface_hub's offline mode).
    An object never read here makes it fail, naming the object; nothing is half-written."""
    from ahmount.ahfs import AhFileSystem  # only offline: the cache lives in the vfs layer
    from ahmount.ahfs.urls import AhUrl
    from ahmount.client.files import write_atomically

    config = _config()
    fs = AhFileSystem(hub=config.ah_host, api_key=config.api_key, skip_instance_cache=True)
    assert parsed.kind is not None and parsed.folder is not None
    root = AhUrl(parsed.owner, parsed.kind, parsed.folder, parsed.asset, parsed.ref or "main")
    wanted = builtins.list(objects) if objects is not None else None
    found = fs.find(str(root), detail=True)
    chosen = []
    for name, info in found.items():
        rel = name[len(str(root)) + 1:]
        if wanted is None or any(rel == w or (w.endswith("/") and rel.startswith(w))
                                 for w in wanted):
            chosen.append((rel, info))
    if not chosen:
        raise unavailable
    payload = []
    for rel, info in chosen:
        try:
            payload.append((rel, info, fs.cat_file(f"{root}/{rel}")))
        except OSError as exc:
            raise HubUnavailable(f"{unavailable}; and {rel!r} of {parsed} was never read on "
                                 "this machine, so it is not in the local cache",
                                 path=parsed.original) from exc
    for rel, info, data in payload:
        write_atomically(save_dir / rel, data, info["mtime"])
    log.info("Hub unreachable: %d object(s) of %s copied to %s from the local cache",
             len(payload), parsed.original, save_dir)


def merge(path: str) -> None:
    """Make ``main`` of a model equal to the branch: one commit with both heads as parents."""
    parsed = parse(path)
    _need(parsed, "ref", "a branch (model/<folder>/<asset>:<branch>)")

    async def run(hub: HubClient) -> None:
        p = await _owned(hub, parsed)
        assert p.ref is not None
        info = await hub.merge(p.asset_addr(), p.ref)
        if info is None:
            log.info("Branch %s already equals main", p)
        else:
            log.info("Branch %s merged into main as commit %s", p, info.id[:8])

    _run(run)


def reset(path: str) -> None:
    """Drop every uncommitted change of a branch (default ``:main``)."""
    parsed = parse(path)
    if parsed.level not in ("asset", "ref"):
        raise InvalidArgument(f"path {path!r} does not name a branch", path=path)

    async def run(hub: HubClient) -> None:
        p = await _owned(hub, parsed)
        dropped = await hub.reset(p.asset_addr(), p.ref or "main")
        log.info("Branch %s reset (%d uncommitted change(s) dropped)", p, dropped)

    _run(run)
