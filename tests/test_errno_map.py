"""The errno boundary: every error a FUSE handler meets becomes one errno, and bugs never
escape into pyfuse3.main()."""

from __future__ import annotations

import errno
import logging

import httpx
import pyfuse3
import pytest

from ahmount import errors
from ahmount.mount.errno_map import errno_for, fuse_errors


@pytest.mark.parametrize(
    ("exc", "number"),
    [
        (errors.NotFound("x"), errno.ENOENT),
        (errors.AlreadyExists("x"), errno.EEXIST),
        (errors.PermissionDenied("x"), errno.EACCES),
        (errors.UnknownChanges("x"), errno.EBUSY),
        (errors.Changed("x"), errno.EBUSY),
        (errors.StorageFull("x"), errno.ENOSPC),
        (errors.DirectoryInTheWay("x"), errno.EISDIR),
        (errors.FileInTheWay("x"), errno.ENOTDIR),
        (errors.InvalidArgument("x"), errno.EINVAL),
        (errors.ChecksumMismatch("x"), errno.EIO),
        (errors.HubUnavailable("x"), errno.EIO),
        (httpx.ReadTimeout("x"), errno.EIO),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (RuntimeError("bug"), errno.EIO),
    ],
)
def test_errno_for(exc: BaseException, number: int) -> None:
    assert errno_for(exc) == number


async def test_a_bug_becomes_eio_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    @fuse_errors
    async def lookup() -> None:
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR, "ahmount.mount"), pytest.raises(pyfuse3.FUSEError) as info:
        await lookup()
    assert info.value.errno == errno.EIO
    assert "bug in lookup" in caplog.text and "KeyError" in caplog.text


async def test_domain_errors_keep_their_errno() -> None:
    @fuse_errors
    async def read() -> None:
        raise errors.HubUnavailable("hub is down")

    with pytest.raises(pyfuse3.FUSEError) as info:
        await read()
    assert info.value.errno == errno.EIO

    @fuse_errors
    async def passthrough() -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    with pytest.raises(pyfuse3.FUSEError) as info:
        await passthrough()
    assert info.value.errno == errno.EROFS


def test_the_fuse_free_table_names_pyfuse3s_enoattr() -> None:
    from ahmount.vfs.errno_map import ENOATTR

    assert pyfuse3.ENOATTR == ENOATTR


async def test_a_hub_away_is_told_once_per_object(caplog: pytest.LogCaptureFixture) -> None:
    @fuse_errors
    async def read(path: str) -> None:
        raise errors.HubUnavailable(f"hub at http://h is unreachable: GET /files/{path}")

    with caplog.at_level(logging.WARNING, "ahmount.mount"):
        for path in ("a.bin", "a.bin", "a.bin", "b.bin", "a.bin"):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await read(path)
            assert info.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lines) == 2 and "a.bin" in lines[0] and "b.bin" in lines[1]


async def test_running_out_of_descriptors_says_what_to_raise(
        caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE reaches the program that opened a file through the mount, whose own limit may
    be far from reached: the daemon's log says whose limit it is and how to raise it."""
    @fuse_errors
    async def create() -> None:
        raise OSError(errno.EMFILE, "Too many open files", "queue/files/spare-1")

    with caplog.at_level(logging.WARNING, "ahmount.mount"):
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await create()
            assert info.value.errno == errno.EMFILE
    assert caplog.text.count("the daemon is out of file descriptors (open files limit") == 1
    assert "ulimit -Hn" in caplog.text
