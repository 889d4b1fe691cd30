"""What the benchmarks set up the same way: a scratch directory that is also
``AHMOUNT_HOME``, an ``ah-server`` on 127.0.0.1 with one user, a tree uploaded to it through
``ah://``, and mounts of it. Each context manager stops and removes what it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ahmount.ahfs import AhFileSystem
from tests.conftest import HubProcess, MountProcess


@contextlib.contextmanager
def bench_dir() -> Iterator[Path]:
    """A scratch directory under ``$BENCH_DIR`` (default /var/tmp: these VMs' /tmp is
    small), its ``home`` the ahmount home of this process and what it starts."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
        try:
            yield root
        finally:
            shutil.rmtree(root / "home", ignore_errors=True)


@contextlib.contextmanager
def served_hub(root: Path, user: str = "bench",
               extra: list[str] | None = None) -> Iterator[tuple[HubProcess, str]]:
    """An ``ah-server`` with its data under ``root/server`` and one user: (server, key)."""
    server = HubProcess(root / "server", extra or [])
    key = server.add_user(user)
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


def upload_tree(server: HubProcess, key: str, local: Path, dest: str, cache: Path) -> None:
    """Upload the file or directory ``local`` to ``dest`` (``kind/folder/asset[/path]`` on
    ``main``), making the folder and asset."""
    fs = AhFileSystem(hub=server.url, api_key=key, cache_dir=str(cache))
    if local.is_dir():
        fs.makedirs(dest)
        fs.put(str(local) + "/", dest + "/", recursive=True)
    else:
        fs.makedirs(dest.rsplit("/", 1)[0])
        fs.put(str(local), dest)


def hub_mount(server: HubProcess, key: str, point: Path, cache: Path,
              *extra: str) -> MountProcess:
    """A started mount of ``server`` at ``point`` with its own cache directory."""
    return MountProcess(point, "--hub", server.url, "--api-key", key, "--cache-dir",
                        str(cache), *extra).start()
