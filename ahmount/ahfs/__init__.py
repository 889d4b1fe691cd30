"""``ah://``: the asset tree as an fsspec file system (pandas, pyarrow, universal-pathlib...).

``fsspec.filesystem("ah")`` and ``ah://`` URLs find :class:`AhFileSystem` through the
``fsspec.specs`` entry point; the URL grammar is :mod:`ahmount.ahfs.urls`.
"""

from ahmount.ahfs.filesystem import AhFileSystem, AhTransaction

__all__ = ["AhFileSystem", "AhTransaction"]
