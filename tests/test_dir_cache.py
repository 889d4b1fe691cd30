"""The bits ``mount/dir_cache.py`` sets in the ``fuse_file_info`` pyfuse3 replies to an
opendir with: only inside an opendir being answered, only in a container whose ``ino`` is
the inode being opened, and exactly ``cache_readdir`` (plus ``keep_cache`` to reuse what the
kernel kept). The kernel's side is tested on a real mount (``test_mount_read.py``)."""

from __future__ import annotations

import ctypes

import pyfuse3

from ahmount.mount import dir_cache


def _bits(container: object) -> int:
    return ctypes.c_uint32.from_address(id(container) + dir_cache._BITS_AT).value


def test_the_installed_pyfuse3_has_the_layout_known() -> None:
    # If this fails, pyfuse3 changed: the mount then keeps no listings (and says so).
    assert dir_cache.known_layout()


def test_nothing_is_set_outside_an_opendir() -> None:
    assert not dir_cache.keep_listing(0, reuse=True)


def test_the_cache_bits_are_set_in_the_opendir_container_of_that_inode() -> None:
    container = pyfuse3._Container()  # type: ignore[attr-defined]  # ino 0, fi zeroed
    with dir_cache.answering(container):
        assert not dir_cache.keep_listing(5, reuse=True)  # another inode: left alone
        assert _bits(container) == 0
        assert dir_cache.keep_listing(0, reuse=False)
        assert _bits(container) == 1 << 6  # cache_readdir
        assert dir_cache.keep_listing(0, reuse=True)
        assert _bits(container) == 1 << 6 | 1 << 2  # and keep_cache
    assert not dir_cache.keep_listing(0, reuse=True)  # the opendir was answered


def test_install_wraps_the_opendir_coroutine_and_uninstall_puts_it_back() -> None:
    original = pyfuse3.fuse_opendir_async  # type: ignore[attr-defined]
    assert dir_cache.install()
    try:
        assert pyfuse3.fuse_opendir_async is not original  # type: ignore[attr-defined]
    finally:
        dir_cache.uninstall()
    assert pyfuse3.fuse_opendir_async is original  # type: ignore[attr-defined]
