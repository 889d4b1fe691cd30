"""fsspec's own test suite for implementers (``fsspec.tests.abstract``: copy, get, put, open,
pipe) against ``ah://`` on a real ah-server, each test on an asset of its own."""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from ahmount.ahfs import AhFileSystem
from tests.conftest import HubProcess


class AhFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def _account(self, sqlite_server: HubProcess) -> tuple[str, str]:
        return sqlite_server.fresh_user()

    @pytest.fixture
    def fs(self, sqlite_server: HubProcess, _account: tuple[str, str],
           tmp_path: Path) -> Iterator[AhFileSystem]:
        _, key = _account
        yield AhFileSystem(hub=sqlite_server.url, api_key=key, cache_dir=str(tmp_path / "c"),
                           skip_instance_cache=True)

    @pytest.fixture
    def fs_path(self, fs: AhFileSystem) -> str:
        asset = f"model/abstract/a{uuid.uuid4().hex[:12]}"
        fs.makedirs(asset, exist_ok=True)
        return asset

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return posixpath.join

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False  # directories inside an asset are implied by the objects in them


class TestAhCopy(AbstractCopyTests, AhFixtures):  # type: ignore[misc]
    pass


class TestAhGet(AbstractGetTests, AhFixtures):  # type: ignore[misc]
    pass


class TestAhPut(AbstractPutTests, AhFixtures):  # type: ignore[misc]
    pass


class TestAhOpen(AbstractOpenTests, AhFixtures):  # type: ignore[misc]
    pass


class TestAhPipe(AbstractPipeTests, AhFixtures):  # type: ignore[misc]
    pass
