"""When upload-ahead sends closed files (``ahmount/vfs/writeback.py``), on trio's mock clock:
after a pause in closes, never later than its maximum wait while files keep closing, and a
failed round again after its backoff. The upload itself is exercised by the mount tests; here
a recording stands in for it so that only the runner's timing is under test."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ahmount.vfs.writeback import UPLOAD_AHEAD_MAX_WAIT, WriteBack


class Recorded(WriteBack):
    def __init__(self, fail_first: int = 0) -> None:
        super().__init__(hub=None, queue=None, delay=0.5)  # type: ignore[arg-type]
        self.rounds: list[tuple[float, list[tuple[str, str]]]] = []
        self._fail_first = fail_first

    async def upload(self, wanted: list[tuple[str, str]]) -> tuple[int, int]:
        self.rounds.append((trio.current_time(), wanted))
        if len(self.rounds) <= self._fail_first:
            raise OSError("hub down")
        return len(wanted), 0


async def _closing(writeback: Recorded, times: list[float], nursery: Any) -> None:
    nursery.start_soon(writeback.run)
    start = trio.current_time()
    for i, at in enumerate(times):
        await trio.sleep_until(start + at)
        writeback.closed("b", f"f{i}")


async def test_a_burst_of_closes_goes_up_once_after_its_pause(autojump_clock: Any) -> None:
    writeback = Recorded()
    async with trio.open_nursery() as nursery:
        await _closing(writeback, [0, 0.3, 0.6, 0.9], nursery)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert len(writeback.rounds) == 1
    at, wanted = writeback.rounds[0]
    assert at == pytest.approx(1.4, abs=0.01) and len(wanted) == 4


async def test_a_single_close_goes_up_after_the_delay(autojump_clock: Any) -> None:
    writeback = Recorded()
    async with trio.open_nursery() as nursery:
        await _closing(writeback, [0], nursery)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert [(round(at, 2), w) for at, w in writeback.rounds] == [(0.5, [("b", "f0")])]


async def test_closes_that_never_pause_still_go_up_every_max_wait(autojump_clock: Any) -> None:
    writeback = Recorded()
    times = [i * 0.2 for i in range(60)]  # for 12 s, never a pause of 0.5 s
    async with trio.open_nursery() as nursery:
        await _closing(writeback, times, nursery)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    starts = [at for at, _ in writeback.rounds]
    assert len(starts) == 3  # at 5 s, at 10 s, and after the last close's pause
    assert starts[0] == pytest.approx(UPLOAD_AHEAD_MAX_WAIT, abs=0.01)
    assert starts[1] - starts[0] == pytest.approx(UPLOAD_AHEAD_MAX_WAIT, abs=0.25)
    assert starts[2] == pytest.approx(times[-1] + 0.5, abs=0.01)
    sent = [path for _, wanted in writeback.rounds for _, path in wanted]
    assert sorted(sent) == sorted(f"f{i}" for i in range(60))  # each once


async def test_a_failed_round_is_tried_again_after_its_backoff(autojump_clock: Any) -> None:
    writeback = Recorded(fail_first=2)
    async with trio.open_nursery() as nursery:
        await _closing(writeback, [0], nursery)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    starts = [round(at, 2) for at, _ in writeback.rounds]
    assert starts == [0.5, 2.5, 6.5]  # then 2 s, then 4 s later
    assert writeback.failures == 2 and writeback.rounds[-1][1] == [("b", "f0")]
