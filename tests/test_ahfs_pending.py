"""What an ``ah://`` write call or transaction will commit (``ahmount/ahfs/pending.py``):
the changes of a branch, and the gate that shuts them when the commit begins."""

from __future__ import annotations

from pathlib import Path

import pytest

from ahmount.ahfs.pending import Pending
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry

ADDR = AssetAddr(FolderAddr("alice", "model", "f"), "a")


def test_a_change_after_the_commit_began_is_refused_not_left_out(tmp_path: Path) -> None:
    """Threads share a file system's transaction: a change that reaches it once its commit
    has begun (the commit has taken its files) raises, where it was dropped silently."""
    spooled = tmp_path / "spooled"
    spooled.write_bytes(b"late")
    pending = Pending("m")
    changes = pending.of(ADDR, "main", "model/f/a")
    changes.add_file("kept.bin", tmp_path / "kept", spooled=False)
    pending.shut()
    for late in (lambda: changes.add_file("late.bin", spooled, spooled=True),
                 lambda: changes.add_entry(ObjectEntry("e.bin", "0" * 64, 1, 0.0)),
                 lambda: changes.delete("kept.bin", exists_on_hub=True),
                 lambda: pending.of(ADDR, "dev", "model/f/a@dev")):
        with pytest.raises(RuntimeError, match="commit had begun"):
            late()
    assert (set(changes.files), changes.entries, changes.deletes) == ({"kept.bin"}, {}, set())
    assert list(pending.branches) == [(ADDR, "main")]
    assert spooled.exists()  # the refused write's bytes are its caller's to drop


def test_changes_before_the_gate_shuts_are_all_kept(tmp_path: Path) -> None:
    pending = Pending()
    changes = pending.of(ADDR, "main", "model/f/a")
    changes.add_file("a.bin", tmp_path / "a", spooled=False)
    changes.add_entry(ObjectEntry("b.bin", "1" * 64, 2, 0.0))
    changes.delete("c.bin", exists_on_hub=True)
    assert pending.of(ADDR, "main", "model/f/a") is changes
    assert [changes.says(p) for p in ("a.bin", "b.bin", "c.bin", "d.bin")] == \
        [True, True, False, None]
    assert changes.describe() == "Write a.bin, b.bin and delete c.bin through ah://"
