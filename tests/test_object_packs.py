"""Small objects kept in packs (``ahmount.vfs.object_packs``), through the object cache that
uses them, two caches on one directory standing for two processes: what one packs the other
reads without fetching; a reader waiting for a batch reads what it kept; a pack torn by a
power cut is caught at the first read; packs are evicted whole, least recently read first,
never while a live writer holds one; a crashed writer's pack is swept; a reader keeps what
it has open. And a model check: any sequence of stores, reads and drops by two processes on
a tiny cache reads only true bytes, within the bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ahmount.vfs.object_packs as packs_module
from ahmount.vfs.object_cache import ObjectCache
from tests.test_shared_cache import MemorySource, blob, held_bytes, small_objects


def pack_files(root: Path) -> list[Path]:
    return sorted((root / "packs").glob("*.pack"))


async def store(cache: ObjectCache, sources: list[MemorySource]) -> None:
    await cache.store([(s.sha256, s.data) for s in sources])


async def stored_by_another_process(root: Path, sources: list[MemorySource]) -> None:
    """``sources`` kept in the cache at ``root`` by a process that then ended."""
    first = ObjectCache(root, 64 << 20)
    try:
        await store(first, sources)
    finally:
        first.close()


async def test_a_pack_torn_by_a_power_cut_is_caught_at_the_first_read(tmp_path: Path) -> None:
    sources = small_objects(40, 4)
    await stored_by_another_process(tmp_path, sources)
    [pack] = pack_files(tmp_path)
    torn = sources[2]
    with pack.open("r+b") as handle:  # its bytes never reached the disk: zeros
        handle.seek(sum(s.size for s in sources[:2]))
        handle.write(bytes(torn.size))
    second = ObjectCache(tmp_path, 64 << 20)
    try:
        for source in sources:
            assert await second.read(source, 0, source.size) == source.data
        assert [s.fetches for s in sources] == [0, 0, 1, 0]
        assert second._packs.mismatches == 1
        assert await second.read(torn, 0, torn.size) == torn.data  # kept again: no fetch
        assert torn.fetches == 1
    finally:
        second.close()
    third = ObjectCache(tmp_path, 64 << 20)
    try:
        assert not third._packs.has(torn.sha256, torn.size)  # its row went with the check
        assert await third.read(torn, 0, torn.size) == torn.data and torn.fetches == 1
    finally:
        third.close()


@pytest.mark.parametrize("kept_in", ["memory", "pack"])
async def test_a_reader_waiting_for_a_batch_reads_what_the_batch_kept(
        tmp_path: Path, kept_in: str) -> None:
    """A reader of an object a batch has claimed waits for the batch, then reads what the
    batch kept (its bytes in memory, or its pack once memory let them go) without a fetch of
    its own: such a reader once looked only in the data files and fetched it again (138 of
    10,000 files fetched twice by a cold 8-worker loader). The wait counts as a miss."""
    import trio.testing

    sources = small_objects(42, 6)
    target = sources[3]
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert cache.claim([(s.sha256, s.size) for s in sources]) == \
            [s.sha256 for s in sources]
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await cache.read(target, 0, target.size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # waiting for the batch, not fetching
            await store(cache, sources)
            if kept_in == "pack":
                cache._fresh.clear()
            cache.settle([s.sha256 for s in sources])
        assert got == [target.data]
        assert [s.fetches for s in sources] == [0] * len(sources)
        assert (cache.stats.hits, cache.stats.misses) == (0, 1)
    finally:
        cache.close()


async def test_packs_are_evicted_whole_least_recently_read_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_module, "PACK_BYTES", 10 * 4096)
    monkeypatch.setattr(packs_module, "LRU_RESOLUTION", 0.0)
    batches = [[MemorySource(blob(41_000 + 100 * b + i, 4096)) for i in range(10)]
               for b in range(4)]
    cache = ObjectCache(tmp_path, 3 * 10 * 4096)
    try:
        for batch in batches[:3]:
            await store(cache, batch)
        assert len(pack_files(tmp_path)) == 3 and cache.used_bytes() == 3 * 10 * 4096
        first = batches[0][0]
        cache._fresh.clear()  # read from its pack, not from memory
        assert await cache.read(first, 0, first.size) == first.data  # pack 0: read last
        await store(cache, batches[3])
        assert cache.used_bytes() <= cache.max_bytes and cache.stats.evictions == 1
        assert [all(cache.is_complete(s.sha256, s.size) for s in batch)
                for batch in batches] == [True, False, True, True]
        assert len(pack_files(tmp_path)) == 3
        lost = batches[1][5]
        assert await cache.read(lost, 0, lost.size) == lost.data and lost.fetches == 1
    finally:
        cache.close()


async def test_a_pack_being_written_is_neither_swept_nor_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ObjectCache(tmp_path, 64 << 20)
    try:
        mine = small_objects(42, 5)
        await store(writer, mine)
        [written] = pack_files(tmp_path)
        other = ObjectCache(tmp_path, 8 * 4200)  # starts (and sweeps) while it is written
        try:
            assert written.exists()
            theirs = small_objects(43, 6)
            await store(other, theirs)  # over the bound: evicting would need the writer's
            assert written.exists() and other.stats.evictions == 0
            assert all(other.is_complete(s.sha256, s.size) for s in mine)
            for source in mine:
                assert await other.read(source, 0, source.size) == source.data
            assert sum(s.fetches for s in mine) == 0
        finally:
            other.close()
    finally:
        writer.close()
    later = ObjectCache(tmp_path, 8 * 4200)
    try:  # the writer ended: its pack is evictable now
        await store(later, small_objects(44, 6))
        assert later.stats.evictions >= 1 and later.used_bytes() <= later.max_bytes
    finally:
        later.close()


async def test_a_crashed_writers_unnamed_pack_is_swept(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        await store(cache, small_objects(45, 3))
    finally:
        cache.close()
    [named] = pack_files(tmp_path)
    crashed = tmp_path / "packs" / "1-deadbeef0000.pack"
    crashed.write_bytes(os.urandom(9000))  # written, never named in the index
    reopened = ObjectCache(tmp_path, 64 << 20)
    try:
        assert pack_files(tmp_path) == [named]
        assert reopened.object_count() == 3 and reopened.used_bytes() == sum(
            s.size for s in small_objects(45, 3))
    finally:
        reopened.close()


async def test_a_reader_keeps_reading_a_pack_another_process_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_module, "PACK_BYTES", 1)  # each batch its own pack, closed after
    sources = small_objects(46, 3)
    reader = ObjectCache(tmp_path, 64 << 20)
    try:
        await store(reader, sources)
        reader._fresh.clear()  # read from the pack, not from memory
        assert await reader.read(sources[0], 0, 10) == sources[0].data[:10]
        dropper = ObjectCache(tmp_path, 64 << 20)
        try:
            assert dropper.drop_all() == 3 and pack_files(tmp_path) == []
        finally:
            dropper.close()
        for source in sources:  # its open pack still reads, unlinked
            assert await reader.read(source, 0, source.size) == source.data
        assert sum(s.fetches for s in sources) == 0
    finally:
        reader.close()
    fresh = ObjectCache(tmp_path, 64 << 20)
    try:
        assert fresh.used_bytes() == 0
        assert await fresh.read(sources[1], 0, sources[1].size) == sources[1].data
        assert sources[1].fetches == 1
    finally:
        fresh.close()


async def test_a_packed_object_copies_out_and_drops(tmp_path: Path) -> None:
    [source] = small_objects(47, 1)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        await store(cache, [source])
        dest = tmp_path / "copy"
        await cache.copy_to(source, dest)
        assert dest.read_bytes() == source.data and source.fetches == 0
        assert cache.drop_all() == 1 and cache.used_bytes() == 0
        assert not cache.is_complete(source.sha256, source.size)
        await store(cache, [source])  # a new pack after its own was dropped
        assert cache.is_complete(source.sha256, source.size) and len(pack_files(tmp_path)) == 1
    finally:
        cache.close()


async def test_reads_of_a_cache_the_page_cache_dropped_wait_for_the_disk_in_threads(
        tmp_path: Path) -> None:
    """A new process on a kept cache whose bytes are only on disk (a second epoch after a
    restart): its reads of packs and data files wait in worker threads, many at once, not in
    the event loop one after the other, and return the true bytes. Once read, they are
    answered in place."""
    from tests.test_file_io import evict_from_memory
    from tests.test_shared_cache import larger_objects

    small, large = small_objects(49, 30), larger_objects(49, 3)
    first = ObjectCache(tmp_path, 64 << 20)
    try:
        await store(first, small)
        for source in large:  # each fetched into its own data file
            assert await first.read(source, 0, source.size) == source.data
    finally:
        first.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            evict_from_memory(path)
    second = ObjectCache(tmp_path, 64 << 20)
    try:
        got: dict[str, bytes] = {}

        async def read(source: MemorySource) -> None:
            got[source.sha256] = await second.read(source, 0, source.size)

        async with trio.open_nursery() as nursery:
            for source in [*small, *large]:
                nursery.start_soon(read, source)
        assert got == {s.sha256: s.data for s in [*small, *large]}
        assert sum(s.fetches for s in small) == 0 and [s.fetches for s in large] == [1] * 3
        waited = second.disk_reads()
        assert second.stats.disk_reads > 0 and waited > second.stats.disk_reads  # both kinds
        for source in [*small, *large]:
            assert await second.read(source, 0, source.size) == source.data
        assert second.disk_reads() == waited
    finally:
        second.close()


async def test_the_first_read_of_a_pack_from_disk_brings_the_whole_pack_into_memory(
        tmp_path: Path) -> None:
    """A pack holds a batch of siblings, what a loader reads all of: once one of its reads
    waits for the disk, the kernel is asked to read the rest (30 MiB here, past its own
    read-ahead of a 256 KiB read), so the loader's next reads in it do not wait one by one."""
    from tests.conftest import wait_until
    from tests.test_file_io import evict_from_memory, pages_in_memory

    sources = [MemorySource(blob(50_000 + i, 256 << 10)) for i in range(120)]
    await stored_by_another_process(tmp_path, sources)
    [pack] = pack_files(tmp_path)
    evict_from_memory(pack)
    second = ObjectCache(tmp_path, 64 << 20)
    try:
        async with trio.open_nursery() as nursery:
            second.set_spawner(lambda _, work: nursery.start_soon(work))
            assert await second.read(sources[0], 0, 100) == sources[0].data[:100]
            assert second.disk_reads() == 1
        wait_until(lambda: all(pages_in_memory(pack)), timeout=15,
                   what="every page of the pack in memory")
        for source in sources[1:]:
            assert await second.read(source, 0, source.size) == source.data
        assert second.disk_reads() == 1
    finally:
        second.close()


# -- model check -------------------------------------------------------------------------------

OBJECTS = [MemorySource(blob(48_000 + i, 1000 + 97 * i)) for i in range(12)]
step = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 1),
              st.lists(st.integers(0, len(OBJECTS) - 1), min_size=1, max_size=6)),
    st.tuples(st.just("read"), st.integers(0, 1), st.integers(0, len(OBJECTS) - 1)),
    st.tuples(st.just("forget"), st.integers(0, 1), st.just(0)),  # memory copies dropped
    st.tuples(st.just("drop"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("restart"), st.integers(0, 1), st.just(0)),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=30))
# Two processes passed the bound together (each saw the other's packs as of its last look),
# and the one that restarted kept the cache over it.
@example(steps=[("store", 0, [0, 5]), ("store", 1, [6, 10]), ("restart", 0, 0),
                ("store", 0, [0])])
# The same with a data file: the second process's read of 0 made room as it saw the cache,
# and the first stored 2, 3 and 5 seeing only its own pack: 6067 > 6000 together.
@example(steps=[("store", 0, [1]), ("read", 1, 0), ("store", 0, [2, 3, 5]), ("read", 0, 0),
                ("store", 0, [0])])
def test_two_processes_on_a_tiny_cache_read_only_true_bytes(
        tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, object]]) -> None:
    root = tmp_path_factory.mktemp("packs")
    bound = 6000

    async def run() -> None:
        caches = [ObjectCache(root, bound), ObjectCache(root, bound)]
        try:
            for op, who, arg in steps:
                cache = caches[who]
                if op == "store":
                    assert isinstance(arg, list)
                    await store(cache, [OBJECTS[i] for i in arg])
                elif op == "read":
                    assert isinstance(arg, int)
                    source = OBJECTS[arg]
                    assert await cache.read(source, 0, source.size) == source.data
                elif op == "forget":
                    cache._fresh.clear()
                    cache._fresh_bytes = 0
                elif op == "drop":
                    cache.drop_all()
                else:
                    cache.close()
                    caches[who] = ObjectCache(root, bound)
                # Both processes together: what is there, within what the ledger counts
                # (exactly: one process at a time never charges a byte twice).
                assert held_bytes(root) == caches[who].used_bytes() <= bound
            for cache in caches:
                cache._fresh.clear()
                for source in OBJECTS:
                    assert await cache.read(source, 0, source.size) == source.data
                assert held_bytes(root) == cache.used_bytes() <= bound
        finally:
            for cache in caches:
                cache.close()

    trio.run(run)
