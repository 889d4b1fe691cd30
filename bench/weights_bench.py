"""Model weights: a safetensors checkpoint (default 2 GiB of float32 numpy tensors) loaded
with ``safetensors.safe_open`` (memory-mapped, every tensor read) from a branch through a
mount of ``ah-server`` on 127.0.0.1, against the same file on local disk and a raw httpx
download of the same object from the same server, in one run:

- cold (page cache dropped, mount cache empty) and warm, MB/s, and the cold load's transfer
  alone (cold minus warm: page faults stop the loader, so transfer and its own work add up);
- 4 processes loading it at once through one mount (cold): the time, and that none hangs
  (each must finish within ``--deadline`` seconds, the hf-mount/transformers failure mode of
  memory-mapped safetensors with kernel read-ahead saturating a FUSE queue).

Usage: python bench/weights_bench.py [--gib 2] [--procs 4] [--deadline 600]
Needs root (drop_caches) and /dev/fuse.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import bench_dir, hub_mount, peak_rss_mib, served_hub, upload_tree
from bench.mount_bench import drop_caches, raw_download
from tests.conftest import MountProcess

TENSOR_MIB = 64


def write_checkpoint(path: Path, gib: float) -> int:
    """A safetensors file of ``gib`` GiB of float32 tensors of 64 MiB each, streamed to disk
    (the format: an 8-byte header length, a JSON header of dtypes/shapes/offsets, the
    data), so that making it needs no memory of that size."""
    count = max(1, int(gib * 1024 / TENSOR_MIB))
    per = TENSOR_MIB << 20
    header = {f"layer{i:03d}.weight": {"dtype": "F32", "shape": [per // 4096, 1024],
                                       "data_offsets": [i * per, (i + 1) * per]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            f.write(os.urandom(per))
    return path.stat().st_size


def load(path: str) -> float:
    """Seconds to open the checkpoint and read every tensor (their sum touches each page)."""
    import numpy as np
    from safetensors import safe_open

    start = time.perf_counter()
    with safe_open(path, framework="np") as f, np.errstate(invalid="ignore", over="ignore"):
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            float(f.get_tensor(name).sum())  # random bits: NaNs among them, and that is fine
    return time.perf_counter() - start


def load_many(path: Path, procs: int, deadline: float) -> float:
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    workers = [context.Process(target=load, args=(str(path),)) for _ in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(1.0, deadline - (time.perf_counter() - start)))
        if w.is_alive():
            for other in workers:
                other.kill()
            raise SystemExit(f"{procs} processes loading at once did not finish in {deadline}s")
        if w.exitcode != 0:
            raise SystemExit(f"a loading process failed ({w.exitcode})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    with bench_dir() as root:
        local = root / "model.safetensors"
        size = write_checkpoint(local, args.gib)
        mb = size / 1e6
        with served_hub(root) as (server, key):
            mounts: list[MountProcess] = []
            try:
                upload_tree(server, key, local, "model/bench/llm/model.safetensors",
                            root / "fs-cache")
                shutil.rmtree(root / "fs-cache", ignore_errors=True)
                url = (f"{server.url}/api/v1/assets/bench/model/bench/llm/refs/main/files/"
                       "model.safetensors")

                def mount(n: int) -> Path:
                    m = hub_mount(server, key, root / f"mnt{n}", root / f"cache{n}",
                                  "--cache-size", f"{int(args.gib * 2) + 1}G")
                    mounts.append(m)
                    return m.mountpoint / "model/bench/llm/main/model.safetensors"

                drop_caches()
                local_cold = load(str(local))
                local_warm = min(load(str(local)) for _ in range(2))
                drop_caches()
                raw = raw_download(url, key)
                path = mount(0)
                drop_caches()
                cold = load(str(path))
                warm = min(load(str(path)) for _ in range(2))
                many_path = mount(1)
                drop_caches()
                many = load_many(many_path, args.procs, args.deadline)
                print(f"safetensors checkpoint of {size / (1 << 30):.2f} GiB, safe_open + every "
                      "tensor read:")
                print(f"  cold: mount {mb / cold:,.0f} MB/s = {raw / cold:.2f}x the raw download "
                      f"({mb / raw:,.0f} MB/s) and {local_cold / cold:.2f}x local disk "
                      f"({mb / local_cold:,.0f} MB/s)")
                print(f"  warm: mount {mb / warm:,.0f} MB/s = {local_warm / warm:.2f}x local "
                      f"({mb / local_warm:,.0f} MB/s)")
                # A page fault stops the loader until its bytes are there: a cold load is the
                # transfer and the loader's own work (a warm load's time) one after the other.
                transfer = cold - warm
                print(f"  cold minus warm (the transfer alone): {mb / transfer:,.0f} MB/s = "
                      f"{raw / transfer:.2f}x the raw download")
                print(f"  {args.procs} processes at once through one cold mount: {many:.1f} s "
                      f"({args.procs * mb / many:,.0f} MB/s together), none hung")
                for m in mounts:
                    assert m.pid is not None
                    print(f"  daemon peak RSS ({m.mountpoint.name}): "
                          f"{peak_rss_mib(m.pid):.0f} MiB")
            finally:
                for m in mounts:
                    m.stop()


if __name__ == "__main__":
    main()
