"""Log lines (logfmt): a value goes bare exactly when it is made of letters, digits and
``-_./:@``, and a quoted one reads back as what was logged, whatever it held."""

from __future__ import annotations

import logging
import shlex

from hypothesis import given
from hypothesis import strategies as st

from ahmount.observability import LogfmtFormatter, _quote


@given(st.text(max_size=40))
def test_a_value_is_bare_exactly_when_it_needs_no_quotes(value: str) -> None:
    bare = bool(value) and all(c.isalnum() or c in "-_./:@" for c in value)
    quoted = _quote(value)
    assert (quoted == value) == bare
    if not bare:
        assert quoted.startswith('"') and quoted.endswith('"') and "\n" not in quoted


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"),
               max_size=40))
def test_a_quoted_value_reads_back_whole(value: str) -> None:
    record = logging.LogRecord("ahmount.test", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"path": value}
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    field = line.split(" path=", 1)[1]
    if field.startswith('"'):
        # The quoting is a shell's double quotes with \\ \" and \n escaped.
        assert shlex.split(field.replace("\\n", "\n"), posix=True) == [value]
    else:
        assert field == value
