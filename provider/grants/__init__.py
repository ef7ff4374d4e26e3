"""Grants of the token endpoint (RFC 6749 §4), one class each, found by ``grant_type``.

A grant validates its own parameters, decides what the client may have, and mints. Nothing here
knows of HTTP: :func:`issue` takes the parsed form and returns the JSON body to answer.

The rate limiter's verdict (an :class:`~provider.ratelimit.Admission`) may still be on its way
from Redis when a grant starts. A grant whose work up to minting has no effect (it parses,
verifies, narrows) says so with ``CHECKS_ADMISSION_BEFORE_MINTING`` and checks it just before
minting, so that the round trip overlaps that work; any other grant has it checked before it
starts. :meth:`Grant.response` checks it in any case: nothing is issued before the verdict.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from provider.errors import (
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from provider.ratelimit import Admission
from provider.scopes import covered_by_any, normalize_resource, parse_scope

if TYPE_CHECKING:
    from provider.clients import Client
    from provider.service import Provider


class Grant:
    GRANT_TYPE: ClassVar[str]
    # True only for a grant that does nothing with an effect before it calls self.admitted().
    CHECKS_ADMISSION_BEFORE_MINTING: ClassVar[bool] = False

    def __init__(self, provider: Provider, dpop_jkt: str | None = None,
                 admission: Admission = Admission.ADMITTED):
        self.provider = provider
        self.settings = provider.settings
        self.admitted = admission.check  # raises the limiter's refusal
        # RFC 9449 §5: a proof at the token endpoint binds what is issued to the proof's key.
        self.dpop_jkt = dpop_jkt
        self.cnf = {"jkt": dpop_jkt} if dpop_jkt else None
        self.token_type = "DPoP" if dpop_jkt else "Bearer"

    def issue(self, client: Client, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # Shared rules -------------------------------------------------------------------------

    def lifetime(self, client: Client) -> int:
        """The client's own lifetime or the default, never above the maximum."""
        tokens = self.settings.tokens
        return min(client.token_ttl or tokens.access_token_ttl, tokens.max_access_token_ttl)

    @staticmethod
    def narrow_scope(requested: str | None, granted: tuple[str, ...] | str) -> str:
        """RFC 6749 §3.3: no scope asked means all granted; more than granted is refused."""
        granted_scopes = tuple(granted.split()) if isinstance(granted, str) else granted
        scopes = parse_scope(requested)
        if scopes is None:
            raise InvalidScope("scope is malformed")
        if not set(scopes) <= set(granted_scopes):
            raise InvalidScope("the requested scope exceeds what may be granted")
        return " ".join(scopes or granted_scopes)

    @staticmethod
    def narrow_audience(granted: list[str], audience: list[str], resource: list[str]) -> list[str]:
        """RFC 8693 §2.1 / RFC 8707 §2: each ``audience`` must be one already granted; each
        ``resource`` must equal or lie under one. Nothing asked means all granted."""
        if not audience and not resource:
            return list(granted)
        narrowed = []
        for value in audience:
            if value not in granted:
                raise InvalidTarget("an audience is not one this token may be issued for")
            narrowed.append(value)
        for value in resource:
            normalized = normalize_resource(value)
            if normalized is None:
                raise InvalidTarget("resource must be an absolute http(s) URI without query, "
                                    "fragment, dot segments or encoded separators")
            if not covered_by_any(granted, normalized):
                raise InvalidTarget("a resource is not covered by what this token may reach")
            narrowed.append(normalized)
        return list(dict.fromkeys(narrowed))

    def response(self, token: str, claims: dict[str, Any], audit: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
        """The RFC 6749 §5.1 body; the issuance is counted and audited (``audit``: more fields)."""
        self.admitted()
        self.provider.issued(claims, self.GRANT_TYPE, **(audit or {}))
        return {
            "access_token": token,
            "token_type": self.token_type,
            "expires_in": max(claims["exp"] - int(time.time()), 0),
            "scope": claims["scope"],
            **extra,
        }


def issue(provider: Provider, client: Client, params: dict[str, Any],
          dpop_jkt: str | None = None,
          admission: Admission = Admission.ADMITTED) -> dict[str, Any]:
    """Dispatch on ``grant_type`` (RFC 6749 §5.2 errors for a missing, unknown or
    unregistered one); ``dpop_jkt`` binds the issued token to a DPoP key; ``admission`` is
    the rate limiter's verdict on the request."""
    grant_type = params.get("grant_type")
    if not isinstance(grant_type, str):
        raise InvalidRequest("grant_type is required")
    grant = GRANTS.get(grant_type)
    if grant is None:
        raise UnsupportedGrantType("this grant_type is not supported")
    if grant_type not in client.grant_types:
        raise UnauthorizedClient("this client is not registered for this grant type")
    if not grant.CHECKS_ADMISSION_BEFORE_MINTING:
        admission.check()
    return grant(provider, dpop_jkt, admission).issue(client, params)


# The registry. Imported last: each grant module subclasses Grant from this one.
from provider.grants.authorization_code import AuthorizationCodeGrant  # noqa: E402
from provider.grants.client_credentials import ClientCredentialsGrant  # noqa: E402
from provider.grants.refresh_token import RefreshTokenGrant  # noqa: E402
from provider.grants.token_exchange import TokenExchangeGrant  # noqa: E402

GRANTS: dict[str, type[Grant]] = {g.GRANT_TYPE: g for g in (
    ClientCredentialsGrant, TokenExchangeGrant, RefreshTokenGrant, AuthorizationCodeGrant)}
