"""The grammars of what to move: ``add`` (local files and directories, globs, target
directories, renames), ``delete`` (object paths and ``dir/`` prefixes) and ``objects`` (what to
download), each checked against the hub's path rules before anything moves.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ahmount.errors import InvalidArgument, NotFound
from ahmount.hub.models import ObjectEntry
from ahmount.names import check_delete_path, check_object_path


@dataclass(frozen=True)
class LocalFile:
    """A local file and the object path it becomes."""

    local: Path
    target: str


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def check_regular(local: Path) -> None:
    """Refuse what is not a regular file once symlinks are followed: a FIFO or a device
    would hold the upload's read forever, a socket cannot be read, a symlink to nothing has
    nothing to send. Raises InvalidArgument naming the path and what it is."""
    try:
        mode = local.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(f"local path {str(local)!r} is a symbolic link to nothing",
                              path=str(local)) from None
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise InvalidArgument(f"local path {str(local)!r} is {kind}: only regular files are "
                              "committed; leave it out", path=str(local))


def _walk(directory: Path, target_dir: str) -> list[LocalFile]:
    """Every file below ``directory``, all of them regular files (:func:`check_regular`).
    A symbolic link to a directory is refused rather than followed (a loop) or skipped (its
    files silently missing from the commit)."""
    out: list[LocalFile] = []
    for root, subdirs, files in os.walk(directory):
        subdirs.sort()
        for name in subdirs:
            if (Path(root) / name).is_symlink():
                raise InvalidArgument(
                    f"local path {str(Path(root) / name)!r} is a symbolic link to a "
                    "directory, which is not followed: add its target itself",
                    path=str(Path(root) / name))
        rel = Path(root).relative_to(directory)
        for name in sorted(files):
            check_regular(Path(root) / name)
            parts = [p for p in (target_dir, *rel.parts, name) if p and p != "."]
            out.append(LocalFile(Path(root) / name, "/".join(parts)))
    return out


def _place(local: Path, target: str | None) -> list[LocalFile]:
    """Where one local file or directory goes. ``target`` None: under its own name at the root.
    A target ending in ``/`` is a directory to put it in; ``[name]`` keeps the name."""
    if not local.exists():
        if local.is_symlink():
            check_regular(local)  # says it is a link to nothing
        raise InvalidArgument(f"local path {str(local)!r} does not exist", path=str(local))
    if target is None:
        target = local.name if local.is_file() else local.resolve().name
    else:
        target = target.replace("[", "").replace("]", "")
        if target.endswith("/"):
            target = target + (local.name if local.name not in ("", ".") else
                               local.resolve().name)
    target = target.strip("/")
    if local.is_dir():
        return _walk(local, target)
    check_regular(local)
    return [LocalFile(local, target)]


def plan_adds(add: Sequence[str] | Mapping[str, str | None] | None) -> list[LocalFile]:
    """Expand the documented ``add`` forms into ``(local file, object path)`` pairs.

    ``['model.pt']`` → ``model.pt``; ``{'model.pt': 'saved_model/'}`` →
    ``saved_model/model.pt``; ``['./saved_model']`` → ``saved_model/…``;
    ``['./saved_model/*']`` → the directory's contents at the root;
    ``{'./saved_model': 'path/to/[saved_model]'}`` → ``path/to/saved_model/…``;
    ``{'./saved_model': 'path/to/renamed_dir'}`` → ``path/to/renamed_dir/…``.
    A mapping value of ``None`` places that entry as in the list form.
    Raises :class:`InvalidArgument` for a missing local path, a bad object path or two files
    that would land on one object path.
    """
    if add is None:
        return []
    if isinstance(add, str | bytes):
        raise InvalidArgument("add must be a list of local paths or a mapping, not a string")
    pairs: list[tuple[str, str | None]]
    if isinstance(add, Mapping):
        pairs = [(k, v) for k, v in add.items()]
    else:
        pairs = [(p, None) for p in add]
    files: list[LocalFile] = []
    for local, target in pairs:
        if not isinstance(local, str) or (target is not None and not isinstance(target, str)):
            raise InvalidArgument(f"add entry {local!r}: {target!r} must be strings")
        if glob.has_magic(local):
            matches = sorted(glob.glob(local))
            if not matches:
                raise InvalidArgument(f"local pattern {local!r} matches nothing", path=local)
            for match in matches:
                inner = None if target is None else target.rstrip("/") + "/"
                files.extend(_place(Path(match), inner))
        else:
            files.extend(_place(Path(local), target))
    seen: dict[str, Path] = {}
    for f in files:
        try:
            check_object_path(f.target)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{f.local} cannot be added: {exc}", path=str(f.local)) from None
        if f.target in seen and seen[f.target] != f.local:
            raise InvalidArgument(
                f"{seen[f.target]} and {f.local} would both become object {f.target!r}",
                path=f.target,
            )
        seen[f.target] = f.local
    return files


def plan_deletes(delete: Sequence[str] | None) -> list[str]:
    if delete is None:
        return []
    if isinstance(delete, str | bytes):
        raise InvalidArgument("delete must be a list of paths, not a string")
    return [check_delete_path(p) for p in delete]


def select_objects(entries: list[ObjectEntry], wanted: Sequence[str] | None,
                   where: str) -> list[ObjectEntry]:
    """The entries named by ``wanted`` (``a/b`` one object, ``a/b/`` all under it)."""
    if wanted is None:
        return entries
    if isinstance(wanted, str | bytes):
        raise InvalidArgument("objects must be a list of paths, not a string")
    by_path = {e.path: e for e in entries}
    chosen: dict[str, ObjectEntry] = {}
    for item in wanted:
        check_delete_path(item)
        if item.endswith("/"):
            found = [e for e in entries if e.path.startswith(item)]
        else:
            found = [by_path[item]] if item in by_path else []
        if not found:
            raise NotFound(f"no object {item!r} in {where}", path=f"{where}/{item}")
        chosen.update((e.path, e) for e in found)
    return [chosen[p] for p in sorted(chosen)]
