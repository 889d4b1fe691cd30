"""The mount's local state directory: one per hub and user, owned by one mount at a time.

``CACHE/mounts/<hub>/<user>/`` holds the object cache, the listings and the change queue of
the mounts of ``user`` on ``hub``. Branch keys in the queue carry no hub, so two hubs must
never share a directory, and two daemons on one directory would delete each other's blocks
and queue files at start-up: the directory is locked (``flock`` on ``lock``, released by the
kernel however the daemon ends, kill -9 included) and a second mount fails at once, naming
the mount that holds it. Everything is created 0700: cached blobs are private bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ahmount.errors import Conflict
from ahmount.mount_table import ahmount_mounted_at

log = logging.getLogger("ahmount.vfs")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def hub_id(hub_url: str | None) -> str:
    """A directory name for a hub: readable, and distinct for distinct URLs."""
    if not hub_url:
        return "embedded"
    digest = hashlib.sha256(hub_url.rstrip("/").encode()).hexdigest()[:12]
    readable = _UNSAFE.sub("_", hub_url.split("://", 1)[-1]).strip("_")[:60]
    return f"{readable}-{digest}"


def state_dir(base: Path, hub_url: str | None, user: str) -> Path:
    """Where the mounts of ``user`` on ``hub_url`` keep their state under ``base``."""
    return base / "mounts" / hub_id(hub_url) / _UNSAFE.sub("_", user)


def open_state_dir(base: Path, hub_url: str | None, user: str) -> Path:
    """The state directory, made (0700, like the directories above it) if missing, without
    claiming it: the object cache and the listings in it are shared by every process of the
    user (mounts and ``ah://``); only the queue is the claiming mount's."""
    root = state_dir(base, hub_url, user)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for directory in (base, base / "mounts", root.parent, root):
        os.chmod(directory, 0o700)
    return root


@dataclass
class CacheDir:
    """A claimed state directory; :meth:`release` (or the process ending) frees it."""

    root: Path
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


#: How long a new mount waits for the mount holding its cache to exit, once that one's
#: mountpoint is unmounted (its shutdown flushes the cache index: well under a second).
SHUTDOWN_WAIT = 10.0


def claim(base: Path, hub_url: str | None, user: str, mountpoint: Path) -> CacheDir:
    """Lock the state directory of (``hub_url``, ``user``) under ``base`` for the mount at
    ``mountpoint``. Raises :class:`Conflict` naming the PID and mountpoint of the mount that
    already holds it."""
    root = open_state_dir(base, hub_url, user)
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + SHUTDOWN_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read_holder(fd)
            where = Path(str(holder.get("mountpoint", "?")))
            # A holder whose mount is gone is finishing its shutdown (unmounted a moment
            # ago: `fusermount3 -u ~/assets && ah-mount ~/assets`): it is waited for.
            leaving = not ahmount_mounted_at(where)
            if leaving and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            doing = (f"is still shutting down after its unmount from {where}; mount again "
                     "when it has exited" if leaving else
                     f"is mounted at {where}; unmount it first (`ah unmount {where}`, "
                     "with --force if its daemon hangs)")
            raise Conflict(
                f"the cache {root} is in use by ah-mount pid {holder.get('pid', '?')}, which "
                f"{doing}, or give this mount its own --cache-dir", path=str(root)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "mountpoint": str(mountpoint)}).encode(), 0)
    _adopt_legacy_queue(base, root)
    return CacheDir(root, fd)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _adopt_legacy_queue(base: Path, root: Path) -> None:
    """Queued edits of a version that kept one queue for every hub move into the first
    directory claimed after the upgrade (they were made on that machine's usual hub)."""
    legacy = base / "queue"
    if legacy.is_dir() and not (root / "queue").exists():
        legacy.rename(root / "queue")
        log.warning("queued changes from %s moved to %s", legacy, root / "queue")


def _user_file(base: Path, hub_url: str | None) -> Path:
    return base / "mounts" / hub_id(hub_url) / ".user"


def remember_user(base: Path, hub_url: str | None, user: str) -> None:
    """Who we were on this hub (an offline start needs it to find its state directory)."""
    path = _user_file(base, hub_url)
    try:
        if not path.exists() or path.read_text() != user:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(user)
            os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not remember the user of %s: %s", hub_url or "embedded", exc)


def last_user(base: Path, hub_url: str | None) -> str | None:
    """The user :func:`remember_user` saved for this hub, if any."""
    try:
        text = _user_file(base, hub_url).read_text().strip()
    except OSError:
        return None
    return text or None
