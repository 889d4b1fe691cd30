"""The mount's control socket: a small typed request/response protocol over a unix socket.

One JSON object per line each way. A request is ``{"op": NAME, "args": {...}}``; a response is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``. A request
with ``"progress": true`` also gets ``{"progress": STATE}`` lines before its response, at most
every :data:`PROGRESS_INTERVAL`, for each transfer the operation makes
(:mod:`ahmount.transfer.progress`): that is how ``ah commit`` in a mount shows a bar. The socket
is mode 0600 inside a 0700 directory, and every connection's peer credentials are checked: only
the user who mounted may talk to it. Operations are looked up in a dispatch table
(:class:`ControlServer.ops`); each takes the args mapping and returns a JSON-able value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ahmount import errors
from ahmount.config import dirs
from ahmount.mount_table import AHMOUNT_TYPE, fuse_entries
from ahmount.nurseries import open_nursery
from ahmount.transfer.progress import REPORTER, State

log = logging.getLogger("ahmount.control")

Op = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20
#: How often a progress line is sent at most (a bar redraws ~10 times a second anyway).
PROGRESS_INTERVAL = 0.1


#: The longest path a unix socket address holds (sun_path, with its NUL).
MAX_SOCKET_PATH = 107


def socket_path(mountpoint: Path) -> Path:
    """Where the control socket of the mount at ``mountpoint`` lives: the runtime directory,
    or, where that path would be too long for a unix socket, a private directory of this
    user's under the temporary directory (named after the runtime directory too, so that
    two homes never share a socket)."""
    digest = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    path = dirs().runtime / "mounts" / f"{digest}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    home = hashlib.sha256(os.fsencode(dirs().runtime)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ahmount-{os.getuid()}" / f"{home}-{digest}.sock"


def _check_private(directory: Path, make_private: bool = False) -> None:
    """The socket's directory must be this user's: a directory someone else made (under
    /tmp, say) could hold a socket that is not ours. ``make_private`` (the server) also
    closes it to everyone else."""
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise errors.PermissionDenied(
            f"{directory} belongs to uid {st.st_uid}, not to this user; remove it",
            path=str(directory))
    if make_private:
        os.chmod(directory, 0o700)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves ``ops`` on the control socket of one mount."""

    def __init__(self, path: Path, ops: dict[str, Op], owner_uid: int) -> None:
        self.path = path
        self.ops = ops
        self.owner_uid = owner_uid

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_private(self.path.parent, make_private=True)
        self.path.unlink(missing_ok=True)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._serve_one, trio.SocketStream(conn))
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        """One connection. A client that hangs up (Ctrl-C on a long ``ah commit``) only ends
        its connection: the operation it asked for still completes, its answer is dropped."""
        try:
            await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("control client went away before its answer: %s", exc)

    async def _converse(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = _peer_uid(stream.socket)  # type: ignore[arg-type]
            if uid != self.owner_uid and uid != 0:
                log.warning("control connection from uid %d refused", uid)
                await self._send(stream, _error("permission_denied",
                                                "only the mounting user may control it"))
                return
            buffer = b""
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                if len(buffer) > MAX_REQUEST:
                    await self._send(stream, _error("invalid_argument", "request too large"))
                    return
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await self._send(stream, await self.handle(line, stream))

    async def handle(self, line: bytes,
                     stream: trio.SocketStream | None = None) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return _error("invalid_argument", "request is not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _error("invalid_argument", "request must be {\"op\": NAME, \"args\": {...}}")
        op = self.ops.get(request["op"])
        if op is None:
            return _error("invalid_argument",
                          f"unknown operation {request['op']!r}; known: {sorted(self.ops)}")
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return _error("invalid_argument", "args must be an object")
        try:
            if request.get("progress") is True and stream is not None:
                return {"ok": True, "result": await self._with_progress(op, args, stream)}
            return {"ok": True, "result": await op(args)}
        except errors.AhError as exc:
            return _error(exc.code, exc.message)
        except Exception as exc:
            log.exception("control operation %s failed", request["op"])
            return _error("internal", f"{request['op']} failed: {exc}")

    async def _with_progress(self, op: Op, args: dict[str, Any],
                             stream: trio.SocketStream) -> Any:
        """Run ``op`` with :data:`REPORTER` set, sending the newest state it reported every
        :data:`PROGRESS_INTERVAL`. Transfers report from worker threads too, so the reporter
        only stores the state; this task sends it. A client that hangs up stops the lines,
        never the operation."""
        latest: State | None = None
        sent: State | None = None
        gone = False

        async def send_newest() -> None:
            nonlocal sent, gone
            if gone or latest is None or latest is sent:
                return
            sent = latest
            try:
                await self._send(stream, {"progress": sent})
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                gone = True

        async def pump() -> None:
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                await send_newest()

        def report(state: State) -> None:
            nonlocal latest
            latest = state  # one reference assignment: atomic for the worker threads

        token = REPORTER.set(report)
        try:
            async with open_nursery() as nursery:  # the op's own error, not a group
                nursery.start_soon(pump)
                result = await op(args)
                nursery.cancel_scope.cancel()
        finally:
            REPORTER.reset(token)
        await send_newest()  # the last state (a finished bar) before the answer
        return result

    async def _send(self, stream: trio.SocketStream, response: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(response).encode() + b"\n")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def call(mountpoint: Path, op: str, args: dict[str, Any] | None = None,
         timeout: float = 600.0, progress: Callable[[State], None] | None = None) -> Any:
    """Send one request to the mount at ``mountpoint`` (blocking); returns its result or raises
    the domain error it answered with. ``progress`` is called with each progress state the
    operation reports (``timeout`` is then the longest silence between two lines)."""
    path = socket_path(mountpoint)
    if path.parent.exists():
        _check_private(path.parent)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise errors.NotFound(f"no ah-mount answers for {mountpoint} ({exc.strerror})",
                                  path=str(mountpoint)) from None
        request: dict[str, Any] = {"op": op, "args": args or {}}
        if progress is not None:
            request["progress"] = True
        sock.sendall(json.dumps(request).encode() + b"\n")
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    raise errors.HubUnavailable(
                        f"ah-mount at {mountpoint} closed the connection")
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            response = json.loads(line)
            if "progress" not in response:
                break
            if progress is not None:
                progress(response["progress"])
    if response.get("ok"):
        return response.get("result")
    error = response.get("error") or {}
    cls = errors.ERRORS_BY_CODE.get(error.get("code", ""), errors.InternalError)
    raise cls(error.get("message", "control request failed"), path=str(mountpoint))


def fuse_mounts() -> list[tuple[Path, str]]:
    """``(mount point, "major:minor")`` of every FUSE mount this process can see."""
    return [(point, device) for point, device, _ in fuse_entries()]


def foreign_mount(path: Path) -> Path | None:
    """The ah-mount containing ``path`` that this user's home has no control socket of (one
    started with another ``AHMOUNT_HOME``, or by another user), if any: its mountpoint."""
    target = Path(os.path.abspath(path))
    for point, _, fstype in fuse_entries():
        if fstype == AHMOUNT_TYPE and (target == point or point in target.parents) and \
                not socket_path(point).exists():
            return point
    return None


def find_mount(path: Path, controlled: bool = True) -> tuple[Path, tuple[str, ...]] | None:
    """The ahmount mountpoint containing ``path`` and the path's segments below it: of
    the mounts with a control socket of this user's, or (not ``controlled``) of every
    ahmount mount in the mount table, also one whose daemon and socket are gone."""
    target = Path(os.path.abspath(path))
    best: Path | None = None
    for point, _, fstype in fuse_entries():
        if (target == point or point in target.parents) and (
            best is None or len(str(point)) > len(str(best))
        ) and (socket_path(point).exists() if controlled else fstype == AHMOUNT_TYPE):
            best = point
    if best is None:
        return None
    return best, target.relative_to(best).parts


def mount_queuing(address: str, identity: str,
                  timeout: float = 10.0) -> tuple[Path, tuple[str, ...]] | None:
    """The mount of this user on the same hub with the same key (``identity``, see
    :func:`ahmount.config.hub_identity`) that holds queued changes of the branch the API path
    ``address`` names, and the branch's path in it; None when no mount does. A mount that
    does not answer (gone, hung past ``timeout``, or too old to know the question) is passed
    over: the caller then asks the hub, as without mounts. Two that both hold changes of it:
    :class:`Conflict` naming them, since only one of them may be meant."""
    holding: list[tuple[Path, tuple[str, ...]]] = []
    for point in dict.fromkeys(point for point, _ in fuse_mounts()):
        if not socket_path(point).exists():
            continue
        try:
            answer = call(point, "queued_branch", {"address": address, "identity": identity},
                          timeout=timeout)
        except (errors.AhError, OSError) as exc:
            log.debug("ah-mount at %s not asked about %s: %s", point, address, exc)
            continue
        found = answer.get("path") if isinstance(answer, dict) else None
        if isinstance(found, list) and all(isinstance(p, str) for p in found):
            holding.append((point, tuple(found)))
    if len(holding) > 1:
        raise errors.Conflict(
            f"{address} has queued changes in {len(holding)} mounts ("
            + ", ".join(str(point) for point, _ in holding)
            + "): run the command inside the one you mean")
    return holding[0] if holding else None
