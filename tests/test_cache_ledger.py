"""The shared byte count of a cache directory (``ahmount.vfs.cache_ledger``): a charge past the
bound is refused and counts nothing; credits never take it below zero; the first opener of a
directory nobody has open sets it to what is there (a crash's leftovers), later openers keep
it; a process killed -9 between a charge and its write is counted again by the next one
alone; and through the object cache, several processes on one directory stay within one bound
together (DataLoader workers each opening the cache of one user)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import trio

from ahmount.vfs.cache_ledger import CacheLedger
from ahmount.vfs.object_cache import ObjectCache
from tests.test_shared_cache import MemorySource, blob, held_bytes, run_processes


def test_a_charge_past_the_bound_is_refused_and_counts_nothing(tmp_path: Path) -> None:
    ledger = CacheLedger(tmp_path, 100, lambda: 0)
    try:
        assert ledger.charge(60) and ledger.charge(40) and ledger.used() == 100
        assert not ledger.charge(1) and ledger.used() == 100
        assert ledger.charge(0)  # at the bound, nothing more: still fits
        ledger.credit(30)
        assert not ledger.charge(31) and ledger.charge(30) and ledger.used() == 100
    finally:
        ledger.close()


def test_credits_never_take_the_count_below_zero(tmp_path: Path) -> None:
    ledger = CacheLedger(tmp_path, 100, lambda: 0)
    try:
        ledger.charge(10)
        ledger.credit(25)
        ledger.credit(-5)  # nothing to credit: ignored, not a charge
        assert ledger.used() == 0
    finally:
        ledger.close()


def test_the_first_opener_sets_the_count_and_later_ones_keep_it(tmp_path: Path) -> None:
    first = CacheLedger(tmp_path, 1000, lambda: 70)  # alone: what is there
    try:
        assert first.used() == 70
        first.charge(30)
        # Open meanwhile: a measure now would miss what the first is writing.
        second = CacheLedger(tmp_path, 1000, lambda: 5)
        try:
            assert second.used() == 100
            assert not second.charge(901) and first.used() == 100
        finally:
            second.close()
    finally:
        first.close()
    # A process that charged and died before writing left the count too high: the next
    # process alone on the directory counts what is there again.
    again = CacheLedger(tmp_path, 1000, lambda: 64)
    try:
        assert again.used() == 64
    finally:
        again.close()


def test_a_smaller_bound_than_the_count_is_brought_under_at_open(tmp_path: Path) -> None:
    sources = [MemorySource(blob(60 + i, 3000)) for i in range(4)]

    async def run() -> None:
        cache = ObjectCache(tmp_path, 64 << 20)
        try:
            await cache.store([(s.sha256, s.data) for s in sources[:2]])
            for source in sources[2:]:  # data files, through the block path
                assert await cache.read(source, 0, source.size) == source.data
            assert cache.used_bytes() == 4 * 3000 == held_bytes(tmp_path)
        finally:
            cache.close()
        smaller = ObjectCache(tmp_path, 7000)
        try:
            assert held_bytes(tmp_path) == smaller.used_bytes() <= 7000
            assert smaller.stats.evictions >= 1
        finally:
            smaller.close()

    trio.run(run)


def _store_distinct(root: str, seed: int, started: multiprocessing.synchronize.Barrier
                    ) -> None:
    async def main() -> None:
        cache = ObjectCache(Path(root), 40_000)
        try:
            started.wait()  # all open before any stores: each sees an empty cache
            for i in range(20):
                source = MemorySource(blob(seed * 100 + i, 3000 + i))
                if i % 2:
                    await cache.store([(source.sha256, source.data)])
                else:
                    assert await cache.read(source, 0, source.size) == source.data
                assert cache.used_bytes() <= 40_000
        finally:
            cache.close()

    trio.run(main)


def test_processes_storing_at_once_stay_within_one_bound_together(tmp_path: Path) -> None:
    # Four processes each want 60 KB of a 40 KB cache: each alone would fit 40 KB, and each
    # seeing only its own objects (as of its last look at the index) let them hold 160 KB.
    started = multiprocessing.get_context("fork").Barrier(4)
    run_processes(_store_distinct, [(str(tmp_path), seed, started) for seed in range(4)])
    counted = held_bytes(tmp_path)
    # Never past the bound (evicting a process's pack frees many objects at once: how full
    # it ends is not fixed).
    assert 0 < counted <= 40_000
    after = ObjectCache(tmp_path, 40_000)
    try:
        assert after.used_bytes() == counted  # nothing charged twice, nothing lost
    finally:
        after.close()


def _killed_mid_write(root: str) -> None:
    """Store two objects, then die as kill -9 would between a charge and its write."""
    async def main() -> None:
        cache = ObjectCache(Path(root), 40_000)
        await cache.store([(s.sha256, s.data) for s in (MemorySource(blob(90, 3000)),
                                                         MemorySource(blob(91, 4000)))])
        cache._reserve("", 5000)  # charged; the process dies before writing anything
        os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main)


def test_a_process_killed_between_a_charge_and_its_write_is_counted_again(
        tmp_path: Path) -> None:
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write,
                                                        args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert held_bytes(tmp_path) == 7000
    after = ObjectCache(tmp_path, 40_000)  # alone: counts what is there, not what was charged
    try:
        assert after.used_bytes() == 7000
        assert after.ledger.charge(33_000) and not after.ledger.charge(1)
    finally:
        after.close()
