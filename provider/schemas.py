"""Request schemas (marshmallow), one per request shape; used only at the edges.

RFC 6749 §3.2: the server MUST ignore unrecognized request parameters, so every schema excludes
unknown fields. :func:`load` is the one place a ``ValidationError`` becomes ``invalid_request``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from provider.errors import InvalidRequest

_TOKEN = validate.Length(min=1, max=16384)
_SHORT = validate.Length(min=1, max=1024)
_VALUES = validate.Length(max=32)


class Request(Schema):
    class Meta:
        unknown = EXCLUDE


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
    try:
        return schema.load(params)
    except ValidationError as error:
        field, messages = next(iter(sorted(error.normalized_messages().items())))
        message = messages[0] if isinstance(messages, list) else messages
        if isinstance(message, dict):
            message = next(iter(message.values()))
        if isinstance(message, list):
            message = message[0]
        raise InvalidRequest(f"{field}: {str(message).rstrip('.').lower()}") from None
