"""The daemons' limit of open files, raised to what the system allows them.

Every file open through the mount may hold a descriptor of the daemon's (a queue file
being written, a cache file being read), and the hub holds one per blob it serves. A
login shell and systemd start programs with a soft limit of 1,024 descriptors: a training
script holding a thousand files open through the mount got EMFILE, though its own limit
was far higher. The soft limit is only a default for programs that use ``select()``; the
daemons use epoll, so they raise it to the hard limit at start, as Go's runtime does for
every Go program (rclone among them).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("ahmount")


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft  # unlimited already, or no ceiling to raise to that we can name
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # a container's seccomp or a bad hard limit
            log.warning("could not raise the open files limit from %d to %d: %s",
                        soft, hard, exc)
            return soft
        log.debug("open files limit raised from %d to %d", soft, hard)
    return hard


def open_files_limit() -> int:
    """This process's soft limit of open files (what it can open before EMFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
