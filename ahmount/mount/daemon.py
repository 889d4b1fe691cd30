"""``ah-mount MOUNTPOINT``: the asset tree as files.

    ah-mount MOUNTPOINT [--hub URL] [--api-key KEY] [--cache-size SIZE] [--cache-dir DIR]
                        [--refresh SECONDS] [--offline] [--no-change-feed]
                        [--foreground] [--log-level LEVEL]

Runs in the background by default and returns once the mount answers (or fails with the
reason). ``--foreground`` stays attached (systemd, debugging). SIGTERM, SIGINT,
``ah unmount MOUNTPOINT`` and ``fusermount3 -u MOUNTPOINT`` all unmount cleanly. A mountpoint
left behind by a crashed daemon ("Transport endpoint is not connected") is recovered.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ahmount import __version__
from ahmount.client.embedded import connect
from ahmount.config import (
    DEFAULT_CACHE,
    ClientConfig,
    dirs,
    hub_identity,
    load_config,
    make_config,
    parse_size,
)
from ahmount.errors import AhError, Conflict, InvalidArgument
from ahmount.exit_codes import FAILURE, exit_code
from ahmount.fd_limit import raise_open_files_limit
from ahmount.mount import dir_cache, fuse_wait
from ahmount.mount.control import ControlServer, fuse_mounts, socket_path
from ahmount.mount.fs import AssetFS
from ahmount.mount.kernel_cache import KernelCache
from ahmount.observability import LogFile, notify_systemd, set_level, setup_logging
from ahmount.vfs.change_feed import Changed
from ahmount.vfs.session import Session
from ahmount.vfs.writeback import UPLOAD_AHEAD_DELAY, UPLOAD_AHEAD_MAX_WAIT

log = logging.getLogger("ahmount.mount")

DEFAULT_REFRESH = 3.0
# The kernel reads ahead on a FUSE mount 128 KiB at a time unless told otherwise; each read is
# one request through the daemon, so a streamed 1 GiB object costs 8,192 of them. 1 MiB reads
# (the largest a request carries) cut the daemon's CPU per byte by about a quarter.
READAHEAD_KB = 1024
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ah-mount", description="Mount the asset tree at MOUNTPOINT.",
        epilog="example:\n  ah-mount ~/assets && ls ~/assets/model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--hub", default=None, help="hub URL (default: ah login's, else the "
                        "embedded hub)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--cache-size", default=DEFAULT_CACHE,
                        help=f"local disk cache bound (default {DEFAULT_CACHE})")
    parser.add_argument("--refresh", type=float, default=DEFAULT_REFRESH,
                        help="seconds after which changes made elsewhere show while the "
                        f"hub's change feed is not connected (default {DEFAULT_REFRESH}); "
                        "with the feed they show at once")
    parser.add_argument("--offline", action="store_true",
                        help="never contact the hub: serve what is cached (tags and commits "
                        "fully, branches at their last known head) and queue writes; a hub "
                        "that is merely unreachable at start is handled the same way "
                        "without this flag, and used again once it answers")
    parser.add_argument("--no-change-feed", action="store_true",
                        help="do not follow the hub's change feed: poll every --refresh "
                        "seconds only")
    parser.add_argument("--write-back", default=str(UPLOAD_AHEAD_DELAY), metavar="SECONDS",
                        help="upload closed files once no file was closed for this long "
                        f"(default {UPLOAD_AHEAD_DELAY}; at most {UPLOAD_AHEAD_MAX_WAIT:g} s "
                        "after the first), ahead of the commit; 'off' keeps written files "
                        "local until 'ah sync' or 'ah commit'")
    parser.add_argument("--fill-random", default="auto", metavar="SIZE",
                        help="after 16 random reads of an object that missed the cache, fetch "
                        "the rest of it in the background when it is at most SIZE (e.g. 2G; "
                        "default 'auto': a quarter of --cache-size); 'off' fetches only what "
                        "is read")
    parser.add_argument("--siblings", choices=("on", "off"), default="on",
                        help="when a file missing from the cache is opened, fetch its "
                        "directory's other missing small files (up to 256 KiB) in the same "
                        "request, and its next mid-size ones (up to 4 MiB) ahead, as a data "
                        "loader reads a directory (default on); 'off' fetches only the files "
                        "opened")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the object cache and the queued edits live (default: "
                        "the ahmount cache directory); one mount of a hub and user at a time "
                        "may use a cache directory")
    parser.add_argument("--foreground", "-f", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--allow-other", action="store_true",
                        help="let other users see the mount (needs user_allow_other)")
    parser.add_argument("--read-only", action="store_true",
                        help="mount read-only, as a data loader or an inference server "
                        "needs it: every change answers EROFS from the kernel, and a file "
                        "read before is opened again with 2 requests to the daemon instead "
                        "of 4 (no flushes, no attributes asked again)")
    return parser


def _setup_logging(level: str, foreground: bool) -> Path:
    """logfmt lines to a file, and to stderr (the journal, under systemd) in the foreground."""
    log_dir = dirs().cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ah-mount.log"
    # A daemon that seems stuck says where: `kill -USR1 PID` appends every thread's stack to
    # the log, and it goes on.
    setup_logging(level, sys.stderr, str(path), stacks_on=signal.SIGUSR1)
    if not (foreground or os.environ.get("JOURNAL_STREAM")):
        root = logging.getLogger()
        root.handlers = [h for h in root.handlers if isinstance(h, LogFile)]
    return path


def recover_stale(mountpoint: Path) -> None:
    """Unmount what a crashed daemon left ("Transport endpoint is not connected" or
    "Software caused connection abort"), then make sure the path exists."""
    try:
        # stat() of a dead FUSE mount may still succeed from cached attributes; reading the
        # directory reaches the (missing) daemon.
        with os.scandir(mountpoint) as entries:
            next(entries, None)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):  # the latter on newer kernels
            log.warning("%s was left mounted by a dead daemon; unmounting it", mountpoint)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)
        elif exc.errno != errno.ENOENT:
            raise
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise InvalidArgument(f"{mountpoint} is already a mount point")


class Mount:
    """One mounted tree: a :class:`Session` served through the FUSE adapter, plus the
    control socket and the signal watcher (both under the session's supervisor)."""

    def __init__(self, mountpoint: Path, config: ClientConfig, cache_size: int,
                 refresh: float, allow_other: bool, cache_dir: Path | None = None,
                 follow_changes: bool = True, offline: bool = False,
                 write_back: float | None = UPLOAD_AHEAD_DELAY,
                 fill_limit: int | None = None, read_only: bool = False,
                 siblings: bool = True) -> None:
        self.mountpoint = mountpoint
        self.siblings = siblings
        self.read_only = read_only
        self.write_back = write_back
        self.fill_limit = fill_limit
        self.offline = offline
        self.follow_changes = follow_changes
        self.cache_dir = cache_dir or dirs().cache
        self.config = config
        self.cache_size = cache_size
        self.refresh = refresh
        self.allow_other = allow_other
        self.session: Session | None = None
        self.ops: AssetFS | None = None
        self._fuse_open = False  # between pyfuse3.init() and pyfuse3.close()

    def _end_fuse_loop(self) -> None:
        """End ``pyfuse3.main()`` (the unmount follows), from any task, at any time: after
        ``pyfuse3.close()`` the session is freed and ``pyfuse3.terminate()`` would
        dereference it (a segfault). That happens when an unmount request, a signal or a
        background bug arrives while the daemon shuts down: after its FUSE connection was
        aborted, say, or unmounted by ``fusermount3 -u`` meanwhile."""
        if self._fuse_open:
            pyfuse3.terminate()

    def _stop_for_bug(self, exc: BaseException) -> None:
        """A background task hit a bug: unmount cleanly (the session then flushes the cache
        index and keeps the queue)."""
        notify_systemd("STOPPING=1")
        self._end_fuse_loop()

    async def run(self, ready: Callable[[], None]) -> None:
        # Few retries and a short fail-fast window: a syscall should not hang on a dead hub.
        hub = connect(self.config, retries=2, down_for=2.0)
        session = Session(hub, hub_url=self.config.ah_host, cache_base=self.cache_dir,
                          cache_size=self.cache_size, refresh=self.refresh,
                          holder=str(self.mountpoint), on_bug=self._stop_for_bug,
                          offline=self.offline, write_back=self.write_back,
                          fill_limit=self.fill_limit, siblings=self.siblings)
        async with session:
            self.session = session
            self.ops = ops = AssetFS(session.vfs, os.getuid(), os.getgid(), self.read_only)
            session.vfs.private = not self.allow_other
            # What df and mount show as the source, as sshfs's user@host:path and rclone's
            # remote: do (a bare "ahmount" is also shown as a path by mount(8) where the
            # current directory has an entry of that name).
            options = {f"fsname=ahmount:{_fsname_hub(self.config.ah_host)}",
                       "subtype=ahmount", "noatime"}
            if self.allow_other:
                # Other users are let in: the kernel checks mode bits for them. A private
                # mount leaves the checks to the handlers (EROFS where nothing may change),
                # which spares a GETATTR of the directory after every create in it.
                options |= {"allow_other", "default_permissions"}
            if self.read_only:
                # The kernel refuses every change itself (and no writeback cache or flushes:
                # see AssetFS).
                options.add("ro")
            pyfuse3.init(ops, str(self.mountpoint), options)
            self._fuse_open = True
            log.info("mounted %s%s for %s (hub %s, cache %.1f GiB, refresh %.1fs)",
                     self.mountpoint, " read-only" if self.read_only else "", session.me,
                     self.config.ah_host or "embedded", self.cache_size / (1 << 30),
                     self.refresh)
            try:
                supervisor = session.supervisor
                supervisor.spawn("signal watcher", self._watch_signals)
                kernel = KernelCache(ops.inodes, session.me, ops.shows_hub_file,
                                     supervisor.spawn)
                session.on_shown_changed = kernel.forget_paths
                control = ControlServer(socket_path(self.mountpoint),
                                        control_ops(self.mountpoint, session, ops, kernel,
                                                    self._end_fuse_loop,
                                                    hub_identity(self.config)),
                                        os.getuid())
                await supervisor.start("control server", control.serve)
                if self.follow_changes:
                    session.follow_changes(kernel.forget)
                supervisor.spawn("ready reporter", lambda: self._report_ready(ready))
                fuse_wait.install()
                dir_cache.install()
                try:
                    await pyfuse3.main()
                finally:
                    fuse_wait.uninstall()
                    dir_cache.uninstall()
            finally:
                self._fuse_open = False
                with contextlib.suppress(Exception):
                    pyfuse3.close(unmount=True)
        log.info("unmounted %s", self.mountpoint)

    async def _report_ready(self, ready: Callable[[], None]) -> None:
        # Ready means the mount answers: stat it from a thread while our loop serves it.
        try:
            await trio.to_thread.run_sync(os.stat, self.mountpoint)
        except OSError:
            self._end_fuse_loop()  # never ready: the waiting parent hears the daemon end
            raise
        raise_readahead(self.mountpoint)  # after the kernel's INIT, which would reset it
        ready()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                notify_systemd("STOPPING=1")
                self._end_fuse_loop()
                return


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def unmount_unless_busy(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount as ``umount`` and ``fusermount3 -u`` do: refused while a process has a file
    open or its working directory in the mount, so that ``ah unmount`` never cuts off a
    running job (ending the FUSE loop alone detaches the mount lazily, as libfuse does on a
    signal: the job's next access would fail). The daemon's loop then ends by itself.

    ``lazy`` (``umount -l``): the path is detached now, and the processes using the mount
    go on being served; the kernel ends the connection, and so the loop, once the last of
    them lets go."""
    result = await trio.run_process(["fusermount3", "-u", *(["-z"] if lazy else []),
                                     str(mountpoint)],
                                    capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode == 0:
        return
    said = result.stderr.decode(errors="replace").strip()
    if "busy" in said.lower():
        raise Conflict(f"{mountpoint} is in use: a process has a file open or its working "
                       "directory there; it stays mounted", path=str(mountpoint))
    raise Conflict(f"{mountpoint} could not be unmounted: {said}", path=str(mountpoint))


def control_ops(mountpoint: Path, session: Session, ops: AssetFS, kernel: KernelCache,
                end_fuse_loop: Callable[[], None], identity: str) -> dict[str, Handler]:
    """What the control socket answers: the session's public methods, by name. ``identity``
    is the mount's (:func:`hub_identity`): only a caller with the same one is told which of
    its branches hold queued changes. ``unmount`` ends the FUSE loop by
    ``end_fuse_loop``."""

    async def status(args: dict[str, Any]) -> dict[str, Any]:
        return {"mountpoint": str(mountpoint), **session.status()}

    async def refresh(args: dict[str, Any]) -> dict[str, Any]:
        session.refresh()
        # And what the kernel kept: a file whose bytes changed elsewhere and that the kernel
        # still has a name for would keep its old size (writeback caching) until that name
        # timed out, cut the new bytes to it (up to --refresh, or for as long as a change
        # feed is up). Forgetting the names makes the kernel look each path up again.
        await kernel.forget(Changed())
        return {"refreshed": True}

    async def cache(args: dict[str, Any]) -> dict[str, Any]:
        action = args.get("action", "stats")
        if action not in ("stats", "drop"):
            raise InvalidArgument(f"cache action {action!r} is not 'stats' or 'drop'")
        dropped = session.drop_cache() if action == "drop" else 0
        return {**session.cache_stats(), "dropped": dropped}

    async def stats(args: dict[str, Any]) -> dict[str, Any]:
        status = session.status()
        return {"fuse_ops": dict(ops.op_counts), "inodes": len(ops.inodes),
                "changes": status["changes"], "hub_state": status["hub_state"],
                **session.stats()}

    async def log_level(args: dict[str, Any]) -> dict[str, Any]:
        return {"level": set_level(args.get("level", "info"))}

    async def serves(args: dict[str, Any]) -> dict[str, Any]:
        """Whether a caller with ``identity`` talks to the hub this mount shows, with the
        same key (so an API path made from a path in here names the same thing there); the
        mount's hub and user either way."""
        status = session.status()
        return {"same": args.get("identity") == identity, "hub": status["hub"],
                "user": status["user"]}

    async def queued_branch(args: dict[str, Any]) -> dict[str, Any]:
        if args.get("identity") != identity:  # another hub or key: its names are not ours
            return {"path": None}
        return {"path": await session.queued_branch(args.get("address"))}

    async def branch_status(args: dict[str, Any]) -> dict[str, Any]:
        return await session.branch_status(args.get("path"))

    async def commit(args: dict[str, Any]) -> dict[str, Any]:
        return await session.commit(args.get("path"), args.get("message", ""),
                                    args.get("force", False))

    async def reset(args: dict[str, Any]) -> dict[str, Any]:
        return await session.reset(args.get("path"))

    async def sync(args: dict[str, Any]) -> dict[str, Any]:
        return await session.sync(args.get("path"))

    async def merge(args: dict[str, Any]) -> dict[str, Any]:
        return await session.merge(args.get("path"))

    async def prefetch(args: dict[str, Any]) -> dict[str, Any]:
        return await session.prefetch(args.get("paths"), args.get("jobs", 8))

    async def prefetch_status(args: dict[str, Any]) -> dict[str, Any]:
        return session.prefetch_status(args.get("job"))

    async def unmount(args: dict[str, Any]) -> dict[str, Any]:
        lazy = bool(args.get("lazy"))
        await unmount_unless_busy(mountpoint, lazy)
        if not lazy:
            end_fuse_loop()  # unmounted: the loop ends by itself too
        return {"unmounting": str(mountpoint), "lazy": lazy}

    return {"status": status, "refresh": refresh, "cache": cache, "stats": stats,
            "log_level": log_level, "unmount": unmount, "branch_status": branch_status,
            "queued_branch": queued_branch, "serves": serves,
            "commit": commit, "reset": reset, "sync": sync, "merge": merge,
            "prefetch": prefetch, "prefetch_status": prefetch_status}


def raise_readahead(mountpoint: Path) -> None:
    """Let sequential reads arrive in 1 MiB requests. Only root may write the mount's
    backing-device setting, so others keep the kernel's 128 KiB (logged, not an error)."""
    devices = [device for point, device in fuse_mounts() if point == mountpoint]
    if not devices:
        return
    setting = Path(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb")  # the newest mount there
    try:
        setting.write_text(f"{READAHEAD_KB}\n")
    except OSError as exc:
        log.info("read-ahead of %s left at the kernel's default: %s", mountpoint, exc)


def _tell_systemd_ready() -> None:
    notify_systemd("READY=1")


def _config_from(args: argparse.Namespace) -> ClientConfig:
    if args.hub:
        return make_config(args.hub, None, args.api_key or load_config().api_key)
    return load_config()


def _write_back(value: str) -> float | None:
    """``--write-back``: seconds, or None for 'off'."""
    if value.strip().lower() == "off":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 86400:
        raise InvalidArgument(f"--write-back {value!r} must be seconds (0 to 86400) or 'off'")
    return seconds


def _fill_random(value: str) -> int | None:
    """``--fill-random``: bytes, 0 for 'off', None for 'auto'."""
    word = value.strip().lower()
    if word == "auto":
        return None
    if word == "off":
        return 0
    return parse_size(value, minimum=0, what="--fill-random")


def _warn_if_not_empty(mountpoint: Path) -> None:
    """Mounting over files hides them (FUSE allows it): say so, as mount(8) users expect."""
    try:
        with os.scandir(mountpoint) as entries:
            hidden = sum(1 for _ in entries)
    except OSError:
        return
    if hidden:
        print(f"ah-mount: warning: {mountpoint} is not empty; its {hidden} entr"
              f"{'y is' if hidden == 1 else 'ies are'} hidden until it is unmounted",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        mountpoint = Path(os.path.abspath(os.path.expanduser(args.mountpoint)))
        cache_size = parse_size(args.cache_size)
        if args.refresh <= 0:
            raise InvalidArgument(f"--refresh {args.refresh} must be positive")
        args.write_back = _write_back(args.write_back)
        args.fill_random = _fill_random(args.fill_random)
        config = _config_from(args)
        recover_stale(mountpoint)
        _warn_if_not_empty(mountpoint)
    except (AhError, OSError) as exc:
        print(f"ah-mount: {exc}", file=sys.stderr)
        return exit_code(exc)
    if args.foreground:
        log_path = _setup_logging(args.log_level, True)
        return _run(mountpoint, config, cache_size, args, _tell_systemd_ready)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        return _wait_for_child(read_end, mountpoint)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    log_path = _setup_logging(args.log_level, False)

    def ready() -> None:
        os.write(write_end, b"ok\n")
        os.close(write_end)

    try:
        code = _run(mountpoint, config, cache_size, args, ready)
    except BaseException as exc:  # report to the waiting parent, then die
        code = exit_code(exc)
        with contextlib.suppress(OSError):
            os.write(write_end, f"error {code}: {exc} (log: {log_path})\n".encode())
        os._exit(code)
    os._exit(code)


def _run(mountpoint: Path, config: ClientConfig, cache_size: int, args: argparse.Namespace,
         ready: Callable[[], None]) -> int:
    raise_open_files_limit()
    cache_dir = Path(os.path.abspath(args.cache_dir)) if args.cache_dir else None
    mount = Mount(mountpoint, config, cache_size, args.refresh, args.allow_other, cache_dir,
                  follow_changes=not args.no_change_feed, offline=args.offline,
                  write_back=args.write_back, fill_limit=args.fill_random,
                  read_only=args.read_only, siblings=args.siblings == "on")
    try:
        trio.run(mount.run, ready)
    except AhError as exc:
        log.error("ah-mount failed: %s", exc)
        raise
    if mount.session is not None and mount.session.bug is not None:
        log.error("ah-mount stopped after a bug (queue kept): %r", mount.session.bug)
        return 1
    return 0


def _fsname_hub(host: str | None) -> str:
    """The hub as the mount's source names it, in the world-readable mount table: its
    host, port and path (no scheme, and no user or password a URL may carry; a comma would
    end the mount option), or "embedded"."""
    if host is None:
        return "embedded"
    parts = urllib.parse.urlsplit(host)
    return (parts.netloc.rpartition("@")[2] + parts.path.rstrip("/")).replace(",", "%2C")


def _wait_for_child(read_end: int, mountpoint: Path) -> int:
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.readline().decode().strip()
    if message == "ok":
        print(f"ah-mount: {mountpoint} is mounted", file=sys.stderr)
        return 0
    code, why = FAILURE, message or "daemon died"
    head, _, rest = message.partition(": ")
    if head.startswith("error ") and head[6:].isdigit():
        code, why = int(head[6:]), rest
    print(f"ah-mount: mounting {mountpoint} failed: {why}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
