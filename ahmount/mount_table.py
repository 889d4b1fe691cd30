"""The FUSE mounts (and the FUSE control file system) this process can see, read from
``/proc/self/mountinfo`` (never from the mounts themselves: a hung daemon's mountpoint would
hang a ``stat``)."""

from __future__ import annotations

from pathlib import Path

#: The file system type of an ahmount mount (``subtype=ahmount``).
AHMOUNT_TYPE = "fuse.ahmount"


def entries(types: tuple[str, ...]) -> list[tuple[Path, str, str]]:
    """``(mount point, "major:minor", type)`` of every mount of one of ``types`` this
    process can see."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[Path, str, str]] = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fstype = right.split(" ", 1)[0]
        if fstype not in types:
            continue
        fields = left.split(" ")
        found.append((Path(fields[4].encode().decode("unicode_escape")), fields[2], fstype))
    return found


def fuse_entries() -> list[tuple[Path, str, str]]:
    """``(mount point, "major:minor", type)`` of every FUSE mount this process can see."""
    return entries((AHMOUNT_TYPE, "fuse"))


def ahmount_mounted_at(point: Path) -> bool:
    """Whether an ahmount mount is at ``point`` now."""
    return any(p == point and t == AHMOUNT_TYPE for p, _, t in fuse_entries())
