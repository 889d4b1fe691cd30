"""Small files travel together (``vfs/sibling_fetch.py``), in-process on the vfs core: the
first read of a small file brings its directory's other small files in one batch request;
later reads there are cache hits; a batch that fails leaves every reader its own fetch."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ahmount import ah
from ahmount.config import dirs
from ahmount.vfs.sibling_fetch import SMALL_OBJECT
from tests.fs_drivers import VfsDriver

B = "model/llm/gpt2/v1"


@pytest.fixture
def dataset(gpt2_v1: None, tmp_path: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for d in ("a", "b"):
        for i in range(20):
            files[f"{d}/{i:02d}.bin"] = os.urandom(4096 + i)
    files["a/big.bin"] = os.urandom(SMALL_OBJECT + 1)  # too large to travel in a batch
    files["a/twin.bin"] = files["a/00.bin"]  # the same content under two names
    commit_files(tmp_path, files, "data")
    return files


def commit_files(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    """Commit ``files`` (path -> bytes) to the branch v1 of model/llm/gpt2."""
    local = {}
    for path, data in files.items():
        (tmp_path / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / path).write_bytes(data)
        local[str(tmp_path / "src" / path)] = path
    ah.commit("model/llm/gpt2:v1", msg=message, add=local)


@pytest.fixture
def vfs(tmp_path: Path) -> Iterator[VfsDriver]:
    driver = VfsDriver(tmp_path / "vfs-cache")
    yield driver
    driver.close_driver()


def read(driver: VfsDriver, path: str) -> bytes:
    fd = driver.open(f"{B}/{path}", os.O_RDONLY)
    try:
        return driver.pread(fd, 1 << 20, 0)
    finally:
        driver.close(fd)


def batches(driver: VfsDriver) -> dict[str, int]:
    return dict(driver.session.stats()["small_batches"])


def test_the_first_read_brings_the_directorys_small_files(vfs: VfsDriver,
                                                           dataset: dict[str, bytes]) -> None:
    from tests.conftest import wait_until

    assert read(vfs, "a/07.bin") == dataset["a/07.bin"]  # its reader does not wait for it:
    wait_until(lambda: batches(vfs)["batches"] == 1, what="the rest of the batch")
    assert batches(vfs) == {"batches": 1, "objects": 20, "failures": 0}  # twin: one copy
    cache = vfs.session.cache_stats()
    for path in sorted(dataset):
        if path.startswith("a/") and path != "a/big.bin":
            assert read(vfs, path) == dataset[path]
    after = vfs.session.cache_stats()
    assert after["misses"] == cache["misses"]  # every other small file of a/ was a hit
    assert batches(vfs)["batches"] == 1
    assert read(vfs, "a/big.bin") == dataset["a/big.bin"]
    assert batches(vfs)["batches"] == 1  # a large file is read by blocks, alone
    assert read(vfs, "b/19.bin") == dataset["b/19.bin"]
    wait_until(lambda: batches(vfs)["batches"] == 2, what="the batch of b/")
    assert batches(vfs) == {"batches": 2, "objects": 40, "failures": 0}


def test_a_failed_batch_leaves_each_reader_its_own_fetch(vfs: VfsDriver,
                                                         dataset: dict[str, bytes]) -> None:
    bad = hashlib.sha256(dataset["a/05.bin"]).hexdigest()
    [blob] = list((dirs().data / "hub").rglob(bad))
    blob.write_bytes(bytes(len(dataset["a/05.bin"])))  # rot on the hub's disk
    good = [p for p in sorted(dataset) if p.startswith("a/") and p not in
            ("a/05.bin", "a/big.bin")]
    for path in good:
        assert read(vfs, path) == dataset[path]
    assert batches(vfs)["failures"] >= 1
    with pytest.raises(OSError) as info:
        read(vfs, "a/05.bin")
    assert info.value.errno == 5  # EIO: the one bad object, nothing else


def test_opening_a_mid_size_file_fetches_its_next_siblings_ahead(
        gpt2_v1: None, tmp_path: Path, vfs: VfsDriver) -> None:
    """A cold open of a file above the batch size (up to MID_OBJECT) starts fetching the
    directory's next uncached mid-size files, MID_AHEAD at a time; their reads are then cache
    hits. A warm open (the file is here) starts nothing."""
    from ahmount.vfs.sibling_fetch import MID_AHEAD
    from tests.conftest import wait_until

    files = {f"m/{i:02d}.bin": os.urandom(SMALL_OBJECT + 1000 + i) for i in range(MID_AHEAD + 4)}
    commit_files(tmp_path, files, "mid-size")

    def ahead() -> int:
        return int(vfs.session.stats()["fetched_ahead"])

    assert read(vfs, "m/00.bin") == files["m/00.bin"]
    wait_until(lambda: ahead() == MID_AHEAD, what="the read-ahead of the siblings")
    misses = vfs.session.cache_stats()["misses"]
    for i in range(1, MID_AHEAD + 1):  # the next ones in directory order were fetched
        assert read(vfs, f"m/{i:02d}.bin") == files[f"m/{i:02d}.bin"]
    assert vfs.session.cache_stats()["misses"] == misses
    assert read(vfs, "m/00.bin") == files["m/00.bin"]  # warm: starts nothing
    assert ahead() == MID_AHEAD
    last = f"m/{MID_AHEAD + 3:02d}.bin"  # cold: the rest is fetched ahead
    assert read(vfs, last) == files[last]
    wait_until(lambda: ahead() == MID_AHEAD + 2, what="the rest of the directory")


def test_with_siblings_off_only_the_opened_files_are_fetched(
        dataset: dict[str, bytes], tmp_path: Path) -> None:
    """``ah-mount --siblings off``: no batch, no read-ahead of mid-size siblings."""
    mid = {f"c/{i}.bin": os.urandom(SMALL_OBJECT + 1 + i) for i in range(3)}
    commit_files(tmp_path, mid, "mid-size")
    driver = VfsDriver(tmp_path / "off-cache", siblings=False)
    try:
        assert read(driver, "a/07.bin") == dataset["a/07.bin"]
        assert read(driver, "c/0.bin") == mid["c/0.bin"]
        stats = driver.session.stats()
        assert stats["small_batches"] == {"batches": 0, "objects": 0, "failures": 0}
        assert stats["fetched_ahead"] == 0
        before = driver.session.cache_stats()["misses"]
        assert read(driver, "a/08.bin") == dataset["a/08.bin"]
        assert read(driver, "c/1.bin") == mid["c/1.bin"]
        assert driver.session.cache_stats()["misses"] == before + 2  # neither was brought
        assert driver.session.cache_stats()["objects"] == 4
    finally:
        driver.close_driver()
    from tests.conftest import wait_until

    on = VfsDriver(tmp_path / "on-cache")  # the default, for contrast
    try:
        assert read(on, "c/0.bin") == mid["c/0.bin"]
        wait_until(lambda: on.session.stats()["fetched_ahead"] == 2,
                   what="the read-ahead of the siblings")
    finally:
        on.close_driver()


@pytest.mark.parametrize("batch_files", [256, 15])
def test_a_reader_across_directories_gets_other_directories_in_its_batches(
        gpt2_v1: None, tmp_path: Path, vfs: VfsDriver, monkeypatch: pytest.MonkeyPatch,
        batch_files: int) -> None:
    """Once cold small files of SPREAD_AFTER directories were opened (a loader walking a
    dataset), batches also carry the small files of the commit's other directories, up to a
    batch's bounds, each object in one batch only."""
    import ahmount.vfs.sibling_fetch as sibling_fetch
    from tests.conftest import wait_until

    monkeypatch.setattr(sibling_fetch, "BATCH_FILES", batch_files)
    files = {f"s/c{d}/{i:02d}.bin": os.urandom(1000 + 10 * d + i)
             for d in range(6) for i in range(10)}
    commit_files(tmp_path, files, "spread")
    assert read(vfs, "s/c0/03.bin") == files["s/c0/03.bin"]
    wait_until(lambda: batches(vfs)["batches"] == 1, what="the batch of s/c0")
    assert batches(vfs)["objects"] == 10  # one directory opened: only its own
    assert read(vfs, "s/c3/07.bin") == files["s/c3/07.bin"]
    wait_until(lambda: batches(vfs)["batches"] == 2, what="the spread batch")
    assert batches(vfs)["objects"] == 10 + min(batch_files, 50)
    misses = vfs.session.cache_stats()["misses"]
    for path in sorted(files):
        assert read(vfs, path) == files[path]
    wait_until(lambda: batches(vfs)["objects"] == len(files), what="every batch")
    if batch_files >= 50:  # all of it came in the spread batch: every read was a hit
        assert batches(vfs)["batches"] == 2 and vfs.session.cache_stats()["misses"] == misses
    else:
        assert batches(vfs)["batches"] > 2
    assert batches(vfs)["failures"] == 0


def test_a_file_opened_cold_is_a_miss_even_when_its_batch_beats_the_read(
        vfs: VfsDriver, dataset: dict[str, bytes]) -> None:
    """Its open started the fetch: a read after the batch landed still counts a miss (``ah
    stats`` said 0 misses after a first read that came late); its siblings are hits."""
    from tests.conftest import wait_until

    before = vfs.session.cache_stats()
    fd = vfs.open(f"{B}/a/03.bin", os.O_RDONLY)
    try:
        wait_until(lambda: batches(vfs)["batches"] == 1, what="the batch to land first")
        assert vfs.pread(fd, 1 << 20, 0) == dataset["a/03.bin"]
    finally:
        vfs.close(fd)
    after = vfs.session.cache_stats()
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 0)
    assert read(vfs, "a/04.bin") == dataset["a/04.bin"]
    last = vfs.session.cache_stats()
    assert (last["misses"] - after["misses"], last["hits"] - after["hits"]) == (0, 1)


@pytest.mark.parametrize(("files", "per_batch"), [(40, 8), (45, 7)])
def test_every_batch_of_a_directory_larger_than_a_batch_carries_new_files(
        gpt2_v1: None, tmp_path: Path, vfs: VfsDriver, monkeypatch: pytest.MonkeyPatch,
        files: int, per_batch: int) -> None:
    """A directory of more small files than a batch holds, read in shuffled order (a loader
    over a class directory of 1,000 images): each batch carries the opened file and the next
    files of the directory not yet here or on their way. Batches once refilled from the
    directory's start, found those all here, and carried the opened file alone: 10,000 x
    4 KiB in 10 directories took 7,450 requests, 253 files/s with 8 workers (4,421 now)."""
    import random

    import ahmount.vfs.sibling_fetch as sibling_fetch
    from tests.conftest import wait_until

    monkeypatch.setattr(sibling_fetch, "BATCH_FILES", per_batch)
    data = {f"big/{i:03d}.bin": os.urandom(4096 + i) for i in range(files)}
    commit_files(tmp_path, data, "a large directory")
    order = sorted(data)
    random.Random(files).shuffle(order)
    for path in order:
        assert read(vfs, path) == data[path]
    wait_until(lambda: batches(vfs)["objects"] == files, what="every batch to end")
    assert batches(vfs)["batches"] == -(-files // per_batch)
    assert batches(vfs)["failures"] == 0
