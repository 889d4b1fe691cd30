"""``AhFileSystem``: the asset tree as an fsspec file system (``ah://``, see :mod:`urls`).

Reads resolve a ref to a commit, find the object in that commit's listing (fetched once per
commit, kept on disk beside the mount's) and read its bytes by range through the block cache
the mount uses (:class:`ObjectCache`). Writes become commits: one per call, or one per branch
for everything inside ``with fs.transaction:`` (nothing on error).

When a branch is resolved again: a file system pins each ref to the commit it first resolved
to, so that every read of a dataset sees one commit (and DataLoader workers, which receive
the file system pickled or forked, see the parent's). ``invalidate_cache()`` forgets the pins
(of one asset or all); a write through this file system moves its branch's pin to the commit
it made. ``use_listings_cache=False`` resolves branches on every call instead. Tags and commit
ids are pinned for good (until ``invalidate_cache``).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import trio
from fsspec.spec import AbstractFileSystem
from fsspec.transaction import Transaction

from ahmount.ahfs import urls
from ahmount.ahfs.files import AhFile
from ahmount.ahfs.pending import AppendBase, BranchChanges, Pending, rebase_append
from ahmount.ahfs.runtime import Runtime, RuntimeKey, runtime_for
from ahmount.ahfs.urls import AhUrl
from ahmount.client.files import read_batch
from ahmount.config import DEFAULT_CACHE, ClientConfig, dirs, load_config, make_config, parse_size
from ahmount.errors import AhError, Changed, InvalidArgument, NotFound
from ahmount.hub.models import AssetAddr, ObjectEntry
from ahmount.nurseries import open_nursery
from ahmount.transfer.plan import LocalFile, check_regular
from ahmount.transfer.upload import upload_files
from ahmount.vfs.errno_map import errno_for
from ahmount.vfs.handles import HubSource, ReadHandle
from ahmount.vfs.hub_view import CommitIndex, Resolved

#: Objects up to this size are read many to a request by ``cat`` of several paths.
BATCH_OBJECT = 1 << 20
BATCH_FILES = 1000
PARALLEL_READS = 16


def os_error(exc: BaseException) -> Exception:
    """The exception an fsspec user expects for a domain error: the errno of the one table
    (``vfs/errno_map.py``) as its ``OSError`` subclass, ``PermissionError`` for read-only
    refs, ``ValueError`` for a malformed argument."""
    if isinstance(exc, InvalidArgument):
        return ValueError(str(exc))
    number = errno_for(exc)
    if number in (errno.EROFS, errno.EACCES, errno.EPERM):
        return PermissionError(number, str(exc))
    return OSError(number, str(exc))


@contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except AhError as exc:
        raise os_error(exc) from exc


#: How long a batch keeps catching up with other writers' appends and creates
#: (:meth:`AhFileSystem._catch_up`) before the hub's refusal reaches the writer, and the
#: longest pause between tries (random, growing: writers that collided spread out).
CATCH_UP_SECONDS = 60.0
CATCH_UP_PAUSE = 0.5

#: Locks of this process's appends and exclusive creates, by (hub identity, asset, branch,
#: object path): see :meth:`AhFileSystem.path_lock`. A few bytes per path so written.
_PATH_LOCKS: dict[tuple[Any, ...], threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


_ONE_TRANSACTION = (
    "an ah:// transaction is already open on this file system (a transaction belongs to the "
    "file system, as in fsspec): do not nest them; for one per thread, give each thread its "
    "own AhFileSystem(..., skip_instance_cache=True)")


class AhTransaction(Transaction):  # type: ignore[misc]
    """Everything written inside ``with fs.transaction:`` becomes one commit per branch on a
    clean exit, and nothing on an error. ``message`` sets the commit message."""

    def __init__(self, fs: AhFileSystem, message: str | None = None, **kwargs: Any) -> None:
        super().__init__(fs, **kwargs)
        self.fs: AhFileSystem | None = fs
        self.pending = Pending(message)

    def start(self) -> None:
        # fsspec hands every `with fs.transaction:` of a file system the one open
        # transaction, and starting it again dropped the files it had deferred; a new one
        # (start_transaction) orphaned them: a second one (nested, or another thread's) is
        # refused before its body runs.
        assert self.fs is not None
        if self.fs._intrans:
            raise RuntimeError(_ONE_TRANSACTION)
        super().start()

    @property
    def message(self) -> str | None:
        return self.pending.message

    @message.setter
    def message(self, value: str | None) -> None:
        self.pending.message = value

    def complete(self, commit: bool = True) -> None:
        fs = cast("AhFileSystem", self.fs)
        try:
            while self.files:
                f = self.files.popleft()
                if commit:
                    # Its close hands it to this transaction (AhFile._upload_chunk); a file
                    # still open has bytes not yet spooled, so it ends here, whole.
                    f.close()
                else:
                    f.discard()
            self.pending.shut()
            if commit:
                fs._commit_pending(self.pending)
        finally:
            while self.files:
                self.files.popleft().discard()
            self.pending.discard()
            fs._intrans = False
            fs._transaction = None
            self.fs = None


class AhFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """``ah://`` paths. Storage options:

    * ``hub``: the hub's URL (default: ``ah login``'s, else the embedded hub);
    * ``api_key``: the key for that hub (default: ``ah login``'s);
    * ``cache_dir``/``cache_size``: the block cache (default: the mount's, 10G);
    * ``use_listings_cache``: pin branches to a commit until ``invalidate_cache()`` (default
      True; False resolves them on every call).
    """

    protocol = "ah"
    root_marker = ""
    transaction_type = AhTransaction
    async_impl = False
    _transaction: AhTransaction | None

    def __init__(self, hub: str | None = None, api_key: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 cache_size: int | str | None = None, use_listings_cache: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with _domain_errors():
            config = _config(hub, api_key)
            size = cache_size if isinstance(cache_size, int) else parse_size(
                cache_size or DEFAULT_CACHE)
        base = Path(cache_dir) if cache_dir is not None else dirs().cache
        self._key = RuntimeKey(config, base.absolute(), size)
        self._use_listings_cache = bool(use_listings_cache)
        self._pins: dict[tuple[AssetAddr, str], Resolved] = {}
        self._me: str | None = None
        #: Per thread: the changes of the write call running in it, when it runs outside a
        #: transaction (see :meth:`_batch`).
        self._calls = threading.local()

    # -- pickling and processes ------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """A pickled file system carries who it is and its pinned refs: a DataLoader worker
        neither asks the hub who it is nor resolves the refs again (the commit listings it
        needs are on disk, shared)."""
        return (_restore, (type(self), self.storage_args, self.storage_options,
                           self._me, dict(self._pins)))

    def _runtime(self) -> Runtime:
        runtime = runtime_for(self._key, self._me)
        self._me = runtime.me
        return runtime

    def _call(self, fn: Any, *args: Any) -> Any:
        with _domain_errors():
            return self._runtime().call(fn, *args)

    @property
    def me(self) -> str:
        """The user this file system acts as."""
        if self._me is None:
            self._runtime()
        assert self._me is not None
        return self._me

    # -- paths -----------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return urls.strip_protocol(str(path))

    def unstrip_protocol(self, name: str) -> str:
        return f"{urls.PROTOCOL}://{urls.strip_protocol(name)}"

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        return {}

    def _parse(self, path: str) -> AhUrl:
        with _domain_errors():
            return urls.parse(path)

    @classmethod
    def _parent(cls, path: str) -> str:
        stripped = urls.strip_protocol(path)
        return stripped.rpartition("/")[0]

    # -- resolution and listings -----------------------------------------------------------

    async def _resolve(self, url: AhUrl) -> tuple[AssetAddr, Resolved]:
        addr = url.asset_addr(self._runtime_me())
        ref = url.ref_or_default
        pinned = self._pins.get((addr, ref))
        if pinned is not None and (pinned.type != "branch" or self._use_listings_cache):
            return addr, pinned
        resolved = await self._view.resolve(addr, ref)
        self._pins[(addr, ref)] = resolved
        return addr, resolved

    async def _index(self, url: AhUrl) -> tuple[AssetAddr, Resolved, CommitIndex]:
        addr, resolved = await self._resolve(url)
        index = await self._view.index(addr, resolved.commit_id, resolved.created)
        return addr, resolved, index

    @property
    def _view(self) -> Any:
        return self._runtime().view

    def _runtime_me(self) -> str:
        assert self._me is not None, "resolved only on the runtime"
        return self._me

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget pinned refs: all of them, or those of the asset ``path`` is in. The next
        call resolves them again (and lists the new commit once)."""
        if path is None or not urls.strip_protocol(path):
            self._pins.clear()
            return
        try:
            url = urls.parse(path)
        except InvalidArgument:
            return
        if url.asset is None or self._me is None:
            if url.asset is None:
                self._pins.clear()
            return
        addr = url.asset_addr(self._me)
        for key in list(self._pins):  # list(): one step, safe beside the loop thread's writes
            if key[0] == addr:
                self._pins.pop(key, None)

    # -- info and listings -----------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        url = self._parse(path)
        entries = cast("list[dict[str, Any]]", self._call(self._ls, url))
        return entries if detail else [e["name"] for e in entries]

    async def _ls(self, url: AhUrl) -> list[dict[str, Any]]:
        level = url.level
        if level in ("root", "owner"):
            return [_dir_info(url.child(k)) for k in urls.KINDS]
        me = self._runtime_me()
        if level == "kind":
            assert url.kind is not None
            folders = await self._view.folders("own", url.owner_or(me), url.kind)
            return [_dir_info(url.child(name), modified=f.modified)
                    for name, f in sorted(folders.items())]
        if level == "folder":
            assets = await self._view.assets(url.folder_addr(me))
            return [_dir_info(url.child(name), modified=a.modified)
                    for name, a in sorted(assets.items())]
        _addr, resolved, index = await self._index(url)
        found = index.lookup(url.path)
        if found is None:
            raise NotFound(f"ah://{url} does not exist")
        if found != "dir":
            return [_file_info(url, found, resolved)]
        out = []
        for name in index.names(url.path):
            child = url.child(name)
            entry = index.dirs[url.path][name]
            out.append(_file_info(child, entry, resolved) if entry is not None
                       else _dir_info(child, commit=resolved.commit_id))
        return out

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self._parse(path)
        return cast("dict[str, Any]", self._call(self._info, url))

    async def _info(self, url: AhUrl) -> dict[str, Any]:
        level = url.level
        if level in ("root", "owner", "kind"):
            return _dir_info(url)
        me = self._runtime_me()
        if level == "folder":
            assert url.kind is not None and url.folder is not None
            folder = await self._view.folder("own", url.owner_or(me), url.kind, url.folder)
            return _dir_info(url, modified=folder.modified)
        if level == "asset":
            await self._view.asset(url.asset_addr(me))
        _addr, resolved, index = await self._index(url)
        found = index.lookup(url.path)
        if found is None:
            raise NotFound(f"ah://{url} does not exist")
        if found == "dir":
            return _dir_info(url, commit=resolved.commit_id)
        return _file_info(url, found, resolved)

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
            return True
        except (FileNotFoundError, PermissionError, ValueError):
            return False

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False,
             detail: bool = False, **kwargs: Any) -> Any:
        url = self._parse(path)
        if url.asset is None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail,
                                **kwargs)
        found = cast("dict[str, dict[str, Any]]",
                     self._call(self._find, url, maxdepth, withdirs))
        if detail:
            return found
        return sorted(found)

    async def _find(self, url: AhUrl, maxdepth: int | None,
                    withdirs: bool) -> dict[str, dict[str, Any]]:
        try:
            _, resolved, index = await self._index(url)
        except NotFound:
            return {}
        found = index.lookup(url.path)
        if found is None:
            return {}
        if found != "dir":
            return {str(url): _file_info(url, found, resolved)}
        out: dict[str, dict[str, Any]] = {}
        base = url.path
        depth0 = base.count("/") + 1 if base else 0
        for directory, children in index.dirs.items():
            if base and directory != base and not directory.startswith(base + "/"):
                continue
            depth = (directory.count("/") + 1 if directory else 0) - depth0 + 1
            if maxdepth is not None and depth > maxdepth:
                continue
            at = AhUrl(url.owner, url.kind, url.folder, url.asset, url.ref, directory)
            for name, entry in children.items():
                child = at.child(name)
                if entry is not None:
                    out[str(child)] = _file_info(child, entry, resolved)
                elif withdirs:
                    out[str(child)] = _dir_info(child, commit=resolved.commit_id)
        if withdirs and base:
            out[str(url)] = _dir_info(url, commit=resolved.commit_id)
        return dict(sorted(out.items()))

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], UTC)

    def ukey(self, path: str) -> str:
        return str(self.info(path)["sha256"])

    def checksum(self, path: str) -> int:
        return int(self.ukey(path)[:16], 16)

    # -- reading ---------------------------------------------------------------------------

    async def _source(self, url: AhUrl) -> tuple[HubSource, Resolved]:
        addr, resolved, index = await self._index(url)
        found = index.lookup(url.path)
        if found is None:
            raise NotFound(f"ah://{url} does not exist")
        if found == "dir" or not url.path:
            raise IsADirectoryError(errno.EISDIR, f"ah://{url} is a directory")
        runtime = self._runtime()
        return HubSource(runtime.view, addr, resolved.commit_id, found.path, found.sha256,
                         found.size), resolved

    def open_source(self, path: str) -> tuple[HubSource, Resolved]:
        """The object at ``path`` pinned to the commit it resolves to now (what a read
        handle holds)."""
        url = self._parse(path)
        return cast("tuple[HubSource, Resolved]", self._call(self._source, url))

    def read_at(self, handle: ReadHandle, start: int, end: int, sequential: bool) -> bytes:
        """Bytes ``[start, end)`` of an open file's object, through the block cache: in
        order with read-ahead (the mount's read handle) when the file is read front to back,
        else as few bytes as the cache blocks allow (``ObjectCache.read_range``)."""
        return cast("bytes", self._call(self._read_at, handle, start, end, sequential))

    async def _read_at(self, handle: ReadHandle, start: int, end: int,
                       sequential: bool) -> bytes:
        cache = self._runtime().cache
        if sequential:
            return await handle.read(cache, start, max(0, end - start))
        return await cache.read_range(handle.source, start, max(0, end - start))

    def pin_source(self, source: HubSource) -> Runtime:
        """Keep the object's cached blocks from eviction while a file reads it; the runtime
        to unpin it with (``Runtime.call_soon(cache.unpin, sha)``: from any thread, without
        waiting, as a file closed by the garbage collector must)."""
        runtime = self._runtime()

        async def pin() -> None:
            runtime.cache.pin(source.sha256)

        self._call(pin)
        return runtime

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        url = self._parse(path)
        return cast("bytes", self._call(self._cat_range, url, start, end))

    async def _cat_range(self, url: AhUrl, start: int | None, end: int | None) -> bytes:
        source, _ = await self._source(url)
        first, last = _bounds(source.size, start, end)
        cache = self._runtime().cache
        if start is None and end is None:
            return await cache.read(source, 0, source.size)
        return await cache.read_range(source, first, last - first)

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, max_gap: Any = None,
                   on_error: str = "return", **kwargs: Any) -> list[Any]:
        """Many ranges (of one file or many) read concurrently: a safetensors header and
        the tensors it lists, a Parquet footer and its column chunks."""
        if not isinstance(starts, list):
            starts = [starts] * len(paths)
        if not isinstance(ends, list):
            ends = [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("cat_ranges needs as many starts and ends as paths")
        parsed = [self._parse(p) for p in paths]
        results = cast("list[Any]", self._call(self._cat_many, parsed, starts, ends))
        if on_error == "raise":
            for r in results:
                if isinstance(r, Exception):
                    raise r
        return results

    async def _cat_many(self, parsed: list[AhUrl], starts: list[Any],
                        ends: list[Any]) -> list[Any]:
        results: list[Any] = [None] * len(parsed)
        limit = trio.CapacityLimiter(PARALLEL_READS)

        async def one(i: int) -> None:
            async with limit:
                try:
                    results[i] = await self._cat_range(parsed[i], starts[i], ends[i])
                except AhError as exc:
                    results[i] = os_error(exc)
                except OSError as exc:
                    results[i] = exc

        async with open_nursery() as nursery:
            for i in range(len(parsed)):
                nursery.start_soon(one, i)
        return results

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise",
            **kwargs: Any) -> Any:
        """Whole files: several small objects of one commit travel in one request (a
        10,000-file ``cat`` is a handful of requests, not 10,000)."""
        paths = self.expand_path(path, recursive=recursive)
        single = (len(paths) == 1 and isinstance(path, str) and not self._is_pattern(path)
                  and not recursive)
        if single:
            return self.cat_file(paths[0])
        results = cast("dict[str, Any]", self._call(self._cat_files, paths))
        if on_error == "raise":
            for value in results.values():
                if isinstance(value, Exception):
                    raise value
        elif on_error == "omit":
            results = {k: v for k, v in results.items() if not isinstance(v, Exception)}
        return results

    @staticmethod
    def _is_pattern(path: str) -> bool:
        return any(c in path for c in "*?[")

    async def _cat_files(self, paths: list[str]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        cache = self._runtime().cache
        groups: dict[tuple[AssetAddr, str], list[tuple[str, HubSource]]] = {}
        singles: list[tuple[str, HubSource]] = []
        for path in paths:
            try:
                source, _ = await self._source(urls.parse(path))
            except IsADirectoryError:
                continue  # a directory of a recursive or glob expansion: its files are here
            except (AhError, OSError) as exc:
                results[path] = os_error(exc) if isinstance(exc, AhError) else exc
                continue
            if cache.is_complete(source.sha256, source.size) or source.size > BATCH_OBJECT:
                singles.append((path, source))
            else:
                groups.setdefault((source.asset, source.commit_id), []).append((path, source))
        limit = trio.CapacityLimiter(PARALLEL_READS)

        async def read_one(path: str, source: HubSource) -> None:
            async with limit:
                try:
                    results[path] = await cache.read(source, 0, source.size)
                except AhError as exc:
                    results[path] = os_error(exc)

        async def read_group(addr: AssetAddr, commit_id: str,
                             items: list[tuple[str, HubSource]]) -> None:
            by_object: dict[str, list[str]] = {}
            entries: dict[str, ObjectEntry] = {}
            for path, source in items:
                by_object.setdefault(source.path, []).append(path)
                entries[source.path] = ObjectEntry(source.path, source.sha256, source.size, 0.0)
            async with limit:
                try:
                    kept: list[tuple[str, bytes]] = []
                    async for entry, data in read_batch(self._runtime().hub, addr, commit_id,
                                                        list(entries.values())):
                        kept.append((entry.sha256, data))
                        for path in by_object[entry.path]:
                            results[path] = data
                    await cache.store(kept)
                except AhError as exc:
                    for path, _ in items:
                        results.setdefault(path, os_error(exc))

        async with open_nursery() as nursery:
            for path, source in singles:
                nursery.start_soon(read_one, path, source)
            for (addr, commit_id), items in groups.items():
                for start in range(0, len(items), BATCH_FILES):
                    nursery.start_soon(read_group, addr, commit_id,
                                       items[start:start + BATCH_FILES])
        return {p: results[p] for p in paths if p in results}

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
              autocommit: bool = True, cache_options: Any = None, **kwargs: Any) -> AhFile:
        if "r" in mode:
            return AhFile(self, path, mode, block_size=block_size, **kwargs)
        url = self._parse(path)
        self._call(self._check_writable, url, path)
        if "x" in mode and self.exists_now(path):
            raise FileExistsError(errno.EEXIST, f"ah://{url} exists")
        spool = self._spool_path()
        appending = None
        if "a" in mode:
            base = self.append_base(path).data
            assert base is not None
            spool.write_bytes(base)
            appending = (len(base), hashlib.sha256(base).digest())
        return AhFile(self, path, mode, block_size=block_size, autocommit=autocommit,
                      spool=spool, message=kwargs.get("message"), appending=appending,
                      exclusive="x" in mode, **_file_kwargs(kwargs))

    # -- appends and exclusive creates -------------------------------------------------------

    def _writable(self, path: str) -> tuple[AhUrl, AssetAddr, str]:
        """``path``'s URL and the asset and branch it writes to (PermissionError for a tag
        or a commit)."""
        url = self._parse(path)
        addr, branch = cast("tuple[AssetAddr, str]",
                            self._call(self._check_writable, url, path))
        return url, addr, branch

    def _written_here(self, path: str) -> tuple[AhUrl, AssetAddr, str, BranchChanges | None]:
        """``path``'s URL, asset and branch, and the changes of its branch that this
        thread's write call or the open transaction holds (None: none yet)."""
        url, addr, branch = self._writable(path)
        pending: Pending | None = getattr(self._calls, "pending", None)
        if pending is None and self._intrans:
            pending = cast("AhTransaction", self.transaction).pending
        return url, addr, branch, None if pending is None else pending.branches.get(
            (addr, branch))

    def append_base(self, path: str, unless: bytes | None = None) -> AppendBase:
        """What an append to ``path`` adds to, now: the file as this thread's call or the
        open transaction has written it so far, else as the branch's head has it (resolved
        now, not at the pinned commit: an append to an old pin would drop what others
        appended since); no bytes if there is no such file. With ``unless`` (a sha256
        digest), the head's file is not read if it still hashes to that, as its listing
        says (``data`` None): an append's commit then reads nothing of it again."""
        url, addr, branch, changes = self._written_here(path)
        if changes is not None:
            if url.path in changes.files:
                return AppendBase(changes.files[url.path].read_bytes())
            if url.path in changes.entries:
                raise OSError(errno.EOPNOTSUPP, f"ah://{url}: appending to a file copied "
                              "earlier in the same transaction is not supported; append to "
                              "its source, or after the transaction")
            if url.path in changes.deletes:
                return AppendBase(b"")
        self._call(self._forget_head, addr, branch)
        if unless is not None:
            info = self._info_or_none(path)
            listed = None if info is None else info.get("sha256")
            if (listed or hashlib.sha256(b"").hexdigest()) == unless.hex():
                return AppendBase(None, from_head=True, head_sha=listed)
        return self._head_file(path)

    def _head_file(self, path: str) -> AppendBase:
        """``path``'s bytes in the branch's head as resolved last, and their sha256 (None:
        no such file)."""
        try:
            data = self.cat_file(path)
        except FileNotFoundError:
            return AppendBase(b"", from_head=True, head_sha=None)
        return AppendBase(data, from_head=True, head_sha=hashlib.sha256(data).hexdigest())

    def exists_now(self, path: str) -> bool:
        """Whether ``path`` is there now, for an exclusive create: written by this thread's
        call or the open transaction, or in the branch's head resolved now."""
        url, addr, branch, changes = self._written_here(path)
        said = None if changes is None else changes.says(url.path)
        if said is not None:
            return said
        self._call(self._forget_head, addr, branch)
        return bool(self.exists(path))

    async def _forget_head(self, addr: AssetAddr, branch: str) -> None:
        self._view.invalidate_asset(addr)
        self._pins.pop((addr, branch), None)

    def _look_now(self, paths: Any) -> None:
        """The refs of ``paths`` resolved again at their next use: an ``rm``, a copy or a
        move acts on the files as they are now, not at the pinned commit (a move of an old
        pin's copy deleted the newer file it stood for; an ``rm`` missed a file made since
        the pin)."""
        for path in paths if isinstance(paths, list) else [paths]:
            url = self._parse(path)
            if url.asset is not None:
                self._call(self._forget_ref, url)

    async def _forget_ref(self, url: AhUrl) -> None:
        await self._forget_head(url.asset_addr(self._runtime_me()), url.ref_or_default)

    def path_lock(self, path: str) -> threading.Lock:
        """This process's lock for ``path`` (every file system of the same hub and cache
        shares it): an append or an exclusive create looks at the file again and commits
        under it, so threads doing either take turns."""
        url, addr, branch = self._writable(path)
        key = (self._key, addr, branch, url.path)
        with _PATH_LOCKS_GUARD:
            return _PATH_LOCKS.setdefault(key, threading.Lock())

    # -- writing ---------------------------------------------------------------------------

    def _spool_path(self) -> Path:
        runtime = self._runtime()
        assert runtime.state_dir is not None
        spool = runtime.state_dir / "spool"
        spool.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool, prefix="write-")
        os.close(fd)
        return Path(name)

    async def _check_writable(self, url: AhUrl, path: str) -> tuple[AssetAddr, str]:
        if url.asset is None or not url.path:
            raise IsADirectoryError(errno.EISDIR, f"ah://{url} is not a file path in an asset")
        addr, resolved = await self._resolve(url)
        if resolved.type != "branch":
            branch = AhUrl(url.owner, url.kind, url.folder, url.asset, urls.DEFAULT_BRANCH)
            raise PermissionError(
                errno.EROFS,
                f"ah://{url.asset_root()} is a {resolved.type}: tags and commits are "
                f"read-only; write to a branch (ah://{branch}/...)")
        return addr, url.ref_or_default

    def changes_for(self, path: str) -> tuple[BranchChanges, str]:
        """The pending changes of ``path``'s branch in the write call or transaction this
        thread is in (see :meth:`_batch`), and the object path."""
        url, addr, branch = self._writable(path)
        pending: Pending | None = getattr(self._calls, "pending", None)
        assert pending is not None, "a change outside a write call"
        return pending.of(addr, branch, url.asset_root()), url.path

    @contextmanager
    def _batch(self, message: str | None) -> Iterator[None]:
        """One commit per branch for what runs inside: it joins the write call this thread
        is in (a ``put``'s files), else the open transaction, else it is this call's own.

        A call's own changes are this thread's alone, not the file system's transaction:
        threads share a file system (pyarrow writes a dataset's partitions from several at
        once), and a write that joined another thread's call joined it after that call's
        commit had taken its files, and was lost. A transaction is the file system's, as
        fsspec has it: a change that comes after its commit began is refused
        (:class:`~ahmount.ahfs.pending.Gate`)."""
        if getattr(self._calls, "pending", None) is not None:
            yield
            return
        if self._intrans:
            transaction = cast("AhTransaction", self.transaction)
            if message and transaction.message is None:
                transaction.message = message
            self._calls.pending = transaction.pending
            try:
                yield
            finally:
                self._calls.pending = None
            return
        pending = self._calls.pending = Pending(message)
        try:
            try:
                yield
            finally:
                self._calls.pending = None
            pending.shut()
            self._commit_pending(pending)
        finally:
            pending.discard()  # the spooled bytes, committed or dropped

    def start_transaction(self, message: str | None = None) -> AhTransaction:
        """Begin a transaction (``message``: its commit message)."""
        transaction = AhTransaction(self, message)
        transaction.start()
        self._transaction = transaction
        return transaction

    def _commit_pending(self, pending: Pending) -> None:
        for changes in list(pending.branches.values()):
            if not (changes.files or changes.entries or changes.deletes):
                continue
            deadline = time.monotonic() + CATCH_UP_SECONDS
            with _domain_errors():
                for attempt in itertools.count():
                    try:
                        self._runtime().call(self._commit_branch, changes, pending.message)
                        break
                    except Changed:
                        if time.monotonic() > deadline:
                            raise
                    time.sleep(random.uniform(0, min(CATCH_UP_PAUSE, 0.005 * 2 ** attempt)))
                    self._catch_up(changes)

    def _catch_up(self, changes: BranchChanges) -> None:
        """After the hub refused a commit because a file it expected changed (another
        process's append or create): each append is put after the file as it is now; an
        exclusive create of a file made meanwhile fails, as O_EXCL does."""
        for path, sha in list(changes.expect.items()):
            where = f"{changes.root}/{path}"
            now = self._head_file(where)
            if now.head_sha == sha:
                continue
            if path in changes.exclusive:
                raise FileExistsError(
                    errno.EEXIST, f"ah://{where} was made by another writer while this one "
                    "(an exclusive create) wrote it: nothing of this commit was made")
            assert now.data is not None
            rebase_append(changes.files[path], changes.appended[path], now.data)
            changes.expect[path], changes.appended[path] = now.head_sha, len(now.data)

    async def _commit_branch(self, changes: BranchChanges, message: str | None) -> None:
        hub = self._runtime().hub
        files = [LocalFile(local, path) for path, local in changes.files.items()]
        adds, _ = await upload_files(hub, files) if files else ([], 0)
        try:
            commit = await hub.commit(
                changes.addr, changes.branch, message or changes.describe(),
                session=f"ah-fsspec-{uuid.uuid4().hex}", deletes=sorted(changes.deletes),
                adds=[*adds, *changes.entries.values()], expect=changes.expect)
        finally:
            await self._forget_head(changes.addr, changes.branch)
        if commit is not None:
            self._pins[(changes.addr, changes.branch)] = Resolved("branch", commit.id,
                                                                  commit.created)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  **kwargs: Any) -> None:
        if mode != "create":
            self._pipe_one(path, value, kwargs.get("message"))
            return
        with self.path_lock(path):  # the check and the commit, one turn among threads
            if self.exists_now(path):
                raise FileExistsError(errno.EEXIST, f"ah://{urls.strip_protocol(path)} exists")
            self._pipe_one(path, value, kwargs.get("message"), exclusive=True)

    def _pipe_one(self, path: str, value: bytes, message: str | None,
                  exclusive: bool = False) -> None:
        with self._batch(message):
            changes, object_path = self.changes_for(path)
            spool = self._spool_path()
            spool.write_bytes(bytes(value))
            changes.add_file(object_path, spool, spooled=True, exclusive=exclusive)

    def pipe(self, path: Any, value: bytes | None = None, **kwargs: Any) -> None:
        """``pipe({path: bytes, ...})`` is one commit per branch, not one per file."""
        with self._batch(kwargs.pop("message", None)):
            super().pipe(path, value, **kwargs)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        if os.path.isdir(lpath):
            return  # directories are implied by the objects in them
        with _domain_errors():
            check_regular(Path(lpath))  # a FIFO in a tree put held its upload forever
        if mode == "create" and self.exists_now(rpath):
            raise FileExistsError(errno.EEXIST, f"ah://{urls.strip_protocol(rpath)} exists")
        with self._batch(kwargs.get("message")):
            changes, object_path = self.changes_for(rpath)
            changes.add_file(object_path, Path(lpath).absolute(), spooled=False,
                             exclusive=mode == "create")

    def put(self, lpath: Any, rpath: Any, recursive: bool = False, callback: Any = None,
            maxdepth: int | None = None, **kwargs: Any) -> None:
        with self._batch(kwargs.pop("message", None)):
            super().put(lpath, rpath, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def rm_file(self, path: str, **kwargs: Any) -> None:
        self.rm(path, message=kwargs.get("message"))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> None:
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            url = self._parse(p)
            if url.asset is None or not url.path:
                raise PermissionError(
                    errno.EPERM, f"ah://{url} is not inside an asset: rm deletes objects; "
                    "delete folders and assets with rmdir or ah delete")
        self._look_now(path)
        expanded = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        with self._batch(kwargs.get("message")):
            for p in expanded:
                info = self._info_or_none(p)
                if info is not None and info["type"] == "directory":
                    continue
                changes, object_path = self.changes_for(p)
                there = changes.says(object_path)
                if there is None:  # this call or transaction has not touched it
                    there = info is not None
                if not there:
                    # As a local rm (and HfFileSystem's): a typo, or a file this call or
                    # transaction removed already, does not pass as removed now.
                    raise FileNotFoundError(errno.ENOENT, f"ah://{p}: no such object")
                changes.delete(object_path, exists_on_hub=info is not None)

    def _info_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self.info(path)
        except FileNotFoundError:
            return None

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        source = self.info(path1)
        if source["type"] == "directory":
            return
        src, dst = self._parse(path1), self._parse(path2)
        with self._batch(kwargs.get("message")):
            changes, object_path = self.changes_for(path2)
            same_hub_asset = (src.asset_addr(self.me) == dst.asset_addr(self.me))
            if same_hub_asset:
                changes.add_entry(ObjectEntry(object_path, source["sha256"], source["size"],
                                              source["mtime"], source["content_type"]))
            else:  # another asset: its bytes travel (the hub checks who may read them)
                spool = self._spool_path()
                self.get_file(path1, str(spool))
                changes.add_file(object_path, spool, spooled=True)

    def copy(self, path1: Any, path2: Any, recursive: bool = False,
             maxdepth: int | None = None, on_error: str | None = None, **kwargs: Any) -> None:
        self._look_now(path1)
        with self._batch(kwargs.pop("message", None)):
            super().copy(path1, path2, recursive=recursive, maxdepth=maxdepth,
                         on_error=on_error, **kwargs)

    def mv(self, path1: Any, path2: Any, recursive: bool = False,
           maxdepth: int | None = None, **kwargs: Any) -> None:
        self._look_now(path1)
        with self._batch(kwargs.pop("message", None)):
            super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """A folder or an asset is created on the hub; directories inside an asset are
        implied by the objects in them, so making one changes nothing."""
        url = self._parse(path)
        self._call(self._mkdir, url, create_parents)

    async def _mkdir(self, url: AhUrl, create_parents: bool) -> None:
        if url.level not in ("folder", "asset"):
            return
        me = self._runtime_me()
        hub = self._runtime().hub
        folder = url.folder_addr(me)
        if url.level == "folder" or create_parents:
            try:
                await hub.create_folder(folder)
            except AhError as exc:
                if url.level == "folder" or errno_for(exc) != errno.EEXIST:
                    raise
        if url.level == "asset":
            await hub.create_asset(url.asset_addr(me))
        self._view.invalidate()

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            self.mkdir(path, create_parents=True)
        except FileExistsError:
            if not exist_ok:
                raise

    def rmdir(self, path: str) -> None:
        """Delete an empty asset or folder; inside an asset, empty directories do not exist
        (nothing to do)."""
        url = self._parse(path)
        self._call(self._rmdir, url)

    async def _rmdir(self, url: AhUrl) -> None:
        me = self._runtime_me()
        hub = self._runtime().hub
        if url.level == "asset":
            _, _, index = await self._index(url)
            if index.dirs[""]:
                raise OSError(errno.ENOTEMPTY, f"ah://{url} is not empty")
            await hub.delete_asset(url.asset_addr(me))
        elif url.level == "folder":
            if await self._view.assets(url.folder_addr(me)):
                raise OSError(errno.ENOTEMPTY, f"ah://{url} is not empty")
            await hub.delete_folder(url.folder_addr(me))
        elif url.level == "object":
            _, _, index = await self._index(url)
            if index.lookup(url.path) == "dir":
                raise OSError(errno.ENOTEMPTY, f"ah://{url} is not empty")
        self._view.invalidate()
        self.invalidate_cache(str(url))


def _bounds(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """fsspec's range convention: None is the start or the end, negatives count from the
    end."""
    first = 0 if start is None else (size + start if start < 0 else start)
    last = size if end is None else (size + end if end < 0 else end)
    return max(0, min(first, size)), max(0, min(last, size))


def _dir_info(url: AhUrl, modified: float | None = None,
              commit: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"name": str(url), "size": 0, "type": "directory"}
    if modified is not None:
        info["mtime"] = modified
    if commit is not None:
        info["commit"] = commit
    return info


def _file_info(url: AhUrl, entry: ObjectEntry, resolved: Resolved) -> dict[str, Any]:
    return {"name": str(url), "size": entry.size, "type": "file", "sha256": entry.sha256,
            "mtime": entry.mtime, "content_type": entry.content_type,
            "commit": resolved.commit_id, "ref_type": resolved.type}


def _file_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("cache_type",)}


def _config(hub: str | None, api_key: str | None) -> ClientConfig:
    if hub is None and api_key is None:
        return load_config()
    if hub is None:
        saved = load_config()
        return make_config(saved.ah_host, saved.ais_host, api_key, saved.timeout)
    return make_config(hub, None, api_key)


def _restore(cls: type[AhFileSystem], args: Sequence[Any], kwargs: dict[str, Any],
             me: str | None, pins: dict[tuple[AssetAddr, str], Resolved]) -> AhFileSystem:
    fs = cls(*args, **kwargs)
    if fs._me is None:
        fs._me = me
    for key, value in pins.items():
        fs._pins.setdefault(key, value)
    return fs


