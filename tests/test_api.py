"""``from ahmount import ah``: every example of the seed document, every add/delete form, the
return shapes and the errors — run against the embedded hub and against a real ah-server."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ahmount import ah
from ahmount.client import hub_client
from ahmount.client.embedded import connect
from ahmount.client.hub_client import HubClient
from ahmount.errors import UnknownChanges
from ahmount.hub.models import AssetAddr, FolderAddr
from ahmount.sync_runner import run_sync
from tests.conftest import HubProcess


class Backend:
    """Where the API points for one test: ``me`` is the caller, ``other`` a second user who
    shares a folder ``llm`` with the caller (edit) on request."""

    def __init__(self, name: str, me: str, other: str,
                 other_client: Callable[[], HubClient]) -> None:
        self.name = name
        self.me = me
        self.other = other
        self._other_client = other_client

    def other_shares_folder(self, kind: str = "model", folder: str = "llm",
                            permission: str = "edit") -> None:
        async def run() -> None:
            async with self._other_client() as hub:
                addr = FolderAddr(self.other, kind, folder)  # type: ignore[arg-type]
                await hub.create_folder(addr)
                await hub.share_folder(addr, self.me, permission)

        run_sync(run)


def _reset_api_state() -> None:
    ah._session = None
    ah._logged_out = False
    ah._me.clear()


@pytest.fixture(params=["embedded", "server-sqlite", "server-postgres-s3"])
def backend(request: pytest.FixtureRequest, unique: str) -> Iterator[Backend]:
    _reset_api_state()
    if request.param == "embedded":
        from ahmount.client.embedded import embedded_app
        from ahmount.config import dirs

        service = embedded_app(dirs().data / "hub").state.service
        other = "user"
        actor = service.ensure_user(other)
        service.ensure_user(getpass.getuser())

        def other_client() -> HubClient:
            from ahmount.client.asgi_transport import StreamingASGITransport
            from ahmount.server.app import create_app

            return HubClient("http://embedded",
                             transport=StreamingASGITransport(create_app(service, actor.name)))

        yield Backend("embedded", getpass.getuser(), other, other_client)
    else:
        server: HubProcess = request.getfixturevalue(
            "sqlite_server" if request.param == "server-sqlite" else "pg_server")
        me, key = server.fresh_user()
        other, other_key = server.fresh_user()
        ah.login(server.url, api_key=key)
        yield Backend("server", me, other,
                      lambda: HubClient(server.url, api_key=other_key, retries=1))
    _reset_api_state()


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the files the seed examples name."""
    root = tmp_path / "work"
    (root / "saved_model" / "sub").mkdir(parents=True)
    (root / "model.pt").write_bytes(b"weights" * 100)
    (root / "saved_model" / "a.bin").write_bytes(b"a" * 10)
    (root / "saved_model" / "sub" / "b.bin").write_bytes(b"b" * 20)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """What the API logged, in its documented voice."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("ahmount.ah")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def paths_of(path: str) -> list[str]:
    return [o["path"] for o in ah.list(path)]


# == seed examples: create =======================================================================

def test_seed_create(backend: Backend, messages: list[str]) -> None:
    folder = ah.create("model/llm")
    assert isinstance(folder, ah.Folder) and folder.kind == "Folder"
    assert folder.path == f"/{backend.me}/t9k-assethub/model/llm"
    assert f"Folder /{backend.me}/t9k-assethub/model/llm created" in messages
    model = ah.create("model/llm/gpt2", labels=["PyTorch"])
    assert isinstance(model, ah.Model) and model.labels == ["PyTorch"]
    ah.create("dataset/images")
    description = "CIFAR-10 is a widely used benchmark dataset ..."
    dataset = ah.create("dataset/images/cifar10", description=description)
    assert isinstance(dataset, ah.Dataset) and dataset.description == description
    branch = ah.create("model/llm/gpt2:v1")
    assert isinstance(branch, ah.Branch) and branch.name == "v1"
    tag = ah.create("model/llm/gpt2:20220101", create_tag=True, source="v1")
    assert isinstance(tag, ah.Tag) and tag.commit_id == branch.commit_id
    tag2 = ah.create("model/llm/gpt2:20220102", create_tag=True,
                     source="model/llm/gpt2:v1")
    assert tag2.commit_id == branch.commit_id  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="already exists"):
        ah.create("model/llm")
    assert ah.create("model/llm", exist_ok=True) == folder
    with pytest.raises(RuntimeError, match="already exists"):
        ah.create("model/llm/gpt2:v1")


def test_seed_create_for_another_user(backend: Backend) -> None:
    backend.other_shares_folder()
    model = ah.create(f"/{backend.other}/t9k-assethub/model/llm/gpt2")
    assert model.path == f"/{backend.other}/t9k-assethub/model/llm/gpt2"
    with pytest.raises(RuntimeError, match="another user"):
        ah.create(f"/{backend.other}/t9k-assethub/model/mine")


# == seed examples: commit =======================================================================

@pytest.fixture
def gpt2(backend: Backend) -> str:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")
    return "model/llm/gpt2:v1"


def test_seed_commit_file(gpt2: str, work: Path, messages: list[str]) -> None:
    c = ah.commit(gpt2, msg="add ...", add=["model.pt"])
    assert isinstance(c, ah.Commit)
    assert c.name == c.id[:8] and len(c.id) == 64
    assert f"Commit {c.name} created" in messages
    assert any(m.startswith("Uploaded 1 file, ") for m in messages)  # one line, piped
    assert paths_of(gpt2) == ["model.pt"]


def test_seed_commit_file_into_directory(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="add ...", add={"model.pt": "saved_model/"})
    assert paths_of(gpt2) == ["saved_model/model.pt"]


def test_seed_commit_directory_with_itself(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="add ...", add=["./saved_model"])
    assert paths_of(gpt2) == ["saved_model/a.bin", "saved_model/sub/b.bin"]


def test_seed_commit_directory_contents(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="add ...", add=["./saved_model/*"])
    assert paths_of(gpt2) == ["a.bin", "sub/b.bin"]


def test_seed_commit_directory_bracket(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="add ...", add={"./saved_model": "path/to/[saved_model]"})
    assert paths_of(gpt2) == ["path/to/saved_model/a.bin", "path/to/saved_model/sub/b.bin"]


def test_seed_commit_directory_renamed(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="add ...", add={"./saved_model": "path/to/renamed_dir"})
    assert paths_of(gpt2) == ["path/to/renamed_dir/a.bin", "path/to/renamed_dir/sub/b.bin"]


def test_seed_commit_deletes(backend: Backend, work: Path) -> None:
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    (work / "0.png").write_bytes(b"png0")
    (work / "data").mkdir()
    (work / "data" / "1.png").write_bytes(b"png1")
    (work / "data" / "2.png").write_bytes(b"png2")
    ah.commit("dataset/images/cifar10", msg="data", add=["0.png", "data"])
    assert paths_of("dataset/images/cifar10") == ["0.png", "data/1.png", "data/2.png"]
    ah.commit("dataset/images/cifar10", msg="delete ...", delete=["0.png"])
    assert paths_of("dataset/images/cifar10") == ["data/1.png", "data/2.png"]
    ah.commit("dataset/images/cifar10", msg="delete ...", delete=["data/"])
    assert paths_of("dataset/images/cifar10") == []
    # Missing paths are no error; with nothing left to change no commit is made.
    assert ah.commit("dataset/images/cifar10", msg="again", delete=["0.png", "data/"]) is None
    assert len(ah.list("dataset/images/cifar10", resource="commit")) == 4


def test_commit_deletes_before_adds(gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="one", add={"model.pt": "w/model.pt"})
    (work / "new.pt").write_bytes(b"new")
    ah.commit(gpt2, msg="replace", delete=["w/"], add={"new.pt": "w/model.pt"})
    assert paths_of(gpt2) == ["w/model.pt"]
    [entry] = ah.list(gpt2)
    assert entry["checksum"] == hashlib.sha256(b"new").hexdigest()


def test_recommit_uploads_nothing(gpt2: str, work: Path, messages: list[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ah.commit(gpt2, msg="one", add=["model.pt"])
    uploads: list[str] = []
    original = hub_client.HubClient.upload_file

    async def counting(self: HubClient, path: Path, sha: str, size: int,
                       progress: object = None) -> None:
        uploads.append(sha)
        await original(self, path, sha, size, progress)  # type: ignore[arg-type]

    monkeypatch.setattr(hub_client.HubClient, "upload_file", counting)
    assert ah.commit(gpt2, msg="same bytes elsewhere", add={"model.pt": "copy.pt"}) is not None
    assert ah.commit(gpt2, msg="unchanged", add=["model.pt"]) is None
    assert uploads == []


def test_unknown_changes_refuse_unless_forced(backend: Backend, gpt2: str, work: Path) -> None:
    ah.commit(gpt2, msg="one", add=["model.pt"])

    async def stage_foreign() -> None:
        async with connect(ah._config()) as hub:
            addr = AssetAddr(FolderAddr(backend.me, "model", "llm"), "gpt2")
            await hub.stage(addr, "v1", "someone-else", deletes=["model.pt"])

    run_sync(stage_foreign)
    with pytest.raises(UnknownChanges, match="gpt2:v1"):
        ah.commit(gpt2, msg="mine", add={"model.pt": "other.pt"})
    assert paths_of(gpt2) == ["model.pt"]
    forced = ah.commit(gpt2, msg="mine", add={"model.pt": "other.pt"}, force=True)
    assert forced is not None
    assert paths_of(gpt2) == ["other.pt"]


def test_reset_drops_staged_changes(backend: Backend, gpt2: str, work: Path) -> None:
    async def stage() -> int:
        async with connect(ah._config()) as hub:
            addr = AssetAddr(FolderAddr(backend.me, "model", "llm"), "gpt2")
            await hub.stage(addr, "main", "s", deletes=["x"])
            return len(await hub.changes(addr, "main"))

    assert run_sync(stage) == 1
    ah.reset("model/llm/gpt2:main")
    assert run_sync(stage) == 1  # staged again, after the reset dropped the first


# == seed examples: list, get, download, merge, update, delete ===================================

def test_seed_list(backend: Backend, work: Path) -> None:
    ah.create("model/llm", labels=["nlp"])
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    ah.commit("model/llm/gpt2:v1", msg="m", add=["model.pt"])
    ah.create("dataset/images/cifar10:20220101", create_tag=True)
    [folder] = ah.list("model")
    assert set(folder) == {"name", "path", "type", "labels", "description", "permission",
                           "id", "editor", "modifiedTimestamp", "extra"}
    assert (folder["type"], folder["permission"], folder["labels"]) == ("Folder", "own", ["nlp"])
    assert ah.list("shared/model") == []
    assert ah.list("/public/t9k-assethub/model") == []
    [model] = ah.list("model/llm")
    assert (model["name"], model["type"]) == ("gpt2", "Model")
    [obj] = ah.list("model/llm/gpt2:v1")
    assert set(obj) == {"path", "size_bytes", "checksum", "mtime", "content_type", "path_type"}
    assert (obj["path"], obj["size_bytes"], obj["path_type"]) == ("model.pt", 700, "object")
    assert ah.list("dataset/images/cifar10:20220101") == []
    branches = ah.list("model/llm/gpt2", resource="branch")
    assert [b["id"] for b in branches] == ["main", "v1"]
    assert set(branches[0]) == {"id", "commit_id"}
    assert [t["id"] for t in ah.list("dataset/images/cifar10", resource="tag")] == ["20220101"]
    commits = ah.list("model/llm/gpt2:v1", resource="commit")
    assert [c["message"] for c in commits] == ["m", "Repository created"]
    assert set(commits[0]) == {"id", "message", "committer", "creation_date", "parents",
                               "metadata"}
    assert commits[0]["committer"] == backend.me
    assert len(ah.list("dataset/images/cifar10", resource="commit")) == 1
    with pytest.raises(ValueError, match="resource 'nope'"):
        ah.list("model", resource="nope")


def test_seed_list_shared_and_other_users(backend: Backend) -> None:
    backend.other_shares_folder(permission="view")
    [shared] = ah.list("shared/model")
    assert (shared["path"], shared["permission"]) == (
        f"/{backend.other}/t9k-assethub/model/llm", "view")
    assert ah.list(f"/{backend.other}/t9k-assethub/model/llm") == []
    folder = ah.get(f"/{backend.other}/t9k-assethub/model/llm")
    assert isinstance(folder, ah.Folder) and folder.permission == "view"
    with pytest.raises(RuntimeError, match="may not change"):
        ah.create(f"/{backend.other}/t9k-assethub/model/llm/gpt2")


def test_seed_get(backend: Backend, work: Path) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    c = ah.commit("model/llm/gpt2:v1", msg="m", add=["model.pt"])
    assert c is not None
    ah.create("model/llm/gpt2:20220101", create_tag=True, source="v1")
    assert isinstance(ah.get("model/llm"), ah.Folder)
    assert isinstance(ah.get("model/llm/gpt2"), ah.Model)
    assert isinstance(ah.get("dataset/images/cifar10"), ah.Dataset)
    branch = ah.get("model/llm/gpt2:v1")
    assert isinstance(branch, ah.Branch)
    assert [x["message"] for x in branch.list_commit()] == ["m", "Repository created"]
    tag = ah.get("model/llm/gpt2:20220101")
    assert isinstance(tag, ah.Tag) and tag.commit_id == c.id
    commit = ah.get(f"model/llm/gpt2:{c.id[:4]}")
    assert isinstance(commit, ah.Commit) and commit.id == c.id and commit.name == c.id[:8]
    model = ah.get("model/llm/gpt2")
    assert isinstance(model, ah.Model)
    assert model.get_commit(c.id[:6]).id == c.id
    with pytest.raises(RuntimeError, match="at least 4"):
        ah.get(f"model/llm/gpt2:{c.id[:3]}")
    with pytest.raises(RuntimeError, match="does not exist"):
        ah.get("model/nothing")


def test_seed_download(backend: Backend, work: Path, tmp_path: Path) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    ah.commit("model/llm/gpt2:v1", msg="m", add=["model.pt", "saved_model"])
    data = ah.commit("dataset/images/cifar10", msg="d", add=["saved_model/*"])
    assert data is not None
    ah.create("dataset/images/cifar10:20220101", create_tag=True)
    out = tmp_path / "cwd"
    out.mkdir()
    os.chdir(out)
    ah.download("model/llm/gpt2:v1")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "model.pt", "saved_model/a.bin", "saved_model/sub/b.bin"]
    ah.download("model/llm/gpt2:v1", objects=["model.pt"], save_dir="./saved_model")
    assert (out / "saved_model" / "model.pt").read_bytes() == b"weights" * 100
    ah.download("model/llm/gpt2:v1", objects=["saved_model/"], save_dir="only")
    assert sorted(str(p.relative_to(out / "only")) for p in (out / "only").rglob("*")
                  if p.is_file()) == ["saved_model/a.bin", "saved_model/sub/b.bin"]
    ah.download("dataset/images/cifar10:20220101", save_dir="tagged")
    assert (out / "tagged" / "a.bin").read_bytes() == b"a" * 10
    ah.download(f"dataset/images/cifar10:{data.id[:8]}", save_dir="by-commit")
    assert (out / "by-commit" / "sub" / "b.bin").read_bytes() == b"b" * 20
    with pytest.raises(RuntimeError, match="no object 'nope'"):
        ah.download("model/llm/gpt2:v1", objects=["nope"], save_dir="none")
    assert not (out / "none").exists()
    # A local directory where an object goes: refused by name before its bytes travel
    # (it was found at the rename, after a whole download, as a bare EISDIR).
    (out / "blocked" / "model.pt").mkdir(parents=True)
    with pytest.raises(ValueError, match="model.pt.*a local directory is in the way"):
        ah.download("model/llm/gpt2:v1", objects=["model.pt"], save_dir="blocked")
    assert [p.name for p in (out / "blocked").iterdir()] == ["model.pt"]
    assert list((out / "blocked" / "model.pt").iterdir()) == []


def test_seed_merge(backend: Backend, work: Path) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.commit("model/llm/gpt2", msg="main work", add={"model.pt": "old.pt"})
    ah.create("model/llm/gpt2:v1")
    ah.commit("model/llm/gpt2:v1", msg="v1 work", add=["model.pt"])
    ah.merge("model/llm/gpt2:v1")
    assert paths_of("model/llm/gpt2") == ["model.pt"]
    head = ah.list("model/llm/gpt2", resource="commit")[0]
    assert len(head["parents"]) == 2
    with pytest.raises(ValueError, match="into itself"):
        ah.merge("model/llm/gpt2:main")


def test_seed_update(backend: Backend) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2", labels=["PyTorch"])
    ah.update("model/llm/gpt2", labels=["JAX"])
    assert ah.list("model/llm")[0]["labels"] == ["JAX"]
    ah.update("model/llm", name="generative-language-model")
    assert [f["name"] for f in ah.list("model")] == ["generative-language-model"]
    ah.update("model/generative-language-model")  # nothing given: nothing done
    with pytest.raises(ValueError, match="only folders and assets"):
        ah.update("model/generative-language-model/gpt2:main", name="x")


def test_seed_delete(backend: Backend) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    ah.create("model/llm/gpt2:v1")
    ah.create("model/llm/gpt2:20220101", create_tag=True)
    ah.create("dataset/images")
    ah.create("dataset/images/cifar10")
    ah.delete("model/llm/gpt2:v1")
    ah.delete("model/llm/gpt2:20220101")
    assert [b["id"] for b in ah.list("model/llm/gpt2", resource="branch")] == ["main"]
    assert ah.list("model/llm/gpt2", resource="tag") == []
    ah.delete("model/llm/gpt2")
    ah.delete("dataset/images/cifar10")
    ah.delete("model/llm")
    with pytest.raises(RuntimeError, match="does not exist"):
        ah.delete("model/llm")
    ah.delete("model/llm", force=True)
    # The seed's "delete another user's folder": the path form works, but an editor of a
    # shared folder writes its contents only; the folder itself is its owner's to delete.
    backend.other_shares_folder()
    with pytest.raises(RuntimeError, match="may not administer folder"):
        ah.delete(f"/{backend.other}/t9k-assethub/model/llm")
    assert [f["name"] for f in ah.list("shared/model")] == ["llm"]
    ah.create(f"/{backend.other}/t9k-assethub/model/llm/gpt2")
    ah.delete(f"/{backend.other}/t9k-assethub/model/llm/gpt2")  # its assets are the editor's


# == login, logout, threads, Jupyter, errors =====================================================

def test_login_logout_for_the_process(backend: Backend, sqlite_server: HubProcess) -> None:
    hub_server = sqlite_server
    ah.logout()
    with pytest.raises(RuntimeError, match="not logged in"):
        ah.list("model")
    with pytest.raises(httpx.HTTPError):
        ah.login("http://127.0.0.1:9", api_key="k", timeout=2)
    with pytest.raises(RuntimeError, match="API key is not valid"):
        ah.login(hub_server.url, api_key="wrong")
    ah.login(hub_server.url, api_key=hub_server.keys["carol"])
    assert ah.list("model") == [] or all(
        f["path"].startswith("/carol/") for f in ah.list("model"))
    with pytest.raises(ValueError, match="ah_host"):
        ah.login("ftp://x")


def test_works_from_threads_and_a_running_event_loop(backend: Backend) -> None:
    ah.create("model/llm")
    results: list[object] = []

    def worker(i: int) -> None:
        results.append(ah.create(f"model/llm/m{i}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4

    async def notebook_cell() -> list[str]:  # Jupyter runs cells inside an asyncio loop
        return [a["name"] for a in ah.list("model/llm")]

    assert asyncio.run(notebook_cell()) == ["m0", "m1", "m2", "m3"]

    async def trio_caller() -> int:
        return len(ah.list("model/llm"))

    assert trio.run(trio_caller) == 4


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: ah.create("model/../x"), ValueError, "'..'"),
        (lambda: ah.create("model/a\x00b"), ValueError, "NUL"),
        (lambda: ah.create("model//x"), ValueError, "empty segment"),
        (lambda: ah.create("weights/x"), ValueError, "kind 'weights'"),
        (lambda: ah.create("model/" + "x" * 200), ValueError, "at most 128"),
        (lambda: ah.create("model/llm/gpt2/extra/more"), ValueError, "too many segments"),
        (lambda: ah.commit("model/llm/gpt2", msg=""), ValueError, "non-empty message"),
        (lambda: ah.commit("model/llm/gpt2", msg="m", add="model.pt"), ValueError, "not a string"),
        (lambda: ah.commit("model/llm/gpt2", msg="m", add=["missing.bin"]), ValueError,
         "missing.bin"),
        (lambda: ah.commit("model/llm/gpt2", msg="m", delete=["../x"]), ValueError, "'..'"),
        (lambda: ah.get("model/llm/gpt2:abc"), RuntimeError, "at least 4"),
        (lambda: ah.get("model/llm/gpt2:nope"), RuntimeError, "'nope'"),
    ],
)
def test_bad_input_names_what_is_wrong(backend: Backend, work: Path,
                                       call: Callable[[], object], error: type[Exception],
                                       fragment: str) -> None:
    ah.create("model/llm")
    ah.create("model/llm/gpt2")
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        call()
    assert [a["name"] for a in ah.list("model/llm")] == ["gpt2"]
    assert len(ah.list("model/llm/gpt2", resource="commit")) == 1


def test_classes_methods(backend: Backend, work: Path, tmp_path: Path) -> None:
    folder = ah.create("model/llm")
    assert isinstance(folder, ah.Folder)
    model = folder.create_asset("gpt2")
    assert isinstance(model, ah.Model)
    branch = model.create_branch("v1")
    c = branch.create_commit("m", add=["model.pt"])
    assert c is not None and [o["path"] for o in c.list_object()] == ["model.pt"]
    assert branch.get_commit().id == c.id
    assert branch.get_commit(index=1).message == "Repository created"
    tag = c.create_tag("t1")
    assert model.get_tag("t1").commit_id == c.id == tag.commit_id
    assert [b["id"] for b in model.list_branch()] == ["main", "v1"]
    branch.merge()
    assert [o["path"] for o in model.list_object()] == ["model.pt"]
    model.download(save_dir=str(tmp_path / "d"))
    assert (tmp_path / "d" / "model.pt").exists()
    assert [a["name"] for a in folder.list_asset()] == ["gpt2"]
    model.update(description="desc")
    assert folder.get_asset("gpt2").description == "desc"
    tag.delete()
    branch.delete()
    model.delete()
    folder.delete()
    assert ah.list("model") == []


def test_download_of_long_names(backend: Backend, tmp_path: Path) -> None:
    ah.create("dataset/long")
    ah.create("dataset/long/names")
    (tmp_path / "x").write_bytes(b"long")
    long_name = "n" * 250  # fits ext4's 255 bytes; the old partial-file suffix did not
    deep = "/".join(["d" * 200] * 20) + "/" + "e" * 60  # over PATH_MAX below a save dir
    ah.commit("dataset/long/names", msg="long",
              add={str(tmp_path / "x"): long_name})
    ah.download("dataset/long/names", save_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / long_name).read_bytes() == b"long"
    ah.commit("dataset/long/names", msg="deep", add={str(tmp_path / "x"): deep})
    with pytest.raises(OSError, match="cannot be saved") as info:
        ah.download("dataset/long/names", objects=[deep], save_dir=str(tmp_path / "deep"))
    assert deep[:40] in str(info.value)


def test_importing_the_api_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = ("import logging, sys; from ahmount import ah; "
            "assert not logging.getLogger('ahmount.ah').handlers, 'handler at import'; "
            "assert not logging.getLogger().handlers; "
            "print(' '.join(dir(ah)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == sorted(["Branch", "Commit", "Dataset", "Folder", "Model", "Tag", "commit",
                          "create", "delete", "download", "get", "list", "login", "logout",
                          "merge", "reset", "update"])


def test_commit_and_reset_on_a_tag_refuse_before_uploading(tmp_path: Path) -> None:
    import hashlib

    from ahmount.client.embedded import embedded_client
    from ahmount.errors import PermissionDenied
    from ahmount.sync_runner import run_sync

    ah.create("model/ro")
    ah.create("model/ro/m")
    ah.create("model/ro/m:v1", create_tag=True)
    data = b"never uploaded " + os.urandom(16)
    (tmp_path / "w.bin").write_bytes(data)
    with pytest.raises(PermissionDenied, match="is a tag: tags are read-only"):
        ah.commit("model/ro/m:v1", msg="no", add=[str(tmp_path / "w.bin")])
    with pytest.raises(PermissionDenied, match="read-only"):
        ah.reset("model/ro/m:v1")

    async def missing() -> set[str]:
        async with embedded_client() as hub:
            return await hub.missing_blobs([hashlib.sha256(data).hexdigest()])

    assert run_sync(missing) == {hashlib.sha256(data).hexdigest()}  # nothing was sent
