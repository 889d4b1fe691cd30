"""The peers ahmount is measured against, on 127.0.0.1, each serving a local directory:

- ``sshfs``: an ``sshd`` of our own on a free port (its own host key, a key of our own,
  root login by that key only), mounted with sshfs 3;
- ``rclone``: ``rclone serve webdav`` of the directory, mounted with ``rclone mount
  --vfs-cache-mode full`` (its cache in a directory of ours);
- the do-nothing pyfuse3 floor is :mod:`bench.minimal_fs`.

Debian packages: ``openssh-server sshfs rclone`` (``install.sh --dev`` installs them). Each
context manager stops what it started, by PID, and unmounts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, wait_until


def available() -> dict[str, bool]:
    return {"sshfs": bool(shutil.which("sshfs") and Path("/usr/sbin/sshd").exists()),
            "rclone": bool(shutil.which("rclone"))}


def wanted(spec: str) -> list[str]:
    """The peers a ``--peers sshfs,rclone`` option names; exits naming any not installed."""
    names = [name for name in spec.split(",") if name]
    have = available()
    missing = [name for name in names if not have.get(name)]
    if missing:
        sys.exit(f"{', '.join(missing)} not installed (./install.sh --dev installs the peers)")
    return names


def unmount(point: Path) -> None:
    if os.path.ismount(point):
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True)
    if os.path.ismount(point):
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def sshfs_mount(directory: Path, work: Path) -> Iterator[Path]:
    """``directory`` through sshfs over an sshd of our own on 127.0.0.1."""
    work.mkdir(parents=True, exist_ok=True)
    host_key, user_key = work / "host_key", work / "user_key"
    for key in (host_key, user_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
    authorized = work / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    os.chmod(authorized, 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd checks
    port = free_port()
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-h", str(host_key),
         "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={authorized}",
         "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
         "-o", "StrictModes=no", "-o", f"PidFile={work / 'sshd.pid'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    point = work / "mnt"
    point.mkdir(exist_ok=True)
    try:
        wait_until(lambda: port_open(port), what="sshd to listen")
        subprocess.run(["sshfs", f"root@127.0.0.1:{directory}", str(point), "-p", str(port),
                        "-o", f"IdentityFile={user_key}", "-o", "StrictHostKeyChecking=no",
                        "-o", f"UserKnownHostsFile={work / 'known_hosts'}"],
                       check=True, capture_output=True, timeout=60)
        yield point
    finally:
        unmount(point)
        _stop(sshd)


@contextlib.contextmanager
def rclone_mount(directory: Path, work: Path) -> Iterator[Path]:
    """``directory`` through rclone mount (--vfs-cache-mode full) of rclone's WebDAV server."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(["rclone", "serve", "webdav", str(directory),
                               "--addr", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    point = work / "mnt"
    point.mkdir(exist_ok=True)
    mount: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: port_open(port), what="rclone serve webdav to listen")
        mount = subprocess.Popen(
            ["rclone", "mount", ":webdav:", str(point), "--webdav-url",
             f"http://127.0.0.1:{port}", "--vfs-cache-mode", "full",
             "--cache-dir", str(work / "cache"), "--config", str(work / "rclone.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.ismount(point), timeout=30, what="rclone mount")
        yield point
    finally:
        unmount(point)
        if mount is not None:
            _stop(mount)
        _stop(server)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


#: Each peer's mount, by name: ``MOUNTS[name](directory, work)`` as a context manager.
MOUNTS = {"sshfs": sshfs_mount, "rclone": rclone_mount}
