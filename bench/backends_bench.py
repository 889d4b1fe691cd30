"""The same hub work on both pairs of stores, side by side: SQLite + a blob directory, and
PostgreSQL + S3 (a local PostgreSQL and moto's S3 server, both on 127.0.0.1).

Reports, through a real ah-server each: blob upload/download throughput, commit of a
100,000-object dataset, listing it, small commits on top and one listing page; the last
column is PostgreSQL+S3 as a ratio to SQLite+local (time ratio for latencies, lower is better;
throughput ratio for MiB/s, higher is better).

Usage: python bench/backends_bench.py [--mib 256] [--objects 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.files import hash_file
from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess, PostgresCluster, S3Server, scale_args


async def measure(server: HubProcess, key: str, blob: Path, objects: int,
                  root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    async with HubClient(server.url, api_key=key) as hub:
        folder = FolderAddr("bench", "dataset", "b")
        await hub.create_folder(folder)
        one, many = AssetAddr(folder, "one"), AssetAddr(folder, "many")
        await hub.create_asset(one)
        await hub.create_asset(many)
        sha, size = hash_file(blob)
        start = time.perf_counter()
        await hub.upload_file(blob, sha, size)
        out["upload MiB/s"] = size / (1 << 20) / (time.perf_counter() - start)
        entry = ObjectEntry("blob.bin", sha, size, 1.0)
        await hub.commit(one, "main", "blob", adds=[entry])
        start = time.perf_counter()
        await hub.download(one, "main", entry, root / f"down-{server.port}")
        out["download MiB/s"] = size / (1 << 20) / (time.perf_counter() - start)
        empty = hashlib.sha256(b"").hexdigest()
        (root / "empty").touch()
        await hub.upload_file(root / "empty", empty, 0)
        entries = [ObjectEntry(f"d{i // 1000:03d}/{i:06d}", empty, 0, 1.0)
                   for i in range(objects)]
        start = time.perf_counter()
        await hub.commit(many, "main", "all", adds=entries)
        out["commit 100k s"] = time.perf_counter() - start
        start = time.perf_counter()
        _, listed = await hub.list_objects(many, "main")
        out["list 100k s"] = time.perf_counter() - start
        assert len(listed) == objects
        times = []
        for i in range(30):
            start = time.perf_counter()
            await hub.commit(many, "main", f"small {i}", deletes=[entries[i].path],
                             adds=[ObjectEntry(f"new/{i}", empty, 0, 1.0)])
            times.append(time.perf_counter() - start)
        out["small commit ms"] = sum(times) / len(times) * 1000
        start = time.perf_counter()
        await hub.list_page(many, "main", prefix="d050/", limit=1000)
        out["list page ms"] = (time.perf_counter() - start) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        blob = root / "blob.bin"
        with blob.open("wb") as handle:
            for _ in range(args.mib):
                handle.write(os.urandom(1 << 20))
        postgres = PostgresCluster()
        postgres.start()
        s3 = S3Server(root)
        s3.start()
        results: dict[str, dict[str, float]] = {}
        try:
            for label, extra in (("sqlite+local", []),
                                 ("postgres+s3", scale_args(postgres, s3, "bench"))):
                server = HubProcess(root / label, extra)
                key = server.add_user("bench")
                server.start()
                try:
                    results[label] = trio.run(measure, server, key, blob, args.objects, root)
                finally:
                    server.stop()
        finally:
            s3.stop()
            postgres.stop()
    base, scale = results["sqlite+local"], results["postgres+s3"]
    print(f"{'measure':<20} {'sqlite+local':>14} {'postgres+s3':>14} {'ratio':>8}")
    for name in base:
        ratio = scale[name] / base[name]
        print(f"{name:<20} {base[name]:>14.2f} {scale[name]:>14.2f} {ratio:>7.2f}x")


if __name__ == "__main__":
    main()
