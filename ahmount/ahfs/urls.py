"""The ``ah://`` URL grammar, and its mapping onto the API's paths both ways.

    ah://[<owner>/]<kind>[/<folder>[/<asset>[@<ref>][/<path>]]]

* ``<kind>`` is ``model`` or ``dataset``. A first segment that is a kind names the caller's
  own folders (``ah://model/llm/gpt2``); any other first segment is an owner
  (``ah://alice/model/llm/gpt2``). So a user called ``model`` or ``dataset`` is reached only
  through the API's absolute paths, never through a URL.
* ``@<ref>`` is a branch, a tag or a commit id prefix (names never contain ``@``); without it
  the URL means the ``main`` branch.
* ``<path>`` is an object path inside the asset at that ref.

The API path of ``ah://alice/model/llm/gpt2@v1/config.json`` is
``/alice/t9k-assethub/model/llm/gpt2:v1`` plus the object path ``config.json``
(:meth:`AhUrl.api_path`, :func:`from_api_path`). Parsing never talks to the hub: the caller's
own URLs keep ``owner=None`` until :meth:`AhUrl.owner_or` fills in who the caller is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ahmount.errors import InvalidArgument
from ahmount.hub.models import HUB_SEGMENT, AssetAddr, FolderAddr
from ahmount.names import (
    RESERVED_USER_NAMES,
    Kind,
    check_kind,
    check_name,
    check_object_path,
    check_ref,
    check_user_name,
)
from ahmount.paths import parse as parse_api_path

PROTOCOL = "ah"
DEFAULT_BRANCH = "main"
KINDS: tuple[Kind, ...] = ("model", "dataset")


@dataclass(frozen=True)
class AhUrl:
    """A parsed ``ah://`` path (without its protocol). ``ref`` is None when the URL gave none
    (the ``main`` branch); ``path`` is ``''`` at the asset's root."""

    owner: str | None
    kind: Kind | None = None
    folder: str | None = None
    asset: str | None = None
    ref: str | None = None
    path: str = ""

    @property
    def level(self) -> str:
        """``root``, ``owner``, ``kind``, ``folder``, ``asset`` or ``object``."""
        if self.path:
            return "object"
        if self.asset is not None:
            return "asset"
        if self.folder is not None:
            return "folder"
        if self.kind is not None:
            return "kind"
        return "owner" if self.owner is not None else "root"

    @property
    def ref_or_default(self) -> str:
        return self.ref if self.ref is not None else DEFAULT_BRANCH

    def owner_or(self, me: str) -> str:
        return self.owner if self.owner is not None else me

    def folder_addr(self, me: str) -> FolderAddr:
        if self.kind is None or self.folder is None:
            raise InvalidArgument(f"ah://{self} does not name a folder")
        return FolderAddr(self.owner_or(me), self.kind, self.folder)

    def asset_addr(self, me: str) -> AssetAddr:
        if self.asset is None:
            raise InvalidArgument(f"ah://{self} does not name a model or dataset")
        return AssetAddr(self.folder_addr(me), self.asset)

    def asset_root(self) -> str:
        """This URL cut at its asset (with its ``@ref`` as given): where object paths start."""
        return str(replace(self, path=""))

    def child(self, name: str) -> AhUrl:
        """The URL one level down, by the grammar (an owner, kind, folder, asset or path)."""
        if self.asset is not None:
            return replace(self, path=f"{self.path}/{name}" if self.path else name)
        if self.folder is not None:
            return replace(self, asset=name)
        if self.kind is not None:
            return replace(self, folder=name)
        if self.owner is not None:
            return replace(self, kind=check_kind(name))
        return parse(name)

    def api_path(self, me: str | None = None) -> tuple[str, str]:
        """The API path of the asset part (``/<owner>/t9k-assethub/<kind>/...[:ref]``) and
        the object path inside it. Own URLs need ``me``, or come back relative
        (``model/llm/gpt2:v1``), which the API reads as the caller's own."""
        owner = self.owner if self.owner is not None else me
        parts = [p for p in (self.kind, self.folder, self.asset) if p is not None]
        rel = "/".join(parts)
        if self.ref is not None:
            rel += f":{self.ref}"
        if owner is None:
            return rel, self.path
        return f"/{owner}/{HUB_SEGMENT}/{rel}".rstrip("/"), self.path

    def __str__(self) -> str:
        parts = [p for p in (self.owner, self.kind, self.folder) if p is not None]
        if self.asset is not None:
            parts.append(self.asset if self.ref is None else f"{self.asset}@{self.ref}")
            if self.path:
                parts.append(self.path)
        return "/".join(parts)


def strip_protocol(url: str) -> str:
    """``ah://x/y/`` → ``x/y`` (also ``ah:/x``, ``ah:x`` and bare paths)."""
    if url.startswith(f"{PROTOCOL}://"):
        url = url[len(PROTOCOL) + 3:]
    elif url.startswith(f"{PROTOCOL}:"):
        url = url[len(PROTOCOL) + 1:]
    return url.strip("/")


def parse(url: object) -> AhUrl:
    """Parse an ``ah://`` URL or a path without the protocol; raises
    :class:`InvalidArgument` naming what is wrong."""
    if not isinstance(url, str):
        raise InvalidArgument(f"an ah:// path must be a string, got {type(url).__name__}")
    text = strip_protocol(url)
    if not text:
        return AhUrl(None)
    segments = text.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidArgument(f"ah://{text}: empty, '.' and '..' segments are not allowed")
    try:
        owner: str | None = None
        if segments[0] not in KINDS:
            owner = check_user_name(segments.pop(0))
            if not segments:
                return AhUrl(owner)
        kind = check_kind(segments[0])
        folder = check_name(segments[1], "folder") if len(segments) > 1 else None
        if folder is None or len(segments) < 3:
            return AhUrl(owner, kind, folder)
        asset_part, at, ref_part = segments[2].partition("@")
        asset = check_name(asset_part, "asset")
        ref = check_ref(ref_part) if at else None
        path = "/".join(segments[3:])
        if path:
            path = check_object_path(path)
    except InvalidArgument as exc:
        raise InvalidArgument(f"ah://{text}: {exc}") from None
    return AhUrl(owner, kind, folder, asset, ref, path)


def from_api_path(api_path: str, object_path: str = "", me: str | None = None) -> AhUrl:
    """The URL of an API path (``/alice/t9k-assethub/model/llm/gpt2:v1``, or a relative
    ``model/llm/gpt2``) and an object path in it. The caller's own (``owner == me``) come
    back without an owner, as they would be written."""
    parsed = parse_api_path(api_path)
    if parsed.owner in RESERVED_USER_NAMES:
        raise InvalidArgument(f"{api_path!r} is a listing, not a place with an ah:// URL")
    owner = None if parsed.owner == me else parsed.owner
    if object_path:
        if parsed.asset is None:
            raise InvalidArgument(f"{api_path!r} names no asset to hold {object_path!r}")
        object_path = check_object_path(object_path)
    return AhUrl(owner, parsed.kind, parsed.folder, parsed.asset, parsed.ref, object_path)
