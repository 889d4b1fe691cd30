"""``ah prefetch``: a ref, a directory or files fetched into a mount's cache before a job
reads them (then reading them fetches nothing), refused with the numbers when the set does
not fit the cache, refused above a ref."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ahmount import ah
from tests.conftest import MountProcess, wait_until
from tests.test_mount_write import run_ah

Mounter = Callable[..., MountProcess]


def dataset(tmp_path: Path) -> dict[str, bytes]:
    local = tmp_path / "local"
    files = {f"d/{i:03d}.bin": os.urandom(1000 + i) for i in range(150)}
    files["big/weights.bin"] = os.urandom(3 << 20)
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    ah.create("dataset/warm")
    ah.create("dataset/warm/imgs")
    ah.commit("dataset/warm/imgs", msg="data", add=[f"{local}/d", f"{local}/big"])
    ah.create("dataset/warm/imgs:v1", create_tag=True, source="main")
    return files


def test_prefetch_a_tag_then_read_it_without_fetching(mount_factory: Mounter,
                                                      tmp_path: Path) -> None:
    files = dataset(tmp_path)
    m = mount_factory()
    tag = m.mountpoint / "dataset/warm/imgs/v1"
    out = run_ah("prefetch", str(tag), "--jobs", "4")
    assert "prefetching 151 files" in out and "151 files in the cache, 0 failed" in out
    fetched = m.control("stats")["cache"]["bytes_fetched"]
    assert fetched >= sum(len(b) for b in files.values())
    for name, data in files.items():
        assert (tag / name).read_bytes() == data
    assert m.control("stats")["cache"]["bytes_fetched"] == fetched  # all from the cache
    again = run_ah("prefetch", str(tag / "d"), str(tag / "big/weights.bin"))
    assert "151 files in the cache" in again
    assert m.control("stats")["cache"]["bytes_fetched"] == fetched  # nothing twice


def test_prefetch_in_the_background_and_by_the_control_socket(mount_factory: Mounter,
                                                              tmp_path: Path) -> None:
    dataset(tmp_path)
    m = mount_factory()
    out = run_ah("prefetch", "--background", str(m.mountpoint / "dataset/warm/imgs/main/d"))
    assert "job 1" in out
    wait_until(lambda: m.control("prefetch_status", job=1)["state"] == "done",
               what="the background prefetch")
    assert m.control("prefetch_status", job=1)["done_files"] == 150


def test_prefetch_refuses_what_does_not_fit_or_is_not_a_ref(mount_factory: Mounter,
                                                            tmp_path: Path) -> None:
    files = dataset(tmp_path)
    for i in range(6):  # 18 MiB more: over a 16 MiB cache
        files[f"big/more{i}.bin"] = os.urandom(3 << 20)
        (tmp_path / f"more{i}.bin").write_bytes(files[f"big/more{i}.bin"])
        ah.commit("dataset/warm/imgs", msg="more",
                  add={str(tmp_path / f"more{i}.bin"): f"big/more{i}.bin"})
    m = mount_factory("--cache-size", "16M")
    refused = run_ah("prefetch", str(m.mountpoint / "dataset/warm/imgs/main"), check=False)
    assert "157 files to prefetch hold" in refused and "16.0 MiB" in refused
    assert "larger" in refused and "--cache-size" in refused
    assert m.control("stats")["cache"]["bytes_fetched"] == 0
    above = run_ah("prefetch", str(m.mountpoint / "dataset/warm/imgs"), check=False)
    assert "is above a branch or tag" in above
    elsewhere = run_ah("prefetch", str(tmp_path), check=False)
    assert "is not inside an ah-mount" in elsewhere
