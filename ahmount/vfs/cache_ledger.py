"""The bytes an object cache directory holds, counted once for every process that shares it.

Mounts and ``ah://`` file systems of one user share a cache directory (DataLoader workers each
open it), and ``--cache-size`` bounds them together. Each process knows the others' objects only
as of its last look at the shared index, so bounding its own view let N processes hold N times
the bound. Instead every process charges what it writes here *before* writing it, and credits
what it removes *after* removing it; a charge that would pass the bound is refused, and the
process evicts (or reads without the cache) until one fits.

The count is one 8-byte integer in ``ROOT/ledger``, read and written under an exclusive
``flock`` on that file: a few syscalls, no database transaction, on the hot path of a cold
small-file read. Charging before the write and crediting after the removal means a crash
(kill -9 between the two) can only leave the count too high, never too low: the cache then
holds less than it may, never more. A power cut can lose the count's last writes either way.
Both are repaired by the first process that opens the directory alone (an exclusive ``flock``
on ``ROOT/users``, which every open cache holds shared): it sets the count to what the index
and the packs say is there (:meth:`CacheLedger.settle`).

Every method runs on its cache's trio thread (one cache, one thread): the flock serializes
processes and other caches of the same process (each opens its own descriptions).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path

_COUNT = struct.Struct("<q")


class CacheLedger:
    """The shared byte count of the cache directory ``root``, bounded by ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int, measure: Callable[[], int]) -> None:
        """Open the ledger; if no other process has the directory open, set the count to
        ``measure()`` (what is on disk) first."""
        self.max_bytes = max_bytes
        self._users = os.open(root / "users", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = -1
        try:
            self._fd = os.open(root / "ledger", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # others have it open: their count stands
            else:
                self.settle(measure())
            # Converting drops the exclusive lock first: another opener may settle in the
            # gap, with the same measure (nobody has written since).
            fcntl.flock(self._users, fcntl.LOCK_SH)
        except BaseException:
            self.close()
            raise

    def used(self) -> int:
        """The bytes all processes hold (or are writing) in the cache."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return self._read()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def charge(self, nbytes: int) -> bool:
        """Count ``nbytes`` about to be written, if they fit under the bound; False if not
        (nothing is counted then)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            used = self._read()
            if used + nbytes > self.max_bytes:
                return False
            if nbytes:
                self._write(used + nbytes)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def credit(self, nbytes: int) -> None:
        """Count ``nbytes`` removed, or charged and never written."""
        if nbytes <= 0:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            # Never below zero: a count too low would let the cache pass its bound.
            self._write(max(self._read() - nbytes, 0))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def settle(self, nbytes: int) -> None:
        """Set the count (the directory's sole user, after measuring it)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._write(nbytes)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self) -> int:
        raw = os.pread(self._fd, _COUNT.size, 0)
        return max(_COUNT.unpack(raw)[0], 0) if len(raw) == _COUNT.size else 0

    def _write(self, value: int) -> None:
        os.pwrite(self._fd, _COUNT.pack(value), 0)

    def close(self) -> None:
        for fd in (self._fd, self._users):
            if fd >= 0:
                os.close(fd)  # the locks go with them
        self._fd = self._users = -1
