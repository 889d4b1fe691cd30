"""Plain records the hub's service layer returns. They know nothing of HTTP or SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ahmount.names import Kind

Permission = Literal["own", "edit", "view"]
RefType = Literal["branch", "tag", "commit"]

EMPTY_COMMIT_MESSAGE = "Repository created"
PUBLIC_OWNER = "public"
HUB_SEGMENT = "t9k-assethub"
#: Changes one call may stage or commit (and items of any list one request carries): it
#: bounds a request's body. A client with more stages them in several calls under one
#: session and commits that session, still one atomic commit.
MAX_CHANGES_PER_CALL = 100_000


def folder_path(owner: str, kind: str, folder: str) -> str:
    return f"/{owner}/{HUB_SEGMENT}/{kind}/{folder}"


@dataclass(frozen=True)
class FolderAddr:
    owner: str
    kind: Kind
    name: str

    def __str__(self) -> str:
        return folder_path(self.owner, self.kind, self.name)


@dataclass(frozen=True)
class AssetAddr:
    folder: FolderAddr
    name: str

    def __str__(self) -> str:
        return f"{self.folder}/{self.name}"

    def at(self, ref: str) -> str:
        return f"{self}:{ref}"


@dataclass(frozen=True)
class FolderInfo:
    id: str
    owner: str
    kind: Kind
    name: str
    labels: list[str]
    description: str
    permission: Permission
    public: bool
    editor: str
    modified: float
    created: float

    @property
    def path(self) -> str:
        return folder_path(self.owner, self.kind, self.name)


@dataclass(frozen=True)
class AssetInfo:
    id: str
    owner: str
    kind: Kind
    folder: str
    name: str
    labels: list[str]
    description: str
    permission: Permission
    editor: str
    modified: float
    created: float

    @property
    def path(self) -> str:
        return f"{folder_path(self.owner, self.kind, self.folder)}/{self.name}"


@dataclass(frozen=True)
class CommitInfo:
    id: str
    message: str
    committer: str
    created: float
    parents: list[str]
    tree: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RefInfo:
    """A resolved reference: what the caller named and the commit it points at."""

    type: RefType
    name: str
    commit: CommitInfo


#: The permission bits of an object nobody gave a mode.
DEFAULT_MODE = 0o644


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    """One object of a commit: its path and the blob that holds its bytes.

    Slots, not an instance dict: a mount keeps one of these per object of every commit it
    lists, and a dict made each 4.5x larger (347 bytes against 75; a listing of 200,000
    objects held 54 MiB more)."""

    path: str
    sha256: str
    size: int
    mtime: float
    content_type: str = "application/octet-stream"
    #: Permission bits (0o000-0o777), kept as a file system would.
    mode: int = DEFAULT_MODE

    def as_json(self) -> dict[str, Any]:
        """The fields as a JSON object. Spelled out: a listing renders ten thousand of
        these, and dataclasses.asdict (which deep-copies each field) took most of a
        10,000-object listing's time."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size,
                "mtime": self.mtime, "content_type": self.content_type, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class Change:
    """One staged (uncommitted) change of a branch.

    ``op`` is ``add`` (with ``entry``) or ``delete`` (``path`` is an object, or a directory when
    it ends with ``/``). ``session`` names the client call that staged it: a commit only takes
    changes staged under its own session unless forced.
    """

    id: int
    op: Literal["add", "delete"]
    path: str
    session: str
    entry: ObjectEntry | None
    created: float


@dataclass(frozen=True)
class ListingPage:
    """A page of a commit's objects. ``dirs`` holds common prefixes when a delimiter was given;
    ``next_after`` is the cursor for the following page, ``None`` on the last one."""

    commit: str
    objects: list[ObjectEntry]
    dirs: list[str]
    next_after: str | None


@dataclass(frozen=True)
class Event:
    """A change the caller may see: ``id`` is its cursor (increasing, never reused);
    ``payload`` says what changed (``type``, ``owner``, ``kind``, ``folder``, maybe
    ``asset``, ``ref``, ``old``/``new`` commit ids, ``name`` for a rename)."""

    id: int
    created: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class EventPage:
    """Events after a cursor. ``cursor`` is where to go on from (the newest event looked at,
    seen or not); ``reset`` is True when events after the given cursor are gone (pruned, or
    the cursor is from another database): forget everything cached."""

    events: list[Event]
    cursor: int
    reset: bool
