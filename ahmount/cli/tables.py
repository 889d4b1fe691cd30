"""Plain-text tables for ``ah`` listings, with the headers SPEC §4 fixes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ahmount.names import CONTROL_CHARACTERS
from ahmount.wording import human_size


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, newlines, carriage
    returns) shown as ``\\xNN`` escapes. The hub refuses them in new names; this covers old
    data and every other string a listing prints."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


#: Commit ids in tables: as many characters as git shows with --abbrev=12 (JSON has them
#: whole).
ID_WIDTH = 12


def date(ts: float) -> str:
    """The one date format of tables and ``ah get``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def table_for(resource: str, level: str, items: list[dict[str, Any]],
              raw_bytes: bool = False) -> str:
    """The table of an ``ah.list`` result: ``resource`` as passed to it, ``level`` of the path
    (kind / folder / asset / ref)."""
    if resource in ("branch", "tag"):
        return render(["NAME", "COMMIT_ID"],
                      [[i["id"], i["commit_id"][:ID_WIDTH]] for i in items])
    if resource == "commit":
        return render(
            ["COMMIT_ID", "MESSAGE", "CREATED"],
            [[i["id"][:ID_WIDTH], i["message"].splitlines()[0] if i["message"] else "",
              date(i["creation_date"])] for i in items],
        )
    if level in ("kind", "folder"):
        return render(
            ["NAME", "PATH", "LABELS", "PERMISSION"],
            [[i["name"], i["path"], ",".join(i["labels"]), i["permission"]] for i in items],
        )
    return render(
        ["PATH", "BYTES", "CHECKSUM", "MODIFIED"],
        [[i["path"], str(i["size_bytes"]) if raw_bytes else human_size(i["size_bytes"]),
          i["checksum"][:16], date(i["mtime"])] for i in items],
    )
