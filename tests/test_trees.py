"""Unit tests of the content-defined range trees against a plain dict model."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from ahmount.errors import DirectoryInTheWay, FileInTheWay
from ahmount.hub.models import ObjectEntry
from ahmount.hub.trees import TreeStore


class DictNodes:
    def __init__(self) -> None:
        self.nodes: dict[str, bytes] = {}
        self.writes = 0

    def get_nodes(self, ids: Sequence[str]) -> dict[str, bytes]:
        return {i: self.nodes[i] for i in ids if i in self.nodes}

    def put_nodes(self, nodes: dict[str, bytes]) -> None:
        self.writes += sum(1 for i in nodes if i not in self.nodes)
        self.nodes.update(nodes)


def entry(path: str, n: int = 0) -> ObjectEntry:
    return ObjectEntry(path, f"{n:064x}", n, 1.0, "application/octet-stream")


def test_apply_matches_a_dict_model() -> None:
    rng = random.Random(7)
    store = TreeStore(DictNodes(), cache_entries=2000)
    tree = store.empty_tree()
    model: dict[str, ObjectEntry] = {}
    for step in range(60):
        adds = [entry(f"d{rng.randrange(30)}/f{rng.randrange(400)}", step) for _ in range(150)]
        existing = sorted(model)
        deletes = rng.sample(existing, min(len(existing), 40))
        if step % 7 == 3:
            deletes.append(f"d{rng.randrange(30)}/")
        tree = store.apply(tree, deletes, adds)
        for path in deletes:
            if path.endswith("/"):
                for key in [k for k in model if k.startswith(path)]:
                    del model[key]
            else:
                model.pop(path, None)
        for e in adds:
            model[e.path] = e
        assert list(store.iter_entries(tree)) == [model[k] for k in sorted(model)]
    assert store.count(tree) == len(model)


def test_the_node_cache_is_bounded_by_the_entries_it_holds() -> None:
    """Ranges hold up to thousands of objects each: a bound in nodes was none in memory."""
    nodes = DictNodes()
    tree = TreeStore(nodes).build(entry(f"data/{i:06d}.png", i) for i in range(50_000))
    reader = TreeStore(nodes, cache_entries=5_000)
    assert sum(1 for _ in reader.iter_entries(tree)) == 50_000
    ranges = len(reader.metarange(tree))
    assert 5_000 - 4096 <= reader.cached_entries() <= 5_000
    # What it keeps is what was read last, and it answers as the store does.
    assert reader.get(tree, "data/049999.png") == entry("data/049999.png", 49_999)
    assert reader.get(tree, "data/000000.png") == entry("data/000000.png", 0)
    assert reader.cached_entries() <= 5_000 and len(reader.metarange(tree)) == ranges
    # A node larger than the whole bound is still kept alone (it is being read).
    tiny = TreeStore(nodes, cache_entries=1)
    assert tiny.get(tree, "data/000001.png") == entry("data/000001.png", 1)
    assert tiny.cached_entries() >= 1


def test_small_change_rewrites_few_nodes() -> None:
    nodes = DictNodes()
    store = TreeStore(nodes)
    tree = store.build(entry(f"data/{i:06d}.png", i) for i in range(100_000))
    ranges_before = len(store.metarange(tree))
    assert ranges_before >= 25
    nodes.writes = 0
    store.apply(tree, ["data/000010.png"], [entry("data/050000.png", 7)])
    # Two ranges and one metarange at most: the rest is shared with the parent tree.
    assert nodes.writes <= 3


def test_listing_with_delimiter_and_cursor() -> None:
    store = TreeStore(DictNodes())
    tree = store.build(
        [entry("a.txt"), entry("b/1"), entry("b/2"), entry("c/x/1"), entry("d")]
    )
    objects, dirs, cursor = store.list_page(tree, "", "", 100, delimiter=True)
    assert [o.path for o in objects] == ["a.txt", "d"]
    assert dirs == ["b/", "c/"]
    assert cursor is None
    seen: list[str] = []
    after = ""
    while True:
        objects, dirs, cursor = store.list_page(tree, "", after, 1, delimiter=True)
        seen += [o.path for o in objects] + dirs
        if cursor is None:
            break
        after = cursor
    assert seen == ["a.txt", "b/", "c/", "d"]
    objects, dirs, _ = store.list_page(tree, "b/", "", 10, delimiter=False)
    assert [o.path for o in objects] == ["b/1", "b/2"]


def test_file_and_directory_of_one_name_conflict() -> None:
    store = TreeStore(DictNodes())
    tree = store.build([entry("a/b")])
    with pytest.raises(DirectoryInTheWay, match="directory of that name"):
        store.apply(tree, [], [entry("a")])
    with pytest.raises(FileInTheWay, match="'a/b' is a file"):
        store.apply(tree, [], [entry("a/b/c")])
    # Deleting first makes room, as commit does: deletes, then adds.
    replaced = store.apply(tree, ["a/"], [entry("a")])
    assert [e.path for e in store.iter_entries(replaced)] == ["a"]
