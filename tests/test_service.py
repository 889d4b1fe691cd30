"""The hub's service layer, called directly on real SQLite and blob-directory stores."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ahmount.errors import (
    AlreadyExists,
    Changed,
    ChecksumMismatch,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RangeNotSatisfiable,
    Unauthenticated,
    UnknownChanges,
)
from ahmount.hub.models import AssetAddr, FolderAddr, ObjectEntry
from ahmount.hub.read_grants import Grant
from ahmount.hub.service import Actor, HubService, hash_key


def send_blob(service: HubService, actor: Actor, sha: str, pieces: list[bytes],
              size: int) -> None:
    """A blob through the service's single-request path, as ``PUT /blobs/{sha}`` sends it:
    written in pieces, verified, registered; dropped on failure."""
    token = service.begin_blob(actor, sha, size)
    try:
        offset = 0
        for piece in pieces:
            offset = service.write_blob(actor, token, offset, piece)
        service.end_blob(actor, token, sha, size)
    except BaseException:
        service.drop_blob_write(actor, token)
        raise
    service.register_blobs(actor, [(sha, size)], durable=True)


def put(service: HubService, actor: Actor, data: bytes) -> dict[str, object]:
    sha = hashlib.sha256(data).hexdigest()
    send_blob(service, actor, sha, [data[: len(data) // 2], data[len(data) // 2:]], len(data))
    return {"sha256": sha, "size": len(data)}


def obj(service: HubService, actor: Actor, path: str, data: bytes) -> dict[str, object]:
    return {"path": path, **put(service, actor, data)}


def granted_object(service: HubService, data: bytes) -> Grant:
    """A read grant for ``data``, committed as alice's object ``f`` of a new asset."""
    alice = service.ensure_user("alice")
    folder = FolderAddr("alice", "dataset", "g")
    service.create_folder(alice, folder)
    addr = AssetAddr(folder, "a")
    service.create_asset(alice, addr)
    service.commit(alice, addr, "main", "c", adds=[obj(service, alice, "f", data)])
    return service.read_grant(alice, service.open_object(alice, addr, "main", "f"))


def paths(service: HubService, actor: Actor, addr: AssetAddr, ref: str) -> list[str]:
    return [o.path for o in service.list_objects(actor, addr, ref, limit=10_000).objects]


@pytest.fixture
def model(service: HubService, alice: Actor) -> AssetAddr:
    folder = FolderAddr("alice", "model", "llm")
    service.create_folder(alice, folder, ["nlp"], "language models")
    addr = AssetAddr(folder, "gpt2")
    service.create_asset(alice, addr, ["PyTorch"])
    return addr


@pytest.fixture
def dataset(service: HubService, alice: Actor) -> AssetAddr:
    folder = FolderAddr("alice", "dataset", "images")
    service.create_folder(alice, folder)
    addr = AssetAddr(folder, "cifar10")
    service.create_asset(alice, addr)
    return addr


def test_folder_lifecycle(service: HubService, alice: Actor) -> None:
    addr = FolderAddr("alice", "model", "llm")
    info = service.create_folder(alice, addr, ["a", "b"], "d")
    assert info.path == "/alice/t9k-assethub/model/llm"
    assert info.permission == "own"
    with pytest.raises(AlreadyExists, match="/alice/t9k-assethub/model/llm"):
        service.create_folder(alice, addr)
    # Labels are replaced as a whole, not merged.
    service.update_folder(alice, addr, labels=["c"])
    assert service.get_folder(alice, addr).labels == ["c"]
    renamed = service.update_folder(alice, addr, name="generative")
    assert renamed.name == "generative"
    with pytest.raises(NotFound):
        service.get_folder(alice, addr)
    assert [f.name for f in service.list_folders(alice, "alice", "model")] == ["generative"]
    assert service.list_folders(alice, "alice", "dataset") == []
    service.delete_folder(alice, FolderAddr("alice", "model", "generative"))
    assert service.list_folders(alice, "alice", "model") == []


def test_nobody_creates_a_folder_for_another_user(service: HubService, alice: Actor,
                                                  bob: Actor) -> None:
    with pytest.raises(PermissionDenied, match="another user"):
        service.create_folder(alice, FolderAddr("bob", "model", "x"))
    assert service.list_folders(bob, "bob", "model") == []


def test_asset_starts_with_repository_created(service: HubService, alice: Actor,
                                              model: AssetAddr) -> None:
    history = service.log(alice, model, "main")
    assert [c.message for c in history] == ["Repository created"]
    assert history[0].parents == []
    assert len(history[0].id) == 64
    assert paths(service, alice, model, "main") == []
    assert service.list_refs(alice, model, "branch") == [("main", history[0].id)]


def test_commit_deletes_then_adds(service: HubService, alice: Actor, model: AssetAddr) -> None:
    first = service.commit(alice, model, "main", "add", adds=[
        obj(service, alice, "a/1.bin", b"1"), obj(service, alice, "a/2.bin", b"2"),
        obj(service, alice, "b.txt", b"b"),
    ])
    assert first is not None and first.message == "add"
    # Deleting a/ and adding a/1.bin in one commit keeps the new a/1.bin: deletes go first.
    second = service.commit(alice, model, "main", "replace", deletes=["a/", "missing.bin"],
                            adds=[obj(service, alice, "a/1.bin", b"new")])
    assert second is not None and second.parents == [first.id]
    assert paths(service, alice, model, "main") == ["a/1.bin", "b.txt"]
    assert paths(service, alice, model, first.id[:6]) == ["a/1.bin", "a/2.bin", "b.txt"]
    # Nothing to change: no commit, None.
    assert service.commit(alice, model, "main", "noop", deletes=["nothing/"]) is None
    assert len(service.log(alice, model, "main")) == 3


def test_staging_unknown_changes_force_and_reset(service: HubService, alice: Actor,
                                                 model: AssetAddr) -> None:
    service.stage(alice, model, "main", "session-a", adds=[obj(service, alice, "x", b"x")])
    assert [c.path for c in service.list_changes(alice, model, "main")] == ["x"]
    with pytest.raises(UnknownChanges, match="gpt2:main.*'x'"):
        service.commit(alice, model, "main", "mine", session="session-b",
                       adds=[obj(service, alice, "y", b"y")])
    # The refused commit changed nothing.
    assert paths(service, alice, model, "main") == []
    assert len(service.list_changes(alice, model, "main")) == 1
    done = service.commit(alice, model, "main", "forced", session="session-b", force=True,
                          adds=[obj(service, alice, "y", b"y")])
    assert done is not None
    assert paths(service, alice, model, "main") == ["x", "y"]
    assert service.list_changes(alice, model, "main") == []
    service.stage(alice, model, "main", "s", deletes=["x"])
    assert service.reset(alice, model, "main") == 1
    assert service.list_changes(alice, model, "main") == []
    assert paths(service, alice, model, "main") == ["x", "y"]
    own = service.stage(alice, model, "main", "s", deletes=["x"])
    assert own == 1
    assert service.commit(alice, model, "main", "own session", session="s") is not None
    assert paths(service, alice, model, "main") == ["y"]


def test_a_commit_with_expectations_lands_only_if_they_hold(service: HubService, alice: Actor,
                                                           model: AssetAddr) -> None:
    first = obj(service, alice, "log.txt", b"one\n")
    service.commit(alice, model, "main", "first", adds=[first])
    two = obj(service, alice, "log.txt", b"one\ntwo\n")
    other = obj(service, alice, "other", b"o")
    # Expected as it is: the commit lands (with a change elsewhere that nobody expected).
    done = service.commit(alice, model, "main", "append", adds=[two],
                          expect={"log.txt": first["sha256"], "new": None})
    assert done is not None
    # Expected as it was: refused, and nothing of the commit is made.
    for expect, says in [({"log.txt": first["sha256"]}, "'log.txt' holds other bytes"),
                         ({"log.txt": None}, "'log.txt' was made"),
                         ({"gone": first["sha256"]}, "'gone' is gone")]:
        with pytest.raises(Changed, match=f"gpt2:main: {says} since"):
            service.commit(alice, model, "main", "stale", adds=[other], expect=expect)
        assert paths(service, alice, model, "main") == ["log.txt"]
    # Staged changes of the refused commit stay staged: a retry can take them.
    service.stage(alice, model, "main", "s", adds=[other])
    with pytest.raises(Changed):
        service.commit(alice, model, "main", "stale", session="s", expect={"other": two["sha256"]})
    assert [c.path for c in service.list_changes(alice, model, "main")] == ["other"]
    assert service.commit(alice, model, "main", "now", session="s",
                          expect={"other": None, "log.txt": two["sha256"]}) is not None
    assert paths(service, alice, model, "main") == ["log.txt", "other"]


def test_a_commit_sent_again_with_its_idempotency_key_gets_the_first_answer(
        service: HubService, alice: Actor, bob: Actor, model: AssetAddr) -> None:
    """A client whose connection failed before the answer sends the commit again: with the
    same idempotency key it gets the commit the first request made, and nothing is committed
    twice, not even an append whose expectation no longer holds."""
    first = obj(service, alice, "log.txt", b"one\n")
    service.commit(alice, model, "main", "first", adds=[first])
    two = obj(service, alice, "log.txt", b"one\ntwo\n")
    append = {"adds": [two], "expect": {"log.txt": first["sha256"]}, "idempotency_key": "r-1"}
    made = service.commit(alice, model, "main", "append", **append)
    assert made is not None
    assert service.commit(alice, model, "main", "append", **append) == made
    assert [c.message for c in service.log(alice, model, "main")][:2] == ["append", "first"]
    # Without the id, the same repeat is a new request: its expectation fails.
    with pytest.raises(Changed):
        service.commit(alice, model, "main", "append", adds=[two],
                       expect={"log.txt": first["sha256"]})
    # A commit that changed nothing is answered as nothing again, even after changes.
    assert service.commit(alice, model, "main", "same", idempotency_key="r-2") is None
    three = obj(service, alice, "log.txt", b"three\n")
    assert service.commit(alice, model, "main", "same", adds=[three],
                          idempotency_key="r-2") is None
    assert service.commit(alice, model, "main", "three", adds=[three],
                          idempotency_key="r-3") is not None
    # Ids are each user's own: bob's "r-1" is a commit of its own.
    service.share_folder(alice, model.folder, "bob", "edit")
    four = obj(service, bob, "log.txt", b"four\n")
    by_bob = service.commit(bob, model, "main", "bob's", adds=[four], idempotency_key="r-1")
    assert by_bob is not None and by_bob != made
    # An id used on one branch is refused on another, and that commit makes nothing.
    service.create_branch(alice, model, "v1")
    with pytest.raises(InvalidArgument, match="Idempotency-Key 'r-1' was used for a commit to "
                                              r".*gpt2:main, not .*gpt2:v1"):
        service.commit(alice, model, "v1", "append", adds=[two], idempotency_key="r-1")
    assert paths(service, alice, model, "v1") == []
    assert len(service.log(alice, model, "main")) == 5


@pytest.mark.parametrize("key", ["x" * 65, "tab\there", "caf\u00e9"])
def test_bad_idempotency_keys_are_named(service: HubService, alice: Actor, model: AssetAddr,
                                        key: str) -> None:
    with pytest.raises(InvalidArgument, match="Idempotency-Key must be a printable ASCII"):
        service.commit(alice, model, "main", "m", adds=[obj(service, alice, "a", b"a")],
                       idempotency_key=key)
    assert paths(service, alice, model, "main") == []


@pytest.mark.parametrize("expect, says", [
    ({"/abs": None}, "'/abs'"),
    ({"a": "XYZ"}, "'XYZ' is not a sha256"),
    ([("a", None)], "expect must map"),
])
def test_bad_expectations_are_named(service: HubService, alice: Actor, model: AssetAddr,
                                    expect: object, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        service.commit(alice, model, "main", "m", adds=[obj(service, alice, "a", b"a")],
                       expect=expect)  # type: ignore[arg-type]
    assert paths(service, alice, model, "main") == []


def test_branches_tags_and_commit_prefixes(service: HubService, alice: Actor,
                                           model: AssetAddr) -> None:
    service.commit(alice, model, "main", "m", adds=[obj(service, alice, "main.bin", b"m")])
    branch = service.create_branch(alice, model, "v1")
    # A new branch starts at the empty "Repository created" commit, not at main.
    assert branch.commit.message == "Repository created"
    assert paths(service, alice, model, "v1") == []
    c1 = service.commit(alice, model, "v1", "v1 work", adds=[obj(service, alice, "w", b"w")])
    assert c1 is not None
    tag = service.create_tag(alice, model, "20220101", "v1")
    assert tag.commit.id == c1.id
    # A tag whose name looks like hex still resolves as the tag (branch > tag > commit).
    assert service.resolve(alice, model, "20220101").type == "tag"
    assert service.create_tag(alice, model, "from-tag", "20220101").commit.id == c1.id
    assert service.create_tag(alice, model, "from-commit", c1.id[:8]).commit.id == c1.id
    assert service.get_commit(alice, model, c1.id[:4]).id == c1.id
    with pytest.raises(InvalidArgument, match="at least 4|4 to 64"):
        service.get_commit(alice, model, c1.id[:3])
    with pytest.raises(NotFound, match="at least 4 hex"):
        service.resolve(alice, model, c1.id[:3])
    with pytest.raises(NotFound, match="no branch, tag or commit 'nope'"):
        service.resolve(alice, model, "nope")
    with pytest.raises(AlreadyExists, match="tag .*:20220101"):
        service.create_branch(alice, model, "20220101")
    with pytest.raises(AlreadyExists, match="branch .*:v1"):
        service.create_tag(alice, model, "v1", "main")
    with pytest.raises(InvalidArgument, match="cannot be deleted"):
        service.delete_ref(alice, model, "main")
    with pytest.raises(PermissionDenied, match="is a tag: tags are read-only"):
        service.commit(alice, model, "20220101", "to a tag", adds=[])
    service.delete_ref(alice, model, "from-tag")
    service.delete_ref(alice, model, "v1")
    assert [n for n, _ in service.list_refs(alice, model, "branch")] == ["main"]
    assert [n for n, _ in service.list_refs(alice, model, "tag")] == ["20220101", "from-commit"]


def test_ambiguous_commit_prefix(service: HubService, alice: Actor, model: AssetAddr) -> None:
    root = service.log(alice, model, "main")[0]
    asset_id = service.get_asset(alice, model).id
    # Two commits whose ids share 5 characters, written straight into the store: waiting for
    # random ids to collide would make the test slow and nondeterministic.
    with service.metadata.write() as tx:
        for commit_id in ("abcde" + "1" * 59, "abcde" + "2" * 59):
            tx.insert_commit({
                "id": commit_id, "asset_id": asset_id, "tree": root.tree, "message": "m",
                "committer": "alice", "created": 1.0, "parents": [root.id], "metadata": {},
            })
    for prefix in ("abcd", "abcde"):
        with pytest.raises(InvalidArgument, match=f"prefix '{prefix}' .* ambiguous"):
            service.get_commit(alice, model, prefix)
        with pytest.raises(InvalidArgument, match="ambiguous"):
            service.resolve(alice, model, prefix)
    assert service.get_commit(alice, model, "abcde1").id == "abcde" + "1" * 59
    assert service.resolve(alice, model, "abcde2").type == "commit"


def test_datasets_have_only_main(service: HubService, alice: Actor, dataset: AssetAddr) -> None:
    with pytest.raises(InvalidArgument, match="only the main branch"):
        service.create_branch(alice, dataset, "v1")
    with pytest.raises(InvalidArgument, match="dataset"):
        service.merge(alice, dataset, "main")
    c = service.commit(alice, dataset, "main", "data", adds=[obj(service, alice, "0.png", b"p")])
    assert c is not None
    assert service.create_tag(alice, dataset, "v1.0", "main").commit.id == c.id


def test_merge_replaces_main_with_both_parents(service: HubService, alice: Actor,
                                              model: AssetAddr) -> None:
    main_head = service.commit(alice, model, "main", "m",
                               adds=[obj(service, alice, "old.bin", b"o")])
    service.create_branch(alice, model, "v1")
    branch_head = service.commit(alice, model, "v1", "b",
                                 adds=[obj(service, alice, "new.bin", b"n")])
    assert main_head is not None and branch_head is not None
    with pytest.raises(InvalidArgument, match="into itself"):
        service.merge(alice, model, "main")
    merged = service.merge(alice, model, "v1")
    assert merged is not None
    assert merged.parents == [main_head.id, branch_head.id]
    assert paths(service, alice, model, "main") == ["new.bin"]
    assert service.merge(alice, model, "v1") is None


def test_permissions(service: HubService, alice: Actor, bob: Actor, model: AssetAddr) -> None:
    folder = model.folder
    carol = service.ensure_user("carol")
    # Private: invisible to bob, with the same answer as a folder that does not exist.
    with pytest.raises(NotFound, match="does not exist"):
        service.get_folder(bob, folder)
    with pytest.raises(NotFound):
        service.list_objects(bob, model, "main")
    assert service.list_folders(bob, "alice", "model") == []
    with pytest.raises(NotFound):
        service.commit(bob, model, "main", "x", adds=[obj(service, bob, "x", b"x")])
    # Only the owner shares.
    service.share_folder(alice, folder, "bob", "view")
    with pytest.raises(PermissionDenied):
        service.share_folder(bob, folder, "carol", "view")
    assert service.get_folder(bob, folder).permission == "view"
    assert [f.name for f in service.list_folders(bob, "shared", "model")] == ["llm"]
    assert service.list_objects(bob, model, "main").objects == []
    with pytest.raises(PermissionDenied, match="may not change"):
        service.commit(bob, model, "main", "x", adds=[obj(service, bob, "x", b"x")])
    with pytest.raises(PermissionDenied):
        service.create_asset(bob, AssetAddr(folder, "bobs"))
    with pytest.raises(PermissionDenied):
        service.delete_folder(bob, folder)
    # Edit includes creating assets and committing, not sharing.
    service.share_folder(alice, folder, "bob", "edit")
    service.create_asset(bob, AssetAddr(folder, "bobs"))
    assert service.commit(bob, model, "main", "bob was here",
                          adds=[obj(service, bob, "x", b"x")]) is not None
    # Public: visible (view) to everyone, listed under public.
    with pytest.raises(NotFound):
        service.get_folder(carol, folder)
    service.set_public(alice, folder, True)
    assert service.get_folder(carol, folder).permission == "view"
    assert [f.path for f in service.list_folders(carol, "public", "model")] == [str(folder)]
    with pytest.raises(PermissionDenied):
        service.update_folder(carol, folder, description="vandal")
    service.share_folder(alice, folder, "bob", None)
    assert service.list_folders(bob, "shared", "model") == []


def test_api_keys_are_hashed(service: HubService) -> None:
    actor, key = service.add_user("dave")
    assert service.authenticate(key) == actor
    with pytest.raises(Unauthenticated):
        service.authenticate(key + "x")
    with service.metadata.engine.connect() as conn:
        stored = [row[0] for row in conn.execute(sa.text("SELECT key_hash FROM api_keys"))]
    assert key not in stored and hash_key(key) in stored
    with pytest.raises(AlreadyExists):
        service.add_user("dave")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("..", "not allowed"),
        ("a\x00b", "NUL"),
        ("", "empty"),
        ("x" * 200, "at most 128"),
        ("a/b", "not allowed"),
    ],
)
def test_bad_names_change_nothing(service: HubService, alice: Actor, name: str,
                                  message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        service.create_folder(alice, FolderAddr("alice", "model", name))
    assert service.list_folders(alice, "alice", "model") == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../x", "'..' segment"),
        ("a//b", "empty segment"),
        ("/abs", "relative"),
        ("a\x00", "NUL"),
        ("d/", "directory"),
        ("a/" + "x" * 300, "longer than 255"),
    ],
)
def test_bad_object_paths_change_nothing(service: HubService, alice: Actor, model: AssetAddr,
                                         path: str, message: str) -> None:
    blob = put(service, alice, b"data")
    with pytest.raises(InvalidArgument, match=message):
        service.commit(alice, model, "main", "bad", adds=[{"path": path, **blob}])
    assert len(service.log(alice, model, "main")) == 1


def test_adds_must_name_uploaded_blobs(service: HubService, alice: Actor,
                                      model: AssetAddr) -> None:
    with pytest.raises(InvalidArgument, match="never uploaded"):
        service.commit(alice, model, "main", "x",
                       adds=[{"path": "a", "sha256": "0" * 64, "size": 1}])
    blob = put(service, alice, b"four")
    with pytest.raises(InvalidArgument, match="says 5 bytes"):
        service.commit(alice, model, "main", "x", adds=[{"path": "a", **blob, "size": 5}])
    with pytest.raises(Conflict, match="directory of that name|is a file"):
        service.commit(alice, model, "main", "x", adds=[{"path": "a", **blob},
                                                        {"path": "a/b", **blob}])
    assert len(service.log(alice, model, "main")) == 1


def test_blob_hash_mismatch_and_truncation_leave_nothing(service: HubService,
                                                        alice: Actor) -> None:
    data = b"payload" * 1000
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(ChecksumMismatch, match=sha):
        send_blob(service, alice, sha, [data[:-1] + b"X"], len(data))
    assert service.missing_blobs(alice, [sha]) == [sha]
    with pytest.raises(InvalidArgument, match="truncated"):
        send_blob(service, alice, sha, [data[:100]], len(data))
    assert service.missing_blobs(alice, [sha]) == [sha]
    assert list(service.blobs.hashes()) == []
    # A resumable upload in pieces, resumed at the offset the store reports.
    upload_id, received = service.start_upload(alice, sha, len(data))
    assert upload_id is not None and received == 0
    service.append_upload(alice, upload_id, 0, data[:3000])
    with pytest.raises(Conflict, match="gap or overwrite"):
        service.append_upload(alice, upload_id, 100, data[100:200])
    _, _, received = service.upload_status(alice, upload_id)
    service.append_upload(alice, upload_id, received, data[received:])
    assert service.finish_upload(alice, upload_id) == sha
    assert service.missing_blobs(alice, [sha]) == []
    assert b"".join(service.blobs.read(sha, 10, 20)) == data[10:20]


def test_small_blobs_stored_at_once_keep_those_before_a_mismatch(service: HubService,
                                                                 alice: Actor) -> None:
    first, second, after = b"first" * 10, b"second", b"after it"
    blobs = [(hashlib.sha256(d).hexdigest(), d) for d in (first, second, after)]
    bad = [blobs[0], (blobs[1][0], b"not " + second), blobs[2]]
    kept, failure = service.store_small_blobs(alice, bad)
    assert kept == [(blobs[0][0], len(first))]
    assert isinstance(failure, ChecksumMismatch) and blobs[1][0] in str(failure)
    service.register_blobs(alice, kept)
    assert service.missing_blobs(alice, [s for s, _ in blobs]) == [blobs[1][0], blobs[2][0]]
    assert sorted(service.blobs.hashes()) == [blobs[0][0]]
    kept, failure = service.store_small_blobs(alice, blobs[1:])
    assert failure is None and kept == [(blobs[1][0], len(second)), (blobs[2][0], len(after))]
    service.register_blobs(alice, kept)
    assert service.missing_blobs(alice, [s for s, _ in blobs]) == []
    assert b"".join(service.blobs.read(blobs[2][0], 0, len(after))) == after


def test_a_blob_write_belongs_to_the_actor_who_began_it(service: HubService, alice: Actor,
                                                        bob: Actor) -> None:
    data = b"alice's bytes"
    sha = hashlib.sha256(data).hexdigest()
    token = service.begin_blob(alice, sha, len(data))
    with pytest.raises(NotFound):
        service.write_blob(bob, token, 0, data)
    service.drop_blob_write(bob, token)  # not his to drop: nothing happens
    service.write_blob(alice, token, 0, data)
    with pytest.raises(NotFound):
        service.end_blob(bob, token, sha, len(data))
    service.end_blob(alice, token, sha, len(data))
    with pytest.raises(NotFound):  # ended: the token is spent
        service.write_blob(alice, token, len(data), b"more")


def test_concurrent_commits_to_one_branch_all_land(service: HubService, alice: Actor,
                                                   model: AssetAddr) -> None:
    blobs = [obj(service, alice, f"w{i}/file", str(i).encode()) for i in range(8)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for round_ in range(5):
                entry = dict(blobs[i], path=f"w{i}/r{round_}")
                assert service.commit(alice, model, "main", f"{i}.{round_}",
                                      adds=[entry]) is not None
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(paths(service, alice, model, "main")) == 40
    assert len(service.log(alice, model, "main")) == 41


def test_gc_removes_only_unreferenced(service: HubService, alice: Actor,
                                      model: AssetAddr) -> None:
    keep = obj(service, alice, "keep", b"keep")
    staged = obj(service, alice, "staged", b"staged")
    drop = put(service, alice, b"drop")
    service.commit(alice, model, "main", "k", adds=[keep])
    service.stage(alice, model, "main", "s", adds=[staged])
    assert service.gc(grace_seconds=3600)["blobs"] == 0  # all too young
    stats = service.gc(grace_seconds=0)
    assert stats["blobs"] == 1
    assert service.missing_blobs(alice, [keep["sha256"], staged["sha256"],  # type: ignore[list-item]
                                         drop["sha256"]]) == [drop["sha256"]]
    # Deleting the asset frees its blobs too (after the grace period).
    service.reset(alice, model, "main")
    service.delete_asset(alice, model)
    time.sleep(0.01)
    assert service.gc(grace_seconds=0)["blobs"] == 2


def test_listing_pages_with_delimiter(service: HubService, alice: Actor,
                                      dataset: AssetAddr) -> None:
    blob = put(service, alice, b"")
    adds = [{"path": f"train/{i:05d}.png", **blob} for i in range(2500)]
    adds += [{"path": "README.md", **blob}, {"path": "test/0.png", **blob}]
    service.commit(alice, dataset, "main", "data", adds=adds)
    top = service.list_objects(alice, dataset, "main", delimiter=True)
    assert [o.path for o in top.objects] == ["README.md"]
    assert top.dirs == ["test/", "train/"]
    seen: list[str] = []
    after = ""
    while True:
        page = service.list_objects(alice, dataset, "main", prefix="train/", after=after,
                                    limit=1000)
        seen += [o.path for o in page.objects]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == [f"train/{i:05d}.png" for i in range(2500)]
    with pytest.raises(InvalidArgument, match="limit"):
        service.list_objects(alice, dataset, "main", limit=0)


def test_object_entry_fields(service: HubService, alice: Actor, model: AssetAddr) -> None:
    blob = put(service, alice, b"abc")
    service.commit(alice, model, "main", "x", adds=[
        {"path": "m.json", **blob, "mtime": 1234.5, "content_type": "application/json"}])
    commit, entry = service.stat_object(alice, model, "main", "m.json")
    assert entry == ObjectEntry("m.json", str(blob["sha256"]), 3, 1234.5, "application/json")
    assert commit.message == "x"
    readable = service.open_object(alice, model, "main", "m.json")
    assert (readable.commit, readable.entry) == (commit, entry)
    assert b"".join(readable.read(1)) == b"bc"
    with pytest.raises(RangeNotSatisfiable):
        readable.read(2, 9)


def test_large_blob_through_a_resumable_upload(service: HubService, alice: Actor,
                                               model: AssetAddr) -> None:
    # Larger than one S3 multipart part (16 MiB), sent in uneven pieces.
    data = os.urandom(21 << 20)
    sha = hashlib.sha256(data).hexdigest()
    upload_id, _ = service.start_upload(alice, sha, len(data))
    assert upload_id is not None
    offset = 0
    for size in (3 << 20, 7 << 20, 11 << 20):
        offset = service.append_upload(alice, upload_id, offset, data[offset:offset + size])
    assert service.upload_status(alice, upload_id)[2] == len(data)
    service.finish_upload(alice, upload_id)
    service.commit(alice, model, "main", "big", adds=[{"path": "big.bin", "sha256": sha,
                                                        "size": len(data)}])
    chunks = service.open_object(alice, model, "main", "big.bin").read((16 << 20) - 10,
                                                                      (16 << 20) + 10)
    assert b"".join(chunks) == data[(16 << 20) - 10:(16 << 20) + 10]
    # A corrupted large upload never becomes a blob.
    bad_id, _ = service.start_upload(alice, "e" * 64, len(data))
    assert bad_id is not None
    service.append_upload(alice, bad_id, 0, data)
    with pytest.raises(ChecksumMismatch):
        service.finish_upload(alice, bad_id)
    assert service.missing_blobs(alice, ["e" * 64]) == ["e" * 64]
    assert sorted(service.blobs.hashes()) == [sha]


def older_database(path: Path, version: int, undo: str) -> str:
    """A SQLite metadata store made now and then made to look like one at schema
    ``version`` (``undo``: the statement that takes away what later versions added); its
    URL."""
    from ahmount.hub.metadata import MetadataStore

    url = f"sqlite:///{path}"
    store = MetadataStore(url)
    with store.write() as tx:
        tx._c.execute(sa.text(undo))
        tx._c.execute(sa.text(f"UPDATE schema_info SET version = {version}"))
    store.close()
    return url


def test_a_damaged_metadata_store_is_named_and_left_as_it_is(tmp_path: Path) -> None:
    """A SQLite metadata store a bad disk damaged: ah-server used to die with a traceback
    (sqlalchemy's DatabaseError, no file named). Now one line names the store, and nothing
    in it is touched."""
    import subprocess

    from ahmount.errors import InternalError
    from ahmount.hub.metadata import MetadataStore
    from tests.conftest import command
    from tests.test_disposable_cache import damage

    data = tmp_path / "hub"
    subprocess.run([command("ah-server"), "--data", str(data), "user", "add", "z"],
                   check=True, capture_output=True)
    damage(data / "meta.db")
    before = (data / "meta.db").read_bytes()
    with pytest.raises(InternalError, match=f"metadata store sqlite:///{data}/meta.db is "
                       "damaged .file is not a database.: restore it from a backup"):
        MetadataStore(f"sqlite:///{data}/meta.db")
    started = subprocess.run([command("ah-server"), "--data", str(data), "user", "list"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "Traceback" not in started.stderr
    assert "meta.db is damaged (file is not a database)" in started.stderr
    assert (data / "meta.db").read_bytes() == before


def test_schema_upgrade_is_logged_and_applied(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from ahmount.hub.metadata import MetadataStore
    from ahmount.hub.migrations import SCHEMA_VERSION

    url = older_database(tmp_path / "old.db", 1, "DROP INDEX ix_blobs_created")
    with caplog.at_level(logging.WARNING, "ahmount.hub"):
        store = MetadataStore(url)
    assert f"from schema v1 to v{SCHEMA_VERSION}" in caplog.text
    with store.engine.connect() as conn:
        assert "ix_blobs_created" in {i["name"] for i in sa.inspect(conn).get_indexes("blobs")}
        assert conn.execute(sa.text("SELECT version FROM schema_info")).scalar() == \
            SCHEMA_VERSION
        conn.execute(sa.text("UPDATE schema_info SET version = 99"))
        conn.commit()
    store.close()
    with pytest.raises(RuntimeError, match="v99, newer than this ahmount"):
        MetadataStore(url)


def test_a_v5_hub_upgrades_and_its_replicas_share_the_read_grant_key(tmp_path: Path) -> None:
    """Schema v6 adds the settings table; the key read grants are signed with is made on
    first use and kept there, so a grant one replica issued checks on another."""
    from ahmount.hub.blobs import LocalBlobStore
    from ahmount.hub.metadata import MetadataStore
    from ahmount.hub.migrations import SCHEMA_VERSION

    url = older_database(tmp_path / "v5.db", 5, "DROP TABLE settings")
    first, second = MetadataStore(url), MetadataStore(url)
    with first.read() as tx:
        assert tx.setting("read_grant_key") is None
    blobs = LocalBlobStore(tmp_path / "blobs")
    data = b"shared bytes"
    sha = hashlib.sha256(data).hexdigest()
    one, other = HubService(first, blobs), HubService(second, blobs)
    grant = granted_object(one, data)
    blob = other.open_granted_blob(sha, grant.user, str(grant.expires), grant.signature)
    assert b"".join(blob.read(0, blob.size)) == data
    with second.read() as tx:
        assert len(bytes.fromhex(tx.setting("read_grant_key") or "")) == 32
        assert tx._c.execute(sa.text("SELECT version FROM schema_info")).scalar() == \
            SCHEMA_VERSION
    first.close()
    second.close()


def test_a_v6_hub_upgrades_and_answers_repeated_commits(tmp_path: Path) -> None:
    """Schema v7 adds the table of commit requests' answers."""
    from ahmount.hub.blobs import LocalBlobStore
    from ahmount.hub.metadata import MetadataStore

    store = MetadataStore(older_database(tmp_path / "v6.db", 6, "DROP TABLE commit_requests"))
    service = HubService(store, LocalBlobStore(tmp_path / "blobs"))
    alice = service.ensure_user("alice")
    folder = FolderAddr("alice", "model", "m")
    service.create_folder(alice, folder)
    addr = AssetAddr(folder, "a")
    service.create_asset(alice, addr)
    once = {"adds": [obj(service, alice, "f", b"f")], "idempotency_key": "r"}
    made = service.commit(alice, addr, "main", "m", **once)
    assert made is not None and service.commit(alice, addr, "main", "m", **once) == made
    assert len(service.log(alice, addr, "main")) == 2
    store.close()


def test_an_idempotency_key_past_its_keeping_is_a_new_request(
        service: HubService, alice: Actor, model: AssetAddr,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ahmount.hub import metadata
    from ahmount.hub import service as service_module

    made = service.commit(alice, model, "main", "m", adds=[obj(service, alice, "f", b"1")],
                          idempotency_key="r")
    monkeypatch.setattr(metadata, "REQUESTS_KEPT", -1.0)  # every answer is past it
    again = service.commit(alice, model, "main", "m", adds=[obj(service, alice, "f", b"2")],
                           idempotency_key="r")
    assert again is not None and again != made
    assert len(service.log(alice, model, "main")) == 3
    # gc drops every asset's answers past their keeping (here: the one just kept).
    monkeypatch.setattr(service_module, "REQUESTS_KEPT", -1.0)
    assert service.gc()["commit_requests"] == 1
    assert service.gc()["commit_requests"] == 0


def test_a_blob_is_no_capability(service: HubService, alice: Actor, bob: Actor,
                                 model: AssetAddr) -> None:
    """Knowing a sha256 gives nothing: a commit may name a blob only if the caller sent its
    bytes or can read an object of it, and the answers of the blob calls reveal nothing of
    blobs the caller cannot read."""
    secret = b"alice's private weights"
    service.commit(alice, model, "main", "private", adds=[obj(service, alice, "w.pt", secret)])
    sha = hashlib.sha256(secret).hexdigest()
    bobs = FolderAddr("bob", "model", "mine")
    service.create_folder(bob, bobs)
    stolen = AssetAddr(bobs, "stolen")
    service.create_asset(bob, stolen)
    never = hashlib.sha256(b"never uploaded").hexdigest()
    # The same answers for alice's blob as for one nobody has, at any claimed size.
    for claimed in (sha, never):
        for size in (len(secret), 1):
            with pytest.raises(InvalidArgument, match="was never uploaded"):
                service.commit(bob, stolen, "main", "x",
                               adds=[{"path": "stolen", "sha256": claimed, "size": size}])
            with pytest.raises(InvalidArgument, match="was never uploaded"):
                service.stage(bob, stolen, "main", "s1",
                              adds=[{"path": "stolen", "sha256": claimed, "size": size}])
    assert service.missing_blobs(bob, [sha, never]) == sorted([sha, never])
    assert service.start_upload(bob, sha, len(secret))[0] is not None
    assert paths(service, bob, stolen, "main") == []
    # Sending the bytes is the proof: then the commit needs no upload of them again.
    send_blob(service, bob, sha, [secret], len(secret))
    assert service.missing_blobs(bob, [sha]) == []
    assert service.commit(bob, stolen, "main", "mine too",
                          adds=[{"path": "w.pt", "sha256": sha, "size": len(secret)}])
    # Reading is proof too, for as long as it lasts: shared with carol, her copy is free.
    carol = service.ensure_user("carol")
    assert service.missing_blobs(carol, [sha]) == [sha]
    service.share_folder(alice, model.folder, "carol", "view")
    assert service.missing_blobs(carol, [sha]) == []
    assert service.start_upload(carol, sha, len(secret)) == (None, len(secret))
    hers = FolderAddr("carol", "model", "copies")
    service.create_folder(carol, hers)
    service.create_asset(carol, AssetAddr(hers, "c"))
    service.commit(carol, AssetAddr(hers, "c"), "main", "copy",
                   adds=[{"path": "w.pt", "sha256": sha, "size": len(secret)}])
    # The owner's own re-commit of unchanged bytes costs nothing.
    assert service.missing_blobs(alice, [sha]) == []


def test_losing_access_takes_the_key_away(service: HubService, alice: Actor, bob: Actor,
                                          model: AssetAddr) -> None:
    secret = b"shared for a while"
    service.commit(alice, model, "main", "s", adds=[obj(service, alice, "s.bin", secret)])
    sha = hashlib.sha256(secret).hexdigest()
    service.share_folder(alice, model.folder, "bob", "view")
    assert service.missing_blobs(bob, [sha]) == []
    service.share_folder(alice, model.folder, "bob", None)
    assert service.missing_blobs(bob, [sha]) == [sha]
    bobs = FolderAddr("bob", "model", "later")
    service.create_folder(bob, bobs)
    service.create_asset(bob, AssetAddr(bobs, "x"))
    with pytest.raises(InvalidArgument, match="was never uploaded"):
        service.commit(bob, AssetAddr(bobs, "x"), "main", "x",
                       adds=[{"path": "s.bin", "sha256": sha, "size": len(secret)}])


def test_a_hub_from_before_blob_grants_indexes_its_commits(tmp_path: Path) -> None:
    from ahmount.hub.open import open_hub

    with open_hub(tmp_path / "hub") as svc:
        owner = svc.ensure_user("alice")
        folder = FolderAddr("alice", "model", "llm")
        svc.create_folder(owner, folder)
        addr = AssetAddr(folder, "gpt2")
        svc.create_asset(owner, addr)
        data = b"committed before the upgrade"
        svc.commit(owner, addr, "main", "old", adds=[obj(svc, owner, "a.bin", data)])
        with svc.metadata.write() as tx:  # what a v2 hub had: no index, no grants
            tx._c.execute(sa.text("DELETE FROM blob_assets"))
            tx._c.execute(sa.text("DELETE FROM blob_grants"))
    with open_hub(tmp_path / "hub") as svc:
        owner = svc.ensure_user("alice")
        assert svc.missing_blobs(owner, [hashlib.sha256(data).hexdigest()]) == []


def test_the_hub_data_directory_is_private(tmp_path: Path) -> None:
    import stat as stat_module

    from ahmount.hub.open import open_hub

    with open_hub(tmp_path / "hub") as svc:
        owner = svc.ensure_user("alice")
        put(svc, owner, b"private bytes")
        sha = hashlib.sha256(b"private bytes").hexdigest()
    modes = {p.relative_to(tmp_path).as_posix(): stat_module.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "hub", tmp_path / "hub/meta.db",
                       *(tmp_path / "hub").rglob(sha)]}
    assert modes["hub"] == 0o700 and modes["hub/meta.db"] == 0o600
    blob_modes = [m for path, m in modes.items() if path.endswith(sha)]
    assert blob_modes and all(m & 0o077 == 0 for m in blob_modes)


def test_listings_do_not_tell_which_users_exist(service: HubService, alice: Actor,
                                                bob: Actor) -> None:
    assert service.list_folders(alice, "bob", "model") == []
    assert service.list_folders(alice, "nosuchuser", "model") == []


def test_editors_write_contents_only_the_owner_the_folder(service: HubService, alice: Actor,
                                                         bob: Actor, model: AssetAddr) -> None:
    folder = model.folder
    service.share_folder(alice, folder, "bob", "edit")
    # Editors: assets, branches, tags, objects, and the folder's labels and description.
    service.create_asset(bob, AssetAddr(folder, "bobs"))
    service.create_branch(bob, model, "exp")
    service.commit(bob, model, "main", "by bob", adds=[obj(service, bob, "b", b"b")])
    service.update_folder(bob, folder, labels=["shared"], description="edited by bob")
    # Not the folder itself: no delete, no rename, no sharing.
    with pytest.raises(PermissionDenied, match="administer"):
        service.delete_folder(bob, folder)
    with pytest.raises(PermissionDenied, match="administer"):
        service.update_folder(bob, folder, name="taken")
    with pytest.raises(PermissionDenied):
        service.share_folder(bob, folder, "carol", "view")
    with pytest.raises(PermissionDenied):
        service.set_public(bob, folder, True)
    assert service.get_folder(alice, folder).description == "edited by bob"
    service.update_folder(alice, folder, name="renamed")


@pytest.mark.parametrize("labels", ["abc", {"a": 1}, ["x\udc80"], ["bad\nlabel"]])
def test_bad_labels_are_refused_and_not_stored(service: HubService, alice: Actor,
                                               labels: object) -> None:
    folder = FolderAddr("alice", "model", "labelled")
    with pytest.raises(InvalidArgument, match="label"):
        service.create_folder(alice, folder, labels)  # type: ignore[arg-type]
    assert service.list_folders(alice, "alice", "model") == []


def test_abandoned_uploads_expire_and_are_capped(service: HubService, alice: Actor,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ahmount.hub.service as module

    monkeypatch.setattr(module, "MAX_OPEN_UPLOADS", 3)
    ids = [service.start_upload(alice, f"{i:064x}", 10)[0] for i in range(3)]
    with pytest.raises(Conflict, match="3 unfinished uploads"):
        service.start_upload(alice, "f" * 64, 10)
    service.append_upload(alice, str(ids[0]), 0, b"12345")  # alive: keeps its place
    with service.metadata.write() as tx:  # the other two were left a day and more ago
        for upload_id in ids[1:]:
            tx._c.execute(sa.text("UPDATE uploads SET touched = 0 WHERE id = :i"),
                          {"i": upload_id})
    assert service.start_upload(alice, "f" * 64, 10)[0] is not None
    assert service.upload_status(alice, str(ids[0]))[2] == 5
    with pytest.raises(NotFound):
        service.upload_status(alice, str(ids[1]))
    with service.metadata.write() as tx:
        tx._c.execute(sa.text("UPDATE uploads SET touched = 0"))
    assert service.gc(grace_seconds=0)["uploads"] == 2
    with service.metadata.read() as tx:
        assert tx.uploads_all() == []


def test_commits_to_one_branch_take_turns_in_one_process() -> None:
    import threading

    from ahmount.hub.service import KeyedLocks

    locks = KeyedLocks()
    inside: list[int] = []
    most = [0]

    def work() -> None:
        with locks.hold("asset:main"):
            inside.append(1)
            most[0] = max(most[0], len(inside))
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and locks._locks == {}  # one at a time, nothing left behind


def test_small_objects_are_read_together_in_order(service: HubService, alice: Actor,
                                                   dataset: AssetAddr) -> None:
    """A batch's objects come back whole and in order from either store, past the number a
    local store opens at once, empty ones included; a blob gone from the store is NotFound."""
    from ahmount.hub.blobs import READ_TOGETHER
    from ahmount.hub.service import ReadableObject

    contents = [b"", *(os.urandom(100 + i) for i in range(READ_TOGETHER + 6))]
    service.commit(alice, dataset, "main", "many", adds=[
        obj(service, alice, f"d/{i:03d}.bin", data) for i, data in enumerate(contents)])
    wanted = [f"d/{i:03d}.bin" for i in reversed(range(len(contents)))]
    _, objects = service.open_objects(alice, dataset, "main", wanted)
    assert ReadableObject.read_all(objects) == list(reversed(contents))
    assert ReadableObject.read_all([]) == []
    service.blobs.delete(objects[0].entry.sha256)
    with pytest.raises(NotFound, match=objects[0].entry.sha256):
        ReadableObject.read_all(objects)
