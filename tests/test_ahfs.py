"""``ah://`` against a real ah-server: listings and their fields, refs, another owner's assets,
writes as commits, transactions, read-only refs, pinning, pickling and fork, and the block
cache shared with the mount."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import httpx
import pytest
import trio

from ahmount.ahfs import AhFileSystem
from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr
from ahmount.vfs.cache_dir import state_dir
from ahmount.vfs.object_cache import ObjectCache
from tests.conftest import HubProcess

T = TypeVar("T")


class Account:
    """A fresh user on the session's ah-server, with a file system and a hub client."""

    def __init__(self, server: HubProcess, cache: Path) -> None:
        self.server = server
        self.name, self.key = server.fresh_user()
        self.cache = cache
        self.fs = self.filesystem()
        self.folder = f"f{uuid.uuid4().hex[:8]}"
        self.root = f"model/{self.folder}/m"
        self.fs.makedirs(self.root)
        self.addr = AssetAddr(FolderAddr(self.name, "model", self.folder), "m")

    def filesystem(self, **options: Any) -> AhFileSystem:
        return AhFileSystem(hub=self.server.url, api_key=self.key, cache_dir=str(self.cache),
                            skip_instance_cache=True, **options)

    def hub(self, fn: Callable[[HubClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with HubClient(self.server.url, api_key=self.key) as hub:
                return await fn(hub)

        return trio.run(main)

    def commits(self, ref: str = "main") -> list[Any]:
        return self.hub(lambda h: h.log(self.addr, ref))


@pytest.fixture
def account(sqlite_server: HubProcess, tmp_path: Path) -> Account:
    return Account(sqlite_server, tmp_path / "cache")


def requests_seen(server: HubProcess) -> Counter[str]:
    """Requests the server has answered so far, by endpoint (from its /metrics)."""
    text = httpx.get(server.url + "/metrics").text
    out: Counter[str] = Counter()
    for match in re.finditer(r'^ah_requests_total\{endpoint="(\w+)",[^}]*\} (\S+)$', text,
                             re.MULTILINE):
        out[match.group(1)] += int(float(match.group(2)))
    return out


# -- discovery ---------------------------------------------------------------------------

def test_entry_point_and_url_forms(account: Account) -> None:
    fs = account.fs
    fs.pipe(f"{account.root}/config.json", b"{}")
    assert isinstance(fsspec.filesystem("ah", hub=account.server.url, api_key=account.key,
                                        cache_dir=str(account.cache)), AhFileSystem)
    # own, explicit owner, and an explicit main branch name the same object
    for url in (f"ah://{account.root}/config.json",
                f"ah://{account.name}/{account.root}/config.json",
                f"ah://{account.root}@main/config.json"):
        assert fs.cat(url) == b"{}"
    with fsspec.open(f"ah://{account.root}/config.json", hub=account.server.url,
                     api_key=account.key, cache_dir=str(account.cache)) as f:
        assert f.read() == b"{}"


def test_listing_fields(account: Account) -> None:
    fs = account.fs
    fs.pipe({f"{account.root}/a.txt": b"hello", f"{account.root}/d/b.bin": b"x" * 10})
    head = account.commits()[0].id
    info = fs.info(f"{account.root}/a.txt")
    assert info["type"] == "file" and info["size"] == 5
    assert info["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert info["commit"] == head and info["mtime"] > 0
    assert fs.ukey(f"{account.root}/a.txt") == info["sha256"]
    listing = {e["name"]: e for e in fs.ls(account.root)}
    assert set(listing) == {f"{account.root}/a.txt", f"{account.root}/d"}
    assert listing[f"{account.root}/d"]["type"] == "directory"
    assert fs.find(account.root) == [f"{account.root}/a.txt", f"{account.root}/d/b.bin"]
    assert fs.find(account.root, maxdepth=1) == [f"{account.root}/a.txt"]
    assert fs.glob(f"{account.root}/**/*.bin") == [f"{account.root}/d/b.bin"]
    assert fs.exists(f"{account.root}/d") and not fs.exists(f"{account.root}/nope")
    assert fs.isdir(f"model/{account.folder}") and fs.isdir("model")
    assert f"model/{account.folder}" in fs.ls("model", detail=False)
    assert fs.ls(f"model/{account.folder}", detail=False) == [account.root]
    with pytest.raises(FileNotFoundError, match="nope"):
        fs.info(f"{account.root}/nope")
    with pytest.raises(ValueError, match="not allowed"):
        fs.info("model/bad name/x")


def test_refs_tags_and_commit_prefixes(account: Account) -> None:
    fs = account.fs
    fs.pipe(f"{account.root}/w.txt", b"v1")
    first = account.commits()[0].id
    account.hub(lambda h: h.create_tag(account.addr, "v1", "main"))
    fs.pipe(f"{account.root}/w.txt", b"v2")
    assert fs.cat(f"{account.root}@v1/w.txt") == b"v1"
    assert fs.cat(f"{account.root}@{first[:8]}/w.txt") == b"v1"
    assert fs.cat(f"{account.root}/w.txt") == b"v2"
    assert fs.info(f"{account.root}@v1/w.txt")["ref_type"] == "tag"
    before = account.commits()
    for ref in ("v1", first[:8]):
        with pytest.raises(PermissionError, match="read-only; write to a branch"):
            fs.pipe(f"{account.root}@{ref}/w.txt", b"no")
        with pytest.raises(PermissionError, match="read-only"):
            fs.open(f"{account.root}@{ref}/new.txt", "wb")
        with pytest.raises(PermissionError, match="read-only"):
            fs.rm(f"{account.root}@{ref}/w.txt")
    assert account.commits() == before  # nothing changed


def test_another_owners_asset(sqlite_server: HubProcess, tmp_path: Path) -> None:
    alice = Account(sqlite_server, tmp_path / "a")
    bob = Account(sqlite_server, tmp_path / "b")
    alice.fs.pipe(f"{alice.root}/x.txt", b"alice's")
    url = f"ah://{alice.name}/{alice.root}/x.txt"
    with pytest.raises(FileNotFoundError):  # the hub does not tell others what exists
        bob.fs.cat(url)
    alice.hub(lambda h: h.share_folder(alice.addr.folder, bob.name, "view"))
    assert bob.fs.cat(url) == b"alice's"
    assert bob.fs.ls(f"{alice.name}/{alice.root}", detail=False) == [
        f"{alice.name}/{alice.root}/x.txt"]
    with pytest.raises(PermissionError):
        bob.fs.pipe(url, b"bob's")
    assert alice.fs.cat(url) == b"alice's"


# -- writes ------------------------------------------------------------------------------

def test_each_write_is_one_commit_with_its_message(account: Account) -> None:
    fs = account.fs
    fs.pipe(f"{account.root}/a.txt", b"a", message="add a")
    assert account.commits()[0].message == "add a"
    with fs.open(f"{account.root}/b.txt", "wb") as f:
        f.write(b"b" * 100)
    assert account.commits()[0].message == "Write b.txt through ah://"
    n = len(account.commits())
    fs.cp(f"{account.root}/a.txt", f"{account.root}/c.txt")
    fs.mv(f"{account.root}/b.txt", f"{account.root}/sub/b.txt")
    assert len(account.commits()) == n + 2  # the move is one commit, not a copy and a delete
    assert fs.find(account.root) == [f"{account.root}/a.txt", f"{account.root}/c.txt",
                                     f"{account.root}/sub/b.txt"]
    fs.rm(f"{account.root}/sub", recursive=True, message="drop sub")
    assert account.commits()[0].message == "drop sub"
    assert fs.find(account.root) == [f"{account.root}/a.txt", f"{account.root}/c.txt"]


@pytest.mark.parametrize("how", ["open", "pipe"])
def test_writes_from_many_threads_each_commit_their_own_file(account: Account,
                                                             how: str) -> None:
    """Threads sharing one file system (pyarrow's dataset writer, a thread pool saving
    shards) each write a file at once: every file is committed, each write its own commit.
    A write's implicit commit was the file system's one transaction, so a write from
    another thread joined it, after it had taken its files: lost, and reported written."""
    fs = account.fs
    n = len(account.commits())
    threads = 8
    barrier = threading.Barrier(threads)

    def write(i: int) -> None:
        path = f"{account.root}/shards/{i}/part-0.bin"
        data = f"shard {i}".encode() * 100
        barrier.wait()
        if how == "pipe":
            fs.pipe(path, data)
        else:
            with fs.open(path, "wb") as f:
                barrier.wait()  # every file open at once, then all closed at once
                f.write(data)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(threads)))
    fs.invalidate_cache()
    assert sorted(fs.find(f"{account.root}/shards")) == sorted(
        f"{account.root}/shards/{i}/part-0.bin" for i in range(threads))
    assert all(fs.cat(f"{account.root}/shards/{i}/part-0.bin") == f"shard {i}".encode() * 100
               for i in range(threads))
    log = account.commits()
    assert len(log) == n + threads
    assert all(c.message == "Write shards/{}/part-0.bin through ah://".format(
        c.message.split("/")[1]) for c in log[:threads])


def test_put_of_a_tree_is_one_commit(account: Account, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "d").mkdir(parents=True)
    for i in range(5):
        (local / "d" / f"{i}.txt").write_text(str(i))
    n = len(account.commits())
    account.fs.put(str(local / "d"), f"{account.root}/up", recursive=True)
    assert len(account.commits()) == n + 1
    assert account.fs.cat(f"{account.root}/up/3.txt") == b"3"


def test_put_of_a_tree_with_a_fifo_is_refused_and_commits_nothing(account: Account,
                                                                     tmp_path: Path) -> None:
    """The upload read the FIFO and waited for a writer forever. (If it waits again, the
    test opens the FIFO's other end, so it fails rather than hangs.)"""
    local = tmp_path / "withfifo"
    local.mkdir()
    (local / "a.txt").write_text("a")
    os.mkfifo(local / "pipe")
    n = len(account.commits())
    outcome: list[BaseException | None] = []

    def put() -> None:
        try:
            account.fs.put(str(local) + "/", f"{account.root}/up/", recursive=True)
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    worker = threading.Thread(target=put)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        os.close(os.open(local / "pipe", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(30)
        pytest.fail("put waited on the FIFO")
    assert isinstance(outcome[0], ValueError) and "is a FIFO" in str(outcome[0])
    assert len(account.commits()) == n


def test_a_write_onto_a_directory_or_under_a_file_is_the_local_error(account: Account) -> None:
    """As ``open()`` on a local disk says: IsADirectoryError, NotADirectoryError. The hub's
    refusal crossed HTTP as a plain conflict and arrived as EBUSY."""
    fs = account.fs
    fs.pipe(f"{account.root}/d/x.txt", b"x")
    fs.pipe(f"{account.root}/f", b"f")
    n = len(account.commits())
    with pytest.raises(IsADirectoryError, match="directory of that name"):
        fs.pipe(f"{account.root}/d", b"1")
    with pytest.raises(NotADirectoryError, match="'f' is a file"):
        fs.pipe(f"{account.root}/f/sub.txt", b"1")
    assert len(account.commits()) == n


def test_transaction_is_one_commit_and_nothing_on_error(account: Account) -> None:
    fs = account.fs
    fs.pipe(f"{account.root}/keep.txt", b"k")
    n = len(account.commits())
    with fs.transaction as t:
        t.message = "one commit"
        fs.pipe(f"{account.root}/1.txt", b"1")
        with fs.open(f"{account.root}/2.txt", "wb") as f:
            f.write(b"2")
        fs.rm(f"{account.root}/keep.txt")
        assert not fs.exists(f"{account.root}/1.txt")  # not visible before the commit
    log = account.commits()
    assert len(log) == n + 1 and log[0].message == "one commit"
    assert fs.find(account.root) == [f"{account.root}/1.txt", f"{account.root}/2.txt"]

    with pytest.raises(RuntimeError, match="boom"), fs.transaction:
        fs.pipe(f"{account.root}/3.txt", b"3")
        with fs.open(f"{account.root}/4.txt", "wb") as f:
            f.write(b"4")
        raise RuntimeError("boom")
    assert len(account.commits()) == n + 1
    assert not fs.exists(f"{account.root}/3.txt") and not fs.exists(f"{account.root}/4.txt")
    spool = state_dir(account.cache, account.server.url, account.name) / "spool"
    assert list(spool.iterdir()) == []  # spooled bytes of the dropped writes are gone


def test_a_second_transaction_while_one_is_open_is_refused_and_loses_nothing(
        account: Account) -> None:
    """fsspec gives every ``with fs.transaction:`` of a file system its one open
    transaction; entering it again (nested, or from another thread) started it over and
    dropped the files it had deferred. It is refused now, before its body runs."""
    fs = account.fs
    with fs.transaction:
        with fs.open(f"{account.root}/outer.bin", "wb") as f:
            f.write(b"outer")
        with pytest.raises(RuntimeError, match="already open"), fs.transaction:
            fs.pipe(f"{account.root}/inner.bin", b"never")
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                with fs.transaction:
                    fs.pipe(f"{account.root}/thread.bin", b"never")
            except RuntimeError as exc:
                errors.append(exc)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert len(errors) == 1 and "already open" in str(errors[0])
        with pytest.raises(RuntimeError, match="already open"):
            fs.start_transaction("fsspec's call for it")
    assert fs.find(account.root) == [f"{account.root}/outer.bin"]
    assert fs.cat(f"{account.root}/outer.bin") == b"outer"
    with fs.transaction:  # a new one after the last ended
        fs.pipe(f"{account.root}/after.bin", b"a")
    assert fs.cat(f"{account.root}/after.bin") == b"a"


def test_a_file_left_open_in_a_transaction_is_committed_whole(account: Account) -> None:
    """A file still open when its transaction ends had only the bytes it had spooled (its
    buffer's not yet): the commit took part of the file. It is closed first now."""
    fs = account.fs
    data = os.urandom(10 << 20)
    with fs.transaction:
        left = fs.open(f"{account.root}/left-open.bin", "wb")
        left.write(data[:9 << 20])  # over the writer's 4 MiB block: spooled
        left.write(data[9 << 20:])  # under it: buffered
    assert fs.cat(f"{account.root}/left-open.bin") == data
    left.close()  # closed already: nothing more happens
    assert fs.cat(f"{account.root}/left-open.bin") == data


def test_rm_of_what_is_not_there_is_file_not_found_and_changes_nothing(
        account: Account) -> None:
    """As a local ``rm`` and HfFileSystem's: a mistyped path raises, it does not pass as
    deleted. Inside a transaction, a file written earlier in it is there to remove."""
    fs = account.fs
    fs.pipe(f"{account.root}/kept.txt", b"k")
    n = len(account.commits())
    with pytest.raises(FileNotFoundError, match="no such object"):
        fs.rm(f"{account.root}/kept.txtt")
    with pytest.raises(FileNotFoundError):
        fs.rm([f"{account.root}/kept.txt", f"{account.root}/missing.txt"])
    assert len(account.commits()) == n and fs.cat(f"{account.root}/kept.txt") == b"k"
    with fs.transaction:
        fs.pipe(f"{account.root}/scratch.txt", b"s")
        fs.rm(f"{account.root}/scratch.txt")
        fs.pipe(f"{account.root}/other.txt", b"o")
    assert fs.find(account.root) == [f"{account.root}/kept.txt", f"{account.root}/other.txt"]


def test_exclusive_and_append_modes(account: Account) -> None:
    fs = account.fs
    path = f"{account.root}/x.txt"
    with fs.open(path, "xb") as f:
        f.write(b"one")
    with pytest.raises(FileExistsError):
        fs.open(path, "xb")
    with fs.open(path, "ab") as f:
        f.write(b"+two")
    assert fs.cat(path) == b"one+two"
    with fs.open(path, "r") as text:
        assert text.read() == "one+two"


def test_appends_from_threads_and_from_a_file_system_with_an_old_pin_all_land(
        account: Account) -> None:
    """Each append adds its bytes to the file as it is when it commits. An append copied
    the file at its open and committed that copy plus its bytes, so appends of several
    threads at once overwrote each other (11 of 40 lines kept), and a file system whose
    pin was older than another's append dropped it."""
    fs = account.fs
    log = f"{account.root}/log.txt"
    fs.pipe(log, b"")
    old_pin = account.filesystem()
    assert old_pin.cat(log) == b""  # pinned at this commit

    def append(i: int) -> None:
        for j in range(5):
            with fs.open(log, "ab") as f:
                f.write(f"{i}-{j}\n".encode())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(append, range(4)))
    with old_pin.open(log, "ab") as f:
        f.write(b"late\n")
    fs.invalidate_cache()
    lines = fs.cat(log).decode().splitlines()
    assert sorted(lines) == sorted([f"{i}-{j}" for i in range(4) for j in range(5)] +
                                   ["late"])
    assert lines[-1] == "late"
    for i in range(4):  # each thread's lines in its order
        assert [x for x in lines if x.startswith(f"{i}-")] == [f"{i}-{j}" for j in range(5)]


@pytest.mark.parametrize("how", ["open", "pipe"])
def test_an_exclusive_create_is_made_once_among_threads_and_old_pins(account: Account,
                                                                     how: str) -> None:
    """``open(path, "xb")`` and ``pipe_file(path, mode="create")`` make the file once, as
    O_EXCL does: of threads creating it at once one wins and the others get
    FileExistsError; a file system pinned before the file was made sees it. Both looked at
    the file once, before writing (and at the pinned commit): every creator committed, the
    last one's bytes won."""
    fs = account.fs
    path = f"{account.root}/lock-{how}"
    old_pin = account.filesystem()
    assert old_pin.find(account.root) == []  # pinned before the file exists
    threads = 6
    barrier = threading.Barrier(threads)

    def create(i: int) -> str:
        try:
            if how == "pipe":
                barrier.wait()
                fs.pipe_file(path, f"writer {i}".encode(), mode="create")
            else:
                with fs.open(path, "xb") as f:
                    barrier.wait()  # every writer past its open's look, then all close
                    f.write(f"writer {i}".encode())
        except FileExistsError:
            return "refused"
        return "made"

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(create, range(threads)))
    assert sorted(outcomes) == ["made"] + ["refused"] * (threads - 1)
    fs.invalidate_cache()
    winner = fs.cat(path)
    assert winner == f"writer {outcomes.index('made')}".encode()
    with pytest.raises(FileExistsError), old_pin.open(path, "xb") as f:
        f.write(b"late")
    with pytest.raises(FileExistsError):
        old_pin.pipe_file(path, b"late", mode="create")
    fs.invalidate_cache()
    assert fs.cat(path) == winner


def test_rm_cp_and_mv_from_an_old_pin_act_on_the_files_as_they_are(account: Account) -> None:
    """A file system pinned before another one rewrote a file moved the pinned copy's bytes
    and deleted the newer file (found by tests/test_ahfs_model.py)."""
    fs = account.fs
    fs.pipe(f"{account.root}/a", b"old")
    old_pin = account.filesystem()
    assert old_pin.cat(f"{account.root}/a") == b"old"  # pinned here
    fs.pipe(f"{account.root}/a", b"new")
    fs.pipe(f"{account.root}/made-since", b"m")
    old_pin.cp(f"{account.root}/a", f"{account.root}/copy")
    old_pin.mv(f"{account.root}/a", f"{account.root}/moved")
    old_pin.rm(f"{account.root}/made-since")
    fresh = account.filesystem()
    assert fresh.find(account.root) == [f"{account.root}/copy", f"{account.root}/moved"]
    assert fresh.cat(f"{account.root}/copy") == fresh.cat(f"{account.root}/moved") == b"new"


def test_an_append_no_one_raced_reads_its_file_once(account: Account,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The append reads the file at its open; at its commit the listing's sha256 says the
    file is unchanged, so it is not read again (a large log was read twice per append)."""
    fs = account.fs
    log = f"{account.root}/once.txt"
    fs.pipe(log, b"x" * (3 << 20))
    reads: list[str] = []
    real = fs.cat_file

    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", counted)
    with fs.open(log, "ab") as f:
        f.write(b"y")
    assert len(reads) == 1
    monkeypatch.undo()
    assert fs.cat(log) == b"x" * (3 << 20) + b"y"


def test_appends_in_a_transaction_add_to_what_it_wrote(account: Account) -> None:
    fs = account.fs
    log = f"{account.root}/t.txt"
    fs.pipe(log, b"hub\n")
    fs.pipe(f"{account.root}/gone.txt", b"old\n")
    with fs.transaction:
        for line in (b"one\n", b"two\n"):
            with fs.open(log, "ab") as f:
                f.write(line)
        fs.rm(f"{account.root}/gone.txt")
        with fs.open(f"{account.root}/gone.txt", "ab") as f:
            f.write(b"new\n")
    assert fs.cat(log) == b"hub\none\ntwo\n"
    assert fs.cat(f"{account.root}/gone.txt") == b"new\n"


def test_a_transaction_keeps_what_another_writer_did_before_its_commit(
        account: Account) -> None:
    """A transaction's append and exclusive create are committed later than they looked at
    the file: the hub commits them only if the file is still as seen (``expect``). Before,
    the other writer's append in between was overwritten, and the other writer's file was
    replaced by the 'exclusive' one."""
    fs, other, fresh = account.fs, account.filesystem(), account.filesystem()
    log, lock, side = (f"{account.root}/{name}" for name in ("log.txt", "lock", "side"))
    fs.pipe(log, b"hub\n")
    with fs.transaction:
        with fs.open(log, "ab") as f:
            f.write(b"mine\n")
        with other.open(log, "ab") as f:  # its own commit, before the transaction's
            f.write(b"theirs\n")
    assert fresh.cat(log) == b"hub\ntheirs\nmine\n"
    with pytest.raises(FileExistsError, match="made by another writer"), fs.transaction:
        fs.pipe(side, b"s")
        with fs.open(lock, "xb") as f:
            f.write(b"mine")
        other.pipe_file(lock, b"theirs", mode="create")
    fresh.invalidate_cache()
    assert fresh.cat(lock) == b"theirs" and not fresh.exists(side)


def _child_writes(fs: AhFileSystem, path: str, child: int, start: Any, out: Any) -> None:
    start.wait()
    try:
        if path.endswith(".log"):
            for j in range(5):
                with fs.open(path, "ab") as f:
                    f.write(f"{child}-{j}\n".encode())
            out.put("appended")
        else:
            fs.pipe_file(path, f"writer {child}".encode(), mode="create")
            out.put("made")
    except FileExistsError:
        out.put("refused")
    except BaseException as exc:  # the parent names it, not a timeout
        out.put(repr(exc))


def test_appends_and_exclusive_creates_of_processes_all_land_once(account: Account) -> None:
    """Processes share no lock: the hub's conditional commit is what keeps each append and
    makes a file once (before it, 4 processes appending lost lines, and several creators
    each 'made' the file)."""
    fs = account.fs
    log, lock = f"{account.root}/p.log", f"{account.root}/p.lock"
    fs.pipe(log, b"")
    ctx = multiprocessing.get_context("fork")
    for path in (log, lock):
        start, out = ctx.Barrier(4), ctx.Queue()
        workers = [ctx.Process(target=_child_writes, args=(fs, path, i, start, out))
                   for i in range(4)]
        for w in workers:
            w.start()
        outcomes = sorted(out.get(timeout=120) for _ in workers)
        for w in workers:
            w.join(30)
            assert w.exitcode == 0
        if path == log:
            assert outcomes == ["appended"] * 4
        else:
            assert outcomes == ["made"] + ["refused"] * 3
    fresh = account.filesystem()
    lines = fresh.cat(log).decode().splitlines()
    assert sorted(lines) == sorted(f"{i}-{j}" for i in range(4) for j in range(5))
    for i in range(4):
        assert [x for x in lines if x.startswith(f"{i}-")] == [f"{i}-{j}" for j in range(5)]
    assert fresh.cat(lock).startswith(b"writer ")


# -- pinning, pickling and processes -----------------------------------------------------

def test_branches_are_pinned_until_invalidate_cache(account: Account) -> None:
    fs = account.fs
    path = f"{account.root}/p.txt"
    fs.pipe(path, b"old")
    other = account.filesystem()
    other.pipe(path, b"new")  # another client moves the branch
    assert fs.cat(path) == b"old"
    fs.invalidate_cache(account.root)
    assert fs.cat(path) == b"new"
    live = account.filesystem(use_listings_cache=False)
    assert live.cat(path) == b"new"
    other.pipe(path, b"newer")
    assert live.cat(path) == b"newer"


def test_pickled_fs_keeps_pins_and_identity(account: Account) -> None:
    fs = account.fs
    path = f"{account.root}/p.txt"
    fs.pipe(path, b"seen")
    assert fs.cat(path) == b"seen"
    account.filesystem().pipe(path, b"moved on")
    clone = pickle.loads(pickle.dumps(fs))
    before = requests_seen(account.server)
    assert clone.cat(path) == b"seen"  # the parent's commit, not the branch's new head
    seen = requests_seen(account.server) - before
    assert seen["whoami"] == 0 and seen["ref"] == 0 and seen["objects"] == 0, seen


def _child_reads(fs: AhFileSystem, paths: list[str], out: Any) -> None:
    out.put({p: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in paths})


def test_forked_workers_read_without_relisting(account: Account) -> None:
    fs = account.fs
    blobs = {f"{account.root}/w/{i}.bin": os.urandom(3000 + i) for i in range(6)}
    fs.pipe(blobs)
    assert fs.cat(next(iter(blobs))) == next(iter(blobs.values()))  # resolves, lists once
    before = requests_seen(account.server)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_child_reads, args=(fs, list(blobs), queue))
               for _ in range(3)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    expected = {p: hashlib.sha256(b).hexdigest() for p, b in blobs.items()}
    assert results == [expected] * 3
    seen = requests_seen(account.server) - before
    assert seen["whoami"] == 0 and seen["ref"] == 0 and seen["objects"] == 0, seen


# -- the block cache, shared with the mount ----------------------------------------------

def test_reads_go_through_the_mounts_block_cache(account: Account) -> None:
    fs = account.fs
    data = os.urandom(3 << 20)
    path = f"{account.root}/big.bin"
    fs.pipe(path, data)
    assert fs.cat_file(path, 1 << 20, (1 << 20) + 10) == data[1 << 20:(1 << 20) + 10]
    before = requests_seen(account.server)
    assert fs.cat_file(path, (1 << 20) + 5, (1 << 20) + 100) == data[(1 << 20) + 5:(1 << 20) + 100]
    assert fs.cat_file(path, -10) == data[-10:]
    # Block 2 only, 1 is cached (through the blob's read URL: the first read gave it).
    seen = requests_seen(account.server) - before
    assert seen["file"] + seen["blob_content"] + seen["blob_data"] == 1, seen
    with fs.open(path) as f:
        f.seek(2 << 20)
        assert f.read(5) == data[2 << 20:(2 << 20) + 5]
    assert requests_seen(account.server) - before == seen
    sha = hashlib.sha256(data).hexdigest()
    root = state_dir(account.cache, account.server.url, account.name)

    async def look() -> bool:
        cache = ObjectCache(root / "objects", 1 << 30)
        try:
            return cache.is_complete(sha, len(data)) or bool(cache._records[sha].blocks)
        finally:
            cache.close()

    from ahmount.ahfs.runtime import stop_all
    stop_all()  # the index is saved when a runtime stops
    assert trio.run(look)


def test_cat_of_many_small_files_is_batched(account: Account) -> None:
    fs = account.fs
    blobs = {f"{account.root}/s/{i:04}.txt": f"file {i}".encode() for i in range(300)}
    fs.pipe(blobs)
    fs.invalidate_cache()
    before = requests_seen(account.server)
    assert fs.cat(f"{account.root}/s/*") == blobs
    seen = requests_seen(account.server) - before
    assert seen["files_batch"] == 1 and seen["file"] == 0, seen
    before = requests_seen(account.server)
    assert fs.cat(list(blobs)) == blobs  # now from the cache
    seen = requests_seen(account.server) - before
    assert seen["files_batch"] == 0 and seen["file"] == 0, seen


def _child_reads_open_file(f: Any, out: Any) -> None:
    f.seek(0)
    out.put(f.read())


def test_a_file_opened_before_fork_reads_in_the_child(account: Account) -> None:
    fs = account.fs
    fs.pipe(f"{account.root}/f.bin", b"before the fork" * 1000)
    with fs.open(f"{account.root}/f.bin") as f:
        assert f.read(6) == b"before"
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_reads_open_file, args=(f, queue))
        child.start()
        assert queue.get(timeout=60) == b"before the fork" * 1000
        child.join(30)
        assert child.exitcode == 0
        assert f.read(4) == b" the"  # the parent's file is untouched


def test_your_own_write_moves_the_pin(account: Account) -> None:
    fs = account.fs
    path = f"{account.root}/mine.txt"
    fs.pipe(path, b"1")
    assert fs.cat(path) == b"1"
    before = requests_seen(account.server)
    with fs.open(path, "wb") as f:
        f.write(b"2")
    assert fs.cat(path) == b"2"
    seen = requests_seen(account.server) - before
    assert seen["ref"] == 0, seen  # the commit told us the new head


def test_storage_options_default_to_ah_login(account: Account) -> None:
    from ahmount.config import make_config, save_config

    account.fs.pipe(f"{account.root}/l.txt", b"via login")
    save_config(make_config(account.server.url, None, account.key))
    fs = AhFileSystem(cache_dir=str(account.cache), skip_instance_cache=True)
    assert fs.me == account.name
    assert fs.cat(f"ah://{account.root}/l.txt") == b"via login"
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        AhFileSystem(hub=account.server.url, api_key="", skip_instance_cache=True)


def test_the_mount_and_ah_urls_share_one_cache(mount_factory: Any) -> None:
    """What ah:// fetched, the mount reads from disk, and the other way round (the
    embedded hub, the default cache directory: what a user gets with no options)."""
    from ahmount.ahfs.runtime import stop_all

    fs = AhFileSystem(skip_instance_cache=True)
    fs.makedirs("model/shared/m")
    first, second = os.urandom(3 << 20), os.urandom(2 << 20)
    fs.pipe({"model/shared/m/first.bin": first, "model/shared/m/second.bin": second})
    assert fs.cat_file("model/shared/m/first.bin") == first
    m = mount_factory()
    before = m.control("stats")["cache"]["bytes_fetched"]
    assert (m.mountpoint / "model/shared/m/main/first.bin").read_bytes() == first
    assert (m.mountpoint / "model/shared/m/main/second.bin").read_bytes() == second
    fetched = m.control("stats")["cache"]["bytes_fetched"] - before
    assert fetched == len(second)  # first.bin came from the cache ah:// filled
    from tests.conftest import wait_until

    # the mount saves an object's record when the kernel releases the file
    wait_until(lambda: m.control("stats")["open_handles"] == 0, what="the mount's release")
    stop_all()
    fs = AhFileSystem(skip_instance_cache=True)
    assert fs.cat_file("model/shared/m/second.bin") == second
    assert fs._runtime().cache.stats.bytes_fetched == 0
