"""The mount's queue of uncommitted changes, per branch, kept durably in the cache directory.

What a branch directory shows is its head commit plus this queue. The queue holds:

* ``file`` rows: an object's new content — bytes in a local file ``files/<local>``, or an
  existing blob (``sha256`` set, no local file) when only the name or mtime changed;
* ``delete`` rows: an object (``a/b``) or a whole directory (``a/b/``) that is gone;
* ``dir`` rows: empty directories made with ``mkdir`` (objects imply their directories, so
  these never reach the hub).

Rows live in SQLite (``queue.db``, WAL). The two changes every written file makes (its row at
``create``, its size and time at close) are appended to ``queue.log`` instead, one ``write``
each (a transaction costs the daemon's one thread 30 times that); every other change is one
transaction, which first folds the log's rows into the database. Either way the change is in
the kernel before the FUSE call that made it returns, so a killed daemon loses nothing that
was acknowledged. Each change to a row raises its ``seq``; a commit removes only rows whose
``seq`` it saw, so a write that lands while a commit runs stays queued for the next one. See
``docs/change-queue.md``.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from ahmount.errors import Conflict, InternalError
from ahmount.sqlite_damage import damaged

log = logging.getLogger("ahmount.vfs")

#: Seconds the change feed's report of a rename made through this mount is waited for.
ECHO_WAIT = 600.0
#: Free space on the queue's disk that written bytes may not take (:meth:`ChangeQueue.
#: room_for`), at most this and a twentieth of the disk: what the queue's own records (its
#: log, its database) need, so that on a full disk an ``rm``, which frees space, and a
#: writer's close can still be recorded.
HEADROOM = 16 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    branch TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,          -- file | delete | dir
    local TEXT,                  -- file id under files/ (kind=file with new bytes)
    sha256 TEXT,                 -- known content hash (blob reference, or hashed after close)
    size INTEGER NOT NULL DEFAULT 0,
    mtime REAL NOT NULL DEFAULT 0,
    base TEXT NOT NULL,          -- the branch head when the change was first queued
    seq INTEGER NOT NULL,
    uploaded INTEGER NOT NULL DEFAULT 0,
    origin TEXT,                 -- for a blob reference: "<commit id>/<path>" it was read from
    mode INTEGER NOT NULL DEFAULT 420,  -- permission bits (0o644), committed with the object
    failed TEXT,                 -- why its bytes are incomplete: a write to it failed
    PRIMARY KEY (branch, path)
);
-- seq: the reservation (see ChangeQueue._next_seq); folded: the last generation of queue.log
-- whose rows are in this database (a log of that generation or older is not replayed).
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER,
                                    folded INTEGER NOT NULL DEFAULT 0);
INSERT OR IGNORE INTO counter (id, seq) VALUES (1, 0);
"""


@dataclass(frozen=True, slots=True)
class Row:
    path: str
    kind: str
    local: str | None
    sha256: str | None
    size: int
    mtime: float
    base: str
    seq: int
    uploaded: bool
    origin: str | None = None
    mode: int = 0o644
    #: Why the file's bytes are incomplete (a write to it failed: "No space left on device");
    #: a commit refuses it unless forced. Until its content starts over (created again,
    #: truncated to nothing) or it is deleted.
    failed: str | None = None

    def origin_parts(self) -> tuple[str, str]:
        """``(commit id, path)`` where a blob reference's bytes can be read."""
        assert self.origin is not None
        commit, _, path = self.origin.partition("/")
        return commit, path


@dataclass
class BranchQueue:
    """The in-memory overlay of one branch (rebuilt from the database at start)."""

    files: dict[str, Row] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    deleted_dirs: list[str] = field(default_factory=list)  # sorted, each ends with "/"
    dirs: set[str] = field(default_factory=set)
    # directory ('' = root) -> child name -> how many queued files and dirs lie below it
    # through that child: makes ``is_dir`` and ``names_under`` independent of queue length.
    _children: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for path in (*self.files, *self.dirs):
            self._count(path, 1)

    def _count(self, path: str, delta: int) -> None:
        parts = path.split("/")
        for depth, child in enumerate(parts):
            directory = "/".join(parts[:depth])
            names = self._children.setdefault(directory, {})
            left = names.get(child, 0) + delta
            if left:
                names[child] = left
                continue
            del names[child]
            if not names:
                del self._children[directory]

    def set_file(self, row: Row) -> None:
        if row.path not in self.files:
            self._count(row.path, 1)
        self.files[row.path] = row

    def pop_file(self, path: str) -> Row | None:
        row = self.files.pop(path, None)
        if row is not None:
            self._count(path, -1)
        return row

    def add_dir(self, path: str) -> None:
        if path not in self.dirs:
            self.dirs.add(path)
            self._count(path, 1)

    def discard_dir(self, path: str) -> None:
        if path in self.dirs:
            self.dirs.discard(path)
            self._count(path, -1)

    def empty(self) -> bool:
        return not (self.files or self.deleted or self.deleted_dirs or self.dirs)

    def hides(self, path: str) -> bool:
        """True if the head's object or directory at ``path`` is deleted by the queue."""
        if path in self.deleted:
            return True
        probe = path + "/"
        return any(probe.startswith(prefix) for prefix in self.deleted_dirs)

    def names_under(self, directory: str) -> set[str]:
        """Names of queued files and directories directly inside ``directory`` ('' = root)."""
        return set(self._children.get(directory, ()))

    def is_dir(self, path: str) -> bool:
        """True if the queue makes ``path`` a directory (made, or holding queued files)."""
        return path in self.dirs or path in self._children


#: Empty local files made ahead for creates (see ChangeQueue.create_local): what their names
#: start with; how many are made back at once when half of them were taken; the most kept,
#: for a burst of creates that took more (the pool grows to the burst it saw); how long
#: creates must pause, in seconds, before the pool is topped up past SPARE_LOW (one burst
#: ends there too).
SPARE_PREFIX = "spare-"
SPARE_LOW = 64
SPARE_MAX = 1024
SPARE_IDLE = 0.25
#: How far ahead of the last seq handed out the database's counter is set (see _next_seq).
SEQ_RESERVE = 1024
#: Rows the log may hold before the next append folds them into the database: bounds the
#: replay at load and the fold's stall (one transaction of this many rows, a few ms).
FOLD_ROWS = 512

#: ``queue.log``: a header (magic, generation), then records: length and CRC-32 of the
#: payload, the payload (a row, :func:`_encode_row`). A record cut short or damaged (a power
#: loss) ends it.
LOG_MAGIC = b"AHQLOG1\0"
_LOG_HEADER = struct.Struct("<8sQ")
_RECORD_HEADER = struct.Struct("<II")


def _encode_row(key: str, row: Row) -> bytes:
    # Fields joined by NUL, which no path, id or hash holds; None as the empty string, which
    # no optional field is (a str.join is a tenth of what json.dumps costs per record).
    payload = "\0".join((key, row.path, row.kind, row.local or "", row.sha256 or "",
                         str(row.size), repr(row.mtime), row.base, str(row.seq),
                         "1" if row.uploaded else "", row.origin or "",
                         str(row.mode), row.failed or "")).encode()
    return _RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_row(payload: bytes) -> tuple[str, Row]:
    key, path, kind, local, sha256, size, mtime, base, seq, uploaded, origin, mode, *rest = \
        payload.decode().split("\0")
    failed = rest[0] if rest else ""  # a log written before failed writes were kept: none
    return key, Row(path, kind, local or None, sha256 or None, int(size), float(mtime), base,
                    int(seq), bool(uploaded), origin or None, int(mode), failed or None)


def _decode_log(data: bytes) -> tuple[int, list[tuple[str, Row]]]:
    """The generation and the rows of a log's bytes, up to the first record that is cut
    short or damaged; generation 0 (nothing) for bytes without a whole header."""
    if len(data) < _LOG_HEADER.size:
        return 0, []
    magic, generation = _LOG_HEADER.unpack_from(data)
    if magic != LOG_MAGIC:
        return 0, []
    rows: list[tuple[str, Row]] = []
    at = _LOG_HEADER.size
    while at + _RECORD_HEADER.size <= len(data):
        length, crc = _RECORD_HEADER.unpack_from(data, at)
        payload = data[at + _RECORD_HEADER.size:at + _RECORD_HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        rows.append(_decode_row(payload))
        at += _RECORD_HEADER.size + length
    return generation, rows


def _sync_tree(root: Path) -> None:
    """fsync ``root``, the directories below it and its ``changes.json``: the names made
    there survive a power loss (the bytes of hard-linked files are as durable as they
    were)."""
    below = [p for p in root.rglob("*") if p.is_dir()]
    for path in [*sorted(below, reverse=True), root / "changes.json", root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def room_on(path: Path) -> int:
    """Bytes files may still take on the disk of ``path``: its free space less the
    :data:`HEADROOM` the queue's records keep (negative when they eat into it)."""
    disk = os.statvfs(path)
    return disk.f_bavail * disk.f_frsize - min(HEADROOM, disk.f_blocks * disk.f_frsize // 20)


def _raise_as_disk_error(exc: BaseException) -> None:
    """A full disk under a failed queue transaction is raised as the ENOSPC it is (what
    the writer of a file on a full local disk hears); anything else returns, for the
    caller to raise as it came."""
    if isinstance(exc, sqlite3.Error) and \
            getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        raise OSError(errno.ENOSPC,
                      "No space left on device (the change queue's database)") from exc


def _append(fd: int, data: bytes) -> None:
    """Append ``data`` with one ``write`` (the log is opened ``O_APPEND``); a short write is
    an error, as a record cut short would end the log there."""
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(errno.ENOSPC, "No space left on device (the queue's log took "
                          f"{written} of {len(data)} bytes)")


class ChangeQueue:
    """All queued changes of one mount. Methods are blocking and thread-safe (one lock); the
    daemon calls them from its trio thread (they are short) or from worker threads."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self.commit_dir = root / "commit"
        shutil.rmtree(self.commit_dir, ignore_errors=True)  # copies of an interrupted commit
        # No busy timeout: nobody else may hold it (below), so a second opener fails at once.
        self._db = sqlite3.connect(str(root / "queue.db"), check_same_thread=False,
                                   isolation_level=None, timeout=0)
        with self._refused_if_damaged(self._db.close):
            self._open_db()
            seq = int(self._db.execute("SELECT seq FROM counter WHERE id = 1").fetchone()[0])
        self._lock = threading.RLock()
        #: The last seq handed out; the highest the database has reserved; the highest
        #: reserved in memory, written by the next transaction (see :meth:`_next_seq`).
        self._seq = self._stored_reserve = self._reserved = seq
        #: Rows appended to the log since its last fold, by (branch, path): the next
        #: transaction writes them first.
        self._unfolded: dict[tuple[str, str], Row] = {}
        #: The log's generation; True once its rows were folded, so that the next append
        #: starts the next generation (the file emptied, a new header).
        self._generation, self._log_folded = 0, False
        self._generation = self._replay_log()
        self._log_fd = os.open(self.root / "queue.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                               0o600)
        os.ftruncate(self._log_fd, 0)  # replayed: every row of it is in the database
        self._log_size, self._log_folded = 0, False
        self._branches: dict[str, BranchQueue] = {}
        #: Local files a running commit reads: their rows may move on, their bytes stay until
        #: the commit lets go of them (then those in ``_doomed`` are deleted).
        self._pinned: Counter[str] = Counter()
        self._doomed: set[str] = set()
        #: Names of empty local files made ahead by a worker thread (kept closed: a pool of
        #: a thousand descriptors could exhaust a default limit of open files).
        self._spares: list[str] = []
        #: How many spares to keep: SPARE_LOW, grown to the longest burst of creates seen.
        self.spare_target = SPARE_LOW
        #: The creates of the burst going on, and when the last one came (``clock``).
        self._burst, self._last_create = 0, float("-inf")
        self._clock = clock
        #: Set when half of SPARE_LOW is left, or the pool is below its target: the
        #: refiller's cue.
        self.spares_taken = threading.Event()
        self._closed = False
        #: Renames made through this mount, (old prefix, new prefix) -> until when the
        #: change feed's report of them is expected (:meth:`follow_rename`).
        self._renamed_here: dict[tuple[str, str], float] = {}
        #: Bytes that may be written before the disk's free space is looked at again.
        self._room_budget = 0
        with self._refused_if_damaged(lambda: os.close(self._log_fd), self._db.close):
            self._load()

    @contextmanager
    def _refused_if_damaged(self, *close: Callable[[], None]) -> Iterator[None]:
        """While the queue opens: an SQLite error closes what ``close`` says, and one saying
        the database is damaged is refused by name. Unlike the caches
        (:mod:`ahmount.disposable_cache`), the queue is nobody else's copy of anything: it
        is never dropped, and the error says where its bytes are."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            for each in close:
                each()
            if not damaged(exc):
                raise
            raise InternalError(
                f"the change queue's database {self.root / 'queue.db'} is damaged ({exc}); "
                f"nothing was removed. The bytes of queued files are in {self.files_dir}: "
                f"copy out what you need, then move {self.root} aside to start with an "
                "empty queue") from exc

    def _open_db(self) -> None:
        """Settings and schema of the queue's database (upgraded from older ones)."""
        # Only this process opens the queue (the cache directory's lock keeps other mounts
        # out): held exclusively, a transaction takes no file locks and the write-ahead
        # log's index lives in memory, which on these VMs saves a dozen system calls per
        # change. Set before the first access, so that no shared-memory index is made.
        self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: each change is durable across a daemon crash as soon as it commits; across a
        # power loss once :meth:`make_durable` ran (fsync of a written file).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(changes)")}
        if "mode" not in columns:  # a queue from before modes were kept
            self._db.execute("ALTER TABLE changes ADD COLUMN mode INTEGER NOT NULL DEFAULT 420")
        if "failed" not in columns:  # a queue from before failed writes were kept
            self._db.execute("ALTER TABLE changes ADD COLUMN failed TEXT")
        if "folded" not in {r[1] for r in self._db.execute("PRAGMA table_info(counter)")}:
            self._db.execute("ALTER TABLE counter ADD COLUMN folded INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._spares.clear()  # their files stay: the next load takes them up again
            try:
                self._fold()  # the next open has nothing to replay
            except sqlite3.Error as exc:  # e.g. a full disk: the log keeps them for replay
                log.warning("queue: the log's %d changes stay in it (%s)", len(self._unfolded),
                            exc)
            os.close(self._log_fd)
            self._db.close()
        self.spares_taken.set()  # the refiller's waiting thread returns

    # -- loading -----------------------------------------------------------------------------

    def _replay_log(self) -> int:
        """Fold into the database the rows a log of a newer generation than the database's
        last fold holds (a daemon that stopped without folding them); the generation the
        next log starts with."""
        try:
            data = (self.root / "queue.log").read_bytes()
        except FileNotFoundError:
            data = b""
        generation, rows = _decode_log(data)
        folded = int(self._db.execute("SELECT folded FROM counter WHERE id = 1").fetchone()[0])
        if generation > folded and rows:
            # Folded as a running queue folds them (the later record of a path wins), with
            # the seqs they handed out past the database's reservation reserved.
            self._generation = generation
            self._unfolded = {(key, row.path): row for key, row in rows}
            self._seq = self._reserved = max([self._reserved, *(row.seq for _, row in rows)])
            self._fold()
            log.info("queue: %d changes replayed from its log", len(rows))
        return max(generation, folded) + 1

    def _stored_rows(self) -> Iterator[tuple[str, Row]]:
        rows = self._db.execute(
            "SELECT branch, path, kind, local, sha256, size, mtime, base, seq, uploaded, "
            "origin, mode, failed FROM changes").fetchall()
        for branch, *values in rows:
            yield branch, Row(values[0], values[1], values[2], values[3], values[4], values[5],
                              values[6], values[7], bool(values[8]), values[9], values[10],
                              values[11])

    def _load(self) -> None:
        for branch, row in self._stored_rows():
            if row.kind == "file" and row.local is not None:
                # A daemon killed between writes and release: the local file is the truth.
                try:
                    st = os.stat(self.local_path(row.local))
                    if st.st_size != row.size:
                        row = replace(row, size=st.st_size, sha256=None, uploaded=False)
                except FileNotFoundError:
                    self._db.execute("DELETE FROM changes WHERE branch=? AND path=?",
                                     (branch, row.path))
                    continue
            self._apply(self._branches.setdefault(branch, BranchQueue()), row)
        known = {r.local for q in self._branches.values() for r in q.files.values() if r.local}
        for stray in self.files_dir.iterdir():
            if stray.name in known:
                continue
            if stray.name.startswith(SPARE_PREFIX) and stray.stat().st_size == 0:
                # Made ahead and never handed out (by this queue before it closed, or by a
                # killed one): a spare again, as making one costs more than keeping it.
                if len(self._spares) < SPARE_MAX:
                    self._spares.append(stray.name)
                else:
                    stray.unlink()
            else:
                self._to_lost_found(stray)

    def room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes of queued files leave the queue's disk its
        :data:`HEADROOM`. The free space is looked at again once half of what lay above the
        headroom was written (every write, near the end), not at each write."""
        self._room_budget -= size
        if self._room_budget >= 0:
            return True
        above = room_on(self.files_dir)
        self._room_budget = max(0, above // 2)
        return above >= size

    def _discard_local(self, local: str) -> None:
        """A local file no row needs any more: deleted now, or when the last commit reading
        it is done."""
        with self._lock:
            if self._pinned[local]:
                self._doomed.add(local)
                return
        self.local_path(local).unlink(missing_ok=True)

    def pin(self, locals_: list[str]) -> None:
        """Keep these local files' bytes as they are while a commit reads them: writers of
        their paths get a copy of their own (:meth:`is_pinned`)."""
        with self._lock:
            self._pinned.update(locals_)

    def unpin(self, locals_: list[str]) -> None:
        with self._lock:
            self._pinned.subtract(locals_)
            freed = [x for x in locals_ if self._pinned[x] <= 0]
            for local in freed:
                del self._pinned[local]
            doomed = [x for x in freed if x in self._doomed]
            self._doomed.difference_update(doomed)
        for local in doomed:
            self.local_path(local).unlink(missing_ok=True)

    def commit_copy(self, local: str) -> Path:
        """A private copy of a local file for a commit, made now (blocking: the caller holds
        off writers meanwhile). ``commit/`` holds only such copies; it is emptied at load."""
        self.commit_dir.mkdir(mode=0o700, exist_ok=True)
        copy = self.commit_dir / uuid.uuid4().hex
        shutil.copyfile(self.local_path(local), copy)
        return copy

    def is_pinned(self, local: str) -> bool:
        with self._lock:
            return self._pinned[local] > 0

    def _to_lost_found(self, stray: Path) -> None:
        """A queue file no row explains (a power loss took the row written after it): kept
        in ``lost+found`` for the user to look at, never deleted."""
        lost = self.root / "lost+found"
        lost.mkdir(mode=0o700, exist_ok=True)
        target = lost / f"{time.strftime('%Y%m%dT%H%M%S')}-{stray.name}"
        stray.rename(target)
        log.warning("queue file %s has no row saying what it is; moved to %s (%d bytes)",
                    stray.name, target, target.stat().st_size)

    def make_durable(self) -> None:
        """Make every change made so far survive a power loss: fsync the log and the
        database's write-ahead log (with ``synchronous=NORMAL`` SQLite leaves that to
        checkpoints).
        Blocking: call it from a worker thread."""
        with self._lock:
            if self._closed:
                return
            logged = os.dup(self._log_fd)  # a close meanwhile leaves this one open
        try:
            os.fdatasync(logged)
        finally:
            os.close(logged)
        wal = self.root / "queue.db-wal"
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:  # checkpointed and removed: the database file is synced
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _apply(self, queue: BranchQueue, row: Row) -> None:
        if row.kind == "file":
            queue.set_file(row)
        elif row.kind == "dir":
            queue.add_dir(row.path)
        elif row.path.endswith("/"):
            if row.path not in queue.deleted_dirs:
                bisect.insort(queue.deleted_dirs, row.path)
        else:
            queue.deleted.add(row.path)

    # -- reading -----------------------------------------------------------------------------

    def branch(self, key: str) -> BranchQueue:
        # Read without the lock first: this runs for every entry a listing of a branch
        # shows, and setdefault built (and dropped) a BranchQueue at each call. A dict read is
        # atomic; the lock is for making one.
        found = self._branches.get(key)
        if found is not None:
            return found
        with self._lock:
            return self._branches.setdefault(key, BranchQueue())

    def branches(self) -> list[str]:
        with self._lock:
            return sorted(k for k, q in self._branches.items() if not q.empty())

    def local_path(self, local: str) -> Path:
        return self.files_dir / local

    def new_local(self) -> tuple[str, Path]:
        """A fresh, empty local file for new bytes, by path."""
        local, fd = self.create_local()
        os.close(fd)
        return local, self.local_path(local)

    def create_local(self) -> tuple[str, int]:
        """A fresh, empty local file for new bytes, open for reading and writing: one made
        ahead (:meth:`make_spares`) when there is one, as a ``create`` should not wait for the
        disk to make a file (on these VMs 20 us to 0.9 ms: their ext4 has no journal, and then
        allocating an inode steps over every inode freed in the last minutes)."""
        with self._lock:
            now = self._clock()
            if now - self._last_create > SPARE_IDLE:
                self._burst = 0
            self._burst += 1
            self._last_create = now
            if self._burst > self.spare_target:
                # A burst longer than the pool: keep as many as it took, made in the next
                # pause, so that the next such burst makes no file while it runs.
                self.spare_target = min(SPARE_MAX, 1 << (self._burst - 1).bit_length())
            if len(self._spares) <= SPARE_LOW // 2:
                # Refilled in batches: a wake-up of the refiller per create would cost the
                # daemon more (a thread switch and the GIL handed over) than it saves.
                self.spares_taken.set()
            spare = self._spares.pop() if self._spares else None
        if spare is not None:
            try:
                return spare, os.open(f"{self.files_dir}/{spare}", os.O_RDWR)
            except FileNotFoundError:  # removed behind the queue's back: make one
                pass
        return self._new_file(uuid.uuid4().hex)

    def _new_file(self, local: str) -> tuple[str, int]:
        # A str path: pathlib's joining costs more than the open (it holds the GIL the
        # daemon's trio thread is waiting for, when the spares' thread makes them).
        fd = os.open(f"{self.files_dir}/{local}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return local, fd

    def _spares_wanted(self) -> int:
        """How many spares to make now (under the lock): back to SPARE_LOW at once, and on
        to the pool's target only while creates pause (making files competes with a writer
        for the CPU and the disk)."""
        have = len(self._spares)
        if self._closed or have >= self.spare_target:
            return 0
        if have < SPARE_LOW or self._clock() - self._last_create >= SPARE_IDLE:
            return 1
        return 0

    def make_spares(self) -> int:
        """Make spares (:meth:`_spares_wanted`) until none is wanted now; how many were made.
        Blocking: run it in a worker thread. A spare is a file no row names, left empty."""
        made = 0
        while True:
            with self._lock:
                if not self._spares_wanted():
                    return made
            local, fd = self._new_file(SPARE_PREFIX + uuid.uuid4().hex)
            os.close(fd)
            with self._lock:
                self._spares.append(local)  # kept after a close too: the next load takes it
            made += 1

    def keep_spares(self) -> None:
        """Make spares (:meth:`make_spares`) when cued, and while the pool is below its target
        check again every SPARE_IDLE for a pause to top it up in, until the queue closes.
        Blocking for the whole life of the queue: one worker thread of its own, so that
        refilling costs the trio thread nothing."""
        while not self._closed:
            self.make_spares()
            with self._lock:
                short = len(self._spares) < self.spare_target
            self.spares_taken.wait(SPARE_IDLE if short else None)
            # A cue set between the wait and here is not lost: make_spares tops up anyway.
            self.spares_taken.clear()

    # -- changing ----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: the log's rows first (in the order they were made, so what the
        transaction changes comes after them), then the caller's changes, then the seq
        reservation if it moved."""
        with self._lock:
            reserved = self._reserved
            self._db.execute("BEGIN IMMEDIATE")
            try:
                folding = bool(self._unfolded)
                for (key, _), row in self._unfolded.items():
                    self._write(self._db, key, row)
                yield self._db
                if folding:
                    self._db.execute("UPDATE counter SET folded = ? WHERE id = 1",
                                     (self._generation,))
                if self._reserved != self._stored_reserve:
                    self._db.execute("UPDATE counter SET seq = ? WHERE id = 1",
                                     (self._reserved,))
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:  # a COMMIT the disk refused SQLite rolled back
                    self._db.execute("ROLLBACK")
                self._reserved = reserved  # a reservation made in it is undone too
                if isinstance(exc, sqlite3.Error | OSError):
                    self._storage_failed(exc)
                    _raise_as_disk_error(exc)
                raise
            self._stored_reserve = self._reserved
            if folding:
                self._unfolded.clear()
                self._log_folded = True

    def _storage_failed(self, exc: BaseException) -> None:
        """A transaction failed in the database or on the disk (full, say) after its body
        changed the rows in memory: memory is made what the database and the log hold
        again, so what shows is what a restart would show. A full disk is raised as
        ENOSPC (:func:`_raise_as_disk_error`)."""
        log.warning("queue: a change could not be recorded (%s); it is not made", exc)
        self._branches = {}
        for branch, row in self._stored_rows():
            self._apply(self._branches.setdefault(branch, BranchQueue()), row)
        for (branch, _), row in self._unfolded.items():  # newer than the database's rows
            queue = self._branches.setdefault(branch, BranchQueue())
            queue.deleted.discard(row.path)
            self._apply(queue, row)

    def _log(self, key: str, row: Row) -> None:
        """Make ``row`` durable across a daemon crash by appending it to the log (the caller
        holds the lock and changes memory only after this returns). A failed append leaves
        the log as it was."""
        record = _encode_row(key, row)
        if self._log_folded:  # its rows are in the database: the next generation starts
            self._generation += 1
            os.ftruncate(self._log_fd, 0)
            self._log_size, self._log_folded = 0, False
        if not self._log_size:
            record = _LOG_HEADER.pack(LOG_MAGIC, self._generation) + record
        try:
            _append(self._log_fd, record)
        except OSError:
            os.ftruncate(self._log_fd, self._log_size)  # no record cut short stays
            raise
        self._log_size += len(record)
        self._unfolded[(key, row.path)] = row

    def _fold(self) -> None:
        """Write the log's rows into the database now (one transaction), if it has any."""
        if self._unfolded:
            with self._tx():
                pass

    def _fold_if_long(self) -> None:
        if len(self._unfolded) >= FOLD_ROWS:
            self._fold()

    def _next_seq(self) -> int:
        # Counted in memory (under the lock). The database holds a reservation at least as
        # high as any seq handed out, raised by SEQ_RESERVE past the seq that passes it and
        # written by the next transaction (the one making that change, or the next fold of
        # the log, whose replay at load also reserves the seqs it holds): one counter write
        # per thousand changes instead of one per change (each is a page of the write-ahead
        # log), and a restarted queue goes on from the reservation, so seqs only ever grow
        # (skipped ones are gaps, as a rolled-back change's is).
        self._seq += 1
        if self._seq > self._reserved:
            self._reserved = self._seq + SEQ_RESERVE
        return self._seq

    def _write(self, db: sqlite3.Connection, key: str, row: Row) -> None:
        db.execute(
            "INSERT OR REPLACE INTO changes (branch, path, kind, local, sha256, size, mtime, "
            "base, seq, uploaded, origin, mode, failed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, row.path, row.kind, row.local, row.sha256, row.size, row.mtime, row.base,
             row.seq, int(row.uploaded), row.origin, row.mode, row.failed))

    def put_file(self, key: str, path: str, base: str, *, local: str | None = None,
                 sha256: str | None = None, size: int = 0, mtime: float | None = None,
                 origin: str | None = None, mode: int = 0o644,
                 failed: str | None = None) -> Row:
        """Queue new content at ``path`` (replacing a queued file or a delete there): local
        bytes, or an existing blob (``sha256`` and the ``origin`` it can be read from), with
        its permission bits (and :attr:`Row.failed` for a copy of incomplete bytes)."""
        with self._lock:
            queue = self.branch(key)
            old = queue.files.get(path)
            row = Row(path, "file", local, sha256, size, time.time() if mtime is None else mtime,
                      old.base if old else base, self._next_seq(), sha256 is not None,
                      origin, mode, failed)
            self._log(key, row)  # replaces a delete row of the path (same key)
            queue.deleted.discard(path)
            queue.set_file(row)
            self._fold_if_long()
        if old is not None and old.local and old.local != local:
            self._discard_local(old.local)
        return row

    def touch_file(self, key: str, path: str, *, size: int | None = None,
                   mtime: float | None = None, sha256: str | None = None,
                   uploaded: bool = False, content_changed: bool = True,
                   mode: int | None = None, failed: str | None = None) -> Row:
        """Record that a queued file changed (size, mtime, mode) or was hashed/uploaded. A
        content change raises its ``seq`` (so a running commit leaves it queued) and forgets
        its hash; an mtime or mode change also raises ``seq`` but keeps the hash. ``failed``:
        why its bytes are now incomplete (see :attr:`Row.failed`); ``""`` clears that (its
        content starts over), None keeps it."""
        with self._lock:
            queue = self.branch(key)
            old = queue.files[path]
            # A Row made directly: dataclasses.replace costs more than the log's append.
            row = Row(old.path, old.kind, old.local,
                      sha256 if sha256 is not None else (None if content_changed else old.sha256),
                      old.size if size is None else size,
                      old.mtime if mtime is None else mtime,
                      old.base,
                      self._next_seq() if (content_changed or mtime is not None or
                                           mode is not None) else old.seq,
                      uploaded if sha256 is not None else (old.uploaded and not content_changed),
                      old.origin,
                      old.mode if mode is None else mode,
                      old.failed if failed is None else (failed or None))
            self._log(key, row)
            queue.set_file(row)
            self._fold_if_long()
            return row

    def delete(self, key: str, path: str, base: str, in_head: bool) -> None:
        """``path`` (an object, or a directory when it ends with ``/``) is gone. A queued file
        there is dropped; a delete is recorded only for what the head has."""
        dropped: list[str] = []
        with self._tx() as db:
            queue = self.branch(key)
            if path.endswith("/"):
                for queued in [p for p in queue.files if p.startswith(path)]:
                    row = queue.pop_file(queued)
                    if row is not None and row.local:
                        dropped.append(row.local)
                for d in [d for d in queue.dirs if (d + "/").startswith(path)]:
                    queue.discard_dir(d)
                db.execute("DELETE FROM changes WHERE branch=? AND substr(path, 1, ?) = ? "
                           "AND kind IN ('file', 'dir')", (key, len(path), path))
                db.execute("DELETE FROM changes WHERE branch=? AND path=?",
                           (key, path[:-1]))
            else:
                gone = queue.pop_file(path)
                if gone is not None and gone.local:
                    dropped.append(gone.local)
                db.execute("DELETE FROM changes WHERE branch=? AND path=?", (key, path))
            if in_head:
                self._write(db, key, Row(path, "delete", None, None, 0, time.time(), base,
                                         self._next_seq(), False))
                self._apply(queue, Row(path, "delete", None, None, 0, 0, base, 0, False))
                self._keep_parent(db, key, queue, path, base)
        for local in dropped:
            self._discard_local(local)

    def _keep_parent(self, db: sqlite3.Connection, key: str, queue: BranchQueue, path: str,
                     base: str) -> None:
        """The head's object (or directory) at ``path`` is deleted: its directory stays, as
        a local directory outlives its files, even once a commit took the last of them (the
        head then has no such directory). It is queued as made here; the commit that leaves
        objects in it drops it again (:meth:`committed`)."""
        parent = path.rstrip("/").rpartition("/")[0]
        if parent and parent not in queue.dirs and not queue.hides(parent):
            self._write(db, key, Row(parent, "dir", None, None, 0, time.time(), base,
                                     self._next_seq(), False))
            queue.add_dir(parent)

    def move_file(self, key: str, old: str, new: str, base: str, old_in_head: bool) -> Row:
        """Move a queued file to ``new`` (its bytes go along); the head's object at ``old``,
        if any, is recorded as deleted. One transaction."""
        with self._tx() as db:
            queue = self.branch(key)
            row = queue.pop_file(old)
            assert row is not None
            moved = replace(row, path=new, seq=self._next_seq())
            replaced: Row | None = queue.files.get(new)
            db.execute("DELETE FROM changes WHERE branch=? AND path IN (?, ?)", (key, old, new))
            self._write(db, key, moved)
            queue.deleted.discard(new)
            queue.set_file(moved)
            if old_in_head:
                self._write(db, key, Row(old, "delete", None, None, 0, time.time(), base,
                                         self._next_seq(), False))
                queue.deleted.add(old)
                self._keep_parent(db, key, queue, old, base)
        if replaced is not None and replaced.local and replaced.local != row.local:
            self._discard_local(replaced.local)
        return moved

    def add_dir(self, key: str, path: str, base: str) -> None:
        with self._tx() as db:
            self._write(db, key, Row(path, "dir", None, None, 0, time.time(), base,
                                     self._next_seq(), False))
            self.branch(key).add_dir(path)

    def remove_dir(self, key: str, path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM changes WHERE branch=? AND path=? AND kind='dir'",
                       (key, path))
            self.branch(key).discard_dir(path)

    def check_free(self, prefix: str) -> None:
        """Refuse (:class:`Conflict`) when changes are queued in a branch whose key starts
        with ``prefix`` (a folder's or an asset's, see ``Location.keys_prefix``): what a
        rename to that name must not mix its own rows into (left there by a rename made
        elsewhere)."""
        found = sum(1 for key in self.branches() if key.startswith(prefix))
        if found:
            raise Conflict(f"changes are queued under {prefix.rstrip(':/')} already, in "
                           f"{found} branch(es); commit or reset them first")

    def rename_branches(self, old: str, new: str, *, here: bool = True) -> int:
        """The branches whose key starts with ``old`` were renamed to start with ``new``:
        their rows follow, in one transaction. How many rows moved. Refused
        (:meth:`check_free`, nothing changed) when rows are queued under ``new`` already.
        ``here``: the rename was made through this mount, so the change feed's report of it
        is not to be followed again (:meth:`follow_rename`)."""
        if here:
            with self._lock:
                self._renamed_here[(old, new)] = self._clock() + ECHO_WAIT
        with self._tx() as db:
            self.check_free(new)
            moved = db.execute(
                "UPDATE changes SET branch = ? || substr(branch, ?) "
                "WHERE substr(branch, 1, ?) = ?",
                (new, len(old) + 1, len(old), old)).rowcount
            with self._lock:
                for key in [k for k in self._branches if k.startswith(old)]:
                    self._branches[new + key[len(old):]] = self._branches.pop(key)
        return int(moved)

    def follow_rename(self, old: str, new: str) -> int | None:
        """A folder or an asset was renamed on the hub (the change feed said so): the rows
        of its branches move from keys starting with ``old`` to ``new``, as they do for a
        rename made here. Nothing moves for the feed's report of a rename made here (its
        rows moved then; following it again would undo a rename back made meanwhile).
        Returns how many rows moved, or None when rows are queued under both names (they
        stay where they are: see :meth:`strand`)."""
        with self._lock:
            now = self._clock()
            self._renamed_here = {k: t for k, t in self._renamed_here.items() if t > now}
            if self._renamed_here.pop((old, new), None) is not None:
                return 0
            if not any(key.startswith(old) for key in self._branches):
                return 0
            try:
                return self.rename_branches(old, new, here=False)
            except Conflict:
                return None

    def strand(self, key: str, why: str) -> Path | None:
        """The branch ``key`` is gone from the hub (deleted, or renamed or unshared
        elsewhere): its rows would show nowhere, and would be laid over a branch made
        again under its name. They leave the queue for ``lost+found/<time>-<branch>/``:
        the bytes of each queued file at its path there, and ``changes.json`` listing
        every row (deletes, directories, and blob references with the commit their bytes
        can be read from). Nothing is deleted before the copy is on disk: a crash
        meanwhile leaves the rows queued, and the next check strands them again. The
        directory, or None when nothing was queued."""
        with self._lock:
            queue = self._branches.get(key)
            if queue is None or queue.empty():
                return None
            lost = self.root / "lost+found"
            lost.mkdir(mode=0o700, exist_ok=True)
            target = lost / f"{time.strftime('%Y%m%dT%H%M%S')}-{quote(key, safe='')}"
            target.mkdir(mode=0o700, exist_ok=True)
            rows = sorted(queue.files.values(), key=lambda r: r.path)
            for row in rows:
                if row.local is None:
                    continue
                copy = target / row.path
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.unlink(missing_ok=True)
                os.link(self.local_path(row.local), copy)
            manifest = {
                "branch": key, "why": why, "stranded": time.time(),
                "files": [{"path": r.path, "size": r.size, "mtime": r.mtime, "mode": r.mode,
                           "sha256": r.sha256, "base": r.base,
                           "bytes": r.path if r.local is not None else None,
                           "origin": r.origin, "failed": r.failed} for r in rows],
                "deleted": sorted(queue.deleted | set(queue.deleted_dirs)),
                "directories": sorted(queue.dirs),
            }
            (target / "changes.json").write_text(json.dumps(manifest, indent=1) + "\n")
            _sync_tree(target)  # on disk before the rows go
            self.reset(key)  # under the lock still: exactly the rows copied
        return target

    def snapshot(self, key: str) -> BranchQueue:
        """A copy of the branch's queue, for a commit that runs while writes go on."""
        with self._lock:
            queue = self.branch(key)
            return BranchQueue(dict(queue.files), set(queue.deleted), list(queue.deleted_dirs),
                               set(queue.dirs))

    def committed(self, key: str, taken: BranchQueue,
                  filled: Callable[[str], bool] | None = None) -> int:
        """Drop what a commit took: rows whose ``seq`` is unchanged since ``snapshot``.
        Local files of dropped rows are returned to the caller as adopted bytes (deleted
        here). Directories made here are dropped too once the new head shows them: those
        the commit's files lie in, and those ``filled`` says the head still has objects in.
        Returns how many rows were dropped (directories not counted)."""
        dropped_locals: list[str] = []
        count = 0
        #: Directories the commit's files lie in: the head now shows them.
        implied: set[str] = set()
        with self._tx() as db:
            queue = self.branch(key)
            for path, row in taken.files.items():
                current = queue.files.get(path)
                if current is not None and current.seq == row.seq:
                    queue.pop_file(path)
                    db.execute("DELETE FROM changes WHERE branch=? AND path=?", (key, path))
                    if current.local:
                        dropped_locals.append(current.local)
                    count += 1
                    parent = path.rpartition("/")[0]
                    while parent and parent not in implied:
                        implied.add(parent)
                        parent = parent.rpartition("/")[0]
            # A directory made here that the new head shows is the head's: kept queued, it
            # would leave the branch with changes no status shows (and the kernel would not
            # keep the branch's listings).
            shown = [d for d in taken.dirs if d in queue.dirs and (
                d in implied or (filled is not None and filled(d)))]
            for path in shown:
                queue.discard_dir(path)
                db.execute("DELETE FROM changes WHERE branch=? AND path=? AND kind='dir'",
                           (key, path))
            for path in [*taken.deleted, *taken.deleted_dirs]:
                kept: set[str] | list[str] = (
                    queue.deleted_dirs if path.endswith("/") else queue.deleted)
                if path in kept:
                    kept.remove(path)
                    db.execute("DELETE FROM changes WHERE branch=? AND path=? AND kind='delete'",
                               (key, path))
                    count += 1
        for local in dropped_locals:
            self._discard_local(local)
        return count

    def rebase(self, key: str, paths: list[str], base: str) -> None:
        """Rows at ``paths`` that outlived a commit (changed while it ran) now build on that
        commit: what it wrote there is ours, not a change made elsewhere."""
        with self._tx() as db:
            queue = self.branch(key)
            for path in paths:
                row = queue.files.get(path)
                if row is not None and row.base != base:
                    row = replace(row, base=base)
                    self._write(db, key, row)
                    queue.set_file(row)

    def reset(self, key: str) -> int:
        """Drop every queued change of the branch; returns how many files and deletes."""
        with self._tx() as db:
            queue = self._branches.pop(key, BranchQueue())
            # Counted as status counts: directories made here are no change of their own.
            count = db.execute("SELECT count(*) FROM changes WHERE branch=? AND kind != 'dir'",
                               (key,)).fetchone()[0]
            db.execute("DELETE FROM changes WHERE branch=?", (key,))
        for row in queue.files.values():
            if row.local:
                self._discard_local(row.local)
        return int(count)
