"""Progress of a transfer: a tqdm bar (bytes, rate, ETA, files) on a terminal; piped, one
summary line when it ends (through the ``ahmount.ah`` logger, so ``-q`` silences both).

Inside a mount the terminal is the client's, not the daemon's: while the control socket serves
an ``ah commit`` or ``ah sync`` that asked for progress, :data:`REPORTER` holds a callback and
every :class:`Progress` made in that operation's tasks reports its state there instead
(:func:`ahmount.mount.control.call` draws it on the client's side with this same class).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from ahmount.wording import human_size, plural

log = logging.getLogger("ahmount.ah")

#: A progress state: ``{"id", "what", "files", "files_done", "bytes", "bytes_done"}``.
State = dict[str, Any]
#: Set for the tasks of a control operation whose client draws the progress.
REPORTER: contextvars.ContextVar[Callable[[State], None] | None] = contextvars.ContextVar(
    "ahmount_progress_reporter", default=None)
_ids = itertools.count(1)


class Progress:
    """One operation's progress: a bar on a terminal, a summary line when piped, or states
    sent to :data:`REPORTER` when a mount's client draws them."""

    def __init__(self, what: str, files: int, total_bytes: int) -> None:
        self._bar: Any = None
        self._report = REPORTER.get()
        self._files = files
        self._done = 0
        self._bytes = 0
        self._total = total_bytes
        self._what = what
        self._id = next(_ids)
        self._started = time.monotonic()
        if self._report is not None:
            self._send()
        elif (sys.stderr.isatty() and total_bytes > 0 and log.isEnabledFor(logging.INFO)):
            from tqdm import tqdm

            # A terminal that reports no size (a fresh pty) would make tqdm draw nothing.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self._description(), file=sys.stderr, leave=True,
                             ncols=size.columns, nrows=size.lines)

    def _description(self) -> str:
        return f"{self._what} {self._done}/{self._files} files"

    def _send(self) -> None:
        assert self._report is not None
        self._report({"id": self._id, "what": self._what, "files": self._files,
                      "files_done": self._done, "bytes": self._total,
                      "bytes_done": self._bytes})

    def add_bytes(self, n: int) -> None:
        self._bytes += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._report is not None:
            self._send()

    def file_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(self._description())
        elif self._report is not None:
            self._send()

    def show(self, state: State) -> None:
        """Catch up with a reported ``state`` (the client's side of :data:`REPORTER`)."""
        self.add_bytes(int(state["bytes_done"]) - self._bytes)
        while self._done < int(state["files_done"]):
            self.file_done()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._report is not None:
            self._send()
        elif self._files:
            done = self._what.removesuffix("ing") + "ed"  # Uploading -> Uploaded
            count = plural(self._files, "file") if self._done == self._files else \
                f"{self._done} of {plural(self._files, 'file')}"
            log.info("%s %s, %s in %.1f s", done, count, human_size(self._bytes),
                     time.monotonic() - self._started)


class RemoteProgress:
    """The client's side: draws the states a mount reports, one :class:`Progress` per
    operation id, each closed when the next begins or the call ends."""

    def __init__(self) -> None:
        self._current: Progress | None = None
        self._id: Any = None

    def __call__(self, state: State) -> None:
        if state.get("id") != self._id:
            self.close()
            self._id = state.get("id")
            self._current = Progress(str(state["what"]), int(state["files"]),
                                     int(state["bytes"]))
        assert self._current is not None
        self._current.show(state)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
