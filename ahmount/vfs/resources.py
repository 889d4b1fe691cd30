"""Directories above the refs are hub resources: ``mkdir`` in a kind directory makes a folder,
in a folder an asset, in an asset a branch; ``rmdir`` deletes them, ``mv`` renames folders
and assets in place, and the ``user.ah.*`` extended attributes show (and, for labels and
descriptions, set) their metadata. Each change goes through :class:`HubView`, which expires
the listings it may have changed.
"""

from __future__ import annotations

from typing import Any

from ahmount.errors import InvalidArgument
from ahmount.hub.models import AssetAddr, FolderAddr
from ahmount.vfs.errors import (
    CrossBranch,
    InvalidName,
    NoAttribute,
    NotPermitted,
    NotSupported,
    ReadOnly,
)
from ahmount.vfs.hub_view import HubView, hub_state
from ahmount.vfs.layout import Place
from ahmount.vfs.tree import Node

#: Places whose ``mkdir`` makes a hub resource rather than a queued directory.
RESOURCE_PARENTS = (Place.KIND, Place.FOLDER, Place.ASSET)
#: Places whose ``rmdir`` deletes a hub resource.
RESOURCES = (Place.FOLDER, Place.ASSET, Place.REF)
XATTR_PREFIX = "user.ah."
SETTABLE_XATTRS = ("user.ah.labels", "user.ah.description")


async def create(view: HubView, parent: Node, name: str) -> None:
    loc = parent.loc
    if not parent.writable:
        raise ReadOnly(f"mkdir {loc.api_path()}/{name} refused: read-only")
    try:
        if loc.place is Place.KIND:
            assert loc.kind is not None
            await view.create_folder(FolderAddr(view.me, loc.kind, name))
        elif loc.place is Place.FOLDER:
            await view.create_asset(AssetAddr(loc.folder_addr, name))
        else:
            await view.create_branch(loc.asset_addr, name)
    except InvalidArgument as exc:
        raise InvalidName(f"mkdir {loc.api_path()}/{name} refused: {exc}") from None


async def delete(view: HubView, parent: Node, node: Node) -> None:
    loc = node.loc
    if not parent.writable:
        raise ReadOnly(f"rmdir {loc.api_path()} refused: read-only")
    if loc.place is Place.REF and loc.ref == "main":
        raise NotPermitted(f"rmdir {loc.api_path()} refused: main is never deleted")
    if loc.place is Place.FOLDER:
        await view.delete_folder(loc.folder_addr)
    elif loc.place is Place.ASSET:
        await view.delete_asset(loc.asset_addr)
    else:
        assert loc.ref is not None
        await view.delete_ref(loc.asset_addr, loc.ref)


async def rename(view: HubView, node: Node, old_parent: Node, new_parent: Node,
                 new_name: str) -> None:
    """``mv`` of a folder or an asset renames it (in the same parent only)."""
    if old_parent.loc.key != new_parent.loc.key:
        raise CrossBranch(f"moving {node.loc.api_path()} to another parent is not a rename")
    if not old_parent.writable:
        raise ReadOnly(f"rename of {node.loc.api_path()} refused: read-only")
    if node.loc.place is Place.FOLDER:
        await view.update_folder(node.loc.folder_addr, name=new_name)
    else:
        await view.update_asset(node.loc.asset_addr, name=new_name)


async def xattrs(view: HubView, node: Node) -> dict[str, bytes]:
    """The ``user.ah.*`` attributes of any node."""
    out = {"user.ah.path": node.loc.api_path().encode(),
           "user.ah.hub": hub_state(view).encode()}
    loc = node.loc
    scope: Any = loc.scope
    if loc.place is Place.FOLDER:
        assert loc.kind is not None and loc.owner is not None
        folder = await view.folder(scope, loc.owner, loc.kind, str(loc.folder))
        out["user.ah.labels"] = ",".join(folder.labels).encode()
        out["user.ah.description"] = folder.description.encode()
    elif loc.place is Place.ASSET:
        asset = await view.asset(loc.asset_addr)
        out["user.ah.labels"] = ",".join(asset.labels).encode()
        out["user.ah.description"] = asset.description.encode()
    if node.resolved is not None:
        out["user.ah.commit"] = node.resolved.commit_id.encode()
        out["user.ah.ref_type"] = node.resolved.type.encode()
    if node.entry is not None:
        out["user.ah.sha256"] = node.entry.sha256.encode()
        out["user.ah.content_type"] = node.entry.content_type.encode()
    return out


async def get_xattr(view: HubView, node: Node, name: str) -> bytes:
    value = (await xattrs(view, node)).get(name)
    if value is None:
        raise NoAttribute(f"no attribute {name!r} on {node.loc.api_path()}")
    return value


async def set_xattr(view: HubView, node: Node, name: str, value: bytes) -> None:
    loc = node.loc
    if name not in SETTABLE_XATTRS or loc.place not in (Place.FOLDER, Place.ASSET):
        raise NotSupported(f"xattr {name!r} cannot be set on {loc.api_path()}")
    if not node.writable:
        raise ReadOnly(f"xattr of {loc.api_path()} refused: read-only")
    text = value.decode(errors="replace")
    labels = [x.strip() for x in text.split(",") if x.strip()] \
        if name == "user.ah.labels" else None
    description = text if name == "user.ah.description" else None
    if loc.place is Place.FOLDER:
        await view.update_folder(loc.folder_addr, labels=labels, description=description)
    else:
        await view.update_asset(loc.asset_addr, labels=labels, description=description)
