"""``UPath("ah://...")``: universal-pathlib's path class for ``ah://``, found through its
``universal_pathlib.implementations`` entry point (universal-pathlib itself loads this module,
so nothing here runs unless it is installed and asked for ``ah``).

Our file system is a plain fsspec one whose paths are ``kind/folder/asset/ref/path``
(:mod:`ahmount.ahfs.urls`): universal-pathlib's generic path over fsspec is exactly right
for it, and is what this class is. Registering it says that ``ah://`` paths are tested
(``tests/test_ahfs_formats.py``), so universal-pathlib no longer warns that they may not be.
"""

from __future__ import annotations

import fsspec
from upath import UPath


class AhPath(UPath):
    """A path on the asset hub (``ah://kind/folder/asset/ref/path``)."""

    __slots__ = ()


# universal-pathlib reads a protocol's path rules (root marker, separator) from the fsspec
# class when fsspec has imported it, and warns that it guessed them otherwise. Importing the
# class is what fsspec does at the first ah:// URL; this module is loaded only by
# universal-pathlib resolving "ah", so that is the only time it happens here too.
fsspec.get_filesystem_class("ah")
