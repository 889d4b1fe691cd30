"""The mount's read path: real ``ah-mount`` daemons, driven with plain os calls and tools."""

from __future__ import annotations

import errno
import getpass
import hashlib
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ahmount import ah
from ahmount.client.embedded import embedded_client
from ahmount.client.hub_client import HubClient
from ahmount.config import dirs
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.names import Kind
from ahmount.sync_runner import run_sync
from ahmount.vfs.cache_dir import state_dir
from tests.conftest import HubProcess, MountProcess, command, wait_until
from tests.proxies import BodyCutter

Mounter = Callable[..., MountProcess]
ME = getpass.getuser()


@pytest.fixture(autouse=True)
def fresh_api_state() -> None:
    ah._session = None
    ah._logged_out = False
    ah._me.clear()


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """model/llm/gpt2 with main (2 files), branch v1 (1 file) and tag t1; a dataset too."""
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "weights" / "model.bin").write_bytes(os.urandom(3 << 20))
    (src / "config.json").write_text('{"layers": 12}')
    ah.create("model/llm", labels=["nlp"], description="language models")
    ah.create("model/llm/gpt2", labels=["PyTorch"])
    ah.commit("model/llm/gpt2", msg="weights", add=[str(src / "weights"),
                                                     str(src / "config.json")])
    ah.create("model/llm/gpt2:v1")
    ah.commit("model/llm/gpt2:v1", msg="v1", add={str(src / "config.json"): "v1.json"})
    ah.create("model/llm/gpt2:t1", create_tag=True, source="main")
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    return src


def test_tree_and_attributes(mount_factory: Mounter, populated: Path) -> None:
    m = mount_factory()
    root = m.mountpoint
    assert sorted(os.listdir(root)) == ["dataset", "model", "public", "shared"]
    assert os.listdir(root / "model") == ["llm"]
    assert os.listdir(root / "model" / "llm") == ["gpt2"]
    assert sorted(os.listdir(root / "model/llm/gpt2")) == ["main", "t1", "v1"]
    main = root / "model/llm/gpt2/main"
    assert sorted(os.listdir(main)) == ["config.json", "weights"]
    data = (main / "weights/model.bin").read_bytes()
    assert data == (populated / "weights/model.bin").read_bytes()
    assert (main / "config.json").read_text() == '{"layers": 12}'
    st = os.stat(main / "weights/model.bin")
    assert st.st_size == 3 << 20
    assert int(st.st_mtime) == int((populated / "weights/model.bin").stat().st_mtime)
    assert stat.S_IMODE(st.st_mode) == 0o644 and stat.S_IMODE(os.stat(main).st_mode) == 0o755
    tag_file = root / "model/llm/gpt2/t1/config.json"
    assert stat.S_IMODE(os.stat(tag_file).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(tag_file.parent).st_mode) == 0o555
    assert os.listdir(root / "model/llm/gpt2/v1") == ["v1.json"]
    # Commits are found by prefix lookup but not listed.
    head = ah.list("model/llm/gpt2", resource="commit")[0]["id"]
    by_commit = root / f"model/llm/gpt2/{head[:6]}"
    assert sorted(os.listdir(by_commit)) == ["config.json", "weights"]
    assert head[:6] not in os.listdir(root / "model/llm/gpt2")
    with pytest.raises(FileNotFoundError):
        os.stat(root / "model/llm/gpt2/abc")  # 3 hex characters: no commit lookup
    with pytest.raises(FileNotFoundError):
        os.stat(root / "model/nothing")
    # xattrs
    sha = hashlib.sha256(data).hexdigest()
    assert os.getxattr(main / "weights/model.bin", "user.ah.sha256").decode() == sha
    assert os.getxattr(root / "model/llm", "user.ah.labels") == b"nlp"
    assert os.getxattr(root / "model/llm/gpt2/main", "user.ah.path").decode() == \
        f"/{ME}/t9k-assethub/model/llm/gpt2:main"
    assert "user.ah.sha256" in os.listxattr(main / "config.json")


def test_inodes_are_stable(mount_factory: Mounter, populated: Path) -> None:
    m = mount_factory("--refresh", "0.2")
    path = m.mountpoint / "model/llm/gpt2/main/config.json"
    first = os.stat(path).st_ino
    os.listdir(m.mountpoint / "model/llm/gpt2/main")
    time.sleep(0.3)  # past the refresh delay: attributes are asked for again
    assert os.stat(path).st_ino == first
    assert os.stat(m.mountpoint / "model/llm/gpt2/main").st_ino != first


def test_read_only_places_and_unsupported_types(mount_factory: Mounter,
                                                populated: Path) -> None:
    m = mount_factory()
    tag = m.mountpoint / "model/llm/gpt2/t1"
    for action in (
        lambda: open(tag / "config.json", "w"),  # noqa: SIM115
        lambda: os.mkdir(tag / "new"),
        lambda: os.unlink(tag / "config.json"),
        lambda: os.rename(tag / "config.json", tag / "x.json"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.symlink("config.json", m.mountpoint / "model/llm/gpt2/main/link")
    assert info.value.errno in (errno.EPERM, errno.EROFS)
    # access(2) tells the same, even to root: the mount answers it, not the mode bits.
    main = m.mountpoint / "model/llm/gpt2/main"
    assert not os.access(tag / "config.json", os.W_OK)
    assert not os.access(tag, os.W_OK)
    assert os.access(tag / "config.json", os.R_OK)
    assert os.access(main / "config.json", os.W_OK) and os.access(main, os.W_OK | os.X_OK)
    assert not os.access(main / "config.json", os.X_OK)
    assert subprocess.run(["test", "-w", str(tag / "config.json")]).returncode == 1


def test_a_read_only_mount_refuses_changes_and_reopens_warm_files_quietly(
        mount_factory: Mounter, populated: Path) -> None:
    """``--read-only``: branches read as usual, every change answers EROFS from the kernel,
    and a file read before is opened, stat'ed and closed again with an open and a release
    only (a read-write mount's kernel flushes at each close and, with writeback caching,
    asks the attributes again after a flush)."""
    def reopen(m: MountProcess, path: Path) -> dict[str, int]:
        with open(path, "rb") as handle:  # open() fstats it
            assert handle.read() == (populated / "config.json").read_bytes()
        before = m.control("stats")["fuse_ops"]
        for _ in range(5):
            with open(path, "rb") as handle:
                handle.read()
        after = m.control("stats")["fuse_ops"]
        return {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}

    m = mount_factory("--read-only")
    main = m.mountpoint / "model/llm/gpt2/main"
    assert (main / "weights/model.bin").read_bytes() == \
        (populated / "weights/model.bin").read_bytes()
    ops_before = m.control("stats")["fuse_ops"]
    for action in (
        lambda: open(main / "new.txt", "w"),  # noqa: SIM115
        lambda: open(main / "config.json", "a"),  # noqa: SIM115
        lambda: os.mkdir(main / "new"),
        lambda: os.unlink(main / "config.json"),
        lambda: os.rename(main / "config.json", main / "x.json"),
        lambda: os.setxattr(m.mountpoint / "model/llm", "user.ah.description", b"x"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    ops_after = m.control("stats")["fuse_ops"]
    for op in ("create", "mkdir", "unlink", "rename", "setxattr", "write", "setattr"):
        assert ops_after.get(op, 0) == ops_before.get(op, 0), op  # refused by the kernel
    quiet = reopen(m, main / "config.json")
    assert quiet == {"open": 5, "release": 5}
    m.stop()
    m = mount_factory()  # read-write: the kernel asks again
    assert reopen(m, m.mountpoint / "model/llm/gpt2/main/config.json").get("getattr", 0) >= 5


def test_reading_the_end_of_a_huge_object_fetches_a_bounded_range(
        mount_factory: Mounter, tmp_path: Path) -> None:
    big = tmp_path / "huge.bin"
    size = (2 << 30) + 12345
    with big.open("wb") as handle:  # sparse: fast to make, real bytes to the hub
        handle.truncate(size)
        handle.seek(size - 4096)
        handle.write(os.urandom(4096))
    tail = _tail(big, 4096)
    ah.create("dataset/big")
    ah.create("dataset/big/one")
    ah.commit("dataset/big/one", msg="huge", add=[str(big)])
    m = mount_factory()
    before = m.control("cache")["bytes_fetched"]
    with open(m.mountpoint / "dataset/big/one/main/huge.bin", "rb") as handle:
        handle.seek(size - 4096)
        assert handle.read(4096) == tail
    fetched = m.control("cache")["bytes_fetched"] - before
    assert 0 < fetched <= 4 << 20, fetched


def _tail(path: Path, n: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-n, os.SEEK_END)
        return handle.read()


def test_sequential_reads_arrive_in_one_mib_requests(mount_factory: Mounter,
                                                     populated: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may raise a mount's read-ahead")
    m = mount_factory()
    path = m.mountpoint / "model/llm/gpt2/main/weights/model.bin"
    device = next(line.split()[2] for line in Path("/proc/self/mountinfo").read_text()
                  .splitlines() if line.split()[4] == str(m.mountpoint))
    assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"
    before = m.control("stats")["fuse_ops"].get("read", 0)
    with open(path, "rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass
    reads = m.control("stats")["fuse_ops"]["read"] - before
    assert reads <= 6, reads  # 3 MiB: 24 requests at the kernel's default 128 KiB


def test_a_full_cache_disk_serves_reads_from_the_hub(mount_factory: Mounter,
                                                     tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    data = os.urandom(24 << 20)
    (tmp_path / "w.bin").write_bytes(data)
    ah.create("dataset/full")
    ah.create("dataset/full/x")
    ah.commit("dataset/full/x", msg="w", add=[str(tmp_path / "w.bin")])
    objects = state_dir(dirs().cache, None, getpass.getuser()) / "objects"
    objects.mkdir(parents=True)
    # A real full disk: an 8 MiB tmpfs under the cache, far below --cache-size.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(objects)], check=True)
    try:
        m = mount_factory("--cache-size", "1G")
        path = m.mountpoint / "dataset/full/x/main/w.bin"
        assert path.read_bytes() == data
        assert m.alive()
        assert m.control("cache")["uncached_reads"] > 0
        log = (Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log").read_text()
        assert "cache disk full" in log
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(objects)], check=False)


def test_concurrent_readers_cause_one_download(mount_factory: Mounter,
                                               populated: Path) -> None:
    m = mount_factory()
    path = m.mountpoint / "model/llm/gpt2/main/weights/model.bin"
    results: list[bytes] = []

    def reader() -> None:
        with open(path, "rb", buffering=0) as handle:
            results.append(handle.read())

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 3 << 20
    assert m.control("cache")["bytes_fetched"] == 3 << 20


def test_cache_is_bounded_lru_and_survives_restart(mount_factory: Mounter,
                                                   tmp_path: Path) -> None:
    src = tmp_path / "blobs"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(6 << 20))
    ah.create("dataset/c")
    ah.create("dataset/c/files")
    ah.commit("dataset/c/files", msg="files", add=[f"{src}/*"])
    m = mount_factory("--cache-size", "16M")
    base = m.mountpoint / "dataset/c/files/main"
    for i in range(4):
        assert (base / f"f{i}.bin").read_bytes() == (src / f"f{i}.bin").read_bytes()
        assert m.control("cache")["used_bytes"] <= 16 << 20
    stats = m.control("cache")
    assert stats["evictions"] >= 2 and stats["used_bytes"] <= 16 << 20
    # The most recent file is still cached after a remount: no bytes fetched for it.
    m.stop()
    m2 = mount_factory("--cache-size", "16M", mountpoint=m.mountpoint)
    assert (m2.mountpoint / "dataset/c/files/main/f3.bin").read_bytes() == \
        (src / "f3.bin").read_bytes()
    assert m2.control("cache")["bytes_fetched"] == 0
    assert m2.control("cache", action="drop")["dropped"] >= 1
    assert m2.control("cache")["used_bytes"] == 0


def test_a_remount_reads_a_kept_cache_from_disk_many_files_at_once(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """A new mount on a cache whose bytes the page cache dropped (a second epoch after a
    restart): 8 readers get the true bytes of small (packed) and larger files, and the reads
    that waited for the disk waited in worker threads (the ``disk_reads`` count), not in the
    loop that answers every other request; nothing is fetched again."""
    from tests.test_file_io import evict_from_memory

    src = tmp_path / "data"
    (src / "small").mkdir(parents=True)
    for i in range(60):
        (src / "small" / f"{i:02d}.bin").write_bytes(os.urandom(4096 + i))
    for i in range(4):
        (src / f"large{i}.bin").write_bytes(os.urandom((2 << 20) + i))
    ah.create("dataset/kept")
    ah.create("dataset/kept/files")
    ah.commit("dataset/kept/files", msg="files", add=[f"{src}/*"])
    cache = tmp_path / "cache"
    names = [f"small/{i:02d}.bin" for i in range(60)] + [f"large{i}.bin" for i in range(4)]

    def read_all(m: MountProcess) -> None:
        base = m.mountpoint / "dataset/kept/files/main"
        failures: list[str] = []

        def worker(share: list[str]) -> None:
            for name in share:
                if (base / name).read_bytes() != (src / name).read_bytes():
                    failures.append(name)

        threads = [threading.Thread(target=worker, args=(names[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []

    first = mount_factory("--cache-dir", str(cache))
    read_all(first)
    fetched = first.control("cache")["bytes_fetched"]
    first.stop()
    for path in cache.rglob("*"):
        if path.is_file():
            evict_from_memory(path)
    second = mount_factory("--cache-dir", str(cache), mountpoint=first.mountpoint)
    read_all(second)
    stats = second.control("cache")
    assert stats["bytes_fetched"] == 0 and fetched > 8 << 20
    assert stats["disk_reads"] > 0


async def new_asset(hub: HubClient, kind: Kind, folder: str, name: str) -> AssetAddr:
    """A new folder of ours holding a new asset ``name``."""
    addr = AssetAddr(FolderAddr(ME, kind, folder), name)
    await hub.create_folder(addr.folder)
    await hub.create_asset(addr)
    return addr


def test_listing_100k_objects_asks_the_hub_once(mount_factory: Mounter) -> None:
    async def populate() -> None:
        async with embedded_client() as hub:
            addr = await new_asset(hub, "dataset", "huge", "many")
            empty = hashlib.sha256(b"").hexdigest()
            await hub.upload_batch([])
            path = Path(os.environ["AHMOUNT_HOME"]) / "empty"
            path.touch()
            await hub.upload_file(path, empty, 0)
            entries = [ObjectEntry(f"d{i // 1000:03d}/{i:06d}.txt", empty, 0, 1.0)
                       for i in range(100_000)]
            await hub.commit(addr, "main", "100k", adds=entries)

    run_sync(populate)
    m = mount_factory()
    found = subprocess.run(["find", str(m.mountpoint / "dataset/huge/many/main"), "-type", "f"],
                           capture_output=True, text=True, check=True, timeout=300)
    assert len(found.stdout.splitlines()) == 100_000
    du = subprocess.run(["du", "-s", "--apparent-size", str(m.mountpoint / "dataset/huge")],
                        capture_output=True, text=True, check=True, timeout=300)
    assert du.stdout.split()[0] == "0"
    assert m.control("stats")["listing_fetches"] == 1


def test_listed_attributes_are_what_lookups_give(mount_factory: Mounter,
                                                 tmp_path: Path) -> None:
    """A listing's attributes (readdirplus: the kernel keeps them, so a ``stat`` after an
    ``ls`` asks nothing more) are the ones a lookup gives, on a branch and a tag, for
    files of any mode and size and for directories."""
    files = {"a.bin": (os.urandom(5000), 0o644), "run.sh": (b"#!/bin/sh\n", 0o755),
             "sub/secret.txt": (b"s", 0o600), "sub/deeper/x": (b"", 0o640)}

    async def populate() -> None:
        async with embedded_client() as hub:
            addr = await new_asset(hub, "model", "modes", "m")
            entries = []
            for i, (name, (data, mode)) in enumerate(files.items()):
                local = tmp_path / f"blob{i}"
                local.write_bytes(data)
                sha = hashlib.sha256(data).hexdigest()
                await hub.upload_file(local, sha, len(data))
                entries.append(ObjectEntry(name, sha, len(data), 1_700_000_000.5 + i,
                                           mode=mode))
            await hub.commit(addr, "main", "modes", adds=entries)
            await hub.create_tag(addr, "t", "main")

    def walk(root: Path, listed: bool) -> dict[str, tuple[int, int, int, int]]:
        """(mode, size, mtime_ns, nlink) of every path below ``root``; ``listed``: each
        directory listed before its entries are stat'ed."""
        out = {}
        todo = [""]
        while todo:
            rel = todo.pop()
            names = os.listdir(root / rel) if listed else []
            if not listed:
                names = sorted({n.split("/")[len(rel.split("/")) - (0 if rel else 1)]
                                for n in files if n.startswith(f"{rel}/" if rel else "")})
            for name in names:
                path = f"{rel}/{name}" if rel else name
                st = os.stat(root / path)
                out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
                if stat.S_ISDIR(st.st_mode):
                    todo.append(path)
        return out

    run_sync(populate)
    lists = mount_factory().mountpoint / "model/modes/m"
    looks = mount_factory("--cache-dir", str(tmp_path / "cache2")).mountpoint / "model/modes/m"
    for ref in ("main", "t"):
        listed = walk(lists / ref, listed=True)
        looked_up = walk(looks / ref, listed=False)
        assert listed == looked_up
        write = 0o777 if ref == "main" else 0o555
        for name, (data, mode) in files.items():
            assert listed[name][:2] == (stat.S_IFREG | mode & write, len(data))
        assert listed["sub"][0] == stat.S_IFDIR | (0o755 if ref == "main" else 0o555)
        assert set(listed) == set(files) | {"sub", "sub/deeper"}


def test_branch_moved_elsewhere_shows_within_the_refresh_delay(
        mount_factory: Mounter, populated: Path) -> None:
    m = mount_factory("--refresh", "0.5")
    branch = m.mountpoint / "model/llm/gpt2/v1"
    assert os.listdir(branch) == ["v1.json"]
    with open(branch / "v1.json", "rb") as pinned:
        ah.commit("model/llm/gpt2:v1", msg="elsewhere", delete=["v1.json"],
                  add={str(populated / "weights"): "w"})
        wait_until(lambda: sorted(os.listdir(branch)) == ["w"], timeout=10,
                   what="the new commit to show")
        # A handle opened before the move still reads the bytes it opened.
        assert pinned.read() == b'{"layers": 12}'
    assert (branch / "w/model.bin").read_bytes() == \
        (populated / "weights/model.bin").read_bytes()


def test_ah_refresh_shows_a_file_changed_elsewhere_at_once_and_whole(
        mount_factory: Mounter, populated: Path, tmp_path: Path) -> None:
    """``ah refresh`` shows changes made elsewhere now, also in the kernel: a file whose
    bytes changed read as the new bytes cut to the old size (the kernel kept its name and,
    with writeback caching, its size) until the name timed out, here for an hour."""
    m = mount_factory("--refresh", "3600", "--no-change-feed")
    branch = m.mountpoint / "model/llm/gpt2/v1"
    assert (branch / "v1.json").read_bytes() == b'{"layers": 12}'
    (tmp_path / "longer.json").write_bytes(b'{"layers": 24, "heads": 16}')
    ah.commit("model/llm/gpt2:v1", msg="elsewhere",
              add={str(tmp_path / "longer.json"): "v1.json"})
    m.control("refresh")
    assert (branch / "v1.json").read_bytes() == b'{"layers": 24, "heads": 16}'
    assert os.stat(branch / "v1.json").st_size == 27


def _committed_and_cached(mount_factory: Mounter, tmp_path: Path, asset: str,
                          files: dict[str, bytes]) -> None:
    """Commit ``files`` (path in the asset: bytes) to ``kind/folder/asset`` and read each
    once through a mount, which is then stopped: its cache holds them all."""
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    ah.create(asset.rsplit("/", 1)[0])
    ah.create(asset)
    ah.commit(asset, msg="small", add={str(tmp_path / name): name for name in files})
    m = mount_factory()
    main = m.mountpoint / asset / "main"
    for name, data in files.items():
        assert (main / name).read_bytes() == data
    m.stop()


def test_small_files_already_here_are_handed_to_the_kernel_at_open(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """A small file whose bytes the cache holds is given to the kernel's page cache by its
    first open, so reading it asks the daemon nothing (a loader's second epoch on a new
    mount); its bytes are right, and a change made elsewhere still shows, whole."""
    files = {f"d/f{i}.bin": os.urandom(3000 + 97 * i) for i in range(12)}
    _committed_and_cached(mount_factory, tmp_path, "dataset/kept/small", files)
    m = mount_factory("--refresh", "3600", "--no-change-feed")  # the same cache, kept
    main = m.mountpoint / "dataset/kept/small/main"
    before = m.control("stats")["fuse_ops"]
    for name, data in files.items():
        assert (main / name).read_bytes() == data
    after = m.control("stats")["fuse_ops"]
    assert after["open"] - before.get("open", 0) == len(files)
    assert after.get("read", 0) == before.get("read", 0)
    (tmp_path / "longer.bin").write_bytes(b"x" * 5000)
    ah.commit("dataset/kept/small", msg="elsewhere",
              add={str(tmp_path / "longer.bin"): "d/f0.bin"})
    m.control("refresh")
    assert (main / "d/f0.bin").read_bytes() == b"x" * 5000


def test_readers_opening_the_same_small_files_at_once_all_get_their_bytes(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """On a kept cache whose packs are not in memory, a file's first open reads its bytes
    from disk in a worker thread; other opens of it meanwhile read it as usual, and the
    first must then leave the kernel's pages alone (storing into a page that a waiting read
    holds locked would stop the daemon). 8 threads reading the same 60 files of 20
    directories (a pack each) in the same order: every read is whole and true, none hangs."""
    files = {f"d{i % 20}/f{i}.bin": os.urandom(2000 + 131 * i) for i in range(60)}
    _committed_and_cached(mount_factory, tmp_path, "dataset/shared/small", files)
    packs = list(dirs().cache.rglob("*.pack"))
    assert packs
    for pack in packs:  # out of memory: the first opens read them in worker threads
        fd = os.open(pack, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages stay
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    m = mount_factory()
    main = m.mountpoint / "dataset/shared/small/main"
    wrong: list[str] = []

    def reader() -> None:
        for name in sorted(files):  # all at once at each file
            try:
                if (main / name).read_bytes() != files[name]:
                    wrong.append(name)
            except OSError as exc:
                wrong.append(f"{name}: {exc}")

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "readers hung"
    assert wrong == []


def test_the_kernel_keeps_a_listing_while_it_shows_the_same_commit(
        mount_factory: Mounter, populated: Path, tmp_path: Path) -> None:
    """A directory listed again is answered by the kernel (no readdir reaches the mount)
    while it shows the same commit: on a tag and on a branch with nothing queued. What is
    written or removed through the mount, and a commit made elsewhere, show at once."""
    m = mount_factory("--refresh", "0.5")
    tag = m.mountpoint / "model/llm/gpt2/t1/weights"
    branch = m.mountpoint / "model/llm/gpt2/main/weights"

    def readdirs() -> int:
        return int(m.control("stats")["fuse_ops"].get("readdir", 0))

    def listed_by_kernel(directory: Path, names: list[str]) -> None:
        assert sorted(os.listdir(directory)) == names
        before = readdirs()
        assert sorted(os.listdir(directory)) == names
        assert readdirs() == before, f"{directory} was read from the mount again"

    listed_by_kernel(tag, ["model.bin"])
    listed_by_kernel(branch, ["model.bin"])
    (branch / "new.bin").write_bytes(b"new")
    assert sorted(os.listdir(branch)) == ["model.bin", "new.bin"]
    os.unlink(branch / "new.bin")
    assert sorted(os.listdir(branch)) == ["model.bin"]
    (tmp_path / "other.bin").write_bytes(b"other")
    ah.commit("model/llm/gpt2", msg="elsewhere", add={str(tmp_path / "other.bin"):
                                                      "weights/other.bin"})
    wait_until(lambda: sorted(os.listdir(branch)) == ["model.bin", "other.bin"], timeout=10,
               what="the commit made elsewhere to show")
    listed_by_kernel(branch, ["model.bin", "other.bin"])
    listed_by_kernel(tag, ["model.bin"])


def test_shared_and_public_folders(mount_factory: Mounter, populated: Path) -> None:
    from ahmount.client.embedded import embedded_app
    from ahmount.config import dirs

    service = embedded_app(dirs().data / "hub").state.service
    bob = service.ensure_user("bob")
    service.create_folder(bob, FolderAddr("bob", "model", "shared-llm"))
    service.create_asset(bob, AssetAddr(FolderAddr("bob", "model", "shared-llm"), "m"))
    service.share_folder(bob, FolderAddr("bob", "model", "shared-llm"), ME, "view")
    service.create_folder(bob, FolderAddr("bob", "dataset", "open"))
    service.set_public(bob, FolderAddr("bob", "dataset", "open"), True)
    service.create_folder(bob, FolderAddr("bob", "model", "private"))
    m = mount_factory()
    assert os.listdir(m.mountpoint / "shared/model") == ["bob"]
    assert os.listdir(m.mountpoint / "shared/model/bob") == ["shared-llm"]
    assert os.listdir(m.mountpoint / "shared/model/bob/shared-llm/m") == ["main"]
    assert stat.S_IMODE(os.stat(m.mountpoint / "shared/model/bob/shared-llm").st_mode) == 0o555
    assert os.listdir(m.mountpoint / "public/dataset/bob") == ["open"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.mountpoint / "shared/model/bob/private")


def commit_to(server: HubProcess, key: str, addr: AssetAddr, tmp_path: Path,
              files: dict[str, bytes]) -> None:
    """Make ``addr`` (and its folder) on ``server`` and commit ``files`` (path -> bytes) to
    its main, each written under ``tmp_path`` first."""
    async def populate() -> None:
        async with HubClient(server.url, api_key=key) as hub:
            await hub.create_folder(addr.folder)
            await hub.create_asset(addr)
            entries = []
            for name, data in files.items():
                p = tmp_path / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                await hub.upload_file(p, hashlib.sha256(data).hexdigest(), len(data))
                entries.append(ObjectEntry(name, hashlib.sha256(data).hexdigest(), len(data),
                                           1.0))
            await hub.commit(addr, "main", "files", adds=entries)

    trio.run(populate)


def test_hub_down_serves_cached_data_and_eio_for_the_rest(
        mount_factory: Mounter, tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "hubdata")
    key = server.add_user("dora")
    server.start()
    try:
        # In two directories: a small file's first read brings its directory's other small
        # files too.
        commit_to(server, key, AssetAddr(FolderAddr("dora", "dataset", "d"), "x"), tmp_path,
                  {name: os.urandom(100_000) for name in ("cached.bin", "other/uncached.bin")})
        m = mount_factory("--hub", server.url, "--api-key", key, "--refresh", "0.2")
        main = m.mountpoint / "dataset/d/x/main"
        assert (main / "cached.bin").read_bytes() == (tmp_path / "cached.bin").read_bytes()
        os.stat(main / "other/uncached.bin")
    finally:
        server.stop()
    time.sleep(0.3)  # let the listings expire: they must be served stale, not fail
    assert (main / "cached.bin").read_bytes() == (tmp_path / "cached.bin").read_bytes()
    assert sorted(os.listdir(main)) == ["cached.bin", "other"]
    with pytest.raises(OSError) as info:
        (main / "other/uncached.bin").read_bytes()
    assert info.value.errno == errno.EIO
    assert m.alive()
    log = (Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log").read_text()
    assert "unreachable" in log


def test_unmount_by_command_signal_and_fusermount(mount_factory: Mounter,
                                                  populated: Path) -> None:
    m = mount_factory()
    result = subprocess.run([command("ah"), "unmount", str(m.mountpoint)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(m.mountpoint)
    wait_until(lambda: not m.alive(), what="daemon exit after ah unmount")
    m2 = mount_factory(mountpoint=m.mountpoint)
    assert m2.pid is not None
    os.kill(m2.pid, signal.SIGTERM)
    wait_until(lambda: not m2.alive(), what="daemon exit after SIGTERM")
    assert not os.path.ismount(m.mountpoint)
    m3 = mount_factory(mountpoint=m.mountpoint)
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
    wait_until(lambda: not m3.alive(), what="daemon exit after fusermount3 -u")


def test_a_crashed_daemon_leaves_no_trap(mount_factory: Mounter, populated: Path) -> None:
    m = mount_factory()
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: not m.alive(), what="daemon death")
    with pytest.raises(OSError) as info:
        os.listdir(m.mountpoint)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    m2 = mount_factory(mountpoint=m.mountpoint)
    assert os.listdir(m2.mountpoint / "model") == ["llm"]


def test_bad_mount_arguments_are_refused(tmp_path: Path) -> None:
    for args, fragment in ((["--cache-size", "lots"], "size 'lots'"),
                           (["--cache-size", "1M"], "below the 16M"),
                           (["--refresh", "0"], "must be positive"),
                           (["--hub", "ftp://x"], "ah_host"),
                           (["--siblings", "maybe"], "--siblings: invalid choice: 'maybe'")):
        result = subprocess.run([command("ah-mount"), str(tmp_path / "m"), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert not os.path.ismount(tmp_path / "m")


def test_readdir_is_a_snapshot_while_the_branch_changes(mount_factory: Mounter,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(3000):
        (src / f"file-{i:05d}.txt").write_text(str(i))
    ah.create("dataset/snap")
    ah.create("dataset/snap/d")
    ah.commit("dataset/snap/d", msg="3000", add=[f"{src}/*"])
    m = mount_factory("--refresh", "0.1")
    directory = m.mountpoint / "dataset/snap/d/main"
    seen: list[str] = []
    with os.scandir(directory) as entries:
        for _ in range(50):
            seen.append(next(entries).name)
        # The branch changes under the open directory: half the files go, others come.
        (tmp_path / "new.txt").write_text("new")
        ah.commit("dataset/snap/d", msg="churn",
                  delete=[f"file-{i:05d}.txt" for i in range(0, 3000, 2)],
                  add={str(tmp_path / "new.txt"): "aaa-new.txt"})
        m.control("refresh")
        seen.extend(e.name for e in entries)
    assert len(seen) == len(set(seen)), "an entry was repeated"
    assert set(seen) == {f"file-{i:05d}.txt" for i in range(3000)}, "an entry was skipped"
    wait_until(lambda: "aaa-new.txt" in os.listdir(directory), timeout=10,
               what="the new listing")
    assert len(os.listdir(directory)) == 1501


def test_random_reads_fill_the_rest_of_an_object_unless_told_not_to(
        mount_factory: Callable[..., MountProcess], tmp_path: Path) -> None:
    """A random reader of an object gets the rest of it fetched behind it (``ah cache``
    counts the fill), and every byte read is the object's; ``--fill-random off`` and a
    limit below the object's size fetch only what is read."""
    import random

    data = os.urandom(24 << 20)
    (tmp_path / "shard.bin").write_bytes(data)
    ah.create("dataset/shards")
    ah.create("dataset/shards/train")
    ah.commit("dataset/shards/train", msg="shard", add=[str(tmp_path / "shard.bin")])
    rng = random.Random(5)
    offsets = [rng.randrange(0, len(data) - 4096) for _ in range(64)]
    cases = [((), 1), (("--fill-random", "off"), 0), (("--fill-random", "8M"), 0)]
    for n, (args, fills) in enumerate(cases):
        m = mount_factory("--cache-dir", str(tmp_path / f"cache-{n}"), *args)  # each cold
        fd = os.open(m.mountpoint / "dataset/shards/train/main/shard.bin", os.O_RDONLY)
        try:
            for at in offsets:
                assert os.pread(fd, 4096, at) == data[at:at + 4096]
        finally:
            os.close(fd)
        # Counted when a fill begins: at the 16th miss, long before these reads ended.
        assert m.control("cache")["fills"] == fills
        if fills:  # and the whole object arrives
            wait_until(lambda m=m: m.control("cache")["bytes_fetched"] >= len(data),
                       what="the fill")
        m.stop()


def test_siblings_off_fetches_only_the_files_opened(mount_factory: Mounter,
                                                    tmp_path: Path) -> None:
    src = tmp_path / "shards"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.bin").write_bytes(os.urandom(4096))
    ah.create("dataset/tiny")
    ah.create("dataset/tiny/train")
    ah.commit("dataset/tiny/train", msg="shards", add=[str(src)])
    for n, (args, batches) in enumerate([((), 1), (("--siblings", "off"), 0)]):
        m = mount_factory("--cache-dir", str(tmp_path / f"cache-{n}"), *args)  # each cold
        base = m.mountpoint / "dataset/tiny/train/main/shards"
        assert (base / "3.bin").read_bytes() == (src / "3.bin").read_bytes()
        if batches:  # the opened file's reader went on before the rest of its batch came
            wait_until(lambda mount=m: mount.control("stats")["small_batches"]["batches"] == 1,
                       what="the batch of the siblings")
        stats = m.control("stats")
        assert stats["small_batches"]["batches"] == batches
        assert stats["cache"]["objects"] == (10 if batches else 1)
        m.stop()


def test_a_connection_dropped_in_the_middle_of_a_read_costs_the_reader_nothing(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """A network that drops the connection halfway through an answer: the mount asks for
    the rest and the read gets every byte (it used to fail with EIO)."""
    data = os.urandom(5 << 20)
    server = HubProcess(tmp_path / "hubdata", ["--data-listen", "off"])
    key = server.add_user("erin")
    server.start()
    proxy = BodyCutter(server.port, cut_after=512 << 10, cuts=1)
    try:
        commit_to(server, key, AssetAddr(FolderAddr("erin", "model", "m"), "w"), tmp_path,
                  {"w.bin": data})
        m = mount_factory("--hub", proxy.url, "--api-key", key)
        assert (m.mountpoint / "model/m/w/main/w.bin").read_bytes() == data
        assert proxy.cut == 1
        log = (Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log").read_text()
        # The kernel would mask an EIO of its read-ahead by reading again: the log says
        # whether a read failed.
        assert "asking for the rest" in log and "(EIO)" not in log
    finally:
        proxy.close()
        server.stop()


def test_a_hub_killed_in_the_middle_of_a_long_read_is_eio_and_the_mount_stays(
        mount_factory: Mounter, tmp_path: Path) -> None:
    """Runs of a large object are read in worker threads straight into the cache; the hub
    dying under them (kill -9) is an EIO for the reader, never a wrong byte, and the daemon
    stays up with what it had."""
    size = 128 << 20
    data = os.urandom(size)
    server = HubProcess(tmp_path / "hubdata")
    key = server.add_user("erin")
    server.start()
    try:
        commit_to(server, key, AssetAddr(FolderAddr("erin", "model", "m"), "w"), tmp_path,
                  {"w.bin": data})
        m = mount_factory("--hub", server.url, "--api-key", key)
        main = m.mountpoint / "model/m/w/main"
        got = bytearray()
        with open(main / "w.bin", "rb", buffering=0) as handle:
            got += handle.read(1 << 20)
            assert server.proc is not None
            server.proc.kill()  # mid-stream: the read-ahead has 2 MiB asked for so far
            server.proc.wait(10)
            with pytest.raises(OSError) as info:
                while chunk := handle.read(1 << 20):
                    got += chunk
        assert info.value.errno == errno.EIO
        assert 0 < len(got) < size and got == data[:len(got)]
        assert m.alive() and m.control("status")["mountpoint"] == str(m.mountpoint)
        assert os.listdir(main) == ["w.bin"]
    finally:
        server.stop()
