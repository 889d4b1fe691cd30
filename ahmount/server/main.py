"""``ah-server``: serve a hub over HTTP, manage its users, collect its garbage.

    ah-server [serve] [--data DIR] [--listen HOST:PORT|unix:PATH|fd://N] [--db URL] [--blobs DIR]
    ah-server user add NAME       create a user and print their API key (shown once)
    ah-server user key NAME       print a further API key for NAME
    ah-server user list
    ah-server gc [--grace SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ahmount import __version__
from ahmount.config import dirs
from ahmount.errors import AhError, InvalidArgument
from ahmount.exit_codes import exit_code
from ahmount.fd_limit import raise_open_files_limit
from ahmount.hub.open import S3Options, open_hub
from ahmount.hub.service import HubService
from ahmount.observability import notify_systemd, setup_logging
from ahmount.server.app import create_observed_app
from ahmount.server.data_plane import DataPlane, parse_listen

log = logging.getLogger("ahmount.server")

OpenService = Callable[[], contextlib.AbstractContextManager[HubService]]

#: A connection with no request in progress costs the server a socket and a task: an idle
#: keep-alive one, or one whose headers never complete (slowloris), goes after this long.
#: (hypercorn's read_timeout is not used: it would also cut a client that is only
#: receiving a long download.)
IDLE_TIMEOUT = 15.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ah-server",
        description="Serve an ahmount hub over HTTP.",
        epilog="example: ah-server --data /srv/ah --listen 127.0.0.1:8080",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--data", type=Path, default=None,
                        help="data directory (SQLite + blobs); default: the embedded hub's")
    parser.add_argument("--db", default=os.environ.get("AH_DB", ""),
                        help="metadata: postgresql://… (AH_DB; default: SQLite under --data)")
    parser.add_argument("--blobs", default=os.environ.get("AH_BLOBS", ""),
                        help="blobs: a directory or s3://bucket/prefix (AH_BLOBS; "
                        "default: DATA/blobs)")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (AH_S3_ENDPOINT)")
    parser.add_argument("--s3-region", default=None, help="S3 region (AH_S3_REGION)")
    parser.add_argument("--s3-access-key", default=None, help="or AH_S3_ACCESS_KEY / AWS_*")
    parser.add_argument("--s3-secret-key", default=None, help="or AH_S3_SECRET_KEY / AWS_*")
    parser.add_argument("--s3-presign", action="store_true",
                        help="let clients read blobs straight from S3 via presigned URLs")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="close a connection with no request in progress (idle keep-alive, "
                        f"or headers still incomplete) after this many seconds "
                        f"(default {IDLE_TIMEOUT:.0f})")
    parser.add_argument("--data-listen", default=os.environ.get("AH_DATA_LISTEN", "auto"),
                        help="where read URLs are served with sendfile, bypassing the API: "
                        "auto (the API's host, a free port), HOST:PORT, or off (reads go "
                        "through the API; for a hub behind a proxy) (AH_DATA_LISTEN)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command")
    serve_p = sub.add_parser("serve", help="serve HTTP (the default command)")
    serve_p.add_argument("--listen", dest="serve_listen", default=None)
    parser.add_argument("--listen", default="127.0.0.1:8080",
                        help="HOST:PORT, unix:PATH or fd://N (default 127.0.0.1:8080)")
    user = sub.add_parser("user", help="manage users").add_subparsers(dest="user_command",
                                                                       required=True)
    user.add_parser("add", help="create users; prints each API key once, one per line"
                    ).add_argument("name", nargs="+")
    user.add_parser("key", help="issue another API key").add_argument("name")
    user.add_parser("list", help="list users")
    gc = sub.add_parser("gc", help="delete blobs and tree nodes nothing references")
    gc.add_argument("--grace", type=float, default=3600.0,
                    help="keep blobs younger than this many seconds (default 3600)")
    return parser


async def _serve(open_service: OpenService, listen: str,
                 idle_timeout: float = IDLE_TIMEOUT, data_listen: str = "auto") -> None:
    config = Config()
    config.bind = [listen]
    config.graceful_timeout = 10.0
    config.keep_alive_timeout = idle_timeout
    config.accesslog = None  # ObservedApp logs one line per request, with its request id
    config.errorlog = logging.getLogger("hypercorn.error")  # through our logfmt handler
    plane_at = parse_listen(data_listen, listen)
    stopping = trio.Event()

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s; finishing requests in flight (at most %.0fs)",
                         signal.Signals(signum).name, config.graceful_timeout)
                notify_systemd("STOPPING=1")
                stopping.set()
                return

    # Bound before anything is served: a port in use is an error naming it, not a crash.
    _bind(config, listen)
    # The stores live exactly as long as the server: closed after the last request.
    with open_service() as service:
        observed = create_observed_app(service)
        app: Any = observed  # hypercorn's type is narrower
        plane: DataPlane | None = None
        if plane_at is not None and service.local_blob_reads:
            plane = DataPlane(service, observed.metrics, idle_timeout)
            observed.app.state.data_plane = await plane.listen(*plane_at)
        async with trio.open_nursery() as nursery:
            if plane is not None:
                await nursery.start(plane.serve)

            async def api(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve(app, config, shutdown_trigger=shutdown_trigger,
                            task_status=task_status)
                # The API has answered its last request: the data plane's reads still in
                # flight get as long as the API's had, then are cut.
                nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

            await nursery.start(api)
            log.info("ah-server listening on %s", listen)
            notify_systemd("READY=1")
            await stopping.wait()
            if plane is not None:
                plane.stop()


def _bind(config: Config, listen: str) -> None:
    """Bind the API's ``listen`` address now and point ``config`` at the sockets (hypercorn
    takes them over as descriptors); raises InvalidArgument naming the address when it
    cannot be bound. A passed descriptor (``fd://N``) is bound already."""
    if listen.startswith("fd://"):
        return
    try:
        sockets = config.create_sockets().insecure_sockets
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    config.bind = [f"fd://{sock.detach()}" for sock in sockets]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    # A hub that seems stuck says where: `kill -USR1 PID` prints every thread's stack on
    # stderr (the journal, under systemd), and it goes on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    data_dir: Path = args.data or dirs().data / "hub"
    s3 = S3Options(args.s3_endpoint, args.s3_region, args.s3_access_key, args.s3_secret_key,
                   args.s3_presign)

    def open_service() -> contextlib.AbstractContextManager[HubService]:
        return open_hub(data_dir, args.db, args.blobs, s3)

    try:
        if args.command in ("user", "gc"):
            with open_service() as service:
                return _admin(args, service)
        raise_open_files_limit()
        trio.run(_serve, open_service, getattr(args, "serve_listen", None) or args.listen,
                 args.idle_timeout, args.data_listen)
        return 0
    except AhError as exc:
        print(f"ah-server: {exc}", file=sys.stderr)
        return exit_code(exc)


def _admin(args: argparse.Namespace, service: HubService) -> int:
    """``ah-server user …`` and ``ah-server gc``."""
    if args.command == "user":
        if args.user_command == "add":
            for name in args.name:
                _, key = service.add_user(name)
                print(key)
        elif args.user_command == "key":
            print(service.add_key(args.name))
        else:
            print(f"{'NAME':<24} {'KEYS':>4}")
            for row in service.list_users():
                print(f"{row['name']:<24} {row['keys']:>4}")
        return 0
    stats = service.gc(args.grace)
    print(f"removed {stats['blobs']} blobs, {stats['nodes']} tree nodes and "
          f"{stats['uploads']} expired uploads ({stats['trees']} trees live)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
