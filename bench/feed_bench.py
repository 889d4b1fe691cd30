"""Change-feed latency: how soon a commit made through the API shows in a mount.

200 commits to a branch through ah-server on 127.0.0.1, each rewriting one file; after each
commit's response, the file is read through a mount of the same branch until it shows the
new content. Prints p50/p95/p99/max against the 250 ms target: for one server (SQLite), for
two replicas on PostgreSQL + S3 (commits through one, the mount on the other), and for a
mount whose feed is off (polling every --refresh seconds, the only way before the feed) as
the baseline.

Usage: python bench/feed_bench.py [--commits 200]
Needs /dev/fuse.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ahmount.client.hub_client import HubClient
from ahmount.hub.models import AssetAddr, ObjectEntry
from bench.harness import bench_dir, hub_mount, served_hub
from tests.conftest import HubProcess, MountProcess, wait_until
from tests.test_mount_feed import make_asset


async def run_commits(server: HubProcess, key: str, addr: AssetAddr, files: list[Path],
                      count: int, tmp: Path) -> list[float]:
    latencies = []
    async with HubClient(server.url, api_key=key) as hub:
        for i in range(count):
            data = f"version {i}\n".encode()
            local = tmp / "blob"
            local.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            await hub.upload_file(local, sha, len(data))
            await hub.commit(addr, "main", f"v{i}",
                             adds=[ObjectEntry("x.txt", sha, len(data), time.time())])
            committed = time.perf_counter()
            deadline = committed + 30
            while True:
                found = [await trio.to_thread.run_sync(f.read_bytes) for f in files]
                if all(x == data for x in found):
                    break
                if time.perf_counter() > deadline:
                    raise AssertionError(f"commit {i} never showed: {found} {files[0].parent}")
                await trio.sleep(0.001)
            latencies.append(time.perf_counter() - committed)
    return latencies


def report(label: str, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    print(f"{label:<40} p50 {q[49] * 1000:7.1f} ms  p95 {q[94] * 1000:7.1f} ms  "
          f"p99 {q[98] * 1000:7.1f} ms  max {ordered[-1] * 1000:7.1f} ms  "
          f"(p99 target 250 ms: {q[98] / 0.25:.2f}x)")


def replicated(commits: int, root: Path, mounts: list[MountProcess]) -> None:
    """Commits through replica A, the mount on replica B: the feed crosses the database."""
    from tests.conftest import PostgresCluster, S3Server, scale_args

    cluster = PostgresCluster()
    cluster.start()
    replicas: list[HubProcess] = []
    s3: S3Server | None = None
    try:
        (root / "s3").mkdir()
        s3 = S3Server(root / "s3")
        s3.start()
        extra = scale_args(cluster, s3, "feedbench")
        a = HubProcess(root / "ra", extra)
        key = a.add_user("bench")
        b = HubProcess(root / "rb", extra)
        b.keys.update(a.keys)
        for r in (a, b):
            r.start()
            replicas.append(r)

        addr = make_asset(a, key, "bench", "feed")
        m = hub_mount(b, key, root / "replica", root / "c3", "--refresh", "60")
        mounts.append(m)
        wait_until(lambda: m.control("status")["changes"] == "live", what="the feed")
        report(f"feed across replicas, {commits} commits", trio.run(
            run_commits, a, key, addr, [m.mountpoint / "model/feed/m/main/x.txt"], commits,
            root))
        m.stop()
    finally:
        for r in replicas:
            r.stop()
        if s3 is not None:
            s3.stop()
        cluster.stop()  # also when the S3 server failed to start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--no-replicas", action="store_true",
                        help="skip the PostgreSQL + S3 pair of replicas")
    args = parser.parse_args()
    with bench_dir() as root, served_hub(root) as (server, key):
        mounts: list[MountProcess] = []
        try:
            addr = make_asset(server, key, "bench", "feed")
            live = hub_mount(server, key, root / "live", root / "c1", "--refresh", "60")
            mounts.append(live)
            wait_until(lambda: live.control("status")["changes"] == "live", what="the feed")
            file = live.mountpoint / "model/feed/m/main/x.txt"
            report(f"feed, {args.commits} commits", trio.run(
                run_commits, server, key, addr, [file], args.commits, root))
            if not args.no_replicas:
                replicated(args.commits, root, mounts)
            polling = hub_mount(server, key, root / "poll", root / "c2", "--refresh", "3",
                                "--no-change-feed")
            mounts.append(polling)
            file = polling.mountpoint / "model/feed/m/main/x.txt"
            report("polling only (--refresh 3), 20 commits", trio.run(
                run_commits, server, key, addr, [file], 20, root))
        finally:
            for m in mounts:
                m.stop()


if __name__ == "__main__":
    main()
