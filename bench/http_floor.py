"""The floor under one small read from the hub: what a 4 KiB GET costs on the stack
``ah-server`` runs on, against what it costs from ``ah-server`` itself.

- a do-nothing Starlette route on hypercorn (trio), in a process of its own, answering
  4 KiB (and the same with one worker-thread hand-off, as a route that touches a store);
- ``ah-server``'s object route for a 4 KiB object of a branch (authentication, resolution,
  lookup, read);

each timed from plain sync httpx and from an async httpx client on trio (the mount's kind).
A serial random reader of a cold file can do at most 1 / (per-request time) reads a second
on any design that asks the hub once per miss: this is the number that bounds it.

Usage: python bench/http_floor.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.harness import bench_dir, served_hub
from tests.conftest import free_port, wait_until
from tests.test_mount_feed import commit_file, make_asset

NOTHING_SERVER = '''
import sys, trio, anyio.to_thread
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
DATA = b"x" * 4096
async def plain(request): return Response(DATA)
async def hop(request): return Response(await anyio.to_thread.run_sync(lambda: DATA))
config = Config()
config.bind = [sys.argv[1]]
config.accesslog = config.errorlog = None
trio.run(serve, Starlette(routes=[Route("/plain", plain), Route("/hop", hop)]), config)
'''


def sync_time(url: str, n: int, headers: dict[str, str] | None = None) -> float:
    with httpx.Client(headers=headers) as client:
        client.get(url).raise_for_status()
        start = time.perf_counter()
        for _ in range(n):
            client.get(url)
        return (time.perf_counter() - start) / n


def async_time(url: str, n: int, headers: dict[str, str] | None = None) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(headers=headers) as client:
            (await client.get(url)).raise_for_status()
            start = time.perf_counter()
            for _ in range(n):
                await client.get(url)
            return (time.perf_counter() - start) / n
    return trio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    n = args.requests
    port = free_port()
    nothing = subprocess.Popen([sys.executable, "-c", NOTHING_SERVER, f"127.0.0.1:{port}"])
    try:
        wait_until(lambda: peers.port_open(port), what="the do-nothing server")
        with bench_dir() as root, served_hub(root) as (server, key):
            addr = make_asset(server, key, "bench", "d")
            commit_file(server, key, addr, "f", os.urandom(4096), root)
            auth = {"authorization": f"Bearer {key}"}
            obj = f"{server.url}/api/v1/assets/{addr.folder.owner}/{addr.folder.kind}/" \
                  f"{addr.folder.name}/{addr.name}/refs/main/files/f?redirect=1"
            rows = [("do-nothing Starlette route", f"http://127.0.0.1:{port}/plain", None),
                    ("... with one thread hand-off", f"http://127.0.0.1:{port}/hop", None),
                    ("ah-server object route", obj, auth)]
            floor = None
            print(f"4 KiB GET, mean of {n}, ms (and reads/s a serial reader can reach)")
            for label, url, headers in rows:
                s_ms, a_ms = sync_time(url, n, headers) * 1e3, async_time(url, n, headers) * 1e3
                floor = floor or a_ms
                print(f"  {label:<32} sync {s_ms:5.2f}  async/trio {a_ms:5.2f} "
                      f"({1000 / a_ms:,.0f}/s; {a_ms / floor:.2f}x the do-nothing route)")
    finally:
        nothing.terminate()
        nothing.wait(timeout=30)


if __name__ == "__main__":
    main()
