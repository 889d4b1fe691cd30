"""Listings built from a commit's flat object list: every directory at every depth, by
``names()`` alone, must show exactly the tree the paths imply (hypothesis-generated trees)."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ahmount.hub.models import ObjectEntry
from ahmount.vfs.hub_view import CommitIndex

segment = st.sampled_from(["a", "b", "c", "d0", "d99", "x.bin", "s4"])
path_strategy = st.lists(segment, min_size=1, max_size=6).map("/".join)


def file_set(paths: list[str]) -> set[str]:
    """Paths that can all be objects at once: none is a directory of another."""
    chosen = set(paths)
    return {p for p in chosen if not any(q.startswith(p + "/") for q in chosen)}


def walk(index: CommitIndex) -> tuple[set[str], set[str]]:
    """(files, directories) reached from the root through listings only, as ``os.walk``."""
    files: set[str] = set()
    dirs: set[str] = set()
    todo = [""]
    while todo:
        directory = todo.pop()
        for name in index.names(directory):
            path = f"{directory}/{name}" if directory else name
            found = index.lookup(path)
            assert found is not None, f"{path!r} is listed but lookup does not find it"
            if found == "dir":
                dirs.add(path)
                todo.append(path)
            else:
                files.add(path)
    return files, dirs


def implied_dirs(files: set[str]) -> set[str]:
    return {p.rsplit("/", depth)[0] for p in files for depth in range(1, p.count("/") + 1)}


@settings(max_examples=300, deadline=None)
@given(st.lists(path_strategy, max_size=30))
def test_every_directory_at_every_depth_is_listed(paths: list[str]) -> None:
    files = file_set(paths)
    index = CommitIndex("c" * 64, 0.0, [ObjectEntry(p, "0" * 64, 1, 0.0) for p in files])
    assert walk(index) == (files, implied_dirs(files))


def test_a_directory_first_seen_deep_is_listed_in_its_parent() -> None:
    # The report: x/y/z/f and top; a dataset s4/d00/f1 whose root lost s4.
    index = CommitIndex("c" * 64, 0.0, [ObjectEntry("x/y/z/f", "0" * 64, 3, 0.0),
                                         ObjectEntry("top", "0" * 64, 2, 0.0)])
    assert index.names("") == ["top", "x"]
    assert index.names("x") == ["y"]
    assert index.names("x/y") == ["z"]


@given(st.builds(ObjectEntry, path_strategy, st.text(min_size=64, max_size=64),
                 st.integers(0, 1 << 40), st.floats(0, 2e9), st.text(max_size=20),
                 st.integers(0, 0o777)))
def test_a_listed_object_parses_to_the_entry_it_was(entry: ObjectEntry) -> None:
    """The client's fast construction of a listed object equals the dataclass's own, holds
    no instance dict (a mount keeps one per object listed), and survives a pickle (a
    DataLoader worker's)."""
    from ahmount.client.hub_client import _entry
    parsed = _entry(entry.as_json())
    assert parsed == entry and hash(parsed) == hash(entry) and type(parsed) is ObjectEntry
    assert not hasattr(parsed, "__dict__")
    assert pickle.loads(pickle.dumps(parsed)) == entry


def test_a_listed_object_with_a_field_left_out_or_unknown() -> None:
    from ahmount.client.hub_client import _entry
    sha = "0" * 64
    assert _entry({"path": "a", "sha256": sha, "size": 1, "mtime": 2.0}) == \
        ObjectEntry("a", sha, 1, 2.0)  # the defaults
    with pytest.raises(TypeError, match="surprise"):
        _entry({"path": "a", "sha256": sha, "size": 1, "mtime": 2.0, "surprise": 1})
