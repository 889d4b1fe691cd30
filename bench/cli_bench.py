"""``ah commit`` / ``ah download`` throughput against ``cp -r`` of the same data.

Two data sets, each run against the embedded hub (the default) in a fresh AHMOUNT_HOME:
one large file (default 2 GiB) and 10,000 small files (4 KiB each). Each figure is printed as a
ratio to ``cp -r`` of the same data on local disk (followed by ``sync``), measured in this run.

Usage: python bench/cli_bench.py [--large-mib 2048] [--small 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with contextlib.suppress(OSError):  # not permitted here: warm-cache figures then
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(label: str, data: Path, root: Path, ah: str) -> None:
    env = dict(os.environ, AHMOUNT_HOME=str(root / f"home-{label}"))
    total = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    drop_caches()
    cp_time = run(["cp", "-r", str(data), str(root / f"cp-{label}")], env)
    subprocess.run([ah, "create", "dataset/bench"], env=env, check=True, capture_output=True)
    subprocess.run([ah, "create", f"dataset/bench/{label}"], env=env, check=True,
                   capture_output=True)
    drop_caches()
    commit_time = run([ah, "-q", "commit", f"dataset/bench/{label}", "-m", "bench", "-a",
                       str(data)], env)
    drop_caches()
    download_time = run([ah, "-q", "download", f"dataset/bench/{label}", "--save-dir",
                         str(root / f"dl-{label}")], env)
    recommit_time = run([ah, "-q", "commit", f"dataset/bench/{label}", "-m", "again", "-a",
                         str(data)], env)
    mib = total / (1 << 20)
    print(f"{label}: {mib:.0f} MiB in {sum(1 for p in data.rglob('*') if p.is_file())} files")
    print(f"  cp -r          {cp_time:7.2f}s  {mib / cp_time:8.1f} MiB/s")
    print(f"  ah commit      {commit_time:7.2f}s  ratio to cp -r {cp_time / commit_time:.2f}x")
    print(f"  ah download    {download_time:7.2f}s  ratio to cp -r {cp_time / download_time:.2f}x")
    print(f"  re-commit      {recommit_time:7.2f}s  (unchanged data: uploads nothing)")
    for d in (root / f"cp-{label}", root / f"dl-{label}", root / f"home-{label}"):
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-mib", type=int, default=2048)
    parser.add_argument("--small", type=int, default=10_000)
    args = parser.parse_args()
    ah = shutil.which("ah") or str(Path(sys.executable).parent / "ah")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        large = root / "large"
        large.mkdir()
        with (large / "weights.bin").open("wb") as handle:
            for _ in range(args.large_mib):
                handle.write(os.urandom(1 << 20))
        measure("large", large, root, ah)
        shutil.rmtree(large)
        small = root / "small"
        for i in range(args.small):
            d = small / f"{i // 1000:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.bin").write_bytes(os.urandom(4096))
        measure("small", small, root, ah)


if __name__ == "__main__":
    main()
