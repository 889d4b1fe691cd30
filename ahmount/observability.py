"""Logs as one line per event (logfmt), request ids, and systemd notifications.

Every log line is ``ts=… level=… logger=… msg="…"`` plus ``request_id=…`` while a server
request is being handled, so one request's lines can be found in a busy log. The request id
comes from the client's ``X-Request-Id`` (a proxy's, for example) or is made up, and is sent
back in the response.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import socket
import sys
import time
from typing import Any

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


def setup_logging(level: str, stream: Any = None, file: str | None = None) -> None:
    """Root logging in logfmt to ``stream`` (default stderr) and optionally a file."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if file:
        from logging.handlers import RotatingFileHandler

        handlers.append(RotatingFileHandler(file, maxBytes=10 << 20, backupCount=3))
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
