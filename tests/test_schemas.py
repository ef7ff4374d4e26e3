"""Request schemas: the plain check of a form request decides exactly as marshmallow does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError, fields, pre_load, validate

from provider.errors import InvalidRequest
from provider.schemas import (
    AuthorizationCodeRequest,
    ClientCredentialsRequest,
    ConnectRequest,
    DepositRequest,
    RefreshTokenRequest,
    Request,
    TokenExchangeRequest,
    TokenRequest,
    load,
)

FORM_SCHEMAS = [ClientCredentialsRequest(), TokenExchangeRequest(), TokenRequest(),
                RefreshTokenRequest(), AuthorizationCodeRequest()]


def _marshmallow(schema, params):
    """What marshmallow alone makes of ``params``: ("ok", loaded) or ("refused", None)."""
    try:
        return "ok", schema.load(params)
    except ValidationError:
        return "refused", None


def _ours(schema, params):
    try:
        return "ok", load(schema, params)
    except InvalidRequest:
        return "refused", None


@pytest.mark.parametrize("schema", FORM_SCHEMAS, ids=lambda s: type(s).__name__)
def test_form_schemas_are_checked_without_marshmallows_machinery(schema):
    assert schema.plain_load is not None


def test_a_schema_with_other_rules_is_left_to_marshmallow():
    assert ConnectRequest().plain_load is None  # a Regexp validator

    class WithInteger(Request):
        count = fields.Integer()

    class WithDefault(Request):
        scope = fields.String(load_default="openid")

    class WithDataKey(Request):
        scope = fields.String(data_key="scp")

    class WithExactLength(Request):
        code = fields.String(validate=validate.Length(equal=8))

    class WithAttribute(Request):
        scope = fields.String(attribute="scopes")

    class WithHook(Request):
        scope = fields.String()

        @pre_load
        def lower(self, data, **kwargs):
            return {name: value.lower() for name, value in data.items()}

    for schema in (WithInteger(), WithDefault(), WithDataKey(), WithExactLength(),
                   WithAttribute(), WithHook(), ClientCredentialsRequest(partial=True)):
        assert schema.plain_load is None


@pytest.mark.parametrize("schema", FORM_SCHEMAS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("params", [None, [], ["token"], "token=x"])
def test_a_request_that_is_not_a_mapping_is_refused_as_marshmallow_refuses_it(schema, params):
    assert _ours(schema, params) == _marshmallow(schema, params) == ("refused", None)


# Strings around the bounds the schemas set (1 to 1024, 1 to 16384 characters), and others.
strings = st.one_of(st.sampled_from(["", "a", "é", "a" * 1024, "a" * 1025, "a" * 16384,
                                     "a" * 16385]),
                    st.text(max_size=8))
values = st.one_of(
    strings,
    st.lists(strings, max_size=34),
    st.sampled_from([None, b"bytes", 5, 1.5, True, {"a": "b"}, ["a", None], ["a", 5], ("a",)]),
)
NAMES = sorted({name for schema in FORM_SCHEMAS for name in schema.load_fields}
               | {"grant_type", "client_id", "unknown"})


@settings(max_examples=400, deadline=None)
@given(schema=st.sampled_from(FORM_SCHEMAS),
       params=st.dictionaries(st.sampled_from(NAMES), values, max_size=6))
def test_load_accepts_and_refuses_exactly_what_marshmallow_does(schema, params):
    assert _ours(schema, params) == _marshmallow(schema, params)


@pytest.mark.parametrize("params", [
    {"audience": ["a" * 1024, "a" * 1025]}, {"audience": ["a", ""]}, {"resource": ["a", 5]},
    {"resource": ["a", None]}, {"audience": ["a"] * 32, "resource": ["a"] * 33}, {"scope": ["a"]},
])
def test_each_value_of_a_list_is_held_to_the_rules_of_one(params):
    schema = ClientCredentialsRequest()
    assert _ours(schema, params) == _marshmallow(schema, params) == ("refused", None)


@pytest.mark.parametrize("params", [
    {"subject_token": "t", "subject_token_type": "u", "resource": ["https://a.example"] * 32},
    {"subject_token": "t" * 16384, "subject_token_type": "u", "audience": ["a"], "scope": "s"},
    {"subject_token": "t", "subject_token_type": "u", "actor_token": "a", "actor_token_type": "v",
     "requested_token_type": "w", "grant_type": "x", "client_secret": "not a field"},
])
def test_a_valid_exchange_loads_as_marshmallow_loads_it(params):
    schema = TokenExchangeRequest()
    assert schema.plain_load(params) == schema.load(params)


def test_loaded_lists_are_copies():
    params = {"subject_token": "t", "subject_token_type": "u", "resource": ["https://a.example"]}
    loaded = load(TokenExchangeRequest(), params)
    loaded["resource"].append("https://b.example")
    assert params["resource"] == ["https://a.example"]


@pytest.mark.parametrize(("schema", "params", "message"), [
    (TokenRequest(), {}, "token: missing data for required field"),
    (ClientCredentialsRequest(), {"scope": "a" * 1025}, "scope: length must be between 1 and 1024"),
    (ClientCredentialsRequest(), {"audience": ["a"] * 33}, "audience: longer than maximum length 32"),
    (TokenExchangeRequest(), {"subject_token": "t"}, "subject_token_type: missing data for "
                                                     "required field"),
    # An unknown field's name is the sender's text: it is never reflected.
    (DepositRequest(), {"subject": "s", "upstream": "u", "access_token": "a",
                        "\u0019,[\u0018\udadf\udc5b": None}, "a field is not one of this request's"),
    (DepositRequest(), {"subject": "s", "upstream": "u", "access_token": "a",
                        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln": 1},
     "a field is not one of this request's"),
])
def test_a_refusal_names_the_field_and_the_rule(schema, params, message):
    with pytest.raises(InvalidRequest) as refused:
        load(schema, params)
    assert refused.value.description == message
