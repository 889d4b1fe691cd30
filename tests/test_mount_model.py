"""Model checking: random sequences of file-system operations on a branch through a real
mount and on a plain local directory, compared after every step.

Each hypothesis example gets a fresh branch (``mkdir`` in the asset) and a fresh local
directory; operations are applied to both, an error must be the same errno on both, and
after every step the listings (by readdir alone), sizes and bytes must agree. After a commit
the commit's own directory and ``ah.list`` must hold exactly the local files; remounts and
kill -9 + remount must change nothing that was closed.

CI runs a bounded number of examples; ``AHMOUNT_MODEL_EXAMPLES=500`` runs it long.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ahmount import ah
from tests.conftest import MountProcess, fresh_api_session, wait_until

PATHS = ["a", "b", "d/a", "d/b", "d/e/a", "e"]
DIRS = ["d", "d/e", "e", "f"]
EXAMPLES = int(os.environ.get("AHMOUNT_MODEL_EXAMPLES", "10"))
_branches = itertools.count()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry below ``root`` found by readdir alone: files with bytes, dirs as None."""
    out: dict[str, bytes | None] = {}
    todo = [root]
    while todo:
        directory = todo.pop()
        for name in os.listdir(directory):
            path = directory / name
            rel = str(path.relative_to(root))
            if path.is_dir():
                out[rel] = None
                todo.append(path)
            else:
                out[rel] = path.read_bytes()
                assert path.stat().st_size == len(out[rel] or b""), rel
    return out


def both(action: Callable[[Path], Any], mount: Path, local: Path) -> None:
    """Apply ``action`` to both roots; they must succeed together or fail with one errno."""
    results: list[int | None] = []
    for root in (local, mount):
        try:
            action(root)
            results.append(None)
        except OSError as exc:
            results.append(exc.errno)
    assert results[0] == results[1], f"local {_name(results[0])}, mount {_name(results[1])}"


def _name(number: int | None) -> str:
    return "ok" if number is None else errno.errorcode.get(number, str(number))


class BranchMachine(RuleBasedStateMachine):
    mounter: Callable[..., MountProcess]
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.m = self.mount
        self.branch_name = f"m{os.getpid()}x{next(_branches)}"
        os.mkdir(self.m.mountpoint / "model/llm/gpt2" / self.branch_name)
        self.local = self.workdir / self.branch_name
        self.local.mkdir()
        self.open_fds: tuple[int, int] | None = None

    @property
    def branch(self) -> Path:
        return self.m.mountpoint / "model/llm/gpt2" / self.branch_name

    @property
    def segments(self) -> list[str]:
        return ["model", "llm", "gpt2", self.branch_name]

    # -- operations --------------------------------------------------------------------------

    @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=3000))
    def write_file(self, path: str, data: bytes) -> None:
        both(lambda root: (root / path).write_bytes(data), self.branch, self.local)

    @rule(path=st.sampled_from(PATHS), offset=st.integers(0, 5000),
          data=st.binary(min_size=1, max_size=500))
    def write_at(self, path: str, offset: int, data: bytes) -> None:
        def act(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        both(act, self.branch, self.local)

    @rule(path=st.sampled_from(PATHS), data=st.binary(min_size=1, max_size=500))
    def append(self, path: str, data: bytes) -> None:
        def act(root: Path) -> None:
            with open(root / path, "ab") as handle:
                handle.write(data)

        both(act, self.branch, self.local)

    @rule(path=st.sampled_from(PATHS), size=st.integers(0, 4000))
    def truncate(self, path: str, size: int) -> None:
        both(lambda root: os.truncate(root / path, size), self.branch, self.local)

    @rule(old=st.sampled_from(PATHS + DIRS), new=st.sampled_from(PATHS + DIRS))
    def rename(self, old: str, new: str) -> None:
        both(lambda root: os.rename(root / old, root / new), self.branch, self.local)

    @rule(path=st.sampled_from(PATHS))
    def unlink(self, path: str) -> None:
        both(lambda root: os.unlink(root / path), self.branch, self.local)

    @rule(path=st.sampled_from(DIRS))
    def mkdir(self, path: str) -> None:
        both(lambda root: os.mkdir(root / path), self.branch, self.local)

    @rule(path=st.sampled_from(DIRS))
    def rmdir(self, path: str) -> None:
        both(lambda root: os.rmdir(root / path), self.branch, self.local)

    @precondition(lambda self: self.open_fds is None)
    @rule(path=st.sampled_from(PATHS))
    def open_file(self, path: str) -> None:
        fds: list[int] = []
        for root in (self.local, self.branch):
            try:
                fds.append(os.open(root / path, os.O_RDWR))
            except OSError as exc:
                fds.append(-exc.errno)
        if min(fds) >= 0:
            self.open_fds = (fds[0], fds[1])
        else:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            assert fds[0] == fds[1], f"open: local {fds[0]}, mount {fds[1]}"

    @precondition(lambda self: self.open_fds is not None)
    @rule(offset=st.integers(0, 3000), data=st.binary(min_size=1, max_size=300), sync=st.booleans())
    def write_open(self, offset: int, data: bytes, sync: bool) -> None:
        assert self.open_fds is not None
        for fd in self.open_fds:
            os.pwrite(fd, data, offset)
            if sync:
                os.fsync(fd)
        local_fd, mount_fd = self.open_fds
        assert os.fstat(local_fd).st_size == os.fstat(mount_fd).st_size
        assert os.pread(mount_fd, 10_000, 0) == os.pread(local_fd, 10_000, 0)

    @precondition(lambda self: self.open_fds is not None)
    @rule()
    def close_open(self) -> None:
        assert self.open_fds is not None
        for fd in self.open_fds:
            os.close(fd)  # a close that fails is a failed test
        self.open_fds = None

    @rule()
    def commit(self) -> None:
        self.m.control("commit", path=self.segments, message="model step", force=False)
        files = {p: d for p, d in tree(self.local).items() if d is not None}
        listed = {o["path"]: o["size_bytes"] for o in
                  ah.list(f"model/llm/gpt2:{self.branch_name}")}
        assert listed == {p: len(d) for p, d in files.items()}
        head = ah.list(f"model/llm/gpt2:{self.branch_name}", resource="commit")[0]["id"]
        committed = self.m.mountpoint / "model/llm/gpt2" / head[:12]
        assert {p: d for p, d in tree(committed).items() if d is not None} == files

    @rule()
    def remount(self) -> None:
        self._close_open()
        self.m.stop()
        self.m = self.mounter(mountpoint=self.m.mountpoint)

    @rule()
    def kill_and_remount(self) -> None:
        self._close_open()
        assert self.m.pid is not None
        os.kill(self.m.pid, signal.SIGKILL)
        wait_until(lambda: not self.m.alive(), what="the daemon to die")
        self.m = self.mounter(mountpoint=self.m.mountpoint)

    def _close_open(self) -> None:
        if self.open_fds is not None:
            self.close_open()

    # -- the comparison ----------------------------------------------------------------------

    @invariant()
    def same_tree(self) -> None:
        assert tree(self.branch) == tree(self.local)

    def teardown(self) -> None:
        self._close_open()
        shutil.rmtree(self.local, ignore_errors=True)
        type(self).mount = self.m


@pytest.mark.slow
def test_a_branch_behaves_like_a_local_directory(mount_factory: Callable[..., MountProcess],
                                                 tmp_path: Path) -> None:
    fresh_api_session()
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    BranchMachine.mounter = staticmethod(mount_factory)  # type: ignore[assignment]
    BranchMachine.workdir = tmp_path / "local"
    BranchMachine.workdir.mkdir()
    BranchMachine.mount = mount_factory()
    BranchMachine.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck), database=None,
        # The mount is state outside hypothesis: replaying a shrunk example on it is not the
        # same run, so the first failure is reported as it happened.
        phases=[Phase.explicit, Phase.generate])
    BranchMachine.TestCase().runTest()
