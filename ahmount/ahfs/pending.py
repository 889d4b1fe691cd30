"""What an ``ah://`` write or transaction will commit: per branch, deletes then adds.

Adds are either local files (uploaded at commit time: a spooled ``open(..., 'wb')``, a
``pipe`` or a ``put``) or objects the hub already holds (``cp``/``mv`` inside an asset: only
the entry is sent, no bytes). Each branch's changes become one atomic commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ahmount.hub.models import AssetAddr, ObjectEntry


class Gate:
    """Shuts a transaction's changes when its commit begins: threads share a file system
    and so its transaction, and a change another thread makes after that is refused, not
    left out of the commit while its writer is told it was made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shut = False

    @contextmanager
    def change(self) -> Iterator[None]:
        with self._lock:
            if self._shut:
                raise RuntimeError("this change joined an ah:// transaction whose commit had "
                                   "begun (another thread's?): nothing of it was made; "
                                   "write again, or finish writing before the transaction "
                                   "ends")
            yield

    def shut(self) -> None:
        with self._lock:
            self._shut = True


@dataclass(frozen=True)
class AppendBase:
    """What an append adds to: ``data`` (None: the head's file, unchanged since the append
    began, not read again); if it is the branch head's file (``from_head``), its sha256
    (None: there was no such file), which the commit then expects."""

    data: bytes | None
    from_head: bool = False
    head_sha: str | None = None


@dataclass
class BranchChanges:
    addr: AssetAddr
    branch: str
    #: The URL of the asset root as the user wrote it (for messages and read-your-writes).
    root: str
    gate: Gate = field(default_factory=Gate, repr=False, compare=False)
    files: dict[str, Path] = field(default_factory=dict)
    entries: dict[str, ObjectEntry] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)
    #: Spooled files this change owns (removed after the commit, or when it is dropped).
    spooled: set[Path] = field(default_factory=set)
    #: What the commit expects of the head (the hub's ``expect``): the sha256 each path had
    #: when an append read it or an exclusive create found it missing (None). The hub
    #: refuses the commit if another writer changed one since, in the same step as the
    #: commit; the writer then catches up (:meth:`AhFileSystem._catch_up`) and tries again.
    expect: dict[str, str | None] = field(default_factory=dict)
    #: Appends whose bytes follow the head's file: how many leading bytes of the spooled
    #: file are the head's (replaced by the head's new bytes when it changed).
    appended: dict[str, int] = field(default_factory=dict)
    #: Exclusive creates: if the file was made meanwhile, the commit fails (O_EXCL).
    exclusive: set[str] = field(default_factory=set)

    def add_file(self, path: str, local: Path, spooled: bool, exclusive: bool = False) -> None:
        """A write of ``path`` that replaces whatever is there; ``exclusive``: one that
        must not find a file there (O_EXCL), missing from the head, unless these changes
        deleted it (then the head may hold it)."""
        with self.gate.change():
            if exclusive and self.says(path) is None:
                self.expect[path] = None
                self.exclusive.add(path)
            self._forget(path)
            self._forget_head(path)
            self.files[path] = local
            if spooled:
                self.spooled.add(local)

    def add_append(self, path: str, spool: Path, head: tuple[str | None, int] | None) -> None:
        """An append to ``path`` in ``spool``: after the head's file (``head``: its sha256,
        None if there was none, and its length), or after what these changes wrote there
        before (None: what that write expected still holds)."""
        with self.gate.change():
            self._forget(path)
            if head is not None:
                self.expect[path], self.appended[path] = head
            self.files[path] = spool
            self.spooled.add(spool)

    def add_entry(self, entry: ObjectEntry) -> None:
        with self.gate.change():
            self._forget(entry.path)
            self._forget_head(entry.path)
            self.entries[entry.path] = entry

    def delete(self, path: str, exists_on_hub: bool) -> None:
        """Remove ``path``: a change made earlier in this batch is undone, and the object
        is deleted from the branch if its head holds it."""
        with self.gate.change():
            self._forget(path)
            self._forget_head(path)
            if exists_on_hub:
                self.deletes.add(path)

    def says(self, path: str) -> bool | None:
        """Whether these changes leave ``path`` there: True (written), False (deleted), or
        None (they do not touch it: the branch's head says)."""
        if path in self.files or path in self.entries:
            return True
        return False if path in self.deletes else None

    def _forget_head(self, path: str) -> None:
        """A write or delete that does not depend on the head's ``path`` needs nothing of
        it, except an exclusive create's: the file stays one this batch made."""
        self.appended.pop(path, None)
        if path not in self.exclusive:
            self.expect.pop(path, None)

    def _forget(self, path: str) -> None:
        local = self.files.pop(path, None)
        if local is not None and local in self.spooled:
            self.spooled.discard(local)
            local.unlink(missing_ok=True)
        self.entries.pop(path, None)

    def describe(self) -> str:
        """A default commit message: what changed, briefly."""
        written = sorted({*self.files, *self.entries})
        parts = []
        if written:
            parts.append(f"write {_names(written)}")
        if self.deletes:
            parts.append(f"delete {_names(sorted(self.deletes))}")
        text = " and ".join(parts) or "no change"
        return f"{text[0].upper()}{text[1:]} through ah://"

    def discard(self) -> None:
        for local in self.spooled:
            local.unlink(missing_ok=True)
        self.spooled.clear()
        self.files.clear()
        self.entries.clear()
        self.deletes.clear()
        self.expect.clear()
        self.appended.clear()
        self.exclusive.clear()


def rebase_append(spool: Path, kept: int, now: bytes) -> None:
    """Make ``spool`` (an append: ``kept`` bytes of the file it read, then its own) ``now``
    (the file as it is) followed by its own bytes."""
    with spool.open("r+b") as handle:
        handle.seek(kept)
        added = handle.read()
        handle.seek(0)
        handle.write(now + added)
        handle.truncate()


def _names(paths: list[str]) -> str:
    if len(paths) <= 3:
        return ", ".join(paths)
    return f"{', '.join(paths[:2])} and {len(paths) - 2} more"


@dataclass
class Pending:
    """The changes of one transaction (or one implicit batch), by branch."""

    message: str | None = None
    branches: dict[tuple[AssetAddr, str], BranchChanges] = field(default_factory=dict)
    gate: Gate = field(default_factory=Gate, repr=False, compare=False)

    def of(self, addr: AssetAddr, branch: str, root: str) -> BranchChanges:
        with self.gate.change():
            found = self.branches.get((addr, branch))
            if found is None:
                found = self.branches[(addr, branch)] = BranchChanges(addr, branch, root,
                                                                      self.gate)
            return found

    def shut(self) -> None:
        """No change from here on (:class:`Gate`): the commit begins."""
        self.gate.shut()

    def discard(self) -> None:
        for changes in self.branches.values():
            changes.discard()
        self.branches.clear()
