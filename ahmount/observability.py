"""Logs as one line per event (logfmt), request ids, and systemd notifications.

Every log line is ``ts=… level=… logger=… msg="…"`` plus ``request_id=…`` while a server
request is being handled, so one request's lines can be found in a busy log. The request id
comes from the client's ``X-Request-Id`` (a proxy's, for example) or is made up, and is sent
back in the response.
"""

from __future__ import annotations

import contextvars
import faulthandler
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from typing import IO, Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)


#: What a value may hold and go unquoted: ``\w`` is exactly ``str.isalnum()`` and ``_``.
#: (A regular expression: testing each character in Python cost the access log of every
#: request ~60 us here.)
_BARE = re.compile(r"[\w\-./:@]+")


def _quote(value: str) -> str:
    if _BARE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """``ts=2026-11-28T22:00:00.123Z level=info logger=ahmount.hub msg="…" request_id=…``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        rid = request_id.get()
        if rid:
            parts.append(f"request_id={_quote(rid)}")
        extra: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{k}={_quote(str(v))}" for k, v in extra.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class LogFile(logging.handlers.RotatingFileHandler):
    """The log file, rotated at 10 MiB, three kept. :meth:`dump_stacks_on` a signal makes
    the signal append every thread's stack to the file as it is when the signal comes,
    also after a rotation (the process goes on)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=10 << 20, backupCount=3)
        self._stacks: tuple[int, IO[str]] | None = None

    def dump_stacks_on(self, signum: int) -> None:
        # faulthandler writes to a descriptor of its own, from the signal handler: the new
        # one is registered before the old one is closed, so no signal finds a closed (or
        # reused) descriptor.
        stacks = open(self.baseFilename, "a")  # noqa: SIM115 - kept open until the next
        faulthandler.register(signum, file=stacks, all_threads=True)
        if self._stacks is not None:
            self._stacks[1].close()
        self._stacks = (signum, stacks)

    def doRollover(self) -> None:
        super().doRollover()
        if self._stacks is not None:
            self.dump_stacks_on(self._stacks[0])

    def close(self) -> None:
        if self._stacks is not None:
            faulthandler.unregister(self._stacks[0])
            self._stacks[1].close()
            self._stacks = None
        super().close()


def setup_logging(level: str, stream: Any = None, file: str | None = None,
                  stacks_on: int | None = None) -> None:
    """Root logging in logfmt to ``stream`` (default stderr) and optionally a file;
    ``stacks_on``: a signal that appends every thread's stack to that file."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if file:
        log_file = LogFile(file)
        if stacks_on is not None:
            log_file.dump_stacks_on(stacks_on)
        handlers.append(log_file)
    for handler in handlers:
        handler.setFormatter(LogfmtFormatter())
        root.addHandler(handler)
    # httpx logs every request at INFO: far too much for a service's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def set_level(level: str) -> str:
    """Change the root log level at run time; returns the level now in force."""
    name = str(level).upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        from ahmount.errors import InvalidArgument

        raise InvalidArgument(f"log level {level!r} is not debug, info, warning or error")
    logging.getLogger().setLevel(name)
    logging.getLogger("ahmount").warning("log level set to %s", name.lower())
    return name.lower()


def notify_systemd(message: str) -> bool:
    """Send an sd_notify message (``READY=1``, ``STOPPING=1``) if systemd asked for them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
