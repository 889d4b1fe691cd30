"""The one place where a client is wired to the embedded hub, or to the hub ``ah login`` chose.

The embedded hub is the hub's own service and ASGI app, run in this process behind a
streaming ASGI transport (:mod:`asgi_transport`): the same code path as ``ah-server``, minus
the socket. It is opened on first use, once per data directory and process (its SQLite
store is safe to share with other processes), and closed at process exit. The HTTP client
(:mod:`hub_client`) never imports this module, so a client of a remote hub loads none of the
service, SQLAlchemy or the server.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import threading
from pathlib import Path
from typing import Any

from ahmount.client.asgi_transport import StreamingASGITransport
from ahmount.client.hub_client import HubClient
from ahmount.config import ClientConfig, dirs, load_config

_LOCK = threading.Lock()
_APPS: dict[Path, Any] = {}
_OPEN = contextlib.ExitStack()
_PID = os.getpid()


def _close_at_exit() -> None:
    """Close the hubs this process opened (a forked child's exit leaves the parent's be)."""
    if os.getpid() == _PID:
        _OPEN.close()


#: Bytes of rendered listing pages the embedded hub keeps.
EMBEDDED_KEEP_PAGES = 8 << 20


def embedded_app(data_dir: Path) -> Any:
    """The process-wide ASGI app of the embedded hub under ``data_dir``."""
    from ahmount.hub.open import open_hub
    from ahmount.server.app import create_app

    global _OPEN, _PID
    with _LOCK:
        if os.getpid() != _PID:
            # A forked child (a DataLoader worker): the parent's service holds database
            # connections the child must not use. Open its own; leave the parent's alone.
            _APPS.clear()
            _OPEN = contextlib.ExitStack()
            _PID = os.getpid()
        if data_dir not in _APPS:
            if not _APPS:
                atexit.register(_close_at_exit)
            service = _OPEN.enter_context(open_hub(data_dir))
            # Its clients are this process's, and a mount keeps listings itself: a few
            # pages kept, not the 64 MiB a shared hub keeps (a daemon's memory).
            _APPS[data_dir] = create_app(service, trusted_user=getpass.getuser(),
                                         keep_pages=EMBEDDED_KEEP_PAGES)
        return _APPS[data_dir]


def embedded_client(data_dir: Path | None = None) -> HubClient:
    """A client of the embedded hub under ``data_dir`` (default: the data directory)."""
    app = embedded_app(data_dir or dirs().data / "hub")
    return HubClient("http://embedded", transport=StreamingASGITransport(app))


def connect(config: ClientConfig | None = None, retries: int = 5,
            down_for: float = 0.0) -> HubClient:
    """A client of the hub ``ah login`` configured, or of the embedded hub when none is.
    Unfinished uploads to a remote hub are remembered in the cache directory, so the next
    process resumes them."""
    config = config or load_config()
    if not config.ah_host:
        return embedded_client()
    return HubClient(config.ah_host, api_key=config.api_key, data_url=config.ais_host,
                     timeout=config.timeout or 60.0, retries=retries, down_for=down_for,
                     upload_ids=dirs().cache / "uploads")
