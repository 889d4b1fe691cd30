"""The FUSE adapter's inode table: stable numbers per path, renames followed, and entries
dropped once a path is gone and the kernel has forgotten it (a long-lived mount must not grow
with every file it ever saw deleted)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahmount.errors import NotFound
from ahmount.mount.inodes import ROOT_INODE, InodeTable


def test_a_path_keeps_its_inode_and_a_new_file_at_an_old_name_gets_a_new_one() -> None:
    table = InodeTable()
    a = table.ino(("x", "a"))
    assert table.ino(("x", "a")) == a and table.key(a) == ("x", "a")
    table.detach(("x", "a"))
    with pytest.raises(NotFound):
        table.key(a)
    assert table.ino(("x", "a")) != a
    assert table.key(ROOT_INODE) == ()


def test_renames_carry_inodes_below_the_moved_directory() -> None:
    table = InodeTable()
    d, f = table.ino(("d",)), table.ino(("d", "f"))
    replaced = table.ino(("e", "f"))
    table.rename(("d",), ("e",))
    assert table.key(d) == ("e",) and table.key(f) == ("e", "f")
    assert not table.has_name(replaced)


def test_a_nameless_inode_lives_while_the_kernel_counts_it() -> None:
    dropped: list[int] = []
    table = InodeTable(on_drop=dropped.append)
    ino = table.ino(("f",))
    table.remember(ino)
    table.remember(ino)
    table.detach(("f",))
    assert table.known(ino) and dropped == []
    table.forget(ino, 1)
    assert table.known(ino)
    table.forget(ino, 1)
    assert not table.known(ino) and dropped == [ino]
    unseen = table.ino(("g",))  # never counted by the kernel: gone at once
    table.detach(("g",))
    assert dropped == [ino, unseen]


def test_a_replaced_inode_remembers_its_path_while_the_kernel_counts_it() -> None:
    """A file whose path shows other bytes now (``ah reset``, a write the disk refused) gets
    a new inode at its path; the old one, which the kernel may still ask about until its
    entry is invalidated, answers for that path instead of ENOENT, and only until the
    kernel forgets it. An unlinked file's inode has no path to answer for."""
    table = InodeTable()
    old = table.ino(("b", "f"))
    table.remember(old)
    gone = table.ino(("b", "g"))
    table.remember(gone)
    table.detach(("b", "f"), replaced=True)
    table.detach(("b", "g"))
    assert table.former(old) == ("b", "f") and table.former(gone) is None
    assert table.ino(("b", "f")) != old
    table.forget(old, 1)
    assert table.former(old) is None
    unseen = table.ino(("b", "h"))  # never handed to the kernel: dropped at once
    table.detach(("b", "h"), replaced=True)
    assert table.former(unseen) is None


@given(st.lists(st.tuples(st.sampled_from(["new", "lookup", "forget", "unlink"]),
                          st.integers(0, 5)), max_size=200))
def test_the_table_holds_only_named_or_counted_inodes(steps: list[tuple[str, int]]) -> None:
    table = InodeTable()
    counts: dict[int, int] = {}
    named: dict[tuple[str, ...], int] = {}
    for op, n in steps:
        key = (f"f{n}",)
        if op == "new":
            named[key] = table.ino(key)
        elif op == "lookup" and key in named:
            table.remember(named[key])
            counts[named[key]] = counts.get(named[key], 0) + 1
        elif op == "forget":  # the kernel forgets any inode it counts, named or not
            counted = sorted(i for i, c in counts.items() if c > 0)
            if counted:
                ino = counted[n % len(counted)]
                table.forget(ino, 1)
                counts[ino] -= 1
        elif op == "unlink" and key in named:
            table.detach(key)
            del named[key]
    alive = set(named.values()) | {i for i, c in counts.items() if c > 0}
    assert len(table) == len(alive) + 1  # the root
