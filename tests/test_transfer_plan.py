"""The ``add`` grammar's local side (``ahmount/transfer/plan.py``): what a directory holds
that is not a regular file is refused by name before anything moves; a FIFO held the
upload's read forever (``ah commit -a dir/`` hung), a symbolic link to a directory was
skipped without a word."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ahmount.errors import InvalidArgument
from ahmount.transfer.plan import plan_adds


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    (root / "to-a").symlink_to(root / "a.txt")  # a link to a regular file is its bytes
    return root


def test_a_tree_of_regular_files_and_links_to_them_is_planned(tree: Path) -> None:
    planned = {f.target: f.local for f in plan_adds([str(tree)])}
    assert planned == {"src/a.txt": tree / "a.txt", "src/sub/b.txt": tree / "sub" / "b.txt",
                       "src/to-a": tree / "to-a"}


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _broken_link(path: Path) -> None:
    path.symlink_to(path.parent / "nothing-here")


def _directory_link(path: Path) -> None:
    path.symlink_to(path.parent)


@pytest.mark.parametrize(("make", "said"), [
    (_fifo, "is a FIFO"), (_socket, "is a socket"),
    (_broken_link, "is a symbolic link to nothing"),
    (_directory_link, "is a symbolic link to a directory")])
def test_what_is_not_a_regular_file_is_refused_by_name(tree: Path, make: object,
                                                       said: str) -> None:
    odd = tree / "sub" / "odd"
    make(odd)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=said) as refusal:
        plan_adds([str(tree)])
    assert str(odd) in str(refusal.value)
    if said != "is a symbolic link to a directory":  # named alone, it is its target's
        with pytest.raises(InvalidArgument, match=said):
            plan_adds([str(odd)])


def test_a_device_named_alone_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="is a character device"):
        plan_adds(["/dev/null"])
