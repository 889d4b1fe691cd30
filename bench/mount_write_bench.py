"""Mount write-path benchmark: every figure a ratio to the same work on local disk.

- 1,000 files of 4 KiB written into a branch, then ``ah sync`` (their bytes uploaded), vs the
  same files written to a local directory, then ``sync``;
- one 256 MiB file written sequentially, vs local;
- ``ah commit`` of the 1,000 queued files, vs the time it took to write them;
- a re-commit of an unchanged 1 GiB file (written again with the same bytes): bytes uploaded.

Usage: python bench/mount_write_bench.py [--files 1000] [--big-mib 256] [--same-gib 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import MountProcess, command


def write_files(root: Path, count: int, data: bytes) -> float:
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        (root / f"f{i:05d}.bin").write_bytes(data)
    return time.perf_counter() - start


def write_big(path: Path, mib: int) -> float:
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    with path.open("wb") as handle:
        for _ in range(mib):
            handle.write(block)
    return time.perf_counter() - start


def idle(mount: MountProcess) -> None:
    """Wait until the mount's upload-ahead has nothing left to do."""
    time.sleep(0.6)
    while mount.control("stats")["uploading"]:
        time.sleep(0.1)


def ah(*args: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([command("ah"), "-q", *args], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--same-gib", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
        for name in ("model/bench", "model/bench/m", "model/bench/m:w"):
            subprocess.run([command("ah"), "-q", "create", name], check=True)
        mount = MountProcess(root / "mnt").start()
        try:
            branch = mount.mountpoint / "model/bench/m/w"
            data = os.urandom(4096)
            # Both sides start with no unrelated dirty pages, so each sync flushes its own.
            subprocess.run(["sync"], check=True)
            local_small = write_files(root / "local-small", args.files, data)
            start = time.perf_counter()
            subprocess.run(["sync"], check=True)
            local_small += time.perf_counter() - start
            subprocess.run(["sync"], check=True)
            mount_write = write_files(branch / "small", args.files, data)
            mount_small = mount_write + ah("sync", cwd=branch)
            commit_small = ah("commit", "-m", "small files", cwd=branch)

            subprocess.run(["sync"], check=True)
            local_big = write_big(root / "local-big.bin", args.big_mib)
            start = time.perf_counter()
            subprocess.run(["sync"], check=True)
            local_big += time.perf_counter() - start
            subprocess.run(["sync"], check=True)
            mount_big = write_big(branch / "big.bin", args.big_mib)
            ah("commit", "-m", "big", cwd=branch)

            same = root / "same.bin"
            with same.open("wb") as handle:
                for _ in range(int(args.same_gib * 1024)):
                    handle.write(os.urandom(1 << 20))
            shutil.copyfile(same, branch / "same.bin")
            ah("commit", "-m", "same v1", cwd=branch)
            idle(mount)
            before = mount.control("stats")["bytes_uploaded"]
            shutil.copyfile(same, branch / "same.bin")  # the same bytes again
            recommit = ah("commit", "-m", "same v2", cwd=branch)
            idle(mount)
            uploaded = mount.control("stats")["bytes_uploaded"] - before

            print(f"{args.files} files of 4 KiB, write + ah sync: {mount_small:.2f}s vs local "
                  f"write + sync {local_small:.2f}s -> {mount_small / local_small:.2f}x local "
                  "(target <= 5x)")
            print(f"sequential write of {args.big_mib} MiB: {local_big / mount_big:.2f}x local "
                  "speed (target >= 0.4x)")
            print(f"ah commit of the {args.files} queued files: {commit_small:.2f}s = "
                  f"{commit_small / mount_write:.2f}x the time to write them (target <= 2x)")
            print(f"re-commit of an unchanged {args.same_gib:.0f} GiB file: {recommit:.2f}s, "
                  f"{uploaded} bytes uploaded (must be 0)")
        finally:
            mount.stop()


if __name__ == "__main__":
    main()
