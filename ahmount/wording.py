"""How counts and sizes read in messages and tables: ``1 file``, ``3 files``, ``4.8 MiB``."""

from __future__ import annotations


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 file``, ``2 files`` (``words``: an irregular plural, ``entries``)."""
    return f"{count} {word if count == 1 else words or word + 's'}"


def human_size(n: int) -> str:
    """``512 B``, ``3.2 MiB``: human-readable bytes."""
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"
