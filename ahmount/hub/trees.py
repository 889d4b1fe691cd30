"""Commit trees as content-defined ranges, so that large commits stay cheap.

A commit's objects are one sorted list of :class:`ObjectEntry`, cut into *ranges* of about
:data:`TARGET_RANGE` entries. A cut falls after an entry whose path hashes to a boundary (and
at the latest after :data:`MAX_RANGE` entries), so the cuts depend on the paths near them and
not on their position: adding or deleting a few objects rewrites only the ranges they fall in,
and every other range is shared, byte for byte, with the parent commit. A *metarange* lists a
commit's ranges with their first and last paths; its id is the commit's ``tree``. This is the
design of lakeFS's graveler, trimmed to what one hub needs.

Nodes (ranges and metaranges) are immutable and addressed by the sha256 of their encoding, so
concurrent writers may insert the same node twice without harm, and readers may cache them
forever.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ahmount.errors import DirectoryInTheWay, FileInTheWay, InternalError
from ahmount.hub.models import DEFAULT_MODE, ObjectEntry

TARGET_RANGE = 1024
MAX_RANGE = 4096
#: Decoded entries the node cache keeps, all nodes together (~300 bytes each decoded: a
#: range's objects; ~80 MiB in all).
CACHE_ENTRIES = 262_144


class NodeStore(Protocol):
    """Where encoded nodes live (the metadata store implements it)."""

    def get_nodes(self, ids: Sequence[str]) -> dict[str, bytes]: ...

    def put_nodes(self, nodes: dict[str, bytes]) -> None: ...


@dataclass(frozen=True)
class RangeRef:
    id: str
    first: str
    last: str
    count: int


def _encode(payload: object) -> tuple[str, bytes]:
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest(), zlib.compress(raw, 6)


def _decode(data: bytes) -> object:
    return json.loads(zlib.decompress(data))


EMPTY_TREE_ID, _EMPTY_TREE_DATA = _encode({"ranges": []})


#: A decoded node as cached: a metarange's ranges, or a range's (paths, entries).
Node = list[RangeRef] | tuple[list[str], list[ObjectEntry]]


def _materialize(raw: object) -> Node:
    """Turn a decoded node into its cached form (see :meth:`TreeStore._load`)."""
    assert isinstance(raw, dict)
    if "ranges" in raw:
        return [RangeRef(r[0], r[1], r[2], r[3]) for r in raw["ranges"]]
    entries = [ObjectEntry(*e) for e in raw["entries"]]  # mode only where not 0o644
    return ([e.path for e in entries], entries)


def _entry_fields(entry: ObjectEntry) -> list[object]:
    """An entry as stored in a range node. The mode is left out when it is the default, so
    trees written before modes were kept keep their ids."""
    fields: list[object] = [entry.path, entry.sha256, entry.size, entry.mtime,
                            entry.content_type]
    if entry.mode != DEFAULT_MODE:
        fields.append(entry.mode)
    return fields


def _is_boundary(path: str) -> bool:
    digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TARGET_RANGE == 0


def _chunk(entries: list[ObjectEntry]) -> list[list[ObjectEntry]]:
    chunks: list[list[ObjectEntry]] = []
    current: list[ObjectEntry] = []
    for entry in entries:
        current.append(entry)
        if len(current) >= MAX_RANGE or _is_boundary(entry.path):
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _prefix_end(prefix: str) -> str:
    """The smallest string greater than every string that starts with ``prefix``."""
    return prefix + "\U0010ffff"


class TreeStore:
    """Reads and writes commit trees on a :class:`NodeStore`, with an LRU of decoded nodes.

    The LRU is bounded by the entries its nodes hold (a range's objects, a metarange's
    ranges), not by nodes: a range holds up to :data:`MAX_RANGE` objects, so 2,048 nodes
    were up to 8 million decoded objects. After one commit of a million objects a hub kept
    1.2 GiB. Safe to share between threads: the cache changes under a lock; a lost race
    merely decodes a node twice.
    """

    def __init__(self, nodes: NodeStore, cache_entries: int = CACHE_ENTRIES) -> None:
        self._nodes = nodes
        self._cache: OrderedDict[str, tuple[int, Node]] = OrderedDict()  # LRU by insertion
        self._cache_limit = cache_entries
        self._cached_entries = 0
        self._cache_lock = threading.Lock()

    # -- node access -------------------------------------------------------------------------

    def _load(self, ids: Sequence[str]) -> dict[str, Node]:
        """Decoded nodes by id: a metarange as ``list[RangeRef]``, a range as
        ``(paths, entries)``; both are kept in the LRU in that form."""
        found: dict[str, Node] = {}
        missing: list[str] = []
        for node_id in ids:
            cached = self._cache.get(node_id)
            if cached is not None:
                found[node_id] = cached[1]
            else:
                missing.append(node_id)
        if missing:
            loaded = self._nodes.get_nodes(missing)
            for node_id in missing:
                if node_id not in loaded:
                    raise InternalError(f"tree node {node_id} is missing from the metadata store")
                found[node_id] = _materialize(_decode(loaded[node_id]))
            with self._cache_lock:
                for node_id in missing:
                    self._keep(node_id, found[node_id])
        return found

    def _keep(self, node_id: str, value: Node) -> None:
        """Cache a decoded node, dropping the oldest past the entry limit (under the lock)."""
        # A range holds its entries; a metarange, its ranges.
        size = len(value[1]) if isinstance(value, tuple) else len(value)
        old = self._cache.pop(node_id, None)
        if old is not None:
            self._cached_entries -= old[0]
        self._cache[node_id] = (size, value)
        self._cached_entries += size
        while self._cached_entries > self._cache_limit and len(self._cache) > 1:
            self._cached_entries -= self._cache.popitem(last=False)[1][0]

    def cached_entries(self) -> int:
        """How many entries the decoded nodes in the cache hold."""
        return self._cached_entries

    def metarange(self, tree_id: str) -> list[RangeRef]:
        value = self._load([tree_id])[tree_id]
        assert isinstance(value, list)
        return value

    def _ranges(self, range_ids: Sequence[str]) -> dict[str, tuple[list[str], list[ObjectEntry]]]:
        loaded = self._load(range_ids)
        out: dict[str, tuple[list[str], list[ObjectEntry]]] = {}
        for range_id, value in loaded.items():
            assert isinstance(value, tuple)
            out[range_id] = value
        return out

    def range_entries(self, range_ids: Sequence[str]) -> dict[str, list[ObjectEntry]]:
        return {rid: value[1] for rid, value in self._ranges(range_ids).items()}

    # -- reading -----------------------------------------------------------------------------

    def count(self, tree_id: str) -> int:
        return sum(r.count for r in self.metarange(tree_id))

    def iter_entries(self, tree_id: str, start: str = "") -> Iterator[ObjectEntry]:
        """Yield the tree's entries with ``path >= start``, in path order."""
        ranges = self.metarange(tree_id)
        lasts = [r.last for r in ranges]
        index = bisect.bisect_left(lasts, start)
        for ref in ranges[index:]:
            paths, entries = self._ranges([ref.id])[ref.id]
            begin = bisect.bisect_left(paths, start) if start else 0
            yield from entries[begin:]

    def get(self, tree_id: str, path: str) -> ObjectEntry | None:
        for entry in self.iter_entries(tree_id, path):
            return entry if entry.path == path else None
        return None

    def has_prefix(self, tree_id: str, prefix: str) -> bool:
        for entry in self.iter_entries(tree_id, prefix):
            return entry.path.startswith(prefix)
        return False

    def list_page(
        self, tree_id: str, prefix: str, after: str, limit: int, delimiter: bool
    ) -> tuple[list[ObjectEntry], list[str], str | None]:
        """One page of entries under ``prefix`` with paths greater than ``after``.

        With ``delimiter``, entries below a further ``/`` are folded into directory names
        (``prefix + name + '/'``), each reported once; the cursor skips past a folded directory
        without reading its contents. Returns ``(objects, dirs, next_after)``.
        """
        objects: list[ObjectEntry] = []
        dirs: list[str] = []
        start = prefix if not after or after < prefix else after + "\x00"
        while True:
            resume_at: str | None = None
            for entry in self.iter_entries(tree_id, start):
                if not entry.path.startswith(prefix):
                    return objects, dirs, None
                slash = entry.path.find("/", len(prefix)) if delimiter else -1
                if slash >= 0:
                    directory = entry.path[: slash + 1]
                    dirs.append(directory)
                    cursor = _prefix_end(directory)
                    resume_at = cursor + "\x00"
                else:
                    objects.append(entry)
                    cursor = entry.path
                if len(objects) + len(dirs) >= limit:
                    more = self._any_after(tree_id, prefix, cursor)
                    return objects, dirs, cursor if more else None
                if resume_at is not None:
                    break
            else:
                return objects, dirs, None
            start = resume_at

    def _any_after(self, tree_id: str, prefix: str, cursor: str) -> bool:
        for entry in self.iter_entries(tree_id, cursor + "\x00"):
            return entry.path.startswith(prefix)
        return False

    # -- writing -----------------------------------------------------------------------------

    def empty_tree(self) -> str:
        self._nodes.put_nodes({EMPTY_TREE_ID: _EMPTY_TREE_DATA})
        return EMPTY_TREE_ID

    def build(self, entries: Iterable[ObjectEntry]) -> str:
        """Store a whole tree from entries in any order; returns its id."""
        by_path = {e.path: e for e in entries}
        return self._store([by_path[p] for p in sorted(by_path)], [], {})

    def apply(
        self, tree_id: str, deletes: Sequence[str], adds: Sequence[ObjectEntry]
    ) -> str:
        """Apply deletes (``a/b`` one object, ``a/b/`` a directory), then adds, to a tree.

        Only the ranges the changes fall in are read and rewritten. Raises :class:`Conflict`
        when an added object would sit where a file and a directory meet (``a`` and ``a/b``).
        Returns the new tree's id, equal to ``tree_id`` when nothing changed.
        """
        if not deletes and not adds:
            return tree_id
        ranges = self.metarange(tree_id)
        firsts = [r.first for r in ranges]
        lasts = [r.last for r in ranges]

        def home(path: str) -> int:
            return max(bisect.bisect_right(firsts, path) - 1, 0)

        touched: set[int] = set()
        for path in deletes:
            if path.endswith("/"):
                low = bisect.bisect_left(lasts, path)
                high = bisect.bisect_left(firsts, _prefix_end(path))
                touched.update(range(low, high))
            elif ranges:
                touched.add(home(path))
        for entry in adds:
            if ranges:
                touched.add(home(entry.path))
        deleted_files = {p for p in deletes if not p.endswith("/")}
        deleted_dirs = _outermost(p for p in deletes if p.endswith("/"))
        added = {e.path: e for e in adds}

        new_refs: list[RangeRef] = []
        new_nodes: dict[str, bytes] = {}
        order = sorted(touched)
        loaded = self.range_entries([ranges[i].id for i in order])
        i = 0
        while i < len(ranges):
            if i not in touched:
                new_refs.append(ranges[i])
                i += 1
                continue
            # A run of touched ranges is merged, edited and cut again as one list.
            run: list[ObjectEntry] = []
            run_first = ranges[i].first if i > 0 else ""
            while i < len(ranges) and i in touched:
                run.extend(loaded[ranges[i].id])
                i += 1
            run_end = ranges[i].first if i < len(ranges) else None
            kept = {
                e.path: e
                for e in run
                if e.path not in deleted_files and not _under_any(e.path, deleted_dirs)
            }
            for path, entry in added.items():
                if path >= run_first and (run_end is None or path < run_end):
                    kept[path] = entry
            self._cut([kept[p] for p in sorted(kept)], new_refs, new_nodes)
        if not ranges:
            self._cut([added[p] for p in sorted(added)], new_refs, new_nodes)
        new_tree = self._store_meta(new_refs, new_nodes)
        if added:
            self._check_shapes(new_tree, list(added))
        return new_tree

    def _check_shapes(self, tree_id: str, added: list[str]) -> None:
        parents: set[str] = set()
        for path in added:
            if self.has_prefix(tree_id, path + "/"):
                raise DirectoryInTheWay(f"cannot add object {path!r}: a directory of that "
                                        "name exists", path=path)
            parts = path.split("/")
            parents.update("/".join(parts[:n]) for n in range(1, len(parts)))
        for parent in sorted(parents):
            if self.get(tree_id, parent) is not None:
                raise FileInTheWay(
                    f"cannot add objects under {parent + '/'!r}: {parent!r} is a file",
                    path=parent,
                )

    def _cut(
        self, entries: list[ObjectEntry], refs: list[RangeRef], nodes: dict[str, bytes]
    ) -> None:
        for chunk in _chunk(entries):
            node_id, data = _encode(
                {"entries": [_entry_fields(e) for e in chunk]}
            )
            nodes[node_id] = data
            refs.append(RangeRef(node_id, chunk[0].path, chunk[-1].path, len(chunk)))

    def _store(
        self, entries: list[ObjectEntry], refs: list[RangeRef], nodes: dict[str, bytes]
    ) -> str:
        self._cut(entries, refs, nodes)
        return self._store_meta(refs, nodes)

    def _store_meta(self, refs: list[RangeRef], nodes: dict[str, bytes]) -> str:
        meta_id, meta_data = _encode({"ranges": [[r.id, r.first, r.last, r.count] for r in refs]})
        nodes[meta_id] = meta_data
        self._nodes.put_nodes(nodes)
        return meta_id

    def node_ids(self, tree_id: str) -> list[str]:
        """The tree's own id and every range id it uses (for garbage collection)."""
        return [tree_id] + [r.id for r in self.metarange(tree_id)]

    def blob_hashes(self, tree_id: str) -> set[str]:
        ranges = self.metarange(tree_id)
        hashes: set[str] = set()
        for entries in self.range_entries([r.id for r in ranges]).values():
            hashes.update(e.sha256 for e in entries)
        return hashes


def _outermost(dirs: Iterable[str]) -> list[str]:
    """Sorted directory prefixes with those inside another one dropped."""
    kept: list[str] = []
    for directory in sorted(set(dirs)):
        if not kept or not directory.startswith(kept[-1]):
            kept.append(directory)
    return kept


def _under_any(path: str, sorted_dirs: list[str]) -> bool:
    """True if ``path`` is under one of ``sorted_dirs`` (sorted, none inside another)."""
    if not sorted_dirs:
        return False
    index = bisect.bisect_right(sorted_dirs, path) - 1
    return index >= 0 and path.startswith(sorted_dirs[index])
