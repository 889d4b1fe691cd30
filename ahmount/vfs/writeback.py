"""Write-back: queued files go to the hub ahead of the commit that will need them.

A closed written file is announced with :meth:`WriteBack.closed`; the runner waits
:data:`UPLOAD_AHEAD_DELAY` for more (files closed together travel together, small ones in
batches), hashes and uploads what the hub lacks, and marks each row uploaded **only if the
row is still the generation it read** (its ``seq``): a file rewritten while it travelled
stays pending. A failed round is tried again after a backoff that doubles from
:data:`UPLOAD_RETRY_FIRST` to :data:`UPLOAD_RETRY_MAX`; a large file resumes where the hub
says it stopped. Nothing here is needed for correctness: a commit uploads whatever is still
missing, so a crash only loses the head start.

Runs on the trio thread, under the session's supervisor; an expected failure (hub down,
file gone, disk full) is contained here, anything else is a bug and stops the session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import ObjectEntry
from ahmount.transfer.plan import LocalFile
from ahmount.transfer.upload import upload_files
from ahmount.vfs.change_queue import ChangeQueue, Row
from ahmount.vfs.supervisor import EXPECTED

log = logging.getLogger("ahmount.vfs")

UPLOAD_AHEAD_DELAY = 0.5
#: While files keep being closed, upload-ahead waits for a pause, but not longer than this
#: after the first close it has not sent: a writer of many small files does not share the
#: 2 cores and the trio thread with their upload, and a long stream of them still goes up.
UPLOAD_AHEAD_MAX_WAIT = 5.0
UPLOAD_RETRY_FIRST = 2.0  # the hub client fails fast for 2 s after giving up on a dead hub
UPLOAD_RETRY_MAX = 60.0


class WriteBack:
    def __init__(self, hub: HubClient, queue: ChangeQueue,
                 delay: float | None = UPLOAD_AHEAD_DELAY) -> None:
        """``delay``: how long after a close the runner uploads; None: never ahead (only
        :meth:`upload_branch` and commits send bytes)."""
        self._hub = hub
        self._delay = delay
        self._queue = queue
        #: Written files closed since the runner last ran: (branch, path).
        self._closed: set[tuple[str, str]] = set()
        self._wake = trio.Event()
        #: When the last file was closed (trio's clock): the runner waits for a pause.
        self._last_close = 0.0
        self.bytes_uploaded = 0
        self.failures = 0
        self.uploading = False
        #: Why a queued file is incomplete, or None. The queue's mark by default; the VFS
        #: puts its own here, which also knows failures the queue could not record (its log
        #: on the same full disk).
        self.incomplete: Callable[[Row], str | None] = lambda row: row.failed

    def closed(self, branch: str, path: str) -> None:
        """A written file of ``branch`` was closed: upload it soon."""
        if self._delay is None:
            return
        self._closed.add((branch, path))
        self._last_close = trio.current_time()
        self.uploading = True
        self._wake.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = first = self._delay or 0.0
        failures = 0
        while True:
            await self._wake.wait()
            if failures:
                await trio.sleep(delay)
            else:
                await self._pause(first)
            self._wake = trio.Event()
            closed, self._closed = self._closed, set()
            self.uploading = True
            try:
                await self.upload(sorted(closed))
                failures, delay = 0, first
            except EXPECTED as exc:  # anything else is a bug: the supervisor stops the session
                failures += 1
                self.failures += 1
                delay = min(UPLOAD_RETRY_FIRST * 2 ** (failures - 1), UPLOAD_RETRY_MAX)
                log.warning("upload ahead of %d file(s) failed (%s); trying again in %.0fs",
                            len(closed), exc, delay)
                self._closed |= closed
                self._wake.set()
            finally:
                self.uploading = bool(self._closed)

    async def _pause(self, delay: float) -> None:
        """Wait until no file was closed for ``delay`` seconds, or
        :data:`UPLOAD_AHEAD_MAX_WAIT` passed."""
        deadline = trio.current_time() + UPLOAD_AHEAD_MAX_WAIT
        while (until := min(self._last_close + delay, deadline)) > trio.current_time():
            await trio.sleep_until(until)

    async def upload_branch(self, branch: str) -> tuple[int, int]:
        """Upload every queued file of ``branch`` the hub lacks now (``ah sync``): how many
        rows were marked uploaded, and the bytes sent."""
        taken = self._queue.snapshot(branch)
        return await self.upload([(branch, path) for path in taken.files])

    async def send(self, files: list[LocalFile]) -> tuple[list[ObjectEntry], int]:
        """Hash ``files`` and upload what the hub lacks (a commit's own uploads): their
        entries, and the bytes sent."""
        entries, sent = await upload_files(self._hub, files)
        self.bytes_uploaded += sent
        return entries, sent

    async def upload(self, wanted: list[tuple[str, str]]) -> tuple[int, int]:
        pending: list[tuple[str, str, Row]] = []
        for branch, path in wanted:
            row = self._queue.branch(branch).files.get(path)
            # An incomplete file (a write to it failed) is not sent: no commit takes it as
            # it is but a forced one, which sends it itself.
            if row is not None and row.local is not None and not row.uploaded and \
                    not self.incomplete(row):
                pending.append((branch, path, row))
        if not pending:
            return 0, 0
        files = [LocalFile(self._queue.local_path(str(r.local)), p) for _, p, r in pending]
        entries, sent = await self.send(files)
        marked = 0
        for (branch, path, row), entry in zip(pending, entries, strict=True):
            current = self._queue.branch(branch).files.get(path)
            if current is not None and current.seq == row.seq:  # the generation it read
                self._queue.touch_file(branch, path, sha256=entry.sha256, uploaded=True,
                                       content_changed=False)
                marked += 1
        return marked, sent
