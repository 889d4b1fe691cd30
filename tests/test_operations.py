"""Running it for real: systemd units, readiness and shutdown, metrics, logs, images."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ahmount import ah
from tests.conftest import HubProcess, MountProcess, command, wait_until

REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            pass
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    for name in ("ah-mount", "ah-server"):
        if not Path(f"/usr/local/bin/{name}").exists():
            pytest.fail(f"/usr/local/bin/{name} is missing; run ./install.sh")
    instance = tmp_path / "ah-mount@home-me-assets.service"
    shutil.copy(REPO / "systemd/ah-mount@.service", instance)
    server = tmp_path / "ah-server.service"
    shutil.copy(REPO / "systemd/ah-server.service", server)
    result = subprocess.run(["systemd-analyze", "verify", str(instance), str(server)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Type=notify" in server.read_text() and "Type=notify" in instance.read_text()


def test_dockerfiles_pass_hadolint() -> None:
    files = sorted(str(p) for p in (REPO / "docker").glob("Dockerfile.*"))
    assert len(files) == 2
    result = subprocess.run([command("hadolint"), *files], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mount_readiness_and_stop_protocol(tmp_path: Path, notify: NotifySocket) -> None:
    ah._session, ah._logged_out = None, False
    ah.create("model/ready")
    mountpoint = tmp_path / "assets"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    proc = subprocess.Popen([command("ah-mount"), str(mountpoint), "--foreground"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "READY=1" in notify.poll(), timeout=60, what="READY=1")
        # Ready means answering: no wait between the message and the first listing.
        assert os.listdir(mountpoint / "model") == ["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "STOPPING=1" in notify.poll()
        assert not os.path.ismount(mountpoint)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert re.search(r"level=info logger=ahmount.mount msg=.*unmounted", stderr), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)])


def test_server_readiness_and_graceful_stop(tmp_path: Path, notify: NotifySocket) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    data = tmp_path / "data"
    key = subprocess.run([command("ah-server"), "--data", str(data), "user", "add", "ops"],
                         capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([command("ah-server"), "--data", str(data), "--listen",
                                 f"fd://{sock.fileno()}"], pass_fds=[sock.fileno()], env=env,
                                stdout=out, stderr=out)
    sock.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "READY=1" in notify.poll(), timeout=60, what="READY=1")
        assert httpx.get(f"{url}/healthz").status_code == 200
        payload = os.urandom(3 << 20)
        sha = hashlib.sha256(payload).hexdigest()
        result: dict[str, int] = {}

        def slow_body() -> Iterator[bytes]:
            for i in range(0, len(payload), 256 << 10):
                time.sleep(0.1)
                yield payload[i:i + (256 << 10)]

        def upload() -> None:
            response = httpx.put(f"{url}/api/v1/blobs/{sha}", content=slow_body(),
                                 headers={"authorization": f"Bearer {key}",
                                          "x-ah-size": str(len(payload))}, timeout=60)
            result["status"] = response.status_code

        worker = threading.Thread(target=upload)
        worker.start()
        time.sleep(0.4)  # the upload is under way
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert result.get("status") == 201, "the request in flight was cut off"
        assert proc.wait(timeout=30) == 0
        assert "STOPPING=1" in notify.poll()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "finishing requests in flight" in text
    assert re.search(r"msg=request request_id=\w+ method=PUT path=/api/v1/blobs/\w+ "
                     r"status=201", text), text


def test_metrics_move_when_work_is_done(tmp_path: Path) -> None:
    server = HubProcess(tmp_path / "metrics")
    key = server.add_user("m")
    server.start()
    try:
        def metric(name: str) -> float:
            text = httpx.get(f"{server.url}/metrics").text
            total = 0.0
            for line in text.splitlines():
                if line.startswith(name) and not line.startswith("#"):
                    total += float(line.rsplit(" ", 1)[1])
            return total

        before = (metric("ah_requests_total"), metric("ah_commits_total"),
                  metric("ah_bytes_received_total"), metric("ah_bytes_sent_total"))
        ah._session, ah._logged_out = None, False
        ah.login(server.url, api_key=key)
        try:
            (tmp_path / "w.bin").write_bytes(os.urandom(50_000))
            ah.create("model/m")
            ah.create("model/m/x")
            ah.commit("model/m/x", msg="one", add=[str(tmp_path / "w.bin")])
            ah.download("model/m/x", save_dir=str(tmp_path / "out"))
        finally:
            ah.logout()
            ah._session, ah._logged_out = None, False
        after = (metric("ah_requests_total"), metric("ah_commits_total"),
                 metric("ah_bytes_received_total"), metric("ah_bytes_sent_total"))
        assert after[0] >= before[0] + 5
        assert after[1] == before[1] + 1
        assert after[2] >= before[2] + 50_000
        assert after[3] >= before[3] + 50_000
        assert metric('ah_request_seconds_count{endpoint="commits"}') >= 1
        response = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "trace-me-42"})
        assert response.headers["x-request-id"] == "trace-me-42"
        wait_until(lambda: "request_id=trace-me-42" in server.log_path.read_text(),
                   what="the request id in the log")
    finally:
        server.stop()


def logging_level_of(m: MountProcess) -> str:
    return str(m.control("log_level", level="debug")["level"])


def test_ah_stats_and_runtime_log_level(mount_factory: object, tmp_path: Path) -> None:
    ah._session, ah._logged_out = None, False
    (tmp_path / "f.bin").write_bytes(os.urandom(100_000))
    ah.create("dataset/s")
    ah.create("dataset/s/d")
    ah.commit("dataset/s/d", msg="f", add=[str(tmp_path / "f.bin")])
    m: MountProcess = mount_factory()  # type: ignore[operator]

    def stats() -> dict[str, str]:
        out = subprocess.run([command("ah"), "stats", str(m.mountpoint)], capture_output=True,
                             text=True, check=True).stdout
        return dict(line.split(": ", 1) for line in out.splitlines())

    first = stats()
    assert (m.mountpoint / "dataset/s/d/main/f.bin").read_bytes() == \
        (tmp_path / "f.bin").read_bytes()
    second = stats()
    assert int(second["cache.bytes_fetched"]) == int(first["cache.bytes_fetched"]) + 100_000
    assert int(second["fuse_ops.read"]) > int(first.get("fuse_ops.read", "0"))
    assert int(second["cache.misses"]) >= 1
    out = subprocess.run([command("ah"), "log-level", "debug", str(m.mountpoint)],
                         capture_output=True, text=True, check=True).stdout
    assert "log level: debug" in out
    logfile = Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log"
    assert 'msg="log level set to debug"' in logfile.read_text()
    assert logging_level_of(m) == "debug"
    bad = subprocess.run([command("ah"), "log-level", "loud", str(m.mountpoint)],
                         capture_output=True, text=True)
    assert bad.returncode == 2


def test_a_server_whose_database_is_down_says_so_and_exits_7(tmp_path: Path) -> None:
    """The stores open in the app's lifespan; a database that refuses us is the hub's own
    'unavailable' (exit code 7) in one line naming the store, never its password."""
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [command("ah-server"), "--data", str(tmp_path / "data"),
         "--db", f"postgresql://hub:s3cret@127.0.0.1:{port}/hub", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 7, result.stderr
    assert "metadata store postgresql+psycopg://hub:***@127.0.0.1" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
