"""Scope and resource containment (RFC 6749 §3.3, RFC 8707), by property."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from provider.scopes import normalize_resource, parse_scope, resource_covers

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_~", min_size=1, max_size=8)
paths = st.lists(segment, min_size=0, max_size=5).map(lambda s: "/" + "/".join(s))
hosts = st.sampled_from(["api.example", "API.example", "other.example"])


@given(host=hosts, path=paths)
def test_a_resource_covers_itself(host, path):
    uri = f"https://{host}{path}"
    assert resource_covers(uri, uri)


@given(host=hosts, outer=paths, inner=paths)
def test_cover_means_whole_segment_prefix(host, outer, inner):
    granted, requested = f"https://{host}{outer}", f"https://{host}{inner}"
    outer_segments = [s for s in outer.split("/") if s]
    inner_segments = [s for s in inner.split("/") if s]
    expected = inner_segments[: len(outer_segments)] == outer_segments
    assert resource_covers(granted, requested) == expected


@given(path=paths, trick=st.sampled_from(["/..", "/.", "/%2e%2e", "/%2F", "/%5c", "//", "?q", "#f",
                                          "/%00", "\\x"]))
def test_ambiguous_resources_are_refused_not_rewritten(path, trick):
    uri = f"https://api.example{path}{trick}/more"
    assert normalize_resource(uri) is None
    assert not resource_covers("https://api.example/", uri)


@given(st.lists(st.text(alphabet="abc:._-", min_size=1, max_size=5), min_size=1, max_size=6))
def test_scope_parsing_keeps_order_and_drops_duplicates(tokens):
    parsed = parse_scope(" ".join(tokens))
    assert parsed == tuple(dict.fromkeys(tokens))


def test_scope_with_forbidden_characters_is_malformed():
    for bad in ['a"b', "a\\b", "a  b", " a", "a ", "é"]:
        assert parse_scope(bad) is None
