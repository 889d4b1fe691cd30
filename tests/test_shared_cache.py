"""The block cache shared between processes (mounts and ``ah://`` of one user): what one
process keeps, another reads without fetching; nobody evicts or sweeps what another has
open; a process whose view went stale (another evicted) fetches again instead of reading
holes; and a stress run of several real processes on a tiny cache reads only true bytes."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from types import ModuleType

import diskcache
import pytest
import trio
import trio.testing

from ahmount.vfs.object_cache import BLOCK, PAGE, ObjectCache, _from_raw


class MemorySource:
    """An object's bytes from memory, counting the ranged fetches the cache makes; with
    ``direct``, long runs are read into the cache's buffer in a worker thread as an HTTP
    hub's are (``read_into``), and ``between`` runs in that thread between two pieces."""

    def __init__(self, data: bytes, direct: bool = False, sha256: str | None = None,
                 between: Callable[[int], None] | None = None) -> None:
        self.data = data
        self.sha256 = sha256 or hashlib.sha256(data).hexdigest()
        self.size = len(data)
        self.fetches = 0
        self.fetched_bytes = 0
        self.reads_directly = direct
        self.direct_reads = 0
        self._between = between

    def read_into(self, start: int, end: int, buffer: memoryview,
                  consume: Callable[[memoryview, int], bool]) -> int:
        assert self.reads_directly
        self.fetches += 1
        self.direct_reads += 1
        self.fetched_bytes += end - start
        done = 0
        while done < end - start:
            if done and self._between is not None:
                self._between(done)
            n = min(len(buffer), end - start - done)
            buffer[:n] = self.data[start + done:start + done + n]
            done += n
            if not consume(buffer[:n], done - n):
                break
        return done

    @asynccontextmanager
    async def fetch(self, start: int, end: int) -> AsyncIterator[AsyncIterator[bytes]]:
        self.fetches += 1
        self.fetched_bytes += end - start

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(start, end, 256 << 10):
                yield self.data[at:min(end, at + (256 << 10))]

        # Closed with the response, as a hub's stream is, also when the cache stops early.
        async with aclosing(chunks()) as stream:
            yield stream


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def run_processes(target: Callable[..., None], args: list[tuple[object, ...]],
                  timeout: float = 120) -> None:
    """Run ``target`` in a forked process per tuple of ``args``, at once; all must exit 0."""
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=target, args=each) for each in args]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout)
    assert [w.exitcode for w in workers] == [0] * len(workers)


def held_bytes(root: Path) -> int:
    """What a cache directory holds, counted apart from its ledger: the present bytes its
    index records name, and its pack files."""
    # The cache's own settings: diskcache stores them, and its defaults would cull.
    index = diskcache.Cache(str(root / "index"), eviction_policy="none", cull_limit=0)
    try:
        records = [_from_raw(index.get(key)) for key in list(index.iterkeys())]
    finally:
        index.close()
    return sum(r.bytes_present() for r in records if r is not None) + \
        sum(p.stat().st_size for p in (root / "packs").glob("*.pack"))


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str,
                  after: int = 0, in_part: bool = False) -> Callable[[], None]:
    """Make ``module.<name>`` (the cache's ``pwritev_all``) fail with ENOSPC from its call
    ``after + 1`` on; ``in_part``: each failing call writes its first buffer first (the disk
    took part of it). Returns what gives the disk its room back."""
    real = getattr(module, name)
    calls = 0

    def full(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls > after:
            if in_part:
                real(fd, buffers[:1], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, buffers, offset)

    monkeypatch.setattr(module, name, full)
    return lambda: monkeypatch.setattr(module, name, real)


async def test_what_one_process_cached_another_reads_without_fetching(tmp_path: Path) -> None:
    source = MemorySource(blob(1, 3 * BLOCK + 5))
    first = ObjectCache(tmp_path, 64 << 20)
    first.pin(source.sha256)
    assert await first.read(source, 0, source.size) == source.data
    first.flush_index()  # what its flusher does every second while the object stays open
    second = ObjectCache(tmp_path, 64 << 20)  # opens while the first has the object open
    try:
        again = MemorySource(source.data)
        assert await second.read(again, BLOCK, 2 * BLOCK) == source.data[BLOCK:3 * BLOCK]
        assert again.fetches == 0
        assert first._path(source.sha256).exists()  # not swept as a stray
    finally:
        first.unpin(source.sha256)
        first.close()
        second.close()


async def test_a_started_process_does_not_sweep_a_file_being_written(tmp_path: Path) -> None:
    source = MemorySource(blob(2, BLOCK))
    writer = ObjectCache(tmp_path, 64 << 20)
    async with writer._leased(source.sha256):  # the file exists, the index has no record yet
        ObjectCache(tmp_path, 64 << 20).close()
        assert writer._path(source.sha256).exists()
    assert await writer.read(source, 0, 10) == source.data[:10]
    writer.close()


async def test_an_open_handle_leases_its_object_from_its_first_read(tmp_path: Path) -> None:
    """A warm open (the kernel's page cache answers its reads) costs no lease; a handle that
    reads holds one until it is closed, so no other process evicts what it reads."""
    source = MemorySource(blob(5, BLOCK))
    cache = ObjectCache(tmp_path, 64 << 20)
    cache.pin(source.sha256)
    assert not cache._path(source.sha256).exists() and source.sha256 not in cache._leases
    assert await cache.read(source, 0, 10) == source.data[:10]
    assert cache._leases[source.sha256] == 1  # the pin's lease, kept after the read
    cache.unpin(source.sha256)
    assert source.sha256 not in cache._leases
    cache.close()


async def test_nobody_evicts_what_another_has_open(tmp_path: Path) -> None:
    held = MemorySource(blob(3, 2 * BLOCK))
    reader = ObjectCache(tmp_path, 64 << 20)
    reader.pin(held.sha256)
    assert await reader.read(held, 0, held.size) == held.data
    reader.flush_index()
    small = ObjectCache(tmp_path, 3 * BLOCK)  # full already: 2 of its 3 MiB are held
    try:
        other = MemorySource(blob(4, 2 * BLOCK))
        assert await small.read(other, 0, other.size) == other.data  # served uncached
        assert small.stats.uncached_reads == 1 and small.stats.evictions == 0
        fresh = MemorySource(held.data)
        assert await reader.read(fresh, 0, held.size) == held.data and fresh.fetches == 0
    finally:
        reader.unpin(held.sha256)
        reader.close()
        small.close()


async def test_a_stale_view_fetches_again_instead_of_reading_holes(tmp_path: Path) -> None:
    victim = MemorySource(blob(5, 2 * BLOCK))
    a = ObjectCache(tmp_path, 64 << 20)
    assert await a.read(victim, 0, victim.size) == victim.data  # not open any more
    b = ObjectCache(tmp_path, 2 * BLOCK)
    try:
        newcomer = MemorySource(blob(6, 2 * BLOCK))
        assert await b.read(newcomer, 0, newcomer.size) == newcomer.data
        assert b.stats.evictions == 1 and not b._path(victim.sha256).exists()
        again = MemorySource(victim.data)
        # a still believes it has every block: its lease re-reads the index first
        assert await a.read(again, 0, victim.size) == victim.data
        assert again.fetches == 1
    finally:
        a.close()
        b.close()


async def test_a_late_remover_leaves_the_new_file_another_leases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remover opens the object's file; before it locks it, another process evicts that
    file and a third leases a new one at the same path. The late remover's lock then holds a
    dead file: it must not unlink the new one nor delete its record (the reader's blocks
    would land in an unlinked file, and the next process would fetch them again, or read a
    record that lists blocks its file lacks)."""
    import ahmount.vfs.object_cache as module

    source = MemorySource(blob(8, 2 * BLOCK + 11))
    evictor = ObjectCache(tmp_path, 64 << 20)
    reader = ObjectCache(tmp_path, 64 << 20)
    late = ObjectCache(tmp_path, 64 << 20)
    real_flock = module.fcntl.flock
    interleaved: list[bool] = []

    def flock(fd: int, operation: int) -> None:
        if operation == module.fcntl.LOCK_EX | module.fcntl.LOCK_NB and not interleaved:
            interleaved.append(True)  # late has the old file open: the others go first
            assert evictor.drop_all() == 1
            reader._acquire(source.sha256)  # leases (and creates) the new file
        real_flock(fd, operation)

    try:
        assert await evictor.read(source, 0, source.size) == source.data
        monkeypatch.setattr(module.fcntl, "flock", flock)
        late._drop(source.sha256)
        monkeypatch.setattr(module.fcntl, "flock", real_flock)
        assert interleaved
        assert await reader.read(source, 0, source.size) == source.data
        reader._release(source.sha256)
        assert reader._path(source.sha256).exists()
        fresh = ObjectCache(tmp_path, 64 << 20)
        try:
            again = MemorySource(source.data)
            assert await fresh.read(again, 0, source.size) == source.data
            assert again.fetches == 0
        finally:
            fresh.close()
    finally:
        for cache in (evictor, reader, late):
            cache.close()


OBJECTS = [(seed, 300_000 + seed * 97_531) for seed in range(12)]


def _stress(root: str, seed: int, rounds: int) -> None:
    async def main() -> None:
        cache = ObjectCache(Path(root), 3 * BLOCK)  # far smaller than the 12 objects
        rng = random.Random(seed)
        # Half the processes read long runs as an HTTP hub's are read (in a thread).
        sources = [MemorySource(blob(s, n), direct=seed % 2 == 0) for s, n in OBJECTS]
        try:
            for _ in range(rounds):
                source = rng.choice(sources)
                start = rng.randrange(source.size)
                length = rng.randrange(1, 2 * BLOCK)
                pin = rng.random() < 0.3
                if pin:
                    cache.pin(source.sha256)
                try:
                    if rng.random() < 0.4:  # a random reader's: pages, learned from the others
                        length = min(length, 3 * PAGE)
                        got = await cache.read_pages(source, start, length)
                    else:
                        got = await cache.read(source, start, length)
                    assert got == source.data[start:start + length], "wrong bytes"
                finally:
                    if pin:
                        cache.unpin(source.sha256)
                if rng.random() < 0.05:
                    cache.drop_all()
        finally:
            cache.close()

    trio.run(main)


def test_processes_sharing_a_tiny_cache_read_only_true_bytes(tmp_path: Path) -> None:
    run_processes(_stress, [(str(tmp_path), seed, 150) for seed in range(4)])
    # The four together, not each: every byte was charged to the shared ledger before it was
    # written, and the ledger never passes the bound. (It may count more than is there: two
    # processes fetching the same block into the same file both charge it.)
    counted = held_bytes(tmp_path)
    leftover = ObjectCache(tmp_path, 3 * BLOCK)  # alone: sets the count to what is there
    try:
        assert counted <= 3 * BLOCK
        assert leftover.used_bytes() == counted
    finally:
        leftover.close()


async def test_a_range_read_fetches_its_bytes_and_keeps_its_whole_blocks(
        tmp_path: Path) -> None:
    source = MemorySource(blob(7, 5 * BLOCK))
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        start, size = BLOCK // 2, 3 * BLOCK
        assert await cache.read_range(source, start, size) == source.data[start:start + size]
        assert source.fetches == 1 and cache.stats.bytes_fetched == size  # not 4 blocks
        record = cache._records[source.sha256]
        assert [record.has(b) for b in range(5)] == [False, True, True, False, False]
        assert await cache.read_range(source, BLOCK + 7, BLOCK) == \
            source.data[BLOCK + 7:2 * BLOCK + 7]
        assert source.fetches == 1  # inside the kept blocks
        tail = source.size - BLOCK - 3
        assert await cache.read_range(source, tail, 10 * BLOCK) == source.data[tail:]
        # the object's last block counts as whole at its end (the record is re-read: the
        # first read's lease ended)
        assert cache._records[source.sha256].has(4)
    finally:
        cache.close()


async def test_an_object_fetched_whole_arrives_verified_without_a_second_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed as it is written (same thread hand-offs): no read-back of the file."""
    import ahmount.vfs.object_cache as module

    def no_read_back(path: Path, stop: object = None) -> tuple[str, int]:
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(module, "hash_file", no_read_back)
    source = MemorySource(blob(6, 3 * BLOCK + 17))
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await cache.read(source, 0, source.size) == source.data
        assert cache._records[source.sha256].verified and source.fetches == 1
    finally:
        cache.close()


async def test_a_large_object_is_verified_once_however_many_reads_ask(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object too large to hash before its last read is hashed in the background once
    it is whole. Every read of it until then asks for that check; the reads that come
    before the first check has started must not start more (each is a whole read-back of
    the file: 1 GiB read cold hashed twice over, 0.6 s of CPU each, while it was read)."""
    import ahmount.vfs.object_cache as module

    hashed: list[Path] = []
    real = module.hash_file

    def counted(path: Path, stop: Callable[[], bool] | None = None) -> tuple[str, int]:
        hashed.append(path)
        return real(path, stop)

    monkeypatch.setattr(module, "hash_file", counted)
    monkeypatch.setattr(module, "VERIFY_INLINE", BLOCK)
    source = MemorySource(blob(8, 3 * BLOCK + 5))
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        async with trio.open_nursery() as nursery:
            cache.set_spawner(lambda name, work: nursery.start_soon(work))
            for block in range(4):  # the object whole, then read again and again
                await cache.read(source, block * BLOCK, BLOCK)
            for _ in range(5):
                assert await cache.read(source, 0, 4096) == source.data[:4096]
        assert len(hashed) == 1
        assert cache._records[source.sha256].verified
    finally:
        cache.close()


@pytest.mark.parametrize("direct", [False, True], ids=["streamed", "direct"])
async def test_random_reads_fetch_pages_and_keep_them(tmp_path: Path, direct: bool) -> None:
    """A 4 KiB read at a random offset fetches its 64 KiB page, not the 1 MiB block; pages
    are kept, and a block whose pages all came becomes whole (and the object verified when
    every block is here). From a hub behind a socket, pages are read in a worker thread
    (``read_into``) as runs are."""

    # The last block is short.
    source = MemorySource(blob(7, 2 * BLOCK + 3 * PAGE + 100), direct=direct)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        cache.pin(source.sha256)
        at = BLOCK + 5 * PAGE + 1000
        assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
        assert source.fetched_bytes == PAGE and cache.used_bytes() == PAGE
        assert await cache.read_pages(source, at + 8192, 4096) == \
            source.data[at + 8192:at + 12288]
        assert source.fetches == 1  # the same page: kept
        edge = BLOCK - 2048  # straddles two blocks: two pages in one request
        assert await cache.read_pages(source, edge, 4096) == source.data[edge:edge + 4096]
        assert source.fetches == 2 and source.fetched_bytes == 3 * PAGE
        for page in range(-(-source.size // PAGE)):  # every page, one by one
            off = page * PAGE
            assert await cache.read_pages(source, off, 10) == source.data[off:off + 10]
        record = cache._records[source.sha256]
        assert record.complete() and record.pages == {} and record.verified
        assert cache.used_bytes() == source.size
        assert source.fetched_bytes == source.size  # nothing fetched twice
        assert source.direct_reads == (source.fetches if direct else 0)
        cache.unpin(source.sha256)
        assert await cache.read(source, 0, source.size) == source.data  # a whole read: hits
        assert source.fetched_bytes == source.size
    finally:
        cache.close()


async def test_pages_are_shared_with_other_processes_and_counted_after_a_lease(
        tmp_path: Path) -> None:

    source = MemorySource(blob(8, 4 * BLOCK))
    first = ObjectCache(tmp_path, 64 << 20)
    at = 2 * BLOCK + 3 * PAGE
    assert await first.read_pages(source, at, 4096) == source.data[at:at + 4096]
    assert first.used_bytes() == PAGE  # the lease is over: still counted, still on disk
    second = ObjectCache(tmp_path, 64 << 20)  # another process, started afterwards
    assert second.used_bytes() == PAGE
    assert await second.read_pages(source, at + 100, 4096) == source.data[at + 100:at + 4196]
    assert source.fetches == 1  # the page the first one fetched
    first.close()
    second.close()


async def test_a_process_holding_an_object_learns_the_pages_another_fetched_meanwhile(
        tmp_path: Path) -> None:
    """Both processes hold the object open throughout: what one fetches and records while
    the other holds it is read by the other without fetching (a miss looks at the shared
    index again whenever another process has written to it since its last look)."""

    source = MemorySource(blob(9, 4 * BLOCK))
    first, second = ObjectCache(tmp_path, 64 << 20), ObjectCache(tmp_path, 64 << 20)
    first.pin(source.sha256)
    second.pin(source.sha256)
    try:
        assert await second.read_pages(source, 0, 10) == source.data[:10]  # its record read
        for n, at in enumerate((BLOCK + 5 * PAGE, 3 * BLOCK + PAGE)):
            assert await first.read_pages(source, at, 4096) == source.data[at:at + 4096]
            first.flush_index()
            assert await second.read_pages(source, at + 8, 4096) == \
                source.data[at + 8:at + 4104]
            assert source.fetches == 2 + n  # second's first page, then first's pages only
        assert await second.read_pages(source, 2 * BLOCK, 10) == \
            source.data[2 * BLOCK:2 * BLOCK + 10]
        assert source.fetches == 4  # nobody had that one
    finally:
        first.unpin(source.sha256)
        second.unpin(source.sha256)
        first.close()
        second.close()


async def test_a_block_fetched_whole_over_kept_pages_is_counted_once(tmp_path: Path) -> None:

    source = MemorySource(blob(9, 2 * BLOCK))
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await cache.read_pages(source, BLOCK + PAGE, 10) == \
            source.data[BLOCK + PAGE:BLOCK + PAGE + 10]
        assert await cache.read(source, 0, source.size) == source.data  # blocks, whole
        assert cache.used_bytes() == source.size
        assert cache._records[source.sha256].pages == {}
    finally:
        cache.close()


@pytest.mark.parametrize("direct", [False, True], ids=["streamed", "direct"])
async def test_a_full_disk_serves_random_reads_from_the_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """Pages share the block path's write: a disk that is full under the cache answers the
    read from what arrived (not EIO), and keeps nothing."""
    import ahmount.vfs.object_cache as module

    fill_the_disk(monkeypatch, module, "_pwritev_all")
    source = MemorySource(blob(10, 2 * BLOCK), direct=direct)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        at = BLOCK + 3 * PAGE + 7
        assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
        assert cache.used_bytes() == 0 and cache.stats.uncached_reads == 1
        assert source.fetches == 1  # the bytes that arrived answered the read
    finally:
        cache.close()


@pytest.mark.parametrize("direct", [False, True], ids=["streamed", "direct"])
async def test_a_random_read_with_no_room_in_the_cache_still_answers(
        tmp_path: Path, direct: bool) -> None:
    """A page that does not fit the cache's bound (everything else in use) is read from the
    hub and answered, uncounted and unkept, and the next read of it asks the hub again."""

    source = MemorySource(blob(12, 2 * BLOCK), direct=direct)
    cache = ObjectCache(tmp_path, PAGE // 2)  # not even one page fits
    try:
        at = BLOCK + 5 * PAGE + 11
        for fetches in (1, 2):
            assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
            assert source.fetches == fetches and cache.used_bytes() == 0
        assert cache.stats.uncached_reads == 2
    finally:
        cache.close()


async def test_a_random_reader_gets_the_rest_of_the_object_fetched_behind_it(
        tmp_path: Path) -> None:
    """After FILL_AFTER random misses, the object is fetched whole in the background in runs
    (the pages already here are not fetched again as pages; their blocks come whole), and
    reads are then local. Reads keep answering while it fills."""
    from ahmount.vfs.object_cache import FILL_AFTER, FILL_RUN, PAGE

    source = MemorySource(blob(11, (FILL_RUN + 3) * BLOCK + 77))
    cache = ObjectCache(tmp_path, 4 * source.size)
    rng = random.Random(3)
    try:
        async with trio.open_nursery() as nursery:
            cache.set_spawner(lambda name, fn: nursery.start_soon(fn, name=name))
            offsets = [rng.randrange(0, source.size - 4096) for _ in range(FILL_AFTER + 8)]
            for at in offsets:
                assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
        # The nursery has waited for the fill.
        assert cache.is_complete(source.sha256, source.size)
        assert cache.stats.fills == 1 and cache._records[source.sha256].verified
        assert source.fetched_bytes <= source.size + len(offsets) * 2 * PAGE
        fetches = source.fetches
        for at in offsets:
            assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
        assert source.fetches == fetches  # every read local now
        assert cache.used_bytes() == source.size
    finally:
        cache.close()


class _RunsAtOnce(MemorySource):
    """Counts the fetches in flight at once (each yields between its chunks); with
    ``fail_at``, the fetch of whole blocks (a fill's run, not a reader's pages) starting at
    that block fails as a dead hub's."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.in_flight = self.most_in_flight = self.failed = 0
        self._fail_at = fail_at

    @asynccontextmanager
    async def fetch(self, start: int, end: int) -> AsyncIterator[AsyncIterator[bytes]]:
        from ahmount.errors import HubUnavailable

        if self._fail_at is not None and start == self._fail_at * BLOCK and \
                end - start >= BLOCK:
            self.failed += 1
            raise HubUnavailable("the hub went away")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with super().fetch(start, end) as chunks:
                async def slow() -> AsyncIterator[bytes]:
                    async for chunk in chunks:
                        await trio.sleep(0)
                        yield chunk

                async with aclosing(slow()) as stream:
                    yield stream
        finally:
            self.in_flight -= 1


async def _fill_by_random_reads(cache: ObjectCache, source: MemorySource) -> None:
    from ahmount.vfs.object_cache import FILL_AFTER

    rng = random.Random(5)
    async with trio.open_nursery() as nursery:
        cache.set_spawner(lambda name, fn: nursery.start_soon(fn, name=name))
        for _ in range(FILL_AFTER):
            at = rng.randrange(0, source.size - 4096)
            assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]


async def test_a_fill_runs_several_streams_and_fetches_each_block_once(
        tmp_path: Path) -> None:
    """The runs of a fill are shared by FILL_STREAMS streams in flight at once (a fill that
    ends sooner leaves more random reads local), and no run is fetched twice."""
    from ahmount.vfs.object_cache import FILL_AFTER, FILL_RUN, FILL_STREAMS, PAGE

    source = _RunsAtOnce(blob(17, (2 * FILL_STREAMS * FILL_RUN + 5) * BLOCK + 11))
    cache = ObjectCache(tmp_path, 4 * source.size)
    try:
        await _fill_by_random_reads(cache, source)
        assert cache.is_complete(source.sha256, source.size)
        assert cache._records[source.sha256].verified and cache.stats.fills == 1
        assert source.most_in_flight == FILL_STREAMS
        assert source.fetched_bytes <= source.size + FILL_AFTER * 2 * PAGE
        assert cache.used_bytes() == source.size
    finally:
        cache.close()


async def test_a_fill_whose_hub_fails_stops_every_stream_quietly(tmp_path: Path) -> None:
    """A failed fetch ends the whole fill (logged, never an error of anyone's): the other
    streams stop too, rather than fetch the rest of an object the hub fails on; the object
    can be filled again later."""
    from ahmount.vfs.object_cache import FILL_AFTER, FILL_RUN, FILL_STREAMS, PAGE

    runs = 4 * FILL_STREAMS
    source = _RunsAtOnce(blob(18, runs * FILL_RUN * BLOCK), fail_at=FILL_RUN)
    cache = ObjectCache(tmp_path, 4 * source.size)
    try:
        await _fill_by_random_reads(cache, source)  # the nursery ends: nothing escaped
        assert cache.stats.fills == 1 and not cache.is_complete(source.sha256, source.size)
        assert source.failed == 1 and not cache._filling  # another fill may start later
        # The runs in flight when it failed, at most: not the rest of the object.
        assert source.fetched_bytes <= FILL_STREAMS * FILL_RUN * BLOCK + FILL_AFTER * 2 * PAGE
    finally:
        cache.close()


async def test_a_random_reader_of_an_object_too_big_to_fill_only_fetches_pages(
        tmp_path: Path) -> None:
    """An object over a quarter of the cache's bound is never filled (a few reads of a huge
    file must not evict everything else)."""
    from ahmount.vfs.object_cache import FILL_AFTER, PAGE

    source = MemorySource(blob(12, 4 * BLOCK))
    cache = ObjectCache(tmp_path, 12 * BLOCK)
    try:
        await _miss_every_other_page(cache, source, FILL_AFTER * 2)
        assert cache.stats.fills == 0 and not cache.is_complete(source.sha256, source.size)
        assert source.fetched_bytes == FILL_AFTER * 2 * PAGE
    finally:
        cache.close()


async def test_a_fill_limit_of_zero_fetches_only_what_is_read(tmp_path: Path) -> None:
    """``ah-mount --fill-random off``: random misses never start a fill."""
    from ahmount.vfs.object_cache import FILL_AFTER, PAGE

    source = MemorySource(blob(16, 4 * BLOCK))
    cache = ObjectCache(tmp_path, 64 << 20)
    cache.fill_limit = 0
    try:
        await _miss_every_other_page(cache, source, FILL_AFTER * 2)
        assert cache.stats.fills == 0 and source.fetched_bytes == FILL_AFTER * 2 * PAGE
    finally:
        cache.close()


async def _miss_every_other_page(cache: ObjectCache, source: MemorySource, count: int) -> None:
    """``count`` random-path reads of distinct pages (every other one), with background work
    started in a nursery that is waited for: any fill they start has finished on return."""

    async with trio.open_nursery() as nursery:
        cache.set_spawner(lambda name, fn: nursery.start_soon(fn, name=name))
        for page in range(count):
            at = page * PAGE * 2 % source.size
            assert await cache.read_pages(source, at, 100) == source.data[at:at + 100]


async def test_a_run_read_directly_is_kept_whole_and_verified_as_it_arrives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ahmount.vfs.object_cache as module

    def no_read_back(path: Path, stop: object = None) -> tuple[str, int]:
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(module, "hash_file", no_read_back)
    source = MemorySource(blob(20, 9 * BLOCK + 3), direct=True)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await cache.read(source, 0, source.size) == source.data
        record = cache._records[source.sha256]
        assert source.direct_reads == 1 and record.complete() and record.verified
        assert cache.used_bytes() == source.size == cache.stats.bytes_fetched
        short = MemorySource(blob(21, BLOCK // 2), direct=True)  # under a block: streamed
        assert await cache.read(short, 0, 10) == short.data[:10]
        assert (short.direct_reads, short.fetches) == (0, 1)
    finally:
        cache.close()


@asynccontextmanager
async def a_run_held_back(tmp_path: Path, seed: int) -> AsyncIterator[
        tuple[MemorySource, ObjectCache, Callable[[], Awaitable[None]]]]:
    """A cache fetching a 12-block object in one direct run (``ensure`` of every block),
    whose hub has sent the first piece and holds back the rest until ``release()``, which
    returns once the run has ended. The cache is closed on the way out."""
    at_hold, go_on = threading.Event(), threading.Event()

    def hold(done: int) -> None:
        # Only ``release()`` (or leaving the block) ends the hold: a timeout would let the
        # run go on under a slow machine and the blocks a test reads as missing arrive.
        at_hold.set()
        go_on.wait()

    source = MemorySource(blob(seed, 12 * BLOCK), direct=True, between=hold)
    cache = ObjectCache(tmp_path, 64 << 20)
    cache.pin(source.sha256)
    ended = trio.Event()

    async def run() -> None:
        await cache.ensure(source, 0, 11)
        ended.set()

    async def release() -> None:
        go_on.set()
        await ended.wait()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                # The run's thread may start late: wait until the hub has sent its first
                # piece (and counted its fetch), then until that piece is marked present.
                assert await trio.to_thread.run_sync(at_hold.wait, 30)
                await trio.testing.wait_all_tasks_blocked()
                yield source, cache, release
            finally:
                go_on.set()
    finally:
        cache.unpin(source.sha256)
        cache.close()


async def test_readers_of_a_run_read_directly_go_on_as_its_first_pieces_arrive(
        tmp_path: Path) -> None:
    """A long read-ahead run does not hold up the reader of its first blocks: each piece
    is marked present (and its waiters woken) as it is written."""
    from ahmount.vfs.object_cache import WRITE_BATCH

    async with a_run_held_back(tmp_path, 22) as (source, cache, release):
        with trio.fail_after(10):  # not marked until the run ended: never answered
            assert await cache.read(source, 5, 100) == source.data[5:105]
        assert source.fetches == 1  # the reader waited for the run, fetched nothing
        record = cache._records[source.sha256]
        assert not record.complete()  # the rest is still held back by the hub
        assert all(record.has(b) for b in range(WRITE_BATCH // BLOCK))
        await release()
        assert cache._records[source.sha256].complete() and source.direct_reads == 1
        assert cache.used_bytes() == source.size


async def test_a_random_read_of_blocks_being_fetched_whole_does_not_wait_for_them(
        tmp_path: Path) -> None:
    """A fill fetches blocks in runs of 16 MiB; a random reader whose block was in one got
    its bytes only once the run's 4 MiB piece holding it was written (40 ms from a hub
    sending 100 MB/s). It now asks for its page on its own, and keeps nothing of it."""
    async with a_run_held_back(tmp_path, 23) as (source, cache, release):
        at = 10 * BLOCK + 3 * PAGE + 5  # a block the hub has not sent yet
        with trio.fail_after(5):
            assert await cache.read_pages(source, at, 4096) == source.data[at:at + 4096]
        assert source.fetches == 2  # the run, and the page
        record = cache._records[source.sha256]
        assert not record.has(10) and 10 not in record.pages  # the run will hold it
        await release()
        assert cache._records[source.sha256].complete()
        assert cache.used_bytes() == source.size  # the page was never counted


async def test_a_run_read_directly_never_waits_for_the_trio_thread(tmp_path: Path) -> None:
    """The thread posts each piece to be marked and reads on: a trio thread busy answering
    the kernel must not stall the hub's stream (its sends stop while nobody reads)."""
    all_read = threading.Event()

    class Source(MemorySource):
        def read_into(self, start: int, end: int, buffer: memoryview,
                      consume: Callable[[memoryview, int], bool]) -> int:
            done = super().read_into(start, end, buffer, consume)
            all_read.set()
            return done

    source = Source(blob(27, 12 * BLOCK), direct=True)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.ensure, source, 0, 11)
            await trio.testing.wait_all_tasks_blocked()  # the run is in its thread
            assert all_read.wait(10)  # the trio thread is blocked here, the reads went on
        assert cache._records[source.sha256].complete()
        assert cache.used_bytes() == source.size
    finally:
        cache.close()


async def test_a_run_read_directly_stops_when_its_reader_is_cancelled(tmp_path: Path) -> None:
    """The worker thread stops at the next piece; what arrived stays, nothing else counts."""
    from ahmount.vfs.object_cache import WRITE_BATCH

    first_piece, go_on = threading.Event(), threading.Event()

    def between(done: int) -> None:
        first_piece.set()
        go_on.wait(10)

    source = MemorySource(blob(23, 12 * BLOCK), direct=True, between=between)
    cache = ObjectCache(tmp_path, 64 << 20)
    cache.pin(source.sha256)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cache.ensure, source, 0, 11)
                await trio.to_thread.run_sync(first_piece.wait, 10)
                scope.cancel()  # the thread cannot be interrupted: it sees it next piece
                go_on.set()
        assert scope.cancelled_caught
        record = cache._records[source.sha256]
        pieces = WRITE_BATCH // BLOCK
        assert [record.has(b) for b in range(12)] == [b < pieces for b in range(12)]
        assert cache.used_bytes() == WRITE_BATCH and not cache._inflight
        assert await cache.read(source, 11 * BLOCK, 10) == source.data[11 * BLOCK:][:10]
    finally:
        go_on.set()
        cache.unpin(source.sha256)
        cache.close()


async def test_a_corrupt_object_read_directly_is_not_kept(tmp_path: Path) -> None:
    from ahmount.errors import ChecksumMismatch

    data = blob(24, 3 * BLOCK)
    source = MemorySource(data, direct=True, sha256=hashlib.sha256(b"other").hexdigest())
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        with pytest.raises(ChecksumMismatch):
            await cache.read(source, 0, source.size)
        assert cache.used_bytes() == 0 and not cache._inflight
        record = cache._records.get(source.sha256)
        assert record is None or not record.blocks
    finally:
        cache.close()


async def test_a_short_run_read_directly_is_an_error_and_keeps_what_came(
        tmp_path: Path) -> None:
    class ShortSource(MemorySource):
        def read_into(self, start: int, end: int, buffer: memoryview,
                      consume: Callable[[memoryview, int], bool]) -> int:
            return super().read_into(start, min(end, start + len(buffer)), buffer, consume)

    source = ShortSource(blob(25, 12 * BLOCK), direct=True)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        with pytest.raises(OSError, match="short range"):
            await cache.ensure(source, 0, 11)
        assert cache.used_bytes() == cache._records[source.sha256].bytes_present() > 0
        assert not cache._inflight
    finally:
        cache.close()


async def test_a_full_disk_under_a_run_read_directly_reads_from_the_hub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ahmount.vfs.object_cache as module

    fill_the_disk(monkeypatch, module, "_pwritev_all")
    source = MemorySource(blob(26, 3 * BLOCK), direct=True)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await cache.read(source, 10, 2 * BLOCK) == source.data[10:10 + 2 * BLOCK]
        assert cache.used_bytes() == 0 and cache.stats.uncached_reads == 1
    finally:
        cache.close()


def small_objects(seed: int, count: int) -> list[MemorySource]:
    return [MemorySource(blob(seed * 1000 + i, 4096 + i)) for i in range(count)]


def larger_objects(seed: int, count: int) -> list[MemorySource]:
    """Objects too large for a pack, small enough for a batch."""
    return [MemorySource(blob(seed * 1000 + i, (300 << 10) + i)) for i in range(count)]


async def test_a_full_disk_under_a_pack_keeps_the_batches_written_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ahmount.vfs.object_packs as packs

    # After the first batch, a part reaches the disk, then it is full.
    room_again = fill_the_disk(monkeypatch, packs, "pwritev_all", after=1, in_part=True)
    kept, lost = small_objects(35, 5), small_objects(36, 5)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        await cache.store([(s.sha256, s.data) for s in kept])
        await cache.store([(s.sha256, s.data) for s in lost])
        assert [cache.is_complete(s.sha256, s.size) for s in kept + lost] == \
            [True] * 5 + [False] * 5
        # Counted: what is on disk, the part of the second batch the disk took included
        # (it stays in the pack file, named by no row, until the pack is evicted).
        assert cache.used_bytes() == sum(s.size for s in kept) + lost[0].size == \
            sum(p.stat().st_size for p in (tmp_path / "packs").glob("*.pack"))
        for source in kept + lost:  # this process has them all in memory still
            assert await cache.read(source, 0, source.size) == source.data
        assert sum(s.fetches for s in kept + lost) == 0
    finally:
        cache.close()
    room_again()
    other = ObjectCache(tmp_path, 64 << 20)
    try:
        for source in kept + lost:
            assert await other.read(source, 0, source.size) == source.data
        assert [s.fetches for s in kept + lost] == [0] * 5 + [1] * 5
        await other.store([(s.sha256, s.data) for s in small_objects(37, 3)])
        assert all(other.is_complete(s.sha256, s.size) for s in small_objects(37, 3))
    finally:
        other.close()


async def test_a_stored_batch_is_whole_verified_and_shared(tmp_path: Path) -> None:
    """Small objects kept from a batch read are complete, in one pack named by the shared
    index (another process reads them without a fetch), with no data file and no lease."""
    sources = small_objects(30, 20)
    first = ObjectCache(tmp_path, 64 << 20)
    try:
        await first.store([(s.sha256, s.data) for s in sources])
        assert first.used_bytes() == sum(s.size for s in sources)
        assert not first._leases and not first._lease_fds
        assert all(first.is_complete(s.sha256, s.size) for s in sources)
        assert list((tmp_path / "data").glob("*/*")) == []
        assert len(list((tmp_path / "packs").glob("*.pack"))) == 1
        await first.store([(s.sha256, s.data) for s in sources[:3]])  # here: kept once
        assert first.used_bytes() == sum(s.size for s in sources)
        assert first.object_count() == len(sources)
    finally:
        first.close()
    second = ObjectCache(tmp_path, 64 << 20)
    try:
        for source in sources:
            assert await second.read(source, 0, source.size) == source.data
        assert sum(s.fetches for s in sources) == 0
        assert second.used_bytes() == sum(s.size for s in sources)
    finally:
        second.close()


async def test_a_full_disk_in_a_stored_batch_keeps_what_was_written_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ahmount.vfs.object_cache as module

    room_again = fill_the_disk(monkeypatch, module, "_pwritev_all", after=5)
    sources = larger_objects(31, 12)  # each its own data file (small ones are packed)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        await cache.store([(s.sha256, s.data) for s in sources])
        kept = [cache.is_complete(s.sha256, s.size) for s in sources]
        assert kept == [True] * 5 + [False] * 7
        assert cache.used_bytes() == sum(s.size for s in sources[:5])
        assert not cache._leases and not cache._lease_fds
        files = {p.name for p in (tmp_path / "data").glob("*/*")}
        assert files == {s.sha256 for s in sources[:5]}  # the one cut short was removed
        for source in sources:  # this process has them all in memory still
            assert await cache.read(source, 0, source.size) == source.data
        assert sum(s.fetches for s in sources) == 0
    finally:
        cache.close()
    room_again()
    other = ObjectCache(tmp_path, 64 << 20)
    try:
        for source in sources:  # another process fetches what was not kept
            assert await other.read(source, 0, source.size) == source.data
        assert [s.fetches for s in sources] == [0] * 5 + [1] * 7
    finally:
        other.close()


async def test_storing_an_object_being_read_keeps_the_readers_lease(tmp_path: Path) -> None:
    [source] = small_objects(32, 1)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        cache._acquire(source.sha256)  # a reader holds it, nothing of it here yet
        fd = cache._lease_fds[source.sha256]
        await cache.store([(source.sha256, source.data)])
        assert cache._leases[source.sha256] == 1 and cache._lease_fds[source.sha256] == fd
        assert await cache.read(source, 0, source.size) == source.data
        assert source.fetches == 0
        cache._release(source.sha256)
        assert not cache._leases and cache.is_complete(source.sha256, source.size)
    finally:
        cache.close()


async def test_a_stored_object_is_read_from_memory_until_read_to_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first read of an object kept from a batch takes no lease: it is answered from
    memory (bounded by FRESH_BYTES), and forgotten there once read to its end."""
    import ahmount.vfs.object_cache as module

    [source] = small_objects(33, 1)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        await cache.store([(source.sha256, source.data)])
        leases = []
        real_acquire = cache._acquire
        monkeypatch.setattr(cache, "_acquire", lambda sha: (leases.append(sha),
                                                            real_acquire(sha))[-1])
        assert await cache.read(source, 0, 100) == source.data[:100]
        assert await cache.read(source, 100, source.size) == source.data[100:]
        assert leases == [] and source.sha256 not in cache._fresh
        assert await cache.read(source, 0, source.size) == source.data  # from its pack now
        assert leases == [] and source.fetches == 0
        monkeypatch.setattr(module, "FRESH_BYTES", 10 * 4200)
        many = small_objects(34, 30)
        await cache.store([(s.sha256, s.data) for s in many])
        assert cache._fresh_bytes <= 10 * 4200
        assert set(cache._fresh) == {s.sha256 for s in many[-len(cache._fresh):]}
    finally:
        cache.close()


async def test_a_small_object_here_is_read_whole_without_asking_the_hub(
        tmp_path: Path) -> None:
    """``read_if_here`` (what a mount hands its kernel at open): all of a small object kept
    in memory or in a pack, this process's or another's, counted as a hit; None, with
    nothing fetched and nothing waited for, for one not here, one being fetched, one too
    large for a pack and an empty one."""
    sources = small_objects(35, 3)
    [large] = larger_objects(36, 1)
    cache = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await cache.read_if_here(sources[0]) is None
        await cache.store([(s.sha256, s.data) for s in [*sources[:2], large]])
        hits = cache.stats.hits
        assert await cache.read_if_here(sources[0]) == sources[0].data  # from memory
        assert sources[0].sha256 not in cache._fresh
        assert await cache.read_if_here(sources[0]) == sources[0].data  # from its pack
        assert cache.stats.hits == hits + 2
        assert cache.claim([(sources[2].sha256, sources[2].size)]) == [sources[2].sha256]
        with trio.fail_after(5):
            assert await cache.read_if_here(sources[2]) is None
        cache.settle([sources[2].sha256])
        assert cache.is_complete(large.sha256, large.size)
        assert await cache.read_if_here(large) is None
        assert await cache.read_if_here(MemorySource(b"")) is None
        assert sum(s.fetches for s in [*sources, large]) == 0
    finally:
        cache.close()
    other = ObjectCache(tmp_path, 64 << 20)
    try:
        assert await other.read_if_here(sources[1]) == sources[1].data
        assert sources[1].fetches == 0
    finally:
        other.close()
