"""Moving files between local disk and the hub, shared by the Python API, the CLI and the
vfs: :mod:`plan` (the ``add``/``delete``/``objects`` grammars), :mod:`hashes` (hashing with a
cache of earlier results), :mod:`progress` (terminal progress bars), :mod:`upload` and
:mod:`download` (parallel transfers, small files in batches).
"""
