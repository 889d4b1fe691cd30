"""Two ways to drive the same file system, for one POSIX suite (rclone's ``vfstest`` idea).

* :class:`OsDriver`: ``os.*`` calls below a directory: a real FUSE mount (the file system
  under test through the kernel) or a plain local directory (the reference model).
* :class:`VfsDriver`: the same calls made in-process on :class:`ahmount.vfs.core.VFS`, with
  no FUSE and no kernel: a :class:`Session` runs in a trio loop on a thread of its own, and
  the driver plays the kernel's part (walking paths one lookup at a time, turning ``open``
  flags into create/open/truncate, close into flush + release) and turns every refusal into
  ``OSError`` through the adapter's own :func:`errno_for`, so both drivers must answer the
  same errno.

Paths are ``/``-separated and relative to the mount root ('' is the root).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from ahmount import errors
from ahmount.vfs.errno_map import errno_for
from ahmount.vfs.errors import VfsError

T = TypeVar("T")


@dataclass(frozen=True)
class Stat:
    st_mode: int
    st_size: int
    st_mtime: float
    st_nlink: int


class OsDriver:
    """The file system below ``root`` through the kernel."""

    name = "mount"

    def __init__(self, root: Path, control: Callable[..., dict[str, Any]] | None = None
                 ) -> None:
        self.root = root
        self._control = control

    def _p(self, path: str) -> Path:
        return self.root / path if path else self.root

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        return os.open(self._p(path), flags, mode)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def append(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fstat(self, fd: int) -> Stat:
        return _stat(os.fstat(fd))

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def stat(self, path: str) -> Stat:
        return _stat(os.stat(self._p(path)))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        if noreplace:
            _renameat2_noreplace(self._p(old), self._p(new))
        else:
            os.rename(self._p(old), self._p(new))

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._p(path), size)

    def utime(self, path: str, mtime: float) -> None:
        os.utime(self._p(path), (mtime, mtime))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self._p(path), name, value)

    def listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self._p(path)))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._control is not None, "a local directory has no control socket"
        return self._control(op, **args)

    def close_driver(self) -> None:
        pass


def _renameat2_noreplace(old: Path, new: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_noreplace = -100, 1
    if libc.renameat2(at_fdcwd, str(old).encode(), at_fdcwd, str(new).encode(),
                      rename_noreplace) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(new))


def _stat(st: os.stat_result) -> Stat:
    return Stat(st.st_mode, st.st_size, st.st_mtime, st.st_nlink)


def _key(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


class VfsDriver:
    """The file system of a :class:`Session` driven in-process, as the kernel would."""

    name = "vfs"

    def __init__(self, cache_base: Path, refresh: float = 3.0, siblings: bool = True,
                 follow: bool = False) -> None:
        """``follow``: follow the hub's change feed, as a mount does by default."""
        from ahmount.client.embedded import connect
        from ahmount.config import load_config
        from ahmount.vfs.session import Session

        self._ready = threading.Event()
        self._follow = follow
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._fds: dict[int, Any] = {}
        self._paths: dict[int, tuple[str, ...]] = {}  # what each open file is named now
        self._append: set[int] = set()
        self._next_fd = 3
        config = load_config()
        self.session = Session(connect(config, retries=2, down_for=2.0),
                               hub_url=config.ah_host, cache_base=cache_base,
                               cache_size=1 << 30, refresh=refresh, holder="vfs test driver",
                               siblings=siblings)
        self._thread = threading.Thread(target=self._serve, name="vfs-driver", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._failure is not None:
            raise self._failure
        assert self._token is not None, "the session did not start in 60 s"

    def _serve(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with self.session:
                if self._follow:
                    self.session.follow_changes()
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test thread
            self._failure = exc
        finally:
            self._ready.set()

    def close_driver(self) -> None:
        """Close the session as an unmount would (open handles are released first)."""
        if self._token is None or not self._thread.is_alive():
            return
        for fd in list(self._fds):
            self.close(fd)
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        if self._failure is not None:
            raise self._failure

    # -- calling into the session's loop -----------------------------------------------------

    def _run(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()`` on the session's loop; a refusal becomes ``OSError`` naming ``what``."""
        assert self._token is not None
        try:
            return trio.from_thread.run(fn, trio_token=self._token)
        except (errors.AhError, VfsError, httpx.HTTPError) as exc:
            number = errno_for(exc)
            raise OSError(number, f"{what}: {exc}") from exc

    @property
    def vfs(self) -> Any:
        return self.session.vfs

    async def _walk(self, key: tuple[str, ...]) -> Any:
        """The node at ``key``, found the kernel's way: a lookup per segment, each in a
        directory (ENOTDIR below a file)."""
        node = await self.vfs.stat(())
        for depth in range(len(key)):
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")  # as the kernel's walk says
            _, node = await self.vfs.lookup(key[:depth], key[depth])
        return node

    async def _parent(self, key: tuple[str, ...]) -> None:
        parent = await self._walk(key[:-1])
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")

    # -- the calls ---------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        key = _key(path)

        async def go() -> Any:
            await self._parent(key)
            try:
                node = await self._walk(key)
            except errors.NotFound:
                if not flags & os.O_CREAT:
                    raise
                handle, _, _ = await self.vfs.create(key[:-1], key[-1],
                                                     stat.S_IFREG | (mode & ~umask()))
                return handle
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise errors.AlreadyExists(f"{path} exists")
            if node.is_dir and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EISDIR, "is a directory")  # the kernel's check
            write = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
            return await self.vfs.open(key, write=write, truncate=bool(flags & os.O_TRUNC))

        handle = self._run(f"open {path}", go)
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = handle
        self._paths[fd] = key
        if flags & os.O_APPEND:
            self._append.add(fd)
        return fd

    def _h(self, fd: int) -> Any:
        if fd not in self._fds:
            raise OSError(errno.EBADF, "bad file descriptor")
        return self._fds[fd]

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        handle = self._h(fd)
        return self._run("read", lambda: self.vfs.read(handle, offset, size))

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        handle = self._h(fd)
        if fd in self._append:
            offset = self.fstat(fd).st_size

        async def go() -> int:
            return int(self.vfs.write(handle, offset, data))

        return self._run("write", go)

    def append(self, fd: int, data: bytes) -> int:
        return self.pwrite(fd, data, self.fstat(fd).st_size)

    def fstat(self, fd: int) -> Stat:
        handle = self._h(fd)

        async def go() -> Stat:
            held = self.vfs.handle_stat(handle)
            mtime = (held.mtime_ns or 0) / 1e9
            return Stat(stat.S_IFREG | held.mode, held.size, mtime, 1)

        return self._run("fstat", go)

    def ftruncate(self, fd: int, size: int) -> None:
        """A SETATTR of the file's inode: by its name while it has one."""
        handle = self._h(fd)

        async def go() -> None:
            if getattr(handle, "orphaned", False):
                self.vfs.handle_setattr(handle, size=size)
            else:
                await self.vfs.setattr(self._paths[fd], size=size)

        self._run("ftruncate", go)

    def fsync(self, fd: int) -> None:
        handle = self._h(fd)
        self._run("fsync", lambda: self.vfs.fsync(handle))

    def close(self, fd: int) -> None:
        handle = self._fds.pop(fd, None)
        self._append.discard(fd)
        self._paths.pop(fd, None)
        if handle is None:
            raise OSError(errno.EBADF, "bad file descriptor")

        async def go() -> None:
            self.vfs.flush(handle)  # close(2) is FLUSH then RELEASE
            await self.vfs.release(handle)

        self._run("close", go)

    def stat(self, path: str) -> Stat:
        async def go() -> Stat:
            node = await self._walk(_key(path))
            kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
            return Stat(kind | node.permissions, node.size, node.mtime, 2 if node.is_dir else 1)

        return self._run(f"stat {path}", go)

    def listdir(self, path: str) -> list[str]:
        async def go() -> list[str]:
            await self._walk(_key(path))
            return [name for name, _ in await self.vfs.listdir(_key(path))]

        return sorted(self._run(f"listdir {path}", go))

    def _on_parent(self, what: str, path: str,
                   fn: Callable[[tuple[str, ...], str], Awaitable[Any]]) -> Any:
        key = _key(path)

        async def go() -> Any:
            await self._parent(key)
            return await fn(key[:-1], key[-1])

        return self._run(f"{what} {path}", go)

    def mkdir(self, path: str) -> None:
        self._on_parent("mkdir", path, self.vfs.mkdir)

    def rmdir(self, path: str) -> None:
        self._on_parent("rmdir", path, self.vfs.rmdir)

    def unlink(self, path: str) -> None:
        self._on_parent("unlink", path, self.vfs.unlink)

    def rename(self, old: str, new: str, noreplace: bool = False) -> None:
        a, b = _key(old), _key(new)

        async def go() -> None:
            await self._parent(a)  # both parents first, then the source: the kernel's order
            await self._parent(b)
            await self._walk(a)
            await self.vfs.rename(a[:-1], a[-1], b[:-1], b[-1], noreplace=noreplace)

        self._run(f"rename {old} {new}", go)
        for fd, key in self._paths.items():  # open files follow, as dentries do
            if key[:len(a)] == a:
                self._paths[fd] = b + key[len(a):]

    def _setattr(self, what: str, path: str, **changes: Any) -> None:
        async def go() -> None:
            await self._walk(_key(path))
            await self.vfs.setattr(_key(path), **changes)

        self._run(f"{what} {path}", go)

    def truncate(self, path: str, size: int) -> None:
        self._setattr("truncate", path, size=size)

    def utime(self, path: str, mtime: float) -> None:
        self._setattr("utime", path, mtime=mtime)

    def chmod(self, path: str, mode: int) -> None:
        self._setattr("chmod", path, mode=mode)

    def getxattr(self, path: str, name: str) -> bytes:
        async def go() -> bytes:
            await self._walk(_key(path))
            return bytes(await self.vfs.getxattr(_key(path), name))

        return self._run(f"getxattr {path}", go)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        async def go() -> None:
            await self._walk(_key(path))
            await self.vfs.setxattr(_key(path), name, value)

        self._run(f"setxattr {path}", go)

    def listxattr(self, path: str) -> list[str]:
        async def go() -> list[str]:
            await self._walk(_key(path))
            return list(await self.vfs.listxattr(_key(path)))

        return sorted(self._run(f"listxattr {path}", go))

    def symlink(self, target: str, path: str) -> None:
        from ahmount.vfs.errors import NotPermitted

        async def go() -> None:
            raise NotPermitted("symlinks: assets hold regular files only")

        self._run(f"symlink {path}", go)

    async def _stats(self) -> dict[str, Any]:
        return self.session.stats()

    async def _refresh(self) -> dict[str, Any]:
        self.session.refresh()  # no kernel here to forget anything
        return {"refreshed": True}

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        """What the control socket would answer: the session's public method of that name."""
        session = self.session
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "commit": lambda: session.commit(args.get("path"), args.get("message", ""),
                                             args.get("force", False)),
            "reset": lambda: session.reset(args.get("path")),
            "sync": lambda: session.sync(args.get("path")),
            "branch_status": lambda: session.branch_status(args.get("path")),
            "refresh": self._refresh,
            "stats": self._stats,
        }
        assert self._token is not None
        result = trio.from_thread.run(calls[op], trio_token=self._token)
        assert isinstance(result, dict)
        return result


def umask() -> int:
    """The process's umask (reading it means setting it: put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


Driver = OsDriver | VfsDriver


def read_bytes(d: Driver, path: str) -> bytes:
    fd = d.open(path, os.O_RDONLY)
    try:
        out = b""
        while True:
            chunk = d.pread(fd, 1 << 20, len(out))
            if not chunk:
                return out
            out += chunk
    finally:
        d.close(fd)


def write_bytes(d: Driver, path: str, data: bytes) -> None:
    fd = d.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if data:
            d.pwrite(fd, data, 0)
    finally:
        d.close(fd)


def is_dir(d: Driver, path: str) -> bool:
    return stat.S_ISDIR(d.stat(path).st_mode)


def tree(d: Driver, root: str) -> dict[str, bytes | None]:
    """Every entry below ``root`` found by listings alone: files with bytes, dirs as None."""
    out: dict[str, bytes | None] = {}
    todo = [root]
    while todo:
        directory = todo.pop()
        for name in d.listdir(directory):
            path = f"{directory}/{name}" if directory else name
            rel = path[len(root):].lstrip("/")
            if is_dir(d, path):
                out[rel] = None
                todo.append(path)
            else:
                data = read_bytes(d, path)
                assert d.stat(path).st_size == len(data), rel
                out[rel] = data
    return out
