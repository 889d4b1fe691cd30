"""Abort a FUSE mount's connection: the one way to free the processes waiting on a daemon that
no longer answers (hung, or stopped with SIGSTOP).

``umount -l`` only detaches the path; a process already blocked in a read of the mount stays
blocked until the daemon answers, and so does every later ``close`` of a descriptor there (the
kernel sends a flush and waits). Writing to the connection's ``abort`` file in the FUSE control
file system (fusectl) ends every request in flight and every later one with ENOTCONN, at once.

Nothing here touches the mount itself (a ``stat`` of it would wait for the same daemon): the
connection is found in ``/proc/self/mountinfo`` by its device number, and the control file
system is mounted with a ``mount(2)`` call, not a command: a forked child would close the
caller's descriptors on the mount before its ``exec`` and wait on each of them.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from ahmount.errors import NotFound, PermissionDenied
from ahmount.mount_table import entries, fuse_entries

#: Where the FUSE control file system lives (systemd mounts it at boot; containers often not).
FUSECTL = Path("/sys/fs/fuse/connections")


def connection_id(mountpoint: Path) -> int:
    """The FUSE connection of the mount at ``mountpoint``: its device number as the kernel
    encodes it (``major << 20 | minor``), the name of its directory under :data:`FUSECTL`."""
    for point, device, _ in reversed(fuse_entries()):  # the last one mounted there is on top
        if point == mountpoint:
            major, minor = (int(part) for part in device.split(":"))
            return major << 20 | minor
    raise NotFound(f"{mountpoint} is not a FUSE mount point", path=str(mountpoint))


def _fusectl_mounted() -> bool:
    return any(point == FUSECTL for point, _, _ in entries(("fusectl",)))


def _mount_fusectl() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"fusectl", os.fsencode(FUSECTL), b"fusectl", 0, None) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:  # mounted meanwhile (another process aborting one)
            return
        if err == errno.EPERM:
            raise PermissionDenied(
                f"the FUSE control file system is not mounted at {FUSECTL}, and mounting it "
                f"needs root: run `mount -t fusectl fusectl {FUSECTL}` as root",
                path=str(FUSECTL))
        raise OSError(err, f"mount -t fusectl at {FUSECTL}: {os.strerror(err)}")


def _control_dir(mountpoint: Path) -> Path:
    conn = connection_id(mountpoint)
    if not _fusectl_mounted():
        _mount_fusectl()
    return FUSECTL / str(conn)


def requests_waiting(mountpoint: Path) -> int:
    """How many requests of the mount at ``mountpoint`` wait for its daemon's answer now."""
    return int((_control_dir(mountpoint) / "waiting").read_text())


def abort(mountpoint: Path) -> None:
    """End every request of the mount at ``mountpoint``, now and later, with ENOTCONN. Its
    daemon, if it runs on, sees its connection gone and exits; the path stays a (dead) mount
    point until it is unmounted (``fusermount3 -u -z``)."""
    control = _control_dir(mountpoint) / "abort"
    try:
        control.write_text("1")
    except FileNotFoundError:
        raise NotFound(f"{mountpoint} has no FUSE connection any more (its daemon exited)",
                       path=str(mountpoint)) from None
    except PermissionError:
        raise PermissionDenied(f"{mountpoint} is another user's mount: only they or root may "
                               "abort it", path=str(mountpoint)) from None
