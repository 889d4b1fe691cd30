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

    def add_file(self, path: str, local: Path, spooled: bool) -> None:
        with self.gate.change():
            self._forget(path)
            self.files[path] = local
            if spooled:
                self.spooled.add(local)

    def add_entry(self, entry: ObjectEntry) -> None:
        with self.gate.change():
            self._forget(entry.path)
            self.entries[entry.path] = entry

    def delete(self, path: str, exists_on_hub: bool) -> None:
        """Remove ``path``: a change made earlier in this batch is undone, and the object
        is deleted from the branch if its head holds it."""
        with self.gate.change():
            self._forget(path)
            if exists_on_hub:
                self.deletes.add(path)

    def says(self, path: str) -> bool | None:
        """Whether these changes leave ``path`` there: True (written), False (deleted), or
        None (they do not touch it: the branch's head says)."""
        if path in self.files or path in self.entries:
            return True
        return False if path in self.deletes else None

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
