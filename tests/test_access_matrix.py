"""Who may call what: every route of the hub and every kind of caller, on a private, a shared
and a public folder, against a real ``ah-server``. The table of what each route needs is
written here; a route added to the server without an entry fails the test."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ahmount.server.app import ROUTES
from tests.conftest import HubProcess

API = "/api/v1"
F = API + "/folders/{owner}/{kind}/{folder}"
A = API + "/assets/{owner}/{kind}/{folder}/{asset}"

#: What each (route, method) needs. open: anyone; any: any authenticated caller (acting on
#: their own things); namespace: being the user named in the path (nobody creates folders
#: for another); read/write/own: that permission on the folder; uploader: the user who
#: started the upload; grant: a read URL (signed, from an object read), whoever holds it.
NEEDS: dict[tuple[str, str], str] = {
    ("/healthz", "GET"): "open",
    (API + "/openapi.json", "GET"): "open",
    (API + "/whoami", "GET"): "any",
    (API + "/events", "GET"): "any",  # each caller's own view of what changed
    (API + "/folders/{owner}/{kind}", "GET"): "any",
    (API + "/folders/{owner}/{kind}", "POST"): "namespace",
    (F, "GET"): "read", (F, "PATCH"): "write", (F, "DELETE"): "own",
    (F + "/shares", "GET"): "own",
    (F + "/shares/{user}", "PUT"): "own", (F + "/shares/{user}", "DELETE"): "own",
    (F + "/public", "PUT"): "own",
    (F + "/assets", "GET"): "read", (F + "/assets", "POST"): "write",
    (A, "GET"): "read", (A, "PATCH"): "write", (A, "DELETE"): "write",
    (A + "/branches", "GET"): "read", (A + "/branches", "POST"): "write",
    (A + "/tags", "GET"): "read", (A + "/tags", "POST"): "write",
    (A + "/refs/{ref}", "GET"): "read", (A + "/refs/{ref}", "DELETE"): "write",
    (A + "/refs/{ref}/log", "GET"): "read",
    (A + "/refs/{ref}/objects", "GET"): "read",
    (A + "/refs/{ref}/files/{path:path}", "GET"): "read",
    (A + "/refs/{ref}/files/{path:path}", "HEAD"): "read",
    (A + "/refs/{ref}/batch", "POST"): "read",
    (A + "/commits/{prefix}", "GET"): "read",
    # Staged changes are the editors' workspace, like the branch they will change.
    (A + "/branches/{branch}/changes", "GET"): "write",
    (A + "/branches/{branch}/changes", "POST"): "write",
    (A + "/branches/{branch}/changes", "DELETE"): "write",
    (A + "/branches/{branch}/commits", "POST"): "write",
    (A + "/branches/{branch}/merge", "POST"): "write",
    (API + "/blobs/missing", "POST"): "any",
    (API + "/blobs/batch", "POST"): "any",
    (API + "/blobs/{sha256}", "PUT"): "any",
    (API + "/blobs/{sha256}/content", "GET"): "grant",
    (API + "/blobs/{sha256}/content", "HEAD"): "grant",
    (API + "/uploads", "POST"): "any",
    (API + "/uploads/{upload_id}", "GET"): "uploader",
    (API + "/uploads/{upload_id}", "PATCH"): "uploader",
    (API + "/uploads/{upload_id}", "DELETE"): "uploader",
    (API + "/uploads/{upload_id}/finish", "POST"): "uploader",
}
RANK = {"read": 1, "write": 2, "own": 3}
CALLERS = ["owner", "viewer", "editor", "reader", "stranger", "anonymous", "bad key"]
FOLDERS = ["private", "shared", "public"]
#: The permission each caller has on each folder (absent: cannot see it).
PERMISSION = {
    ("owner", "private"): 3, ("owner", "shared"): 3, ("owner", "public"): 3,
    ("viewer", "shared"): 1, ("editor", "shared"): 2,
    **{(c, "public"): 1 for c in ("viewer", "editor", "reader", "stranger")},
}
_names = itertools.count()


def test_every_route_has_an_entry() -> None:
    declared = {(path, method) for path, _, methods in ROUTES for method in methods}
    assert declared == set(NEEDS), (
        f"routes without an entry: {sorted(declared - set(NEEDS))}; "
        f"entries without a route: {sorted(set(NEEDS) - declared)}")


@dataclass
class Hub:
    server: HubProcess
    names: dict[str, str]
    keys: dict[str, str]
    sha: str
    commit_ids: dict[str, str]
    cursor: int = 0  # the change feed's cursor before the folders were made

    def client(self, caller: str) -> httpx.Client:
        headers = {}
        if caller == "bad key":
            headers["authorization"] = "Bearer ah_not_a_key"
        elif caller != "anonymous":
            headers["authorization"] = f"Bearer {self.keys[caller]}"
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)

    def owner_call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        with self.client("owner") as c:
            answer = c.request(method, url, **kwargs)
        assert answer.status_code < 300, (method, url, answer.text)
        return answer

    def folder_url(self, which: str) -> str:
        return f"{API}/folders/{self.names['owner']}/model/{which}"

    def asset_url(self, which: str, asset: str = "a") -> str:
        return f"{API}/assets/{self.names['owner']}/model/{which}/{asset}"

    def make_folder(self, name: str, like: str) -> None:
        """A folder shared as ``like`` is (private, shared, public), with one asset ``a``."""
        owner = self.names["owner"]
        self.owner_call("POST", f"{API}/folders/{owner}/model", json={"name": name})
        url = self.folder_url(name)
        if like == "shared":
            self.owner_call("PUT", url + f"/shares/{self.names['viewer']}",
                            json={"permission": "view"})
            self.owner_call("PUT", url + f"/shares/{self.names['editor']}",
                            json={"permission": "edit"})
        if like == "public":
            self.owner_call("PUT", url + "/public", json={"public": True})
        self.owner_call("POST", url + "/assets", json={"name": "a"})


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A server of its own: the matrix makes folders public, which every user would see."""
    server = HubProcess(tmp_path_factory.mktemp("matrix") / "data")
    server.add_users(["placeholder"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub(matrix_server: HubProcess) -> Hub:
    sqlite_server = matrix_server
    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for role in ("owner", "viewer", "editor", "reader", "stranger", "target"):
        names[role], keys[role] = sqlite_server.fresh_user()
    data = b"matrix"
    sha = hashlib.sha256(data).hexdigest()
    found = Hub(sqlite_server, names, keys, sha, {})
    found.cursor = found.owner_call("GET", f"{API}/events").json()["cursor"]
    found.owner_call("PUT", f"{API}/blobs/{sha}", content=data)
    for which in FOLDERS:
        found.make_folder(which, which)
        commit = found.owner_call(
            "POST", found.asset_url(which) + "/branches/main/commits",
            json={"message": "f", "adds": [{"path": "f.txt", "sha256": sha, "size": 6}]})
        found.commit_ids[which] = commit.json()["commit"]["id"]
        found.owner_call("POST", found.asset_url(which) + "/branches", json={"name": "b"})
    return found


@pytest.mark.parametrize("caller", CALLERS)
def test_a_blob_reads_only_through_a_read_url_the_hub_signed(hub: Hub, caller: str) -> None:
    """Knowing a blob's hash reads nothing: without a read URL, or with one whose any part
    was changed, every caller (the blob's owner too) is refused, told why, and sent no
    byte."""
    good = httpx.URL(hub.owner_call("GET", hub.asset_url("private") + "/refs/main/files/f.txt"
                                    ).headers["x-ah-read-url"])
    params = dict(good.params)
    other = hashlib.sha256(b"other").hexdigest()
    forged = [
        ({}, good.path),
        ({**params, "signature": "0" * 64}, good.path),
        ({**params, "expires": str(int(params["expires"]) + 1)}, good.path),
        ({**params, "user": hub.names["stranger"]}, good.path),
        (params, good.path.replace(hub.sha, other)),
    ]
    with hub.client(caller) as client:
        for query, path in forged:
            # On the API or on the data plane (an absolute URL), whichever the hub gave.
            answer = client.get(good.copy_with(path=path, query=None), params=query)
            assert answer.status_code == 403, (query, path, answer.text)
            assert answer.json()["error"]["message"].startswith("read URL of blob"), answer.text
            assert b"matrix" not in answer.content
        assert client.get(good).content == b"matrix"


@pytest.mark.parametrize("caller", ["owner", "viewer", "editor", "reader", "stranger"])
def test_the_feed_shows_each_caller_what_they_may_read(hub: Hub, caller: str) -> None:
    """A caller hears of a folder's changes exactly when they may read it (public folders:
    from the moment they became public)."""
    with hub.client(caller) as c:
        page = c.get(f"{API}/events", params={"after": hub.cursor, "limit": 1000}).json()
    heard = {e["folder"] for e in page["events"]
             if e["owner"] == hub.names["owner"] and e["folder"] in FOLDERS}
    assert heard == {f for f in FOLDERS if (caller, f) in PERMISSION}


def _fresh(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def request_for(hub: Hub, path: str, method: str, folder: str,
                caller: str) -> tuple[str, dict[str, Any]]:
    """The URL and request arguments that exercise (path, method) on ``folder``; what a
    call would destroy is made fresh first (by the owner)."""
    owner = hub.names["owner"]
    target_folder, target_asset = folder, "a"
    if (path, method) in ((F, "DELETE"), (F + "/public", "PUT")):
        target_folder = _fresh("d")
        hub.make_folder(target_folder, folder)
    if (path, method) in ((A, "DELETE"), (A + "/branches/{branch}/merge", "POST")):
        target_asset = _fresh("x")
        hub.owner_call("POST", hub.folder_url(folder) + "/assets", json={"name": target_asset})
        if path.endswith("merge"):
            hub.owner_call("POST", hub.asset_url(folder, target_asset) + "/branches",
                           json={"name": "b"})
    ref = "main"
    if (path, method) == (A + "/refs/{ref}", "DELETE"):
        ref = _fresh("r")
        hub.owner_call("POST", hub.asset_url(folder) + "/branches", json={"name": ref})
    upload_id = ""
    if "{upload_id}" in path:
        data = _fresh("upload").encode()
        started = hub.owner_call("POST", f"{API}/uploads", json={
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
        upload_id = started.json()["id"]
        if path.endswith("/finish"):
            hub.owner_call("PATCH", f"{API}/uploads/{upload_id}", content=data,
                           headers={"upload-offset": "0"})
    url = (path.replace("{owner}", owner)
           .replace("{kind}", "model").replace("{folder}", target_folder)
           .replace("{asset}", target_asset).replace("{ref}", ref)
           .replace("{branch}", "b" if path.endswith("merge") else "main")
           .replace("{path:path}", "f.txt").replace("{prefix}", hub.commit_ids[folder][:12])
           .replace("{user}", hub.names["target"]).replace("{sha256}", hub.sha)
           .replace("{upload_id}", upload_id))
    bodies: dict[tuple[str, str], Any] = {
        (API + "/folders/{owner}/{kind}", "POST"): {"name": _fresh("n")},
        (F, "PATCH"): {"description": f"by {caller}"},
        (F + "/shares/{user}", "PUT"): {"permission": "view"},
        (F + "/public", "PUT"): {"public": True},
        (F + "/assets", "POST"): {"name": _fresh("n")},
        (A, "PATCH"): {"description": f"by {caller}"},
        (A + "/branches", "POST"): {"name": _fresh("n")},
        (A + "/tags", "POST"): {"name": _fresh("n"), "source": "main"},
        (A + "/refs/{ref}/batch", "POST"): {"paths": ["f.txt"]},
        (A + "/branches/{branch}/changes", "POST"): {"session": "m", "deletes": ["gone"]},
        (A + "/branches/{branch}/commits", "POST"): {"message": "m", "deletes": ["gone"]},
        (API + "/blobs/missing", "POST"): {"hashes": [hub.sha]},
        (API + "/uploads", "POST"): {"sha256": "b" * 64, "size": 1},
    }
    if path.endswith("/content"):
        # The read URL the owner's read of the private file came with.
        url = hub.owner_call("GET", hub.asset_url(folder) + "/refs/main/files/f.txt"
                             ).headers["x-ah-read-url"]
    kwargs: dict[str, Any] = {}
    if (path, method) in bodies:
        kwargs["json"] = bodies[(path, method)]
    if (path, method) == (API + "/blobs/{sha256}", "PUT"):
        kwargs["content"] = b"matrix"
    if (path, method) == (API + "/blobs/batch", "POST"):
        kwargs["content"] = b'{"blobs": [{"sha256": "%s", "size": 6}]}\nmatrix' % \
            hub.sha.encode()
    if (path, method) == (API + "/uploads/{upload_id}", "PATCH"):
        kwargs["headers"] = {"upload-offset": "0"}
        kwargs["content"] = b"x"
    return url, kwargs


def expected(need: str, caller: str, folder: str) -> set[int] | str:
    """``"ok"`` (any 2xx) or the set of statuses a refusal may have."""
    if need in ("open", "grant"):
        return "ok"
    if caller in ("anonymous", "bad key"):
        return {401}
    if need == "any":
        return "ok"
    if need in ("uploader", "namespace"):
        return "ok" if caller == "owner" else ({404} if need == "uploader" else {403})
    permission = PERMISSION.get((caller, folder))
    if permission is None:
        return {404}
    return "ok" if permission >= RANK[need] else {403}


Case = tuple[str, str, str, str]
CASES: list[Case] = [
    (path, method, folder, caller)
    for (path, method), need in NEEDS.items()
    for folder in (FOLDERS if need in RANK else ["private"])
    for caller in CALLERS
]


@pytest.mark.parametrize(("path", "method", "folder", "caller"), CASES,
                         ids=["-".join(c) for c in CASES])
def test_the_access_matrix(hub: Hub, path: str, method: str, folder: str,
                           caller: str) -> None:
    need = NEEDS[(path, method)]
    url, kwargs = request_for(hub, path, method, folder, caller)
    with hub.client(caller) as client:
        answer = client.request(method, url, **kwargs)
    want = expected(need, caller, folder)
    if want == "ok":
        assert answer.status_code < 300, (caller, method, url, answer.text)
    else:
        assert answer.status_code in want, (caller, method, url, answer.status_code,
                                            answer.text)
        if answer.status_code == 404 and method != "HEAD":
            # A refusal tells nothing: the same answer as for something that is not there.
            assert "does not exist" in answer.text or "no " in answer.text, answer.text
    if path.endswith("/changes") and method == "POST" and answer.status_code < 300:
        hub.owner_call("DELETE", url)  # staged changes would refuse later commits


