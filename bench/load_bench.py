"""Load check of a real ``ah-server`` on 127.0.0.1: many concurrent clients doing a mix of
list, get, download and commit for a fixed time, then a count of what was lost.

Each client has an asset of its own plus one shared by all (commits on the shared branch
race through compare-and-swap). Every commit adds a new object; at the end every object a
client was told was committed must be in the head of its branch. Prints per-operation
p50/p99 latencies, the request rate, the error count and the lost-commit count, and the
same latencies for one client alone as the baseline (the ratio is what concurrency costs).

Usage: python bench/load_bench.py [--clients 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from tests.conftest import HubProcess


class Stats:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.committed: dict[AssetAddr, set[str]] = defaultdict(set)

    def report(self, label: str, seconds: float) -> dict[str, float]:
        total = sum(len(v) for v in self.times.values())
        print(f"{label}: {total} requests in {seconds:.0f} s = {total / seconds:.0f} req/s, "
              f"{len(self.errors)} errors")
        p99s: dict[str, float] = {}
        for op, values in sorted(self.times.items()):
            values.sort()
            p50 = statistics.median(values) * 1000
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
            p99s[op] = p99
            print(f"  {op:<9} n={len(values):<6} p50={p50:7.1f} ms  p99={p99:7.1f} ms")
        for error in self.errors[:5]:
            print(f"  error: {error}")
        return p99s


async def client_loop(hub: HubClient, own: AssetAddr, shared: AssetAddr, blob: ObjectEntry,
                      deadline: float, stats: Stats, name: str) -> None:
    step = 0
    while time.monotonic() < deadline:
        step += 1
        op = ("list", "get", "download", "commit", "commit-shared")[step % 5]
        start = time.perf_counter()
        try:
            if op == "list":
                await hub.list_objects(own, "main")
            elif op == "get":
                await hub.resolve(own, "main")
            elif op == "download":
                await hub.read_range(own, "main", blob.path, 0, blob.size)
            else:
                target = own if op == "commit" else shared
                path = f"{name}/{step}.bin"
                entry = ObjectEntry(path, blob.sha256, blob.size, 1000.0)
                await hub.commit(target, "main", f"step {step}", adds=[entry])
                stats.committed[target].add(path)
        except Exception as exc:  # counted and reported: the check is that there are none
            stats.errors.append(f"{op}: {type(exc).__name__}: {exc}")
        stats.times[op].append(time.perf_counter() - start)


async def run(server: HubProcess, users: list[tuple[str, str]], seconds: float) -> Stats:
    stats = Stats()
    data = os.urandom(64 << 10)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        path.write_bytes(data)
        from ahmount.client.files import hash_file

        sha, size = hash_file(path)
        owner_name, owner_key = users[0]
        async with HubClient(server.url, api_key=owner_key) as owner:
            folder = FolderAddr(owner_name, "model", f"load{len(users)}")
            await owner.create_folder(folder)
            shared = AssetAddr(folder, "shared")
            await owner.create_asset(shared)
            for name, _ in users[1:]:
                await owner.share_folder(folder, name, "edit")
            blob = ObjectEntry("seed.bin", sha, size, 1000.0)
            own_assets = []
            for name, key in users:
                async with HubClient(server.url, api_key=key) as hub:
                    await hub.upload_file(path, sha, size)
                    own = AssetAddr(folder, f"a-{name}")
                    await hub.create_asset(own)
                    await hub.commit(own, "main", "seed", adds=[blob])
                own_assets.append(own)
        deadline = time.monotonic() + seconds
        async with trio.open_nursery() as nursery:
            for (name, key), own in zip(users, own_assets, strict=True):
                hub = HubClient(server.url, api_key=key)
                nursery.start_soon(_with_client, hub, own, shared, blob, deadline, stats, name)
        async with HubClient(server.url, api_key=owner_key) as owner:
            for addr, paths in stats.committed.items():
                _, entries = await owner.list_objects(addr, "main")
                present = {e.path for e in entries}
                lost = paths - present
                if lost:
                    stats.errors.append(f"lost commits on {addr}: {sorted(lost)[:5]}")
    return stats


async def _with_client(hub: HubClient, own: AssetAddr, shared: AssetAddr, blob: ObjectEntry,
                       deadline: float, stats: Stats, name: str) -> None:
    async with hub:
        await client_loop(hub, own, shared, blob, deadline, stats, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        server = HubProcess(Path(root) / "data")
        names = [f"load{i}" for i in range(args.clients)]
        keys = server.add_users(names)
        server.start()
        try:
            users = list(zip(names, keys, strict=True))
            alone = trio.run(run, server, users[:1], min(10.0, args.seconds))
            base = alone.report("1 client (baseline)", min(10.0, args.seconds))
            loaded = trio.run(run, server, users, args.seconds)
            p99 = loaded.report(f"{args.clients} clients", args.seconds)
            print("p99 under load / p99 alone: " + ", ".join(
                f"{op} {p99[op] / base[op]:.1f}x" for op in sorted(p99) if base.get(op)))
            lost = [e for e in loaded.errors if e.startswith("lost")]
            print(f"RESULT errors={len(loaded.errors)} lost_commits={len(lost)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
