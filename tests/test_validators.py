"""Validators of everything stored and shown again (hypothesis): what they accept can be
encoded, printed on one line (or as text) and sent in a header; what they refuse raises
InvalidArgument naming the value's role, never anything else."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahmount.errors import InvalidArgument
from ahmount.names import (
    MAX_OBJECT_PATH_BYTES,
    check_content_type,
    check_mtime,
    check_object_path,
    check_size,
    check_text,
)

CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]}


@given(st.text())
def test_text_accepts_exactly_printable_utf8(value: str) -> None:
    try:
        checked = check_text(value, "label")
    except InvalidArgument as exc:
        assert "label" in str(exc)
        assert set(value) & CONTROL or len(value) > 65536
        return
    assert checked == value and not set(value) & CONTROL
    json.dumps(value).encode()  # listings can always serialise it


@given(st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                      categories=["Cs"]), min_size=1))
def test_lone_surrogates_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        check_text("x" + value, "description", multiline=True)


def test_multiline_text_keeps_newlines_and_tabs() -> None:
    assert check_text("line 1\n\tline 2", "commit message", multiline=True)
    with pytest.raises(InvalidArgument, match="control character"):
        check_text("line 1\r\nline 2", "commit message", multiline=True)
    with pytest.raises(InvalidArgument, match="control character"):
        check_text("bold \x1b[1m", "commit message", multiline=True)


@given(st.text(max_size=80))
def test_content_types_are_safe_in_a_header(value: str) -> None:
    try:
        checked = check_content_type(value, "object 'a'")
    except InvalidArgument as exc:
        assert "content_type" in str(exc)
        return
    assert "/" in checked and all(" " <= c <= "~" for c in checked)


@pytest.mark.parametrize("value", ["text/plain\r\nX-Evil: 1", "plain", "", "a/b\n"])
def test_bad_content_types(value: str) -> None:
    with pytest.raises(InvalidArgument):
        check_content_type(value, "object 'a'")


@given(st.one_of(st.floats(), st.integers(), st.booleans(), st.none(), st.text()))
def test_mtimes_are_finite_times(value: object) -> None:
    try:
        mtime = check_mtime(value, "object 'a'")
    except InvalidArgument as exc:
        assert "mtime" in str(exc)
        return
    assert math.isfinite(mtime) and not isinstance(value, bool)


@given(st.integers())
def test_sizes_are_bounded(value: int) -> None:
    try:
        assert check_size(value, "blob") == value
    except InvalidArgument:
        assert value < 0 or value > 1 << 50


@given(st.text(min_size=1, max_size=300))
def test_object_paths_hold_no_control_characters(value: str) -> None:
    try:
        checked = check_object_path(value)
    except InvalidArgument as exc:
        assert "object path" in str(exc)
        return
    assert not set(checked) & CONTROL
    assert len(checked.encode()) <= MAX_OBJECT_PATH_BYTES
    assert not checked.startswith("/") and ".." not in checked.split("/")


def test_listings_escape_what_a_terminal_would_run() -> None:
    from ahmount.cli.tables import render

    table = render(["PATH"], [["evil\x1b]0;owned\x07\rname\n"]])
    assert "\x1b" not in table and "\r" not in table and "\x07" not in table
    assert "evil\\x1b]0;owned\\x07\\x0dname\\x0a" in table


def test_exit_codes_tell_bad_input_from_corruption_and_bugs() -> None:
    from ahmount import errors
    from ahmount.exit_codes import exit_code

    assert exit_code(errors.InvalidArgument("bad")) == 2
    assert exit_code(errors.TooLarge("big")) == 2
    assert exit_code(errors.ChecksumMismatch("rotten")) == 1
    assert exit_code(ValueError("a bug, not the user's input")) == 1
    assert exit_code(errors.Conflict("held")) == 6
    assert exit_code(errors.HubUnavailable("down")) == 7
    assert exit_code(OSError(5, "disk")) == 8
    assert exit_code(errors.StorageFull("the hub's disk")) == 9
