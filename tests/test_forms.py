"""Form bodies (RFC 6749 Appendix B) are decoded exactly as ``urllib.parse.parse_qsl`` does."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider.views import forms
from provider.views.forms import MAX_FIELDS, decode_pairs


def _reference(text: str):
    try:
        return parse_qsl(text, keep_blank_values=False, strict_parsing=False, encoding="utf-8",
                         errors="strict", max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        return "not UTF-8"
    except ValueError:
        return "too many"


def _ours(text: str):
    try:
        return decode_pairs(text)
    except UnicodeDecodeError:
        return "not UTF-8"
    except ValueError:
        return "too many"


# Pieces a body is made of: separators, escapes (valid, invalid, cut short, non-UTF-8), plus
# signs, the parameters we read, and anything else.
pieces = st.one_of(
    st.sampled_from(["&", "=", "+", "%", "%2", "%3A", "%3a", "%2B", "%26", "%3D", "%25", "%ff",
                     "%C3%A9", "%C3", "%E2%82%AC", "%00", "%zz", "grant_type", "scope",
                     "client_credentials", "urn%3Aietf%3Aparams%3Aoauth", ";", " ", "é"]),
    st.text(max_size=6),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(pieces, max_size=40).map("".join))
def test_a_body_decodes_as_parse_qsl_decodes_it(text):
    assert _ours(text) == _reference(text)


@given(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=8))
def test_encoded_pairs_come_back_as_they_were_sent(pairs):
    text = "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in pairs)
    assert _ours(text) == _reference(text)


@pytest.mark.parametrize("fields", [MAX_FIELDS - 1, MAX_FIELDS, MAX_FIELDS + 1, 1000])
def test_the_number_of_fields_is_bounded_as_parse_qsl_bounds_it(fields):
    text = "&".join(f"x{i}=1" for i in range(fields))
    assert _ours(text) == _reference(text)


@pytest.mark.parametrize("value", ["%C3%A9%26%3D%2B+a" * 5000, "a+b" * 200, "a" * 300 + "%ff"])
def test_a_long_value_is_decoded_as_a_short_one(value):
    assert _ours("v=" + value) == _reference("v=" + value)


def test_only_values_that_name_types_scopes_and_targets_are_remembered():
    """A credential sent in the body (client_secret_post, a token to revoke, a code) is never
    kept in the decoder's memory, whatever its escapes."""
    forms._remembered.cache_clear()
    pairs = decode_pairs("client_secret=s%2Bcret&token=t%2Bken&code=c%2Bde&refresh_token=r%2Bt"
                         "&scope=files%3Aread&grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type"
                         "%3Atoken-exchange")
    assert dict(pairs)["client_secret"] == "s+cret"
    assert forms._remembered.cache_info().currsize == 2  # the scope and the grant type
