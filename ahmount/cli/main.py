"""``ah``: every Asset Hub operation as a command.

Each command is a thin layer over :mod:`ahmount.ah` (or, for what the documented API lacks —
``status``, ``share`` — over :class:`HubClient`). Results go to stdout (tables, or the API's
dicts with ``--json``); errors print one line to stderr and exit with the code
:mod:`ahmount.exit_codes` assigns.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from ahmount import __version__, ah
from ahmount.cli import completion
from ahmount.cli.tables import date, printable, render, table_for
from ahmount.client.embedded import connect
from ahmount.client.hub_client import HubClient
from ahmount.config import (
    dirs,
    hub_identity,
    load_config,
    make_config,
    remove_config,
    save_config,
)
from ahmount.errors import Conflict, HubUnavailable, InvalidArgument, NotFound
from ahmount.exit_codes import EXIT_CODE_MEANINGS, USAGE, exit_code
from ahmount.paths import parse
from ahmount.sync_runner import run_sync
from ahmount.vfs.hub_view import utc_time
from ahmount.wording import human_size, plural

Handler = Callable[[argparse.Namespace], int]
PATH_HELP = "an API path: model/llm, model/llm/gpt2, model/llm/gpt2:v1, /alice/t9k-assethub/..."
BRANCH_HELP = "a branch (model/llm/gpt2:v1), or a path inside a mounted branch (default: .)"
JSON_HELP = "print the result as JSON (the API's dicts)"
LABEL_HELP = "a label; repeatable"
EXIT_CODES_HELP = "exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}"
                                              for code, meaning in EXIT_CODE_MEANINGS)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _resource_dict(obj: Any) -> dict[str, Any]:
    keys = ("kind", "path", "name", "id", "labels", "description", "permission", "commit_id",
            "message", "committer", "creation_date", "parents")
    return {k: getattr(obj, k) for k in keys if hasattr(obj, k)}


# -- commands ---------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    config = make_config(args.host, args.ais_host, args.api_key, args.timeout)
    if config.ah_host is None:
        raise InvalidArgument("ah login needs --host URL")
    ah.login(config.ah_host, config.ais_host, config.api_key, args.timeout)
    path = save_config(config)
    print(f"Logged in to {config.ah_host}; settings saved in {path}")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    removed = remove_config()
    print("Logged out; the embedded hub is used again" if removed else "Not logged in")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    resource = args.resource
    for flag in ("branch", "tag", "commit"):
        if getattr(args, flag):
            resource = flag
    items = ah.list(args.path, resource=resource)
    if args.json:
        _print_json(items)
    else:
        print(table_for(resource, parse(args.path).level, items, raw_bytes=args.bytes))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    obj = ah.get(args.path)
    info = _resource_dict(obj)
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            shown = ",".join(value) if isinstance(value, list) else value
            if key == "creation_date" and isinstance(value, int | float):
                shown = date(value)  # the date format of the listings
            print(printable(f"{key}: {shown}"))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    obj = ah.create(args.path, labels=args.label, description=args.description or "",
                    exist_ok=args.exist_ok, create_tag=args.tag, source=args.source)
    if args.json:
        _print_json(_resource_dict(obj))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete; a folder or asset with something in it asks first on a terminal (scripts,
    pipes and ``-y`` are not asked, as the API's ``delete`` is not)."""
    level = parse(args.path).level
    if level in ("folder", "asset") and sys.stdin.isatty() and not args.yes:
        try:
            inside = ah.list(args.path)
        except NotFound:
            inside = []  # --force deletes nothing quietly; without it, delete says so
        if inside:
            what = plural(len(inside), "asset") if level == "folder" else \
                plural(len(inside), "object") + " on main"
            answer = input(f"{args.path} holds {what}; delete it for good? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("not deleted", file=sys.stderr)
                return 1
    ah.delete(args.path, force=args.force)
    return 0


def _adds(values: Sequence[str]) -> list[str] | dict[str, str | None] | None:
    if not values:
        return None
    pairs: list[tuple[str, str | None]] = []
    for value in values:
        local, colon, target = value.partition(":")
        pairs.append((local, target if colon else None))
    if all(t is None for _, t in pairs):
        return [local for local, _ in pairs]
    return dict(pairs)


def _in_mount(path: str | None) -> tuple[Path, list[str]] | None:
    """``(mountpoint, segments)`` when ``path`` (default: the current directory) is inside an
    ah-mount; None when it is an API path."""
    from ahmount.mount.control import find_mount, foreign_mount

    if path is not None and not (path.startswith((".", "/", "~")) or os.path.exists(path)):
        return None
    target = Path(os.path.expanduser(path)) if path else Path(os.getcwd())
    found = find_mount(target)
    if found is None:
        other = foreign_mount(target)
        if other is not None:  # else it was taken for an API path, and refused as one
            raise InvalidArgument(
                f"{target} is inside the ah-mount at {other}, which this ah does not "
                "control (its control socket is not in this ah's "
                f"{dirs().runtime / 'mounts'}): it was started with another AHMOUNT_HOME "
                "or XDG_RUNTIME_DIR, or by another user; run ah as that user, with the "
                "environment the mount was started with")
        return None
    return found[0], list(found[1])


def _mount_queuing(address: str) -> tuple[Path, list[str]] | None:
    """The running mount (of this hub and key) holding queued changes of the branch the API
    path ``address`` names, and the branch's path in it: ``ah status|commit|reset|sync
    model/llm/gpt2:main`` run anywhere acts on what a mount queued, as it would inside it."""
    from ahmount.mount.control import mount_queuing

    if parse(address).level not in ("asset", "ref"):
        return None
    found = mount_queuing(address, hub_identity(load_config()))
    return None if found is None else (found[0], list(found[1]))


def _mount_branch_op(args: argparse.Namespace, op: str, transfers: bool = False,
                     **extra: Any) -> dict[str, Any] | None:
    """Run ``op`` on the mounted branch ``args.path`` is in; None if it is not in a mount.
    ``transfers``: the daemon streams the progress of what it uploads, drawn here."""
    from ahmount.mount.control import call
    from ahmount.transfer.progress import RemoteProgress

    found = _in_mount(args.path)
    if found is None:
        if args.path is None:
            raise InvalidArgument(f"ah {args.command} needs a path: the current directory is "
                                  "not inside a branch of an ah-mount")
        found = _mount_queuing(args.path)
        if found is None:
            return None
        if not args.quiet:
            print(f"(the changes queued in the ah-mount at {found[0]})", file=sys.stderr)
    progress = RemoteProgress() if transfers else None
    try:
        result = call(found[0], op, {"path": found[1], **extra}, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    assert isinstance(result, dict)
    return result


def cmd_commit(args: argparse.Namespace) -> int:
    if not args.add and not args.delete:
        done = _mount_branch_op(args, "commit", transfers=True, message=args.message,
                                force=args.force)
        if done is not None:
            if args.json:
                _print_json(done)
            elif done["commit"]:
                print(done["commit"])
                print(f"Commit {done['commit'][:8]} created "
                      f"({plural(done['taken'], 'queued change')})", file=sys.stderr)
            else:
                print("Nothing to commit", file=sys.stderr)
            return 0
    if args.path is None:
        raise InvalidArgument("ah commit needs the path of a branch (model/<folder>/<asset>:"
                              "<branch>) when not run inside a mounted branch")
    adds = cast("list[str] | dict[str, str] | None", _adds(args.add))
    result = ah.commit(args.path, args.message, delete=args.delete or None, add=adds,
                       force=args.force)
    if args.json:
        _print_json(None if result is None else _resource_dict(result))
    elif result is not None:
        print(result.id)  # the log line names it too; stdout carries it for scripts
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    ah.download(args.path, objects=args.object or None, save_dir=args.save_dir)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    if args.name is None and args.label is None and args.description is None:
        raise InvalidArgument("ah update needs -n NAME, --label or --description")
    ah.update(args.path, name=args.name, labels=args.label, description=args.description)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    merged = _mount_branch_op(args, "merge")
    if merged is None:
        ah.merge(args.path)  # says what it did (the API's log line)
    elif merged.get("commit"):
        print(f"merged into main as commit {str(merged['commit'])[:12]}", file=sys.stderr)
    else:
        print("nothing to merge: main already equals the branch", file=sys.stderr)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    done = _mount_branch_op(args, "reset")
    if done is None:
        ah.reset(args.path)
    else:
        print(f"Dropped {plural(done['dropped_local'], 'queued change')} and "
              f"{plural(done['dropped_staged'], 'staged change')}", file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    done = _mount_branch_op(args, "sync", transfers=True)
    if done is None:
        raise InvalidArgument(f"{args.path} is not inside a branch of an ah-mount, and no "
                              "running ah-mount has queued changes of it")
    if not args.quiet:
        print(f"{plural(done['uploaded'], 'file')} uploaded ahead "
              f"({human_size(done['bytes'])} sent)", file=sys.stderr)
    return 0


def _hub_call(fn: Callable[[HubClient], Any]) -> Any:
    config = load_config()

    async def main() -> Any:
        async with connect(config) as hub:
            return await fn(hub)

    return run_sync(main)


#: How ``ah status`` names each kind of queued change (git's words).
_STATUS_WORDS = {"new": "new file:", "modified": "modified:", "delete": "deleted:"}


def cmd_status(args: argparse.Namespace) -> int:
    mounted = _mount_branch_op(args, "branch_status")
    if mounted is not None:
        if args.json:
            _print_json(mounted)
            return 0
        print(f"On {mounted['branch']}: {mounted['adds']} added/changed, "
              f"{mounted['deletes']} deleted, {human_size(mounted['bytes'])} queued")
        if mounted.get("hub", "online") != "online":
            print(f"  hub {mounted['hub']}: showing what is cached; queued changes upload "
                  "and commit once it answers")
        remote = set(mounted["changed_remotely"])
        for change in mounted["changes"]:
            note = "  (also changed on the hub)" if change["path"] in remote else ""
            if change.get("incomplete"):
                note += f"  (incomplete: {change['incomplete']})"
            word = _STATUS_WORDS.get(change["op"], change["op"] + ":")
            print(f"  {word:<10} {printable(change['path'])}{note}")
        return 0
    parsed = parse(args.path)
    if parsed.level not in ("asset", "ref"):
        raise InvalidArgument(f"ah status needs the path of a branch, not {args.path!r}")

    async def run(hub: HubClient) -> list[dict[str, Any]]:
        p = parsed.with_owner(await hub.whoami()) if parsed.owner is None else parsed
        changes = await hub.changes(p.asset_addr(), p.ref or "main")
        return [{"op": c.op, "path": c.path, "session": c.session,
                 "size": c.entry.size if c.entry else None} for c in changes]

    changes = _hub_call(run)
    if args.json:
        _print_json(changes)
    elif not changes:
        print(f"On {args.path}: nothing to commit")
    else:
        print(f"On {args.path}: {plural(len(changes), 'uncommitted change')}")
        print(render(["CHANGE", "PATH", "BYTES"],
                     [["added" if c["op"] == "add" else "deleted", c["path"],
                       "" if c["size"] is None else str(c["size"])] for c in changes]))
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    parsed = parse(args.folder)
    if parsed.level != "folder":
        raise InvalidArgument(f"ah share needs a folder path, not {args.folder!r}")
    if not (args.public or args.private or args.user):
        raise InvalidArgument("ah share needs USER PERMISSION, --revoke USER, --public or "
                              "--private")

    async def run(hub: HubClient) -> None:
        p = parsed.with_owner(await hub.whoami()) if parsed.owner is None else parsed
        addr = p.folder_addr()
        if args.public or args.private:
            await hub.set_public(addr, bool(args.public))
        if args.user:
            permission = None if args.revoke else args.permission
            if not args.revoke and permission not in ("view", "edit"):
                raise InvalidArgument(f"permission {permission!r} must be 'view' or 'edit'")
            await hub.share_folder(addr, args.user, permission)

    _hub_call(run)
    print(f"{args.folder}: sharing updated")
    return 0


def _mount_of(path: str | None) -> Path:
    """The mountpoint that contains ``path`` (default: the current directory)."""
    found = _in_mount(path or os.getcwd())
    if found is None:
        raise NotFound(f"{path or os.getcwd()} is not inside an ah-mount", path=path)
    return found[0]


def cmd_unmount(args: argparse.Namespace) -> int:
    from ahmount.mount_table import ahmount_mounted_at

    mountpoint = _forced_mount_of(args.path) if args.force else _mount_of(args.path)
    try:
        _ask_to_unmount(mountpoint, args.timeout, lazy=args.lazy)
    except Conflict:
        if not args.force:
            raise
        _abort_and_detach(mountpoint)
        print(f"{mountpoint}: its FUSE connection was aborted and the mount point detached; "
              "closed files stay queued for the next mount")
        return 0
    if args.force and ahmount_mounted_at(mountpoint):  # unmounted, and mounted again since
        raise Conflict(f"{mountpoint} was mounted again meanwhile; nothing aborted")
    if args.lazy:
        print(f"{mountpoint} detached; its daemon serves what still uses it and exits once "
              "nothing does")
    else:
        print(f"{mountpoint} unmounted")
    return 0


def _ask_to_unmount(mountpoint: Path, timeout: float, lazy: bool = False) -> None:
    """Ask the daemon to unmount (``lazy``: to detach the path and serve what still uses
    the mount) and wait until it has; :class:`Conflict` when it does not answer or the
    mount point stays (busy) for ``timeout`` seconds."""
    from ahmount.mount.control import call
    from ahmount.mount_table import ahmount_mounted_at

    hint = "; `ah unmount --force` aborts it (processes waiting on it get an error)"
    busy_hint = f"; `ah unmount --lazy` detaches it and lets them finish{hint}"
    deadline = time.monotonic() + timeout
    try:
        call(mountpoint, "unmount", {"lazy": lazy}, timeout=timeout)
    except Conflict as exc:  # in use: refused, as umount refuses
        raise Conflict(f"{exc}{busy_hint}", path=str(mountpoint)) from None
    except TimeoutError:
        raise Conflict(f"the ah-mount at {mountpoint} did not answer in {timeout:g}s "
                       f"(hung or stopped){hint}", path=str(mountpoint)) from None
    except HubUnavailable:  # it hung up: fine if that was its shutdown after unmounting
        if ahmount_mounted_at(mountpoint):
            raise
    except (NotFound, OSError) as exc:  # no daemon answers: a dead one's mount point
        if not ahmount_mounted_at(mountpoint):
            raise
        raise Conflict(f"no ah-mount answers for {mountpoint} ({exc}){hint}",
                       path=str(mountpoint)) from None
    # Read from the mount table, never by a stat of the mount point: that would wait too.
    while ahmount_mounted_at(mountpoint):
        if time.monotonic() > deadline:
            raise Conflict(f"{mountpoint} is still mounted after {timeout:g}s{hint}",
                           path=str(mountpoint))
        time.sleep(0.05)


def _forced_mount_of(path: str | None) -> Path:
    """For ``--force``: the ah-mount containing ``path`` by the mount table alone, also one
    whose daemon is gone (and its control socket with it)."""
    from ahmount.mount.control import find_mount

    target = Path(os.path.expanduser(path or os.getcwd()))
    found = find_mount(target, controlled=False)
    if found is None:
        raise NotFound(f"{os.path.abspath(target)} is not inside an ah-mount",
                       path=str(target))
    return found[0]


def _abort_and_detach(mountpoint: Path) -> None:
    """End every request of the mount now (see :mod:`ahmount.mount.fuse_abort`), then detach
    the mount point; its daemon, if it runs on, sees the connection gone and exits."""
    import subprocess

    from ahmount.mount import fuse_abort
    from ahmount.mount_table import ahmount_mounted_at

    fuse_abort.abort(mountpoint)
    result = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 and ahmount_mounted_at(mountpoint):
        raise Conflict(f"{mountpoint} was aborted but could not be detached: "
                       f"{result.stderr.strip()}", path=str(mountpoint))


def cmd_mount_op(args: argparse.Namespace) -> int:
    from ahmount.mount.control import call

    mountpoint = _mount_of(args.path)
    op_args = {"action": "drop" if args.drop else "stats"} if args.op == "cache" else {}
    result = call(mountpoint, args.op, op_args)
    if args.json or not isinstance(result, dict):
        _print_json(result)
    else:
        for key, value in _flatten(result):
            print(f"{key}: {value}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Warm a mount's cache with files, directories or refs, showing progress."""
    from ahmount.mount.control import call
    from ahmount.transfer.progress import Progress

    places = [_in_mount(p) for p in args.paths]
    if any(p is None for p in places):
        bad = next(path for path, p in zip(args.paths, places, strict=True) if p is None)
        raise InvalidArgument(f"{bad} is not inside an ah-mount")
    mounts = {p[0] for p in places if p is not None}
    if len(mounts) != 1:
        raise InvalidArgument("prefetch paths of one mount at a time")
    mountpoint = mounts.pop()
    job = call(mountpoint, "prefetch", {"paths": [p[1] for p in places if p is not None],
                                        "jobs": args.jobs})
    if not args.quiet:
        print(f"prefetching {plural(job['files'], 'file')} ({human_size(job['bytes'])}) "
              f"into {mountpoint}'s cache", file=sys.stderr)
    if args.background:
        print(f"job {job['id']}: 'ah stats' shows the cache filling", file=sys.stderr)
        return 0
    progress = Progress("Prefetching", job["files"], job["bytes"])
    try:
        while True:
            job = call(mountpoint, "prefetch_status", {"job": job["id"]})
            progress.show({"bytes_done": job["done_bytes"], "files_done": job["done_files"]})
            if job["state"] != "running":
                break
            time.sleep(0.2)
    finally:
        progress.close()
    for error in job["errors"]:
        print(f"failed: {error}", file=sys.stderr)
    print(f"{plural(job['done_files'] - job['failed'], 'file')} in the cache, "
          f"{job['failed']} failed", file=sys.stderr)
    return 1 if job["failed"] else 0


# -- history and differences ------------------------------------------------------------------

def _api_path(path: str | None) -> str:
    """An API path as given, or the API path of a mount path (``.`` inside a branch
    directory, ``~/assets/model/llm/gpt2/v1/...``), through the mount's layout."""
    from ahmount.vfs.layout import Place, locate

    found = _in_mount(path)
    if found is None:
        if path is None:
            raise InvalidArgument("give a path: the current directory is not inside an "
                                  "ah-mount")
        return path
    mountpoint, segments = found
    me = _same_hub_as(mountpoint, path or os.getcwd())
    loc = locate(tuple(segments), me)
    if loc.place in (Place.ROOT, Place.SCOPE, Place.SCOPE_KIND, Place.OWNER):
        raise InvalidArgument(f"{path or os.getcwd()} is not inside a kind, folder or asset "
                              "of the mount")
    if loc.place is Place.OBJECT:  # a file or directory in a ref: the ref
        return f"/{loc.owner}/t9k-assethub/{loc.kind}/{loc.folder}/{loc.asset}:{loc.ref}"
    return loc.api_path()


def _same_hub_as(mountpoint: Path, where: str) -> str:
    """The user of the mount at ``mountpoint``, after checking that it shows the hub this
    ``ah`` talks to, with the same key: otherwise the API path of ``where`` would name a
    folder, asset or branch of another hub (``ah delete .`` deleting one there)."""
    from ahmount.mount.control import call

    config = load_config()
    try:
        answer = call(mountpoint, "serves", {"identity": hub_identity(config)})
    except InvalidArgument:  # "unknown operation": a daemon older than this ah
        raise InvalidArgument(
            f"the ah-mount at {mountpoint} does not say which hub it shows (it was started "
            "by an older ahmount): remount it, or give an API path") from None
    if not answer["same"]:
        ours = config.ah_host or "the embedded hub"
        theirs = "the embedded hub" if answer["hub"] == "embedded" else answer["hub"]
        how = "the same hub with another API key" if theirs == ours else theirs
        raise InvalidArgument(
            f"{where} is in the ah-mount at {mountpoint}, which shows {how}, but ah talks to "
            f"{ours}: its path would name something else there. Run ah login with that "
            "mount's hub and key, or give an API path")
    return str(answer["user"])


#: Commands whose PATH may also be a path in a mount (or ``.``), mapped to its API path.
MOUNT_PATH_COMMANDS = frozenset({"ls", "list", "get", "create", "delete", "download",
                                 "update"})


def _asset_and_ref(path: str) -> tuple[Any, str]:
    parsed = parse(path)
    if parsed.level not in ("asset", "ref"):
        raise InvalidArgument(f"{path!r} does not name an asset or a reference of one")
    return parsed, parsed.ref or "main"


def cmd_tag(args: argparse.Namespace) -> int:
    """Tag a branch's head (inside a mounted branch directory: that branch)."""
    parsed, ref = _asset_and_ref(_api_path(args.path))
    base = parsed.original.rsplit(":", 1)[0] if parsed.ref is not None else parsed.original
    tag = ah.create(f"{base}:{args.name}", create_tag=True, source=ref)
    print(f"tag {args.name} at {str(getattr(tag, 'commit_id', ''))[:12]} (the head of {ref})")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """git log for a ref: newest first."""
    parsed, ref = _asset_and_ref(_api_path(args.path))

    async def run(hub: HubClient) -> list[Any]:
        p = parsed.with_owner(await hub.whoami()) if parsed.owner is None else parsed
        return await hub.log(p.asset_addr(), ref, limit=args.n)

    commits = _hub_call(run)
    if args.json:
        _print_json([{"id": c.id, "message": c.message, "committer": c.committer,
                      "created": c.created, "parents": c.parents} for c in commits])
        return 0
    for i, c in enumerate(commits):
        first = c.message.splitlines()[0] if c.message else ""
        if args.oneline:
            print(printable(f"{c.id[:12]} {utc_time(c.created)[:10]} {c.committer}: {first}"))
            continue
        if i:
            print()
        print(f"commit {c.id}")
        if len(c.parents) > 1:
            print("Merge: " + " ".join(p[:12] for p in c.parents))
        print(printable(f"Author: {c.committer}"))
        print(f"Date:   {utc_time(c.created)}")
        print()
        for line in c.message.splitlines() or [""]:
            print(printable(f"    {line}"))
    return 0


def _object_map(entries: list[Any]) -> dict[str, Any]:
    return {e.path: e for e in entries}


def diff_lines(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(word, path, sizes)`` for each object added, deleted or modified, by path."""
    out = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a is None:
            assert b is not None
            out.append(("added:", path, human_size(b.size)))
        elif b is None:
            out.append(("deleted:", path, human_size(a.size)))
        elif a.sha256 != b.sha256:
            out.append(("modified:", path, f"{human_size(a.size)} -> {human_size(b.size)}"))
    return out


def _print_diff(lines: list[tuple[str, str, str]], as_json: bool) -> None:
    if as_json:
        _print_json([{"change": w.rstrip(":"), "path": p, "sizes": s} for w, p, s in lines])
        return
    for word, path, sizes in lines:
        print(printable(f"  {word:<10} {path}  ({sizes})"))
    counts = {w: sum(1 for x, _, _ in lines if x == w) for w in ("added:", "modified:",
                                                                  "deleted:")}
    print(f"{counts['added:']} added, {counts['modified:']} modified, "
          f"{counts['deleted:']} deleted")


def cmd_show(args: argparse.Namespace) -> int:
    """A commit (a ref's head, or an id prefix) and its changes against its first parent."""
    parsed, ref = _asset_and_ref(_api_path(args.path))

    async def run(hub: HubClient) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        p = parsed.with_owner(await hub.whoami()) if parsed.owner is None else parsed
        addr = p.asset_addr()
        commit = (await hub.resolve(addr, ref)).commit
        _, new = await hub.list_objects(addr, commit.id)
        old: list[Any] = []
        if commit.parents:
            _, old = await hub.list_objects(addr, commit.parents[0])
        return commit, _object_map(old), _object_map(new)

    commit, old, new = _hub_call(run)
    lines = diff_lines(old, new)
    if args.json:
        _print_json({"id": commit.id, "message": commit.message,
                     "committer": commit.committer, "created": commit.created,
                     "parents": commit.parents, "metadata": commit.metadata,
                     "changes": [{"change": w.rstrip(":"), "path": p, "sizes": z}
                                 for w, p, z in lines]})
        return 0
    print(f"commit {commit.id}")
    print(printable(f"Author: {commit.committer}"))
    print(f"Date:   {utc_time(commit.created)}")
    if commit.parents:
        print("Parents: " + " ".join(p[:12] for p in commit.parents))
    print()
    for line in commit.message.splitlines() or [""]:
        print(printable(f"    {line}"))
    print()
    _print_diff(lines, False)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Objects added, deleted or modified from A to B (B: a path of the same asset, or a bare
    ref); with no arguments inside a mounted branch, its queued changes."""
    if args.a is None:
        return cmd_status(argparse.Namespace(path=None, json=args.json, command="diff"))
    parsed_a, ref_a = _asset_and_ref(_api_path(args.a))
    if args.b is None:
        raise InvalidArgument("ah diff A B needs two refs (or none, inside a mounted branch)")
    if ":" not in args.b and "/" not in args.b:
        parsed_b, ref_b = parsed_a, args.b
    else:
        parsed_b, ref_b = _asset_and_ref(_api_path(args.b))

    async def run(hub: HubClient) -> tuple[dict[str, Any], dict[str, Any]]:
        me = await hub.whoami()
        maps = []
        for p, ref in ((parsed_a, ref_a), (parsed_b, ref_b)):
            owned = p.with_owner(me) if p.owner is None else p
            _, entries = await hub.list_objects(owned.asset_addr(), ref)
            maps.append(_object_map(entries))
        return maps[0], maps[1]

    old, new = _hub_call(run)
    _print_diff(diff_lines(old, new), args.json)
    return 0


def cmd_log_level(args: argparse.Namespace) -> int:
    from ahmount.mount.control import call

    result = call(_mount_of(args.path), "log_level", {"level": args.level})
    print(f"log level: {result['level']}")
    return 0


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key in sorted(value):
        item = value[key]
        if isinstance(item, dict):
            out.extend(_flatten(item, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", item))
    return out


# -- parser -----------------------------------------------------------------------------------

def _sub(subs: Any, name: str, handler: Handler, help_: str, example: str,
         aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subs.add_parser(
        name, aliases=list(aliases), help=help_, description=help_,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The global flag after the command too (ah commit -q ...); SUPPRESS keeps the value
    # given before the command when it is not repeated after it.
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or summary lines")
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ah", description="Asset Hub: versioned models and datasets.",
        epilog="example:\n  ah create model/llm && ah create model/llm/gpt2\n"
               "  ah commit model/llm/gpt2 -m 'first weights' -a model.pt\n\n"
               + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or summary lines")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(subs, "login", cmd_login, "store the hub address and API key (file mode 0600)",
             "ah login --host http://hub:8080 --api-key ah_xxx")
    p.add_argument("--host", required=True, help="the hub's URL, e.g. http://hub:8080")
    p.add_argument("--api-key", required=True, help="your API key on that hub (ah_...)")
    p.add_argument("--ais-host", default=None, help="data-plane URL (default: --host)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may take (default 60)")

    _sub(subs, "logout", cmd_logout, "forget the stored hub; use the embedded hub", "ah logout")

    p = _sub(subs, "ls", cmd_list, "list folders, assets, objects, branches, tags or commits",
             "ah ls model/llm/gpt2:v1    ah ls model/llm/gpt2 --branch", aliases=["list"])
    p.add_argument("path", nargs="?", help=PATH_HELP + "; or a path in a mount (default: .)")
    p.add_argument("--resource", default="default",
                   choices=["default", "branch", "tag", "commit"],
                   help="what to list (the API's resource argument)")
    p.add_argument("--branch", action="store_true", help="list branches of an asset")
    p.add_argument("--tag", action="store_true", help="list tags of an asset")
    p.add_argument("--commit", action="store_true", help="list commits of a reference")
    p.add_argument("--bytes", action="store_true",
                   help="sizes in bytes (default: human-readable, 4.0 KiB)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "get", cmd_get, "show a folder, asset, branch, tag or commit",
             "ah get model/llm/gpt2:a41ac4ec")
    p.add_argument("path", nargs="?", help=PATH_HELP + "; or a path in a mount (default: .)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "create", cmd_create, "create a folder, asset, branch or tag",
             "ah create model/llm/gpt2:20220101 --tag --source v1")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("--tag", action="store_true", help="create a tag instead of a branch")
    p.add_argument("--source", default="main", help="what a tag points at (branch/tag/commit)")
    p.add_argument("--label", action="append", default=None, help=LABEL_HELP)
    p.add_argument("--description", default=None, help="a description, free text")
    p.add_argument("--exist-ok", action="store_true",
                   help="no error if it exists already")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "delete", cmd_delete, "delete a folder, asset, branch or tag",
             "ah delete model/llm/gpt2:v1")
    p.add_argument("path", help=PATH_HELP)
    p.add_argument("--force", action="store_true", help="no error if it does not exist")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask before deleting a folder or asset that holds something")

    p = _sub(subs, "commit", cmd_commit, "commit local files and deletions to a branch",
             "ah commit model/llm/gpt2:v1 -m 'new weights' -a model.pt -a ./cfg:config/\n"
             "  cd ~/assets/model/llm/gpt2/v1 && cp ~/w.pt . && ah commit -m 'new weights'")
    p.add_argument("path", nargs="?", help=BRANCH_HELP)
    p.add_argument("-m", "--message", required=True, help="the commit message")
    p.add_argument("-a", "--add", action="append", default=[], metavar="LOCAL[:PATH]",
                   help="a local file or directory to add (at PATH in the asset; a PATH "
                   "ending in / is a directory); repeatable")
    p.add_argument("-d", "--delete", action="append", default=[], metavar="PATH",
                   help="an object (or, ending in /, a directory) to delete; repeatable")
    p.add_argument("--force", action="store_true",
                   help="include unknown staged changes; in a mount, also files changed on "
                        "the hub since queued and incomplete files (a write failed)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "download", cmd_download, "download objects of a branch, tag or commit",
             "ah download dataset/images/cifar10:20220101 --save-dir ./data")
    p.add_argument("path", nargs="?", help="an asset or ref (default ref: main), or a path "
                   "in a mount (default: .)")
    p.add_argument("--object", action="append", default=[], metavar="PATH",
                   help="only this object (or, ending in /, everything under it); "
                   "repeatable")
    p.add_argument("--save-dir", default=".", help="where to write them (default: .)")

    p = _sub(subs, "update", cmd_update, "rename, relabel or describe a folder or asset",
             "ah update model/llm -n generative-language-model")
    p.add_argument("path", help="a folder or an asset")
    p.add_argument("-n", "--name", default=None, help="a new name")
    p.add_argument("--label", action="append", default=None, help=LABEL_HELP)
    p.add_argument("--description", default=None, help="a new description")

    p = _sub(subs, "merge", cmd_merge, "make main of a model equal to a branch",
             "ah merge model/llm/gpt2:v1    (or, inside a mounted branch: ah merge)")
    p.add_argument("path", nargs="?", help=BRANCH_HELP)

    p = _sub(subs, "reset", cmd_reset, "drop the uncommitted changes of a branch",
             "ah reset model/llm/gpt2:main    (or, inside a mounted branch: ah reset)")
    p.add_argument("path", nargs="?", help=BRANCH_HELP)

    p = _sub(subs, "sync", cmd_sync, "upload a mounted branch's queued bytes now",
             "cd ~/assets/model/llm/gpt2/v1 && ah sync")
    p.add_argument("path", nargs="?", help="a path inside a mounted branch (default: .)")

    p = _sub(subs, "status", cmd_status, "show the uncommitted changes of a branch",
             "ah status model/llm/gpt2:v1    (or, inside a mounted branch: ah status)")
    p.add_argument("path", nargs="?", help=BRANCH_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "share", cmd_share, "share a folder with a user, or make it public",
             "ah share model/llm bob view")
    p.add_argument("folder", help="a folder of yours (model/llm)")
    p.add_argument("user", nargs="?", help="the user to share it with")
    p.add_argument("permission", nargs="?", default="view", help="view (default) or edit")
    p.add_argument("--revoke", action="store_true", help="stop sharing with USER")
    p.add_argument("--public", action="store_true", help="everyone may read it")
    p.add_argument("--private", action="store_true", help="only you and those you shared "
                   "it with")

    p = _sub(subs, "unmount", cmd_unmount, "unmount an ah-mount (queued edits are kept)",
             "ah unmount ~/assets")
    p.add_argument("path", nargs="?", help="the mountpoint or a path inside (default: .)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the unmount (default 30)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--lazy", action="store_true",
                     help="detach the mount point now and let the processes still using the "
                     "mount finish (umount -l); the daemon exits once nothing uses it")
    how.add_argument("--force", action="store_true",
                     help="if the mount is in use or its daemon does not answer for --timeout "
                     "seconds: abort its FUSE connection (whatever uses it gets an error; "
                     "files still open for writing may lose their last writes, closed ones "
                     "stay queued) and detach the mount point")

    for op, help_ in (("refresh", "forget cached listings: show changes made elsewhere now"),
                      ("stats", "counters of a mount: FUSE ops, cache hits, bytes fetched"),
                      ("cache", "cache usage of a mount; --drop empties it")):
        p = _sub(subs, op, cmd_mount_op, help_, f"ah {op} ~/assets")
        if op == "cache":
            p.add_argument("--drop", action="store_true", help="empty the cache")
        p.add_argument("path", nargs="?", help="a path inside the mount (default: .)")
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        p.set_defaults(op=op)

    p = _sub(subs, "tag", cmd_tag, "tag a branch's head (tags are read-only refs; mkdir in a "
             "mount makes branches, not tags)",
             "cd ~/assets/model/llm/gpt2/main && ah tag v2    ah tag v2 model/llm/gpt2:main")
    p.add_argument("name", help="the tag's name")
    p.add_argument("path", nargs="?", help=BRANCH_HELP)

    p = _sub(subs, "log", cmd_log, "the commits of a ref, newest first (like git log)",
             "ah log model/llm/gpt2:v1 -n 5    (or, inside a mounted branch: ah log)")
    p.add_argument("path", nargs="?", help="an asset or ref, or a path inside a mount")
    p.add_argument("-n", type=int, default=1000, help="at most this many commits")
    p.add_argument("--oneline", action="store_true", help="one line per commit")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "show", cmd_show, "a commit and what it changed against its parent",
             "ah show model/llm/gpt2:a41ac4ec")
    p.add_argument("path", nargs="?", help="a ref or commit id, or a path inside a mount")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "diff", cmd_diff, "objects added, modified and deleted between two refs",
             "ah diff model/llm/gpt2:v1 main    (inside a mounted branch: ah diff)")
    p.add_argument("a", nargs="?", help="from: a ref path (or a path inside a mount)")
    p.add_argument("b", nargs="?", help="to: a ref path of any asset, or a bare ref name")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = _sub(subs, "prefetch", cmd_prefetch,
             "fetch files, directories or refs of a mount into its cache (warm-up)",
             "ah prefetch ~/assets/dataset/imgs/coco/v1 --jobs 16")
    p.add_argument("paths", nargs="+", help="paths inside one mount")
    p.add_argument("--jobs", type=int, default=8, help="requests at a time (default 8)")
    p.add_argument("--background", action="store_true",
                   help="start it and return; the mount goes on")

    p = _sub(subs, "log-level", cmd_log_level, "change a mount's log level while it runs",
             "ah log-level debug ~/assets")
    p.add_argument("level", choices=["debug", "info", "warning", "error"],
                   help="the new level")
    p.add_argument("path", nargs="?", help="a path inside the mount (default: .)")

    p = _sub(subs, "completion", cmd_completion,
             "print the shell completion script (commands, options, and folder, asset and "
             "ref names from the hub)",
             "eval \"$(ah completion bash)\"    # or: ah completion bash > "
             "/etc/bash_completion.d/ah")
    p.add_argument("shell", choices=completion.SHELLS, help="the shell to complete in")
    completion.attach(parser)
    return parser


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion.shellcode(args.shell))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # A command that seems stuck says where: `kill -USR1 PID` prints every thread's stack to
    # its stderr, and it goes on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = build_parser()
    completion.autocomplete(parser)  # a shell asking for completions: answered, then exit
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a wrong flag of a command: that command's usage, not the top-level one
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subs.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    ah._console_logging()  # progress and summary lines; -q turns them down
    if args.quiet:
        logging.getLogger("ahmount.ah").setLevel(logging.WARNING)
    handler: Handler = args.handler
    try:
        if args.command in MOUNT_PATH_COMMANDS and hasattr(args, "path"):
            args.path = _api_path(args.path)  # None: the current directory in a mount
        return handler(args)
    except BrokenPipeError:
        # `ah ... | head`: the reader has what it wanted. Quietly, as git does; stdout goes
        # to /dev/null so the interpreter's own flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("ah: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place errors become a line and an exit code
        code = exit_code(exc)
        if code == 1 and not isinstance(exc, RuntimeError):
            logging.getLogger("ahmount.cli").debug("unexpected error", exc_info=exc)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ah: error: {message}", file=sys.stderr)
        return code if code != 0 else USAGE


if __name__ == "__main__":
    sys.exit(main())
