"""The mount's tree and its 1:1 mapping to API paths.

    MOUNT/<kind>/<folder>/<asset>/<ref>/<path>
        = /<me>/t9k-assethub/<kind>/<folder>/<asset>:<ref>, object <path>
    MOUNT/shared/<kind>/<owner>/<folder>/<asset>/<ref>/<path>
        = /<owner>/t9k-assethub/<kind>/<folder>/<asset>:<ref>  (a folder shared with me)
    MOUNT/public/<kind>/<owner>/<folder>/<asset>/<ref>/<path>
        = /<owner>/t9k-assethub/<kind>/<folder>/<asset>:<ref>  (a public folder)

``<kind>`` is ``model`` or ``dataset``; ``<ref>`` is a branch or tag (listed) or a commit id
prefix of at least 4 hex characters (found by lookup, not listed). Each mount path names
exactly one API path; an API path maps back to the first of these places that shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property, lru_cache

from ahmount.errors import NotFound
from ahmount.hub.models import HUB_SEGMENT, AssetAddr, FolderAddr
from ahmount.names import KINDS, Kind, check_kind

SCOPES = ("shared", "public")

Key = tuple[str, ...]


class Place(Enum):
    ROOT = "root"
    KIND = "kind"
    SCOPE = "scope"
    SCOPE_KIND = "scope-kind"
    OWNER = "owner"
    FOLDER = "folder"
    ASSET = "asset"
    REF = "ref"
    OBJECT = "object"


@dataclass(frozen=True)
class Location:
    """What a mount path (as a key of segments) stands for."""

    place: Place
    key: Key
    scope: str = "own"
    kind: Kind | None = None
    owner: str | None = None
    folder: str | None = None
    asset: str | None = None
    ref: str | None = None
    subpath: str = ""

    # Cached: every resolution of a path asks for these several times (frozen dataclasses
    # without slots keep a cached_property in the instance's __dict__, outside eq and hash).
    @cached_property
    def folder_addr(self) -> FolderAddr:
        assert self.owner is not None and self.kind is not None and self.folder is not None
        return FolderAddr(self.owner, self.kind, self.folder)

    @cached_property
    def asset_addr(self) -> AssetAddr:
        assert self.asset is not None
        return AssetAddr(self.folder_addr, self.asset)

    @property
    def ref_key(self) -> str:
        """``owner/kind/folder/asset:ref``: the change queue's key of this path's ref (a
        branch's, when the ref is a branch)."""
        return f"{self.owner}/{self.kind}/{self.folder}/{self.asset}:{self.ref}"

    @property
    def keys_prefix(self) -> str:
        """What the :attr:`ref_key` of every ref in this folder (``owner/kind/folder/``) or
        asset (``owner/kind/folder/asset:``) starts with."""
        if self.asset is None:
            return folder_keys_prefix(self.folder_addr)
        return asset_keys_prefix(self.asset_addr)

    def renamed(self, name: str) -> Location:
        """This folder or asset under another name."""
        if self.place is Place.FOLDER:
            return replace(self, key=(*self.key[:-1], name), folder=name)
        assert self.place is Place.ASSET
        return replace(self, key=(*self.key[:-1], name), asset=name)

    def api_path(self) -> str:
        """The API path this mount path names (``''`` for places above a kind)."""
        if self.kind is None:
            return ""
        owner = self.owner or "?"
        if self.place in (Place.KIND, Place.SCOPE_KIND):
            return f"{self.scope}/{self.kind}" if self.place is Place.SCOPE_KIND and \
                self.scope == "shared" else f"/{owner}/{HUB_SEGMENT}/{self.kind}"
        out = f"/{owner}/{HUB_SEGMENT}/{self.kind}"
        for part in (self.folder, self.asset):
            if part is not None:
                out += f"/{part}"
        if self.ref is not None:
            out += f":{self.ref}"
        if self.subpath:
            out += f"/{self.subpath}"
        return out


def branch_of_key(key: str) -> tuple[AssetAddr, str]:
    """The asset and branch a change-queue key (:attr:`Location.ref_key`) names."""
    place, _, ref = key.rpartition(":")
    owner, kind, folder, asset = place.split("/")
    return AssetAddr(FolderAddr(owner, check_kind(kind), folder), asset), ref


def folder_keys_prefix(folder: FolderAddr) -> str:
    """What the key of every branch in ``folder`` starts with (:attr:`Location.keys_prefix`)."""
    return f"{folder.owner}/{folder.kind}/{folder.name}/"


def asset_keys_prefix(asset: AssetAddr) -> str:
    """What the key of every branch of ``asset`` starts with."""
    return f"{folder_keys_prefix(asset.folder)}{asset.name}:"


@lru_cache(maxsize=1 << 16)
def locate(key: Key, me: str) -> Location:
    """Classify a mount path. Raises NotFound for shapes the tree does not have. Memoized
    (a path's shape never changes; a Location is immutable): an ``open`` of a file the kernel
    looked up already costs no parsing."""
    if not key:
        return Location(Place.ROOT, key)
    head, rest = key[0], key[1:]
    if head in SCOPES:
        if not rest:
            return Location(Place.SCOPE, key, scope=head)
        kind = _kind(rest[0], key)
        if len(rest) == 1:
            return Location(Place.SCOPE_KIND, key, scope=head, kind=kind)
        owner = rest[1]
        if len(rest) == 2:
            return Location(Place.OWNER, key, scope=head, kind=kind, owner=owner)
        return _below_kind(key, rest[2:], head, kind, owner)
    kind = _kind(head, key)
    if not rest:
        return Location(Place.KIND, key, kind=kind, owner=me)
    return _below_kind(key, rest, "own", kind, me)


def _kind(value: str, key: Key) -> Kind:
    for kind in KINDS:
        if value == kind:
            return kind
    raise NotFound(f"{'/'.join(key)} is not in the tree")


def _below_kind(key: Key, rest: Key, scope: str, kind: Kind, owner: str) -> Location:
    common = {"scope": scope, "kind": kind, "owner": owner}
    if len(rest) == 1:
        return Location(Place.FOLDER, key, folder=rest[0], **common)  # type: ignore[arg-type]
    if len(rest) == 2:
        return Location(Place.ASSET, key, folder=rest[0], asset=rest[1],
                        **common)  # type: ignore[arg-type]
    if len(rest) == 3:
        return Location(Place.REF, key, folder=rest[0], asset=rest[1], ref=rest[2],
                        **common)  # type: ignore[arg-type]
    return Location(Place.OBJECT, key, folder=rest[0], asset=rest[1], ref=rest[2],
                    subpath="/".join(rest[3:]), **common)  # type: ignore[arg-type]


def places_of(folder: FolderAddr | None, asset: str | None, ref: str | None,
              me: str) -> list[Key]:
    """The mount paths where a folder (and, below it, an asset and one of its refs) shows:
    under the caller's own kind directory when it is theirs, and under ``shared/`` and
    ``public/``. ``[()]`` (the whole tree) when ``folder`` is None."""
    if folder is None:
        return [()]
    below = (folder.name, *(p for p in (asset, ref) if p is not None))
    places: list[Key] = [(scope, folder.kind, folder.owner, *below) for scope in SCOPES]
    if folder.owner == me:
        places.insert(0, (folder.kind, *below))
    return places
