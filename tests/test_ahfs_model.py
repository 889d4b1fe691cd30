"""Model checking ``ah://`` writes: random sequences of ``pipe``, append, exclusive create,
``rm``, ``cp`` and ``mv``, alone (each its own commit) and inside transactions that commit
or are dropped, on a real ah-server, compared with a dict of path -> bytes.

A write must fail exactly when the model says (``FileExistsError`` for an exclusive create
of a file there is, ``FileNotFoundError`` for ``rm``/``cp``/``mv`` of one there is not, at
the state the write sees: inside a transaction, what the transaction wrote so far). After
every step the branch, as a new file system (no pins) lists and reads it, must be the
committed model: inside a transaction, still as it was. Another
writer (a file system of its own) changes the branch between steps, so the pins of the one
under test fall behind: what depends on the files as they are must not use them.

The bugs this layer was added for were each a sequence: threads writing at once, an append
after another, a second transaction, an ``rm`` of what a transaction removed. The threads
are in ``tests/test_ahfs.py``; this covers the sequences one thread can make.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ahmount.ahfs import AhFileSystem
from tests.conftest import HubProcess
from tests.test_ahfs import Account

#: Files only where no other file is a directory: the model needs no file/directory rules.
PATHS = ["a", "b", "d/a", "d/b", "d/e/c"]
#: Examples (``AHMOUNT_MODEL_EXAMPLES`` sets it): each step is a commit through the server.
EXAMPLES = int(os.environ.get("AHMOUNT_MODEL_EXAMPLES", "25"))
_assets = itertools.count()
_data = st.binary(max_size=600)


class AhfsMachine(RuleBasedStateMachine):
    account: Account

    def __init__(self) -> None:
        super().__init__()
        self.fs: AhFileSystem = self.account.fs
        self.root = f"model/{self.account.folder}/m{os.getpid()}x{next(_assets)}"
        self.fs.makedirs(self.root)
        self.committed: dict[str, bytes] = {}
        #: Inside a transaction: the files as it has written them so far.
        self.staged: dict[str, bytes] | None = None
        self.transaction: Any = None

    @property
    def view(self) -> dict[str, bytes]:
        return self.committed if self.staged is None else self.staged

    def url(self, path: str) -> str:
        return f"{self.root}/{path}"

    def expect(self, error: type[OSError] | None, act: Callable[[], object]) -> bool:
        """Run ``act``; it must raise ``error`` (or nothing, if None). Whether it did not."""
        if error is None:
            act()
            return True
        with pytest.raises(error):
            act()
        return False

    # -- writes, alone or inside a transaction -------------------------------------------------

    @rule(path=st.sampled_from(PATHS), data=_data)
    def pipe(self, path: str, data: bytes) -> None:
        self.fs.pipe(self.url(path), data)
        self.view[path] = data

    @rule(path=st.sampled_from(PATHS), data=_data)
    def append(self, path: str, data: bytes) -> None:
        with self.fs.open(self.url(path), "ab") as f:
            f.write(data)
        self.view[path] = self.view.get(path, b"") + data

    @rule(path=st.sampled_from(PATHS), data=_data, by_open=st.booleans())
    def create_exclusively(self, path: str, data: bytes, by_open: bool) -> None:
        def act() -> None:
            if by_open:
                with self.fs.open(self.url(path), "xb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(self.url(path), data, mode="create")

        if self.expect(FileExistsError if path in self.view else None, act):
            self.view[path] = data

    @rule(path=st.sampled_from(PATHS))
    def rm(self, path: str) -> None:
        if self.expect(None if path in self.view else FileNotFoundError,
                       lambda: self.fs.rm(self.url(path))):
            del self.view[path]

    # -- copies and moves read the branch's head: outside transactions -----------------------

    @precondition(lambda self: self.staged is None)
    @rule(source=st.sampled_from(PATHS), dest=st.sampled_from(PATHS), move=st.booleans())
    def copy_or_move(self, source: str, dest: str, move: bool) -> None:
        if source == dest:
            return
        act = self.fs.mv if move else self.fs.cp
        if self.expect(None if source in self.view else FileNotFoundError,
                       lambda: act(self.url(source), self.url(dest))):
            self.view[dest] = self.view.pop(source) if move else self.view[source]

    # -- transactions ----------------------------------------------------------------------

    @precondition(lambda self: self.staged is None)
    @rule()
    def begin(self) -> None:
        self.transaction = self.fs.transaction
        self.transaction.__enter__()
        self.staged = dict(self.committed)

    @precondition(lambda self: self.staged is not None)
    @rule()
    def commit(self) -> None:
        assert self.staged is not None
        transaction, self.transaction = self.transaction, None
        transaction.__exit__(None, None, None)
        self.committed, self.staged = self.staged, None

    @precondition(lambda self: self.staged is not None)
    @rule()
    def drop(self) -> None:
        transaction, self.transaction = self.transaction, None
        failure = RuntimeError("dropped")
        transaction.__exit__(RuntimeError, failure, None)
        self.staged = None

    # -- what the branch holds -------------------------------------------------------------

    # -- another writer: the file system above keeps its pins, now older than the branch --

    @precondition(lambda self: self.staged is None)
    @rule(path=st.sampled_from(PATHS), data=_data, remove=st.booleans())
    def another_writer(self, path: str, data: bytes, remove: bool) -> None:
        """Another process's write (a file system of its own). The one under test is not
        told: its pinned commit is older from here on, and its appends, exclusive creates,
        ``rm``, copies and moves must still act on the branch as it is."""
        other = self.account.filesystem()
        if remove and path in self.committed:
            other.rm(self.url(path))
            del self.committed[path]
        else:
            other.pipe(self.url(path), data)
            self.committed[path] = data

    @invariant()
    def branch_is_the_model(self) -> None:
        """The branch holds the committed model, as a new file system (no pins) lists and
        reads it; a transaction under way has changed nothing on it yet."""
        fresh = self.account.filesystem()
        listed = sorted(p[len(self.root) + 1:] for p in fresh.find(self.root))
        assert listed == sorted(self.committed)
        got = fresh.cat([self.url(p) for p in listed]) if listed else {}
        assert {p[len(self.root) + 1:]: v for p, v in got.items()} == self.committed

    def teardown(self) -> None:
        if self.transaction is not None:
            self.transaction.__exit__(RuntimeError, RuntimeError("teardown"), None)


def test_ah_url_writes_follow_the_model(sqlite_server: HubProcess, tmp_path: Path) -> None:
    AhfsMachine.account = Account(sqlite_server, tmp_path / "cache")
    AhfsMachine.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=20, deadline=None,
        suppress_health_check=list(HealthCheck), database=None,
        # The hub is state outside hypothesis: a shrunk replay is not the same run, so the
        # first failure is reported as it happened.
        phases=[Phase.explicit, Phase.generate])
    AhfsMachine.TestCase().runTest()
