"""The small-file batch policy (``vfs/sibling_fetch.py``) as a model, in process: a shuffled
first epoch over generated layouts (file counts, directory sizes, batch sizes), against a
stand-in of the object cache that remembers claims. Every file travels in exactly one batch,
and the batches stay within a small multiple of the fewest possible, whatever the layout
(a directory larger than a batch once made a request per file past its first batch)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ahmount.vfs.sibling_fetch as sibling_fetch
from ahmount.hub.models import ObjectEntry
from ahmount.vfs.handles import HubSource
from ahmount.vfs.sibling_fetch import SiblingFetcher

Listing = dict[str, dict[str, ObjectEntry | None]]


@dataclass
class ClaimingCache:
    """What the policy asks of the object cache: claims are remembered (in order, each time
    made), nothing arrives."""

    claimed: list[str] = field(default_factory=list)
    on_its_way: set[str] = field(default_factory=set)

    def is_complete(self, sha: str, size: int) -> bool:
        return False

    def in_flight(self, sha: str) -> bool:
        return sha in self.on_its_way

    def claim(self, objects: list[tuple[str, int]]) -> list[str]:
        new = list(dict.fromkeys(sha for sha, _ in objects if sha not in self.on_its_way))
        self.claimed += new
        self.on_its_way.update(new)
        return new

    def note_cold_open(self, sha: str) -> None:
        pass


def listing(files: int, per_dir: int) -> Listing:
    dirs: Listing = {}
    for i in range(files):
        directory = f"d{i // per_dir:07d}"
        path = f"{directory}/{i:08d}.jpg"
        dirs.setdefault(directory, {})[path] = ObjectEntry(path, f"{i:064x}", 4096, 0.0)
    return dirs


def epoch(dirs: Listing, seed: int = 1) -> tuple[ClaimingCache, int]:
    """Every cold open of a shuffled first epoch (a file whose batch is on its way starts
    nothing: its open waits); the cache's claims, and how many batches were started."""
    cache = ClaimingCache()
    batches = 0

    def spawn(name: str, work: Any) -> None:
        nonlocal batches
        batches += 1

    fetcher = SiblingFetcher(cache, spawn)  # type: ignore[arg-type]
    index = SimpleNamespace(dirs=dirs)
    entries = [e for entries in dirs.values() for e in entries.values() if e is not None]
    random.Random(seed).shuffle(entries)
    for entry in entries:
        if cache.in_flight(entry.sha256):
            continue
        node = SimpleNamespace(index=index, queued=None, entry=entry)
        source = HubSource(None, None, "commit", entry.path, entry.sha256,  # type: ignore
                           entry.size)
        fetcher.opened(node, source)  # type: ignore[arg-type]
    return cache, batches


@settings(max_examples=60, deadline=None)
@given(files=st.integers(1, 400), per_dir=st.integers(1, 400), per_batch=st.integers(2, 32),
       seed=st.integers(0, 1000))
def test_every_file_travels_once_in_few_batches(files: int, per_dir: int, per_batch: int,
                                                seed: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sibling_fetch, "BATCH_FILES", per_batch)
        patch.setattr(sibling_fetch, "SPREAD_SCAN", 8 * per_batch)
        cache, batches = epoch(listing(files, per_dir), seed)
    assert sorted(cache.claimed) == sorted(f"{i:064x}" for i in range(files))
    fewest = -(-files // per_batch)
    assert batches <= 2 * fewest + sibling_fetch.SPREAD_AFTER, (batches, fewest)
