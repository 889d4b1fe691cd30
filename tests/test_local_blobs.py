"""The local blob store on its own: where blobs lie on disk (``ROOT/ab/<sha256>``), and that
blobs a hub wrote in the layout before (``ROOT/ab/cd/<sha256>``) stay readable, listed and
deletable next to new ones; and the groups a batch upload stores small blobs in."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ahmount.errors import NotFound, RangeNotSatisfiable
from ahmount.hub.blobs import LocalBlobStore


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(store: LocalBlobStore, data: bytes, name: str = "u1") -> str:
    """``data`` stored as the hub stores a blob: an upload, finished under its hash."""
    store.start_upload(name)
    store.append(name, 0, data)
    store.finish_upload(name, sha(data), len(data))
    return sha(data)


def place_legacy(store: LocalBlobStore, data: bytes) -> str:
    """``data`` where a hub from before the one-level layout put its blobs."""
    digest = sha(data)
    path = store.root / digest[:2] / digest[2:4] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def test_a_finished_upload_lies_one_directory_deep(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = upload(store, b"weights")
    assert (tmp_path / "blobs" / digest[:2] / digest).read_bytes() == b"weights"
    assert not (tmp_path / "blobs" / digest[:2] / digest[2:4]).exists()
    assert store.size(digest) == 7
    assert b"".join(store.read(digest, 2, 7)) == b"ights"
    assert list(store.hashes()) == [digest]


def test_small_blobs_stored_at_once_lie_where_uploads_do(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    blobs = [(sha(data), data) for data in (b"a", b"bb", b"", b"weights" * 1000)]
    store.store_small(blobs)
    store.store_small(blobs[:1])  # again: the same bytes under the same name
    for digest, data in blobs:
        assert (tmp_path / "blobs" / digest[:2] / digest).read_bytes() == data
        assert store.size(digest) == len(data)
    assert sorted(store.hashes()) == sorted(digest for digest, _ in blobs)
    assert list((tmp_path / "blobs" / "uploads").iterdir()) == []  # no temp file left


def test_a_small_blob_that_cannot_be_written_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = sha(b"x")
    (tmp_path / "blobs" / digest[:2]).write_bytes(b"a file where its directory goes")
    with pytest.raises(NotADirectoryError):
        store.store_small([(digest, b"x")])
    assert list((tmp_path / "blobs" / "uploads").iterdir()) == []


def test_blobs_of_the_layout_before_are_read_listed_and_deleted(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    old = place_legacy(store, b"old bytes")
    new = upload(store, b"new bytes")
    assert store.size(old) == 9
    assert b"".join(store.read(old, 0, 9)) == b"old bytes"
    assert store.read_small([(new, 9), (old, 9)]) == [b"new bytes", b"old bytes"]
    assert sorted(store.hashes()) == sorted([old, new])
    store.delete(old)
    assert store.size(old) is None
    assert list(store.hashes()) == [new]


def test_a_missing_blob_is_not_found_by_name(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    here = upload(store, b"here")
    gone = sha(b"gone")
    assert store.size(gone) is None
    with pytest.raises(NotFound, match=gone):
        list(store.read(gone, 0, 1))
    with pytest.raises(NotFound, match=gone):
        store.read_small([(here, 4), (gone, 4)])
    store.delete(gone)  # no error
    assert list(store.hashes()) == [here]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.booleans(), st.booleans()),
                max_size=12))
def test_any_mix_of_layouts_reads_lists_and_deletes_as_one_store(
        blobs: list[tuple[bytes, bool, bool]]) -> None:
    """Model check: blobs put in either layout (``legacy``), some then deleted (``gone``);
    the store lists exactly the ones kept, reads them back whole in one batch, and knows
    none of the deleted ones."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalBlobStore(Path(tmp) / "blobs")
        stored: dict[str, bytes] = {}
        for count, (data, legacy, _) in enumerate(blobs):
            digest = sha(data)
            if digest in stored:
                continue
            if legacy:
                place_legacy(store, data)
            else:
                upload(store, data, f"u{count}")
            stored[digest] = data
        deleted = {sha(data) for data, _, gone in blobs if gone}
        for digest in deleted:
            store.delete(digest)
            stored.pop(digest, None)
        assert sorted(store.hashes()) == sorted(stored)
        kept = sorted(stored.items())
        assert store.read_small([(d, len(b)) for d, b in kept]) == [b for _, b in kept]
        assert all(store.size(digest) is None for digest in deleted)


async def test_a_batch_upload_keeps_its_blobs_in_bounded_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded hub's batch endpoint: every blob kept, in groups of at most
    GROUP_BLOBS blobs and GROUP_BYTES bytes (what a request holds in memory)."""
    from ahmount.client.embedded import embedded_client
    from ahmount.client.files import hash_file
    from ahmount.hub.service import HubService
    from ahmount.server.endpoints import blobs as endpoint

    monkeypatch.setattr(endpoint, "GROUP_BLOBS", 3)
    monkeypatch.setattr(endpoint, "GROUP_BYTES", 100)
    groups: list[list[int]] = []
    store = HubService.store_small_blobs

    def recorded(self: HubService, actor: object, blobs: list[tuple[str, bytes]]) -> object:
        groups.append([len(data) for _, data in blobs])
        return store(self, actor, blobs)  # type: ignore[arg-type]

    monkeypatch.setattr(HubService, "store_small_blobs", recorded)
    files = []
    for i, size in enumerate([40, 40, 40, 10, 10, 10, 10, 99, 1, 100, 0]):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]) * size)
        files.append((path, *hash_file(path)))
    async with embedded_client(tmp_path / "hub") as hub:
        await hub.whoami()
        await hub.upload_batch(files)
        assert await hub.missing_blobs([sha for _, sha, _ in files]) == set()
    kept = [size for group in groups for size in group]
    assert sorted(kept) == sorted(size for _, _, size in files)
    assert all(len(g) <= 3 and sum(g) <= 100 for g in groups), groups
    assert len(groups) >= 5


def test_a_cached_read_answers_only_from_the_page_cache(tmp_path: Path) -> None:
    """``read_cached`` (what a server reads on its event loop) gives the bytes the page
    cache holds, and None for bytes that would wait for the disk, never other bytes."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(3 << 20)
    digest = upload(store, data)
    fd = store._open(digest)
    try:
        os.pread(fd, len(data), 0)  # in the page cache
        assert store.read_cached(digest, 0, len(data)) == data
        assert store.read_cached(digest, 5, 1 << 20) == data[5:1 << 20]
        os.fsync(fd)  # clean pages, which the kernel may then drop
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert store.read_cached(digest, 0, len(data)) is None
        assert b"".join(store.read(digest, 0, len(data))) == data  # the waiting read
    finally:
        os.close(fd)
    with pytest.raises(RangeNotSatisfiable):
        store.read_cached(digest, 0, len(data) + 1)
    with pytest.raises(NotFound):
        store.read_cached(sha(b"never stored"), 0, 1)
