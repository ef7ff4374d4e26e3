"""Token introspection (RFC 7662).

Fails closed: the answer starts as ``{"active": false}`` and becomes active only for a token
that verifies, has not expired, and neither it nor any ancestor is revoked. Why a token is
inactive is never said (RFC 7662 §4; THREATS.md promise 6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from provider.tokens import TokenInvalid, verify_access_token

if TYPE_CHECKING:
    from provider.service import Provider

INACTIVE: dict[str, Any] = {"active": False}
_COPIED_CLAIMS = ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti", "act", "cnf")


def introspect(provider: Provider, token: str) -> dict[str, Any]:
    """RFC 7662 §2.2: the token's state and, if active, its claims."""
    settings = provider.settings
    try:
        claims = verify_access_token(token, provider.keys, settings.issuer,
                                     settings.tokens.leeway)
    except TokenInvalid:
        return dict(INACTIVE)
    if provider.revocations.is_revoked(claims):
        return dict(INACTIVE)
    response: dict[str, Any] = {"active": True}
    response.update((name, claims[name]) for name in _COPIED_CLAIMS if name in claims)
    # RFC 9449 §6.2: a DPoP-bound token is introspected as token_type DPoP.
    cnf = claims.get("cnf")
    response["token_type"] = "DPoP" if isinstance(cnf, dict) and "jkt" in cnf else "Bearer"
    return response
