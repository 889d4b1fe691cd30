"""The Asset Hub path grammar of the documented API.

    /<owner>/t9k-assethub/<kind>[/<folder>[/<asset>[:<ref>]]]     absolute
    <kind>[/<folder>[/<asset>[:<ref>]]]                             relative: under the caller
    shared/<kind>                                                   folders shared with the caller
    /public/t9k-assethub/<kind>                                     public folders

Parsing never talks to the hub: a relative path keeps ``owner=None`` until
:meth:`ApiPath.with_owner` fills in the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ahmount.errors import InvalidArgument
from ahmount.hub.models import HUB_SEGMENT, PUBLIC_OWNER, AssetAddr, FolderAddr
from ahmount.names import Kind, check_kind, check_name, check_ref, check_user_name

SHARED = "shared"


@dataclass(frozen=True)
class ApiPath:
    """A parsed path. ``owner`` is ``None`` for a relative path (the caller), or ``shared`` /
    ``public`` for those listings. ``ref`` is ``None`` when no ``:ref`` was given."""

    original: str
    owner: str | None
    kind: Kind
    folder: str | None = None
    asset: str | None = None
    ref: str | None = None

    @property
    def level(self) -> str:
        """``kind``, ``folder``, ``asset`` or ``ref``."""
        if self.ref is not None:
            return "ref"
        if self.asset is not None:
            return "asset"
        if self.folder is not None:
            return "folder"
        return "kind"

    def with_owner(self, me: str) -> ApiPath:
        return self if self.owner is not None else replace(self, owner=me)

    def folder_addr(self) -> FolderAddr:
        if self.owner is None or self.folder is None or self.owner in (SHARED, PUBLIC_OWNER):
            raise InvalidArgument(f"path {self.original!r} does not name a folder",
                                  path=self.original)
        return FolderAddr(self.owner, self.kind, self.folder)

    def asset_addr(self) -> AssetAddr:
        if self.asset is None:
            raise InvalidArgument(f"path {self.original!r} does not name a model or dataset",
                                  path=self.original)
        return AssetAddr(self.folder_addr(), self.asset)

    def __str__(self) -> str:
        owner = self.owner or "?"
        out = f"/{owner}/{HUB_SEGMENT}/{self.kind}"
        if self.folder:
            out += f"/{self.folder}"
        if self.asset:
            out += f"/{self.asset}"
        if self.ref is not None:
            out += f":{self.ref}"
        return out


def parse(path: object) -> ApiPath:
    """Parse an API path; raises :class:`InvalidArgument` naming what is wrong."""
    if not isinstance(path, str):
        raise InvalidArgument(f"path must be a string, got {type(path).__name__}")
    original = path
    if not path:
        raise InvalidArgument("path is empty")
    if "\x00" in path:
        raise InvalidArgument(f"path {path!r} contains a NUL byte", path=path)
    stripped = path.rstrip("/") if path != "/" else path
    if path.startswith("/"):
        parts = stripped[1:].split("/")
        if len(parts) < 3 or parts[1] != HUB_SEGMENT:
            raise InvalidArgument(
                f"absolute path {path!r} must look like /<owner>/{HUB_SEGMENT}/<kind>/...",
                path=path,
            )
        owner = parts[0]
        if owner != PUBLIC_OWNER:
            try:
                check_user_name(owner)
            except InvalidArgument as exc:
                raise InvalidArgument(f"path {path!r}: {exc}", path=path) from None
        rest = parts[2:]
    elif stripped.split("/")[0] == SHARED:
        parts = stripped.split("/")
        if len(parts) != 2:
            raise InvalidArgument(f"path {path!r}: use 'shared/model' or 'shared/dataset'",
                                  path=path)
        owner, rest = SHARED, parts[1:]
    else:
        owner, rest = None, stripped.split("/")
    for segment in rest:
        if segment in (".", ".."):
            raise InvalidArgument(f"path {path!r} contains a {segment!r} segment", path=path)
    if len(rest) > 3:
        raise InvalidArgument(
            f"path {path!r} has too many segments: <kind>/<folder>/<asset>[:<ref>] at most",
            path=path,
        )
    if any(not segment for segment in rest):
        raise InvalidArgument(f"path {path!r} has an empty segment", path=path)
    try:
        kind = check_kind(rest[0])
        folder = asset = ref = None
        if len(rest) >= 2:
            if ":" in rest[1]:
                raise InvalidArgument("a reference (':') belongs after an asset, not a folder")
            folder = check_name(rest[1], "folder")
        if len(rest) == 3:
            asset_part, colon, ref_part = rest[2].partition(":")
            asset = check_name(asset_part, "asset")
            if colon:
                ref = check_ref(ref_part)
    except InvalidArgument as exc:
        raise InvalidArgument(f"path {path!r}: {exc}", path=path) from None
    if owner in (SHARED, PUBLIC_OWNER) and folder is not None:
        raise InvalidArgument(
            f"path {path!r}: '{owner}' only lists folders; name a folder by its owner",
            path=path,
        )
    return ApiPath(original, owner, kind, folder, asset, ref)


def split_ref_source(source: str, asset: ApiPath) -> str:
    """The reference named by ``source``: a bare name/commit id, or a path of the same asset
    (``model/llm/gpt2:v1``)."""
    if not isinstance(source, str) or not source:
        raise InvalidArgument("source must be a non-empty string")
    if ":" not in source and "/" not in source:
        return check_ref(source)
    parsed = parse(source)
    if parsed.ref is None:
        raise InvalidArgument(f"source {source!r} names no reference (add ':<ref>')")
    same = (parsed.kind, parsed.folder, parsed.asset) == (asset.kind, asset.folder, asset.asset)
    if not same or (parsed.owner is not None and parsed.owner != asset.owner):
        raise InvalidArgument(f"source {source!r} is not a reference of {asset}")
    return parsed.ref
