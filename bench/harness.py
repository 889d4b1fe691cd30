"""What the benchmarks set up the same way: a scratch directory that is also
``AHMOUNT_HOME``, an ``ah-server`` on 127.0.0.1 with one user, a tree uploaded to it through
``ah://``, and mounts of it. Each context manager stops and removes what it made.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ahmount.ahfs import AhFileSystem
from tests.conftest import HubProcess, MountProcess


@contextlib.contextmanager
def bench_dir() -> Iterator[Path]:
    """A scratch directory under ``$BENCH_DIR`` (default /var/tmp: these VMs' /tmp is
    small), its ``home`` the ahmount home of this process and what it starts; memory kept
    steady meanwhile (:func:`steady_memory`)."""
    with steady_memory(), \
            tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        os.environ["AHMOUNT_HOME"] = str(root / "home")
        try:
            yield root
        finally:
            shutil.rmtree(root / "home", ignore_errors=True)


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
#: Above the buddy allocator's largest order: no free block is ever large enough to report.
NO_REPORTING = "11"


@contextlib.contextmanager
def steady_memory() -> Iterator[None]:
    """Memory every contender allocates at the cost the guest pays, not the host's.

    These VMs report freed memory to their host (virtio-balloon free page reporting), which
    takes it back: the next use of such a page faults it in from the host, ~1.6 s per GiB
    here, charged to whoever allocates it first. That is a cold read's page cache (the
    mount's cache file, the reader's pages), not a raw download that keeps nothing; the
    same 1 GiB cold read measured 270-830 MB/s by where its pages came from. So while a
    benchmark runs, reporting is paused and the memory available touched once (it then
    stays the guest's), as on a machine without a balloon; the setting is restored after.
    Nothing happens without the setting or root; ``BENCH_STEADY_MEMORY=0`` skips it."""
    if os.environ.get("BENCH_STEADY_MEMORY") == "0" or not os.access(PAGE_REPORTING, os.W_OK):
        yield
        return
    before = PAGE_REPORTING.read_text().strip()
    PAGE_REPORTING.write_text(NO_REPORTING)
    try:
        seconds, touched = _touch_available_memory()
        print(f"(host page reporting paused for the run; {touched / (1 << 30):.1f} GiB "
              f"touched in {seconds:.0f} s)", flush=True)
        yield
    finally:
        PAGE_REPORTING.write_text(before)


def _touch_available_memory(spare: int = 2 << 30) -> tuple[float, int]:
    """Write a byte of every page of what is available, but ``spare``, then free it."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) for line in meminfo
                     if line.startswith("MemAvailable:")) << 10
    size = max(0, available - spare) & ~((1 << 21) - 1)
    start = time.perf_counter()
    if size:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages = ctypes.c_char.from_buffer(area)
        for at in range(0, size, 1 << 30):
            ctypes.memset(ctypes.addressof(pages) + at, 1, min(1 << 30, size - at))
        del pages  # the mapping can close only when nothing points into it
        area.close()
    return time.perf_counter() - start, size


@contextlib.contextmanager
def served_hub(root: Path, user: str = "bench",
               extra: list[str] | None = None) -> Iterator[tuple[HubProcess, str]]:
    """An ``ah-server`` with its data under ``root/server`` and one user: (server, key)."""
    server = HubProcess(root / "server", extra or [])
    key = server.add_user(user)
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


def upload_tree(server: HubProcess, key: str, local: Path, dest: str, cache: Path) -> None:
    """Upload the file or directory ``local`` to ``dest`` (``kind/folder/asset[/path]`` on
    ``main``), making the folder and asset."""
    fs = AhFileSystem(hub=server.url, api_key=key, cache_dir=str(cache))
    if local.is_dir():
        fs.makedirs(dest)
        fs.put(str(local) + "/", dest + "/", recursive=True)
    else:
        fs.makedirs(dest.rsplit("/", 1)[0])
        fs.put(str(local), dest)


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process, the kernel's
    own threads: a FUSE peer's ssh or WebDAV server as much as ours) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The process ``pid``'s peak resident memory so far, MiB (``VmHWM``, which the kernel
    keeps: no sampling thread can miss a short peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} reports no VmHWM")


#: The issue's bound on the mount daemon's memory in every benchmark.
RSS_BOUND_MIB = 200


def report_peak_rss(peaks: dict[str, float]) -> None:
    """Print each mount's peak RSS (by target name) against :data:`RSS_BOUND_MIB`."""
    if peaks:
        worst = max(peaks.values())
        print("daemon peak RSS, MiB: " + ", ".join(f"{name} {mib:.0f}"
                                                  for name, mib in peaks.items())
              + f" (bound {RSS_BOUND_MIB}: {'within' if worst < RSS_BOUND_MIB else 'OVER'})")


def hub_mount(server: HubProcess, key: str, point: Path, cache: Path,
              *extra: str) -> MountProcess:
    """A started mount of ``server`` at ``point`` with its own cache directory."""
    return MountProcess(point, "--hub", server.url, "--api-key", key, "--cache-dir",
                        str(cache), *extra).start()
