"""Log lines (logfmt): a value goes bare exactly when it is made of letters, digits and
``-_./:@``, and a quoted one reads back as what was logged, whatever it held. The log file
a signal appends the threads' stacks to is the current one, also after a rotation."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from ahmount.observability import LogFile, LogfmtFormatter, _quote


@given(st.text(max_size=40))
def test_a_value_is_bare_exactly_when_it_needs_no_quotes(value: str) -> None:
    bare = bool(value) and all(c.isalnum() or c in "-_./:@" for c in value)
    quoted = _quote(value)
    assert (quoted == value) == bare
    if not bare:
        assert quoted.startswith('"') and quoted.endswith('"') and "\n" not in quoted


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"),
               max_size=40))
@example("\\n")  # a backslash and an n: found by this test in CI (2026-12-07)
@example('a "b"\\\n')
def test_a_quoted_value_reads_back_whole(value: str) -> None:
    record = logging.LogRecord("ahmount.test", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"path": value}
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    field = line.split(" path=", 1)[1]
    if field.startswith('"'):
        # Double quotes with \\ \" and \n escaped, read left to right (a backslash
        # followed by an n is "\\n", which replacing every "\n" would misread).
        assert field.endswith('"')
        assert re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], field[1:-1],
                      flags=re.DOTALL) == value
    else:
        assert field == value


def test_a_signal_appends_the_stacks_to_the_log_file_current_after_a_rotation(
        tmp_path: Path) -> None:
    path = tmp_path / "ah-mount.log"
    log_file = LogFile(str(path))
    log_file.maxBytes = 300  # rotate after a few lines
    logger = logging.getLogger("ahmount.test.rotation")
    logger.addHandler(log_file)
    logger.propagate = False
    try:
        log_file.dump_stacks_on(signal.SIGUSR1)
        for i in range(20):
            logger.warning("line %d of a log that rotates", i)
        rotated = Path(f"{path}.1")
        assert rotated.exists()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert "Current thread" in path.read_text()
        assert "line 19" in path.read_text()  # the lines go on in the same file
        assert "Current thread" not in rotated.read_text()
    finally:
        logger.removeHandler(log_file)
        log_file.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # given back
