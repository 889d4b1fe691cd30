"""The ``ah://`` grammar: examples, bad input named, and properties over generated URLs
(print and parse are inverse; the API path round-trips; children stay in the grammar)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ahmount.ahfs import urls
from ahmount.ahfs.urls import AhUrl
from ahmount.errors import InvalidArgument

NAME = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
USER = NAME.filter(lambda n: n not in ("shared", "public", "model", "dataset"))
SEGMENT = NAME
REF = st.one_of(NAME, st.from_regex(r"[0-9a-f]{4,64}", fullmatch=True))


@st.composite
def ah_urls(draw: st.DrawFn) -> AhUrl:
    owner = draw(st.one_of(st.none(), USER))
    depth = draw(st.integers(0 if owner else 1, 4))
    if depth == 0:
        return AhUrl(owner)
    kind = draw(st.sampled_from(urls.KINDS))
    if depth == 1:
        return AhUrl(owner, kind)
    folder = draw(NAME)
    if depth == 2:
        return AhUrl(owner, kind, folder)
    asset = draw(NAME)
    ref = draw(st.one_of(st.none(), REF))
    path = "/".join(draw(st.lists(SEGMENT, max_size=4))) if depth == 4 else ""
    return AhUrl(owner, kind, folder, asset, ref, path)


def test_examples() -> None:
    own = urls.parse("ah://model/llm/gpt2@v1/config.json")
    assert own == AhUrl(None, "model", "llm", "gpt2", "v1", "config.json")
    assert own.api_path("alice") == ("/alice/t9k-assethub/model/llm/gpt2:v1", "config.json")
    assert own.api_path() == ("model/llm/gpt2:v1", "config.json")
    other = urls.parse("ah://alice/dataset/images/coco@main/train/0001.jpg")
    assert (other.owner, other.kind, other.ref, other.path) == ("alice", "dataset", "main",
                                                                "train/0001.jpg")
    assert urls.parse("ah://model/llm/gpt2").ref_or_default == "main"
    assert urls.parse("ah://").level == "root" and urls.parse("alice").level == "owner"
    assert urls.parse("ah://model/llm/gpt2@0a1b2c3d").ref == "0a1b2c3d"
    assert urls.from_api_path("/alice/t9k-assethub/model/llm/gpt2:v1", "a/b", me="bob") == \
        AhUrl("alice", "model", "llm", "gpt2", "v1", "a/b")
    assert urls.from_api_path("/bob/t9k-assethub/model/llm", me="bob") == \
        AhUrl(None, "model", "llm")


@pytest.mark.parametrize(("url", "names"), [
    ("ah://model/bad name", "folder name 'bad name'"),
    ("ah://model/llm/gpt2@", "reference name is empty"),
    ("ah://model/llm/gpt2@a@b", "reference name 'a@b'"),
    ("ah://model//x", "empty, '.' and '..' segments"),
    ("ah://model/llm/gpt2/../x", "'..'"),
    ("ah://shared/model", "user name 'shared' is reserved"),
    ("ah://alice/weights", "kind 'weights'"),
    ("ah://model/llm/gpt2/a\x00b", "ah://model/llm/gpt2"),
])
def test_bad_urls_name_what_is_wrong(url: str, names: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        urls.parse(url)
    assert names in str(info.value)


def test_not_a_string() -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        urls.parse(3)


@given(ah_urls())
def test_print_and_parse_are_inverse(url: AhUrl) -> None:
    assert urls.parse(f"ah://{url}") == url
    assert urls.parse(str(url)) == url
    assert urls.parse(f"ah://{url}/") == url


@given(ah_urls(), USER)
def test_api_path_round_trip(url: AhUrl, me: str) -> None:
    if url.kind is None:
        return
    api, path = url.api_path(me)
    back = urls.from_api_path(api, path, me=me)
    expected = url if url.owner != me else AhUrl(None, url.kind, url.folder, url.asset,
                                                  url.ref, url.path)
    assert back == expected


@given(ah_urls(), NAME)
def test_children_stay_in_the_grammar(url: AhUrl, name: str) -> None:
    if url.level == "root" or (url.level == "owner"):
        name = "model"
    child = url.child(name)
    assert urls.parse(str(child)) == child
    assert str(child).rpartition("/")[2].split("@")[0] == name or child.path.endswith(name)
