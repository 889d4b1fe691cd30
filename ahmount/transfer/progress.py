"""Progress bars for transfers (tqdm, the bar ML users know), on a terminal only."""

from __future__ import annotations

import shutil
import sys
from typing import Any


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
        self._what = what

    def add_bytes(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def file_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(f"{self._what} {self._done}/{self._files} files")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
