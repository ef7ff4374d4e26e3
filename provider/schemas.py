"""Request schemas (marshmallow), one per request shape; used only at the edges.

RFC 6749 §3.2: the server MUST ignore unrecognized request parameters, so every schema excludes
unknown fields. :func:`load` is the one place a ``ValidationError`` becomes ``invalid_request``.

The form requests of the token, introspection and revocation endpoints are only strings and
lists of strings with bounded lengths. For such a schema, :class:`Request` derives from its
fields a plain check (``plain_load``) that loads a valid request without marshmallow's
general machinery: 6 µs of a client-credentials request's CPU and 17 µs of an exchange's, for
rules that are a few comparisons. It accepts only what marshmallow accepts and returns what it
returns (a property test holds the two to that); anything else, a refusal included, goes to
marshmallow, which says what is wrong. A schema with any other field, validator or option is
left to marshmallow entirely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, missing, validate

from provider.errors import InvalidRequest

_TOKEN = validate.Length(min=1, max=16384)
_SHORT = validate.Length(min=1, max=1024)
_VALUES = validate.Length(max=32)


class Request(Schema):
    """A form request (``application/x-www-form-urlencoded``, parsed by
    :mod:`provider.views.forms` into strings and lists of strings)."""

    class Meta:
        unknown = EXCLUDE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plain_load = _plain_loader(self)


class ClientCredentialsRequest(Request):
    """RFC 6749 §4.4.2, with RFC 8707 ``resource`` and an ``audience`` as in RFC 8693."""

    scope = fields.String(validate=_SHORT)
    audience = fields.List(fields.String(validate=_SHORT), validate=_VALUES)
    resource = fields.List(fields.String(validate=_SHORT), validate=_VALUES)


class TokenExchangeRequest(ClientCredentialsRequest):
    """RFC 8693 §2.1."""

    subject_token = fields.String(required=True, validate=_TOKEN)
    subject_token_type = fields.String(required=True, validate=_SHORT)
    actor_token = fields.String(validate=_TOKEN)
    actor_token_type = fields.String(validate=_SHORT)
    requested_token_type = fields.String(validate=_SHORT)


class RefreshTokenRequest(Request):
    """RFC 6749 §6."""

    refresh_token = fields.String(required=True, validate=_TOKEN)
    scope = fields.String(validate=_SHORT)


class AuthorizationCodeRequest(Request):
    """RFC 6749 §4.1.3 with RFC 7636 §4.5 (PKCE is required)."""

    code = fields.String(required=True, validate=_SHORT)
    redirect_uri = fields.String(required=True, validate=_SHORT)
    code_verifier = fields.String(required=True, validate=_SHORT)


_SUBJECT = validate.Regexp(r"^[\x21-\x7e]{1,255}$", error="1 to 255 printable ASCII characters")


class ConnectRequest(Request):
    """``POST /connect/{upstream}``: the back-channel start of the connect flow."""

    subject = fields.String(required=True, validate=_SUBJECT)
    redirect_uri = fields.String(required=True, validate=_SHORT)
    state = fields.String(validate=_SHORT)
    code_challenge = fields.String(required=True, validate=_SHORT)
    code_challenge_method = fields.String(required=True, validate=_SHORT)
    scope = fields.String(validate=_SHORT)


class DepositRequest(Schema):
    """``POST /connections`` (JSON). Unknown fields are refused: a typo must not silently drop
    a credential's refresh token."""

    class Meta:
        unknown = RAISE

    subject = fields.String(required=True, validate=_SUBJECT)
    upstream = fields.String(required=True, validate=_SHORT)
    access_token = fields.String(required=True, validate=_TOKEN)
    refresh_token = fields.String(validate=_TOKEN)
    expires_in = fields.Integer(strict=True, validate=validate.Range(min=1, max=31536000))
    scope = fields.String(validate=_SHORT)
    allowed_ips = fields.List(fields.String(validate=_SHORT), validate=_VALUES)


class TokenRequest(Request):
    """RFC 7662 §2.1 and RFC 7009 §2.1 share these two parameters. A token of any length is
    answered as a token (inactive, or nothing to revoke); the body bound limits it."""

    token = fields.String(required=True, validate=validate.Length(min=1))
    token_type_hint = fields.String(validate=_SHORT)


def load(schema: Schema, params: dict[str, Any]) -> dict[str, Any]:
    plain_load = getattr(schema, "plain_load", None)
    if plain_load is not None and (loaded := plain_load(params)) is not None:
        return loaded
    try:
        return schema.load(params)
    except ValidationError as error:
        field, messages = next(iter(sorted(error.normalized_messages().items())))
        # An unknown field's name is the sender's text: never reflected. (``_schema`` holds
        # what a schema-wide validator says.)
        if field not in schema.load_fields and field != "_schema":
            raise InvalidRequest("a field is not one of this request's") from None
        message = messages[0] if isinstance(messages, list) else messages
        if isinstance(message, dict):
            message = next(iter(message.values()))
        if isinstance(message, list):
            message = message[0]
        raise InvalidRequest(f"{field}: {str(message).rstrip('.').lower()}") from None


# The plain check -------------------------------------------------------------------------------

# A field's rule: (name, required, shortest, longest, item bounds): a string of a length in
# [shortest, longest], or with item bounds (shortest, longest), a list of such strings whose
# number is in [shortest, longest].
_Bounds = tuple[int, float]
_Rule = tuple[str, bool, int, float, _Bounds | None]


def _plain_loader(schema: Schema) -> Callable[[Any], dict[str, Any] | None] | None:
    """The plain check of ``schema``'s rules, or None if they are not all plain ones."""
    # ``_hooks``: the schema's pre/post-load and validation methods, which marshmallow must run.
    # A private attribute: a marshmallow without it gets no plain check, rather than an error.
    hooks = getattr(schema, "_hooks", None)
    if schema.partial or not isinstance(hooks, dict) or any(hooks.values()):
        return None
    rules: list[_Rule] = []
    for name, field in schema.load_fields.items():
        if (field.data_key not in (None, name) or field.attribute not in (None, name)
                or field.load_default is not missing):
            return None
        if type(field) is fields.List:
            bounds, items = _length_bounds(field.validators), _string_bounds(field.inner)
            if items is None:
                return None
        else:
            bounds, items = _string_bounds(field), None
        if bounds is None:
            return None
        rules.append((name, field.required, *bounds, items))
    return _loader(tuple(rules))


def _string_bounds(field: fields.Field) -> _Bounds | None:
    if type(field) is not fields.String:
        return None
    return _length_bounds(field.validators)


def _length_bounds(validators: list[Any]) -> _Bounds | None:
    """The bounds that ``validators`` set together, if they are only ``Length`` ones."""
    shortest, longest = 0, math.inf
    for validator in validators:
        if type(validator) is not validate.Length or validator.equal is not None:
            return None
        shortest = max(shortest, validator.min or 0)
        longest = min(longest, math.inf if validator.max is None else validator.max)
    return shortest, longest


def _loader(rules: tuple[_Rule, ...]) -> Callable[[Any], dict[str, Any] | None]:
    def plain_load(params: Any) -> dict[str, Any] | None:
        """What marshmallow would load from ``params``, or None to ask it."""
        if type(params) is not dict:
            return None
        loaded: dict[str, Any] = {}
        for name, required, shortest, longest, items in rules:
            value = params.get(name, missing)
            if value is missing:
                if required:
                    return None
            elif items is None:
                if type(value) is not str or not shortest <= len(value) <= longest:
                    return None
                loaded[name] = value
            else:
                low, high = items
                if (type(value) is not list or not shortest <= len(value) <= longest
                        or not all(type(v) is str and low <= len(v) <= high for v in value)):
                    return None
                loaded[name] = list(value)
        return loaded

    return plain_load
