"""Progress of a transfer: a tqdm bar (bytes, rate, ETA, files) on a terminal; piped, one
summary line when it ends (through the ``ahmount.ah`` logger, so ``-q`` silences it)."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import Any

log = logging.getLogger("ahmount.ah")


class Progress:
    """Progress bars (files and bytes, with rate) on a terminal; silent when piped."""

    def __init__(self, what: str, files: int, total_bytes: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty() and total_bytes > 0:
            from tqdm import tqdm

            # A terminal that reports no size (a fresh pty) would make tqdm draw nothing.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"{what} 0/{files} files", file=sys.stderr, leave=True,
                             ncols=size.columns, nrows=size.lines)
        self._files = files
        self._done = 0
        self._bytes = 0
        self._what = what
        self._started = time.monotonic()

    def add_bytes(self, n: int) -> None:
        self._bytes += n
        if self._bar is not None:
            self._bar.update(n)

    def file_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(f"{self._what} {self._done}/{self._files} files")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._files:
            done = self._what.removesuffix("ing") + "ed"  # Uploading -> Uploaded
            count = f"{self._done}" if self._done == self._files else \
                f"{self._done} of {self._files}"
            log.info("%s %s file(s), %.1f MiB in %.1f s", done, count,
                     self._bytes / (1 << 20), time.monotonic() - self._started)
