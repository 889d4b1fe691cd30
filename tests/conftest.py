"""Shared fixtures: hermetic AHMOUNT_HOME, a service on temp stores, real ah-server processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ahmount.errors import AhError
from ahmount.hub.open import open_hub
from ahmount.hub.service import Actor, HubService

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """The installed console script ``name`` (next to this interpreter, else on PATH)."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run ./install.sh --dev")
    return found


def run_command(name: str, *args: str, cwd: Path | None = None, stderr_tty: bool = False,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an installed command; ``stderr_tty``: its stderr is a terminal (a pty), as when a
    user runs it, which is what progress bars draw on."""
    env = dict(os.environ, COLUMNS="120")
    if not stderr_tty:
        result = subprocess.run([command(name), *args], capture_output=True, text=True,
                                cwd=cwd, env=env, timeout=120)
    else:
        leader, follower = os.openpty()
        proc = subprocess.run([command(name), *args], stdout=subprocess.PIPE, stderr=follower,
                              text=True, cwd=cwd, env=env, timeout=120)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        os.close(leader)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout,
                                             b"".join(chunks).decode(errors="replace"))
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr}")
    return result


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A real disk of ``size`` (a tmpfs, ``"4m"``) mounted at ``where``, unmounted after:
    what a full disk does, for tests run as root (skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def wait_until(predicate: object, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it returns truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class HubProcess:
    """A real ``ah-server`` on a free loopback port, listening on a socket this test bound
    (passed as ``fd://N``, so there is no race for the port)."""

    def __init__(self, data_dir: Path, extra: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra or []
        self.keys: dict[str, str] = {}
        self._pool: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def add_user(self, name: str) -> str:
        return self.add_users([name])[0]

    def add_users(self, names: list[str]) -> list[str]:
        out = subprocess.run(
            [command("ah-server"), "--data", str(self.data_dir), *self.extra, "user", "add",
             *names],
            check=True, capture_output=True, text=True,
        )
        keys = out.stdout.split()
        self.keys.update(zip(names, keys, strict=True))
        return keys

    def fresh_user(self) -> tuple[str, str]:
        """A user no other test has used, from a pool created in one call."""
        if not self._pool:
            names = [f"u{len(self.keys)}x{i}" for i in range(64)]
            self.add_users(names)
            self._pool = names
        name = self._pool.pop()
        return name, self.keys[name]

    def start(self, port: int = 0) -> None:
        """Start serving, on ``port`` if given (a restart at the same URL) or a free one."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [command("ah-server"), "--data", str(self.data_dir), *self.extra,
                 "--listen", f"fd://{sock.fileno()}"],
                pass_fds=[sock.fileno()], stdout=log, stderr=log,
            )
        sock.close()

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"ah-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, what="ah-server to answer /healthz")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """A private PostgreSQL server for the test session, on 127.0.0.1 and a free port,
    started from Debian's binaries as the postgres user (the server refuses root)."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            pytest.fail("PostgreSQL is not installed; run ./install.sh --dev")
        self.bin = found[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="ah-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self._counter = 0

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A",
                          "trust", "-U", "postgres", "--no-sync")
        self.start_server()

    def start_server(self) -> None:
        """Start the server of the initialized cluster (again, after :meth:`stop_server`)."""
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c max_connections=300")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-o",
                          options, "-w", "-l", str(self.dir / "log"), "start")

    def stop_server(self) -> None:
        """Stop the server, keeping its data (a database outage)."""
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D",
                        str(self.dir / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)

    def stop(self) -> None:
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database; returns its postgresql:// URL."""
        import psycopg

        self._counter += 1
        name = f"ah_test_{os.getpid()}_{self._counter}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


class S3Server:
    """An S3-protocol server on 127.0.0.1 for the session: moto's server mode (PyPI), the S3
    implementation boto3's own test suites are checked against; MinIO is not packaged for PyPI
    or Debian."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([command("moto_server"), "-H", "127.0.0.1", "-p",
                                          str(self.port)], stdout=log, stderr=log)

        def up() -> bool:
            try:
                return httpx.get(self.url, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, what="the S3 server")
        self.client().create_bucket(Bucket="ahmount-test")

    def client(self) -> object:
        from ahmount.hub.s3_blobs import make_s3_client

        return make_s3_client(self.url, "us-east-1", "test", "test")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


def scale_args(postgres: PostgresCluster, s3: S3Server, prefix: str) -> list[str]:
    """ah-server flags for PostgreSQL metadata and S3 blobs (a fresh database and prefix)."""
    return ["--db", postgres.new_database(), "--blobs", f"s3://ahmount-test/{prefix}",
            "--s3-endpoint", s3.url, "--s3-region", "us-east-1",
            "--s3-access-key", "test", "--s3-secret-key", "test"]


@pytest.fixture(autouse=True)
def _stop_ahfs_runtimes() -> Iterator[None]:
    """Each test's ah:// file systems stop their loop threads (and close their connections
    to the session's servers) when it ends."""
    yield
    runtime = sys.modules.get("ahmount.ahfs.runtime")
    if runtime is not None:
        runtime.stop_all()


@pytest.fixture(autouse=True)
def ahmount_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "ahmount-home"
    monkeypatch.setenv("AHMOUNT_HOME", str(home))
    return home


@pytest.fixture(params=["sqlite-local", "postgres-s3"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubService]:
    """The hub's service on each pair of stores: SQLite + a blob directory (embedded), and
    PostgreSQL + S3 (at scale)."""
    if request.param == "sqlite-local":
        with open_hub(tmp_path / "hub") as svc:
            yield svc
        return
    from ahmount.hub.open import S3Options

    cluster: PostgresCluster = request.getfixturevalue("postgres")
    s3server: S3Server = request.getfixturevalue("s3")
    options = S3Options(s3server.url, "us-east-1", "test", "test")
    with open_hub(tmp_path / "hub", cluster.new_database(),
                  f"s3://ahmount-test/{tmp_path.name}", options) as svc:
        yield svc


@pytest.fixture
def alice(service: HubService) -> Actor:
    return service.ensure_user("alice")


@pytest.fixture
def bob(service: HubService) -> Actor:
    return service.ensure_user("bob")


def _session_server(root: Path, extra: list[str]) -> Iterator[HubProcess]:
    server = HubProcess(root / "data", extra)
    server.add_users(["alice", "bob", "carol"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """An ah-server on SQLite + a blob directory, users alice, bob and carol."""
    yield from _session_server(tmp_path_factory.mktemp("server"), [])


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresCluster,
              s3: S3Server) -> Iterator[HubProcess]:
    """An ah-server on PostgreSQL + S3, users alice, bob and carol."""
    root = tmp_path_factory.mktemp("server")
    yield from _session_server(root, scale_args(postgres, s3, root.name))


@pytest.fixture(scope="session", params=["sqlite-local", "postgres-s3"])
def hub_server(request: pytest.FixtureRequest) -> HubProcess:
    """Each session server in turn."""
    name = "sqlite_server" if request.param == "sqlite-local" else "pg_server"
    server: HubProcess = request.getfixturevalue(name)
    return server


class MountProcess:
    """A real ``ah-mount`` daemon (background mode, as users run it) on a temp mountpoint."""

    def __init__(self, mountpoint: Path, *args: str) -> None:
        self.mountpoint = mountpoint
        self.args = list(args)
        self.pid: int | None = None

    def start(self) -> MountProcess:
        result = subprocess.run([command("ah-mount"), str(self.mountpoint), *self.args],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"ah-mount failed: {result.stderr}")
        self.pid = self.control("status")["pid"]
        return self

    def control(self, op: str, timeout: float = 600.0,
                **args: object) -> dict:  # type: ignore[type-arg]
        from ahmount.mount.control import call

        result = call(self.mountpoint, op, dict(args), timeout=timeout)
        assert isinstance(result, dict)
        return result

    def alive(self) -> bool:
        return self.pid is not None and Path(f"/proc/{self.pid}").exists() and \
            "zombie" not in _proc_state(self.pid)

    def hung(self, timeout: float = 30.0) -> bool:
        """Whether the daemon runs but does not answer on its control socket."""
        if not self.alive():
            return False
        try:
            self.control("status", timeout=timeout)
        except TimeoutError:
            return self.alive()
        except (OSError, AhError):  # exiting meanwhile, its socket gone
            return False
        return False

    def stop(self, hung_after: float = 30.0) -> None:
        """Unmount and wait for the daemon to exit. A daemon that does not answer for
        ``hung_after`` seconds (a deadlock) fails the test instead of hanging the run: its
        FUSE connection is aborted first, from this process, since a forked ``fusermount3``
        would close this process's descriptors on the mount (a test's stuck readers)
        before its exec, each close a flush the daemon never answers. Then the daemon is
        killed if the abort did not end it. The mount table, not ``stat``, says what is
        mounted, for the same reason."""
        from ahmount.mount import fuse_abort
        from ahmount.mount_table import ahmount_mounted_at

        hung = self.hung(hung_after)
        if hung:
            fuse_abort.abort(self.mountpoint)
            with contextlib.suppress(AssertionError):  # a stopped one (SIGSTOP) never will
                if self.pid is not None and "stopped" not in _proc_state(self.pid):
                    wait_until(lambda: not self.alive(), timeout=10, what="ah-mount to exit")
            if self.alive() and self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
        elif ahmount_mounted_at(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.pid is not None:
            wait_until(lambda: not self.alive(), timeout=30, what="ah-mount to exit")
        if ahmount_mounted_at(self.mountpoint):  # a daemon that died left it behind
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True)
        if hung:
            raise AssertionError(f"ah-mount pid {self.pid} at {self.mountpoint} stopped "
                                 "answering (hung): its FUSE connection was aborted")


def _proc_state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "zombie"
    for line in status.splitlines():
        if line.startswith("State:"):
            return line
    return ""


def daemon_tracebacks() -> list[str]:
    """Log lines of the mount daemons of this test that carry a traceback."""
    path = Path(os.environ["AHMOUNT_HOME"]) / "cache/logs/ah-mount.log"
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if "Traceback" in line]


@pytest.fixture
def mount_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Start mounts with ``mount_factory(*args)``; all are stopped after the test, which
    then fails if a daemon logged a traceback (unless marked ``expect_traceback``: s3ql's
    check of the logs)."""
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse on this machine")
    started: list[MountProcess] = []

    def start(*args: str, mountpoint: Path | None = None) -> MountProcess:
        point = mountpoint or tmp_path / f"mnt{len(started)}"
        m = MountProcess(point, *args)
        started.append(m)
        return m.start()

    yield start
    failures: list[AssertionError] = []
    for m in started:  # each one, also after another hung
        try:
            m.stop()
        except AssertionError as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
    if request.node.get_closest_marker("expect_traceback") is None:
        found = daemon_tracebacks()
        assert not found, f"the mount daemon logged a traceback: {found[0][:3000]}"


def fresh_api_session() -> None:
    """``ah`` as a new process would start: no session, no remembered user (tests switch
    AHMOUNT_HOME, so each test is a new machine)."""
    from ahmount import ah

    ah._session, ah._logged_out = None, False
    ah._me.clear()


@pytest.fixture
def gpt2_v1() -> None:
    """The seed's example model on the embedded hub: model/llm/gpt2 with a branch v1."""
    from ahmount import ah

    fresh_api_session()
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")


_counter = iter(range(1_000_000))


@pytest.fixture
def unique() -> str:
    """A name no other test in this session uses (tests share the session's server)."""
    return f"t{os.getpid()}x{next(_counter)}"
