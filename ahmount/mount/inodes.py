"""Path ↔ inode for the FUSE adapter, with the kernel's lookup counts.

An inode number is handed out the first time a path is looked up and stays that path's (and
follows it through renames) while the path exists, so tools that compare inode numbers
(git's index, ``find -samefile``) see one file. When a path loses its name (unlink, rmdir, a
rename over it, or it vanished on the hub) its inode lives on only while the kernel still
counts lookups of it; at a count of 0 the entry is dropped, so a long-lived mount does not
grow with every file it ever saw deleted. Runs on the trio thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from ahmount.errors import NotFound
from ahmount.vfs.layout import Key

ROOT_INODE = 1  # FUSE's, fixed by the protocol


class InodeTable:
    def __init__(self, on_drop: Callable[[int], None] | None = None) -> None:
        """``on_drop(ino)`` is called when an inode is gone for good (its per-inode state
        elsewhere may go too)."""
        self._on_drop = on_drop
        self._by_key: dict[Key, int] = {(): ROOT_INODE}
        self._by_ino: dict[int, Key] = {ROOT_INODE: ()}
        self._lookups: dict[int, int] = {}
        #: Inodes whose path is gone and that the kernel still counts.
        self._nameless: set[int] = set()
        #: Of those, the ones replaced by other bytes at the same path (not unlinked): the
        #: path they had, for the kernel's getattr of them until it forgets the name.
        self._former: dict[int, Key] = {}
        self._next = ROOT_INODE + 1
        #: Raised whenever a named path may have changed inode (a rename, a detach): what
        #: was remembered of paths' inodes is valid only under the same version.
        self.version = 0

    def __len__(self) -> int:
        return len(self._by_ino) + len(self._nameless)

    def ino(self, key: Key) -> int:
        found = self._by_key.get(key)
        if found is None:
            found = self._next
            self._next += 1
            self._by_key[key] = found
            self._by_ino[found] = key
        return found

    def key(self, ino: int) -> Key:
        try:
            return self._by_ino[ino]
        except KeyError:
            raise NotFound(f"inode {ino} has no name (unlinked)") from None

    def under(self, prefixes: list[Key]) -> list[tuple[int, int | None, str]]:
        """``(inode, parent inode, name)`` of every named path at or below one of
        ``prefixes``, and of each prefix's parent directory (whose listing holds it): what
        the kernel must forget when something there changed elsewhere."""
        out: list[tuple[int, int | None, str]] = []
        wanted = set(prefixes)
        for prefix in prefixes:
            if prefix:
                parent = prefix[:-1]
                if parent in self._by_key:
                    grand = self._by_key.get(parent[:-1]) if parent else None
                    out.append((self._by_key[parent], grand, parent[-1] if parent else ""))
        lengths = sorted({len(p) for p in wanted})
        for key, ino in self._by_key.items():
            if any(key[:n] in wanted for n in lengths if n <= len(key)):
                parent_ino = self._by_key.get(key[:-1]) if key else None
                out.append((ino, parent_ino, key[-1] if key else ""))
        return out

    def has_name(self, ino: int) -> bool:
        return ino in self._by_ino

    def known(self, ino: int) -> bool:
        return ino in self._by_ino or ino in self._nameless

    def rename(self, old: Key, new: Key) -> None:
        """A path (and everything below it) moved: its inodes follow it, as the kernel's
        dentries do; whatever was at the new path loses its name."""
        self.version += 1
        depth = len(old)
        moved = [k for k in self._by_key if k[:depth] == old]
        for key in moved:
            ino = self._by_key.pop(key)
            target = new + key[depth:]
            stale = self._by_key.pop(target, None)
            if stale is not None:
                self._unname(stale)
            self._by_key[target] = ino
            self._by_ino[ino] = target

    def detach(self, key: Key, replaced: bool = False) -> None:
        """``key`` lost its name: its inode no longer has a path (open handles keep using
        it, and a new file at that path gets a new inode, as on any POSIX file system).
        ``replaced``: the path shows other bytes now, not nothing; until the kernel hears
        that (its entry is invalidated right after), it may still ask the old inode's
        attributes, which then are the path's (:meth:`former`), not ENOENT."""
        self.version += 1
        ino = self._by_key.pop(key, None)
        if ino is not None:
            self._unname(ino)
            if replaced and ino in self._nameless:
                self._former[ino] = key

    def former(self, ino: int) -> Key | None:
        """The path a replaced inode had (see :meth:`detach`), while the kernel counts it."""
        return self._former.get(ino)

    def _unname(self, ino: int) -> None:
        self._by_ino.pop(ino, None)
        if self._lookups.get(ino, 0) > 0:
            self._nameless.add(ino)
        elif self._on_drop is not None:
            self._on_drop(ino)

    def remember(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``ino``."""
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._former.pop(ino, None)
        if ino in self._nameless:
            self._nameless.discard(ino)
            if self._on_drop is not None:
                self._on_drop(ino)
