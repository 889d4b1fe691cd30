"""How a refused commit names the paths it is about (``ahmount/vfs/branch_ops.py``): the
first five, and how many more, however many there are."""

from __future__ import annotations

from ahmount.vfs.branch_ops import _some


def test_a_message_names_at_most_five_paths_and_counts_the_rest() -> None:
    assert _some(["a"]) == "a"
    assert _some([f"f{i}" for i in range(5)]) == "f0, f1, f2, f3, f4"
    assert _some([f"f{i}" for i in range(10_000)]) == "f0, f1, f2, f3, f4 and 9995 more"
