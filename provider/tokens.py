"""Mint and verify the provider's access tokens: JWTs per RFC 9068, checked per RFC 8725.

The server chooses the algorithm and the key, never the token: ``kid`` selects one of our
keys, the key fixes the one algorithm accepted, ``typ`` must be ``at+jwt`` (so a client
assertion, a DPoP proof or an ID token is never taken for an access token), any ``crit`` is
refused (we implement no extension), and key-carrying headers (``jku``, ``jwk``, ``x5u``,
``x5c``) are refused rather than ignored. ``iss``, ``exp``, ``nbf`` and ``iat`` are checked with
the configured leeway, and ``exp - iat`` against the longest lifetime the provider mints.
``aud`` is checked by each caller against its own identity (an access token's audience is a
resource server, not this provider).

Every token carries its ``lineage`` (a private claim) so that revocation can cascade without a
database row per issued token: see :mod:`provider.revocation`.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from provider import jws
from provider.keys import KeySet

ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")  # RFC 9068 §2.1
MAX_TOKEN_LENGTH = 16384
_REFUSED_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit")
_REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "lineage"]


class TokenInvalid(Exception):
    """The token is not one of our valid access tokens. Callers never tell anyone why."""


@dataclass(frozen=True)
class Lineage:
    """Where a token comes from, carried inside it.

    ``ids``: every ancestor whose revocation must kill this token (ancestor tokens' ``jti``,
    actor tokens' ``jti``, the refresh token family, the connection); ``root_ms``: when the
    chain's root grant was made (revoking a subject kills chains rooted before it);
    ``clients``: for each client in the chain, when it first held one of its tokens (revoking
    a client kills chains it held before it); ``depth``: exchanges since the root.
    """

    depth: int = 0
    ids: tuple[str, ...] = ()
    root_ms: int = 0
    clients: tuple[tuple[str, int], ...] = ()

    def to_claim(self) -> dict[str, Any]:
        return {"depth": self.depth, "ids": list(self.ids), "root": self.root_ms,
                "clients": dict(self.clients)}

    @classmethod
    def from_claim(cls, claim: Any) -> Lineage:
        if not isinstance(claim, dict):
            raise TokenInvalid("lineage")
        depth, ids, root, clients = (claim.get(k) for k in ("depth", "ids", "root", "clients"))
        if (not isinstance(depth, int) or not isinstance(root, int)
                or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
                or not isinstance(clients, dict)
                or not all(isinstance(v, int) for v in clients.values())):
            raise TokenInvalid("lineage")
        return cls(depth, tuple(ids), root, tuple(clients.items()))

    @classmethod
    def root(cls, client_id: str, now_ms: int, ids: tuple[str, ...] = ()) -> Lineage:
        return cls(0, ids, now_ms, ((client_id, now_ms),))

    def derive(self, parent_jti: str, client_id: str, now_ms: int,
               actor: tuple[str, Lineage] | None = None) -> Lineage:
        """The lineage of a token exchanged from one with this lineage (and ``actor``)."""
        ids = [*self.ids, parent_jti]
        clients = dict(self.clients)
        if actor is not None:
            actor_jti, actor_lineage = actor
            ids += [*actor_lineage.ids, actor_jti]
            for name, since in actor_lineage.clients:
                clients[name] = min(since, clients.get(name, since))
        clients.setdefault(client_id, now_ms)
        return Lineage(self.depth + 1, tuple(dict.fromkeys(ids)), self.root_ms,
                       tuple(clients.items()))


def new_id() -> str:
    """128 random bits, URL-safe: token ids, family ids, connection ids.

    Operators pass these ids to the command line (`revoke --jti`, `connections delete`), so an
    id never starts with "-", where it would be read as an option. Redrawing the 1 in 64 that
    do costs a fraction of a bit of entropy.
    """
    while (value := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return value


def mint_access_token(
    keys: KeySet,
    *,
    issuer: str,
    sub: str,
    client_id: str,
    audience: list[str],
    scope: str,
    expires_at: int,
    lineage: Lineage,
    now: int | None = None,
    act: dict[str, Any] | None = None,
    may_act: dict[str, Any] | None = None,
    cnf: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Sign an RFC 9068 access token; returns the token and its claims."""
    now = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": audience[0] if len(audience) == 1 else list(audience),
        "exp": expires_at,
        "iat": now,
        "jti": new_id(),
        "client_id": client_id,
        "scope": scope,
        "lineage": lineage.to_claim(),
    }
    if act:
        claims["act"] = act
    if may_act:
        claims["may_act"] = may_act
    if cnf:
        claims["cnf"] = cnf
    key = keys.signer()
    return jws.sign(claims, {"kid": key.kid, "typ": "at+jwt"}, key.private_key, key.alg), claims


def verify_access_token(token: Any, keys: KeySet, issuer: str, leeway: int) -> dict[str, Any]:
    """The claims of a valid access token of ours; raises :class:`TokenInvalid` otherwise.

    Revocation is not checked here (see :mod:`provider.revocation`).
    """
    try:
        unverified = jws.read(token, MAX_TOKEN_LENGTH)
    except jws.JWSInvalid:
        raise TokenInvalid("shape") from None
    header = unverified.header
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise TokenInvalid("typ")
    if any(name in header for name in _REFUSED_HEADERS):
        raise TokenInvalid("header")
    kid = header.get("kid")
    key = keys.verification_key(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenInvalid("key")
    try:
        claims = unverified.verify(key.public_key, key.alg)
    except jws.JWSInvalid:
        raise TokenInvalid("signature") from None
    _check_claims(claims, issuer, leeway, keys.token_expiry)
    return claims


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_claims(claims: dict[str, Any], issuer: str, leeway: int, max_lifetime: float) -> None:
    """RFC 7519 §4.1 and RFC 9068 §4: every claim we mint is present and well typed, the issuer
    is us, the token is within its validity period give or take ``leeway`` seconds, and that
    period is no longer than ``max_lifetime`` (the longest the configuration mints, and as long
    as a retired key stays trusted)."""
    if any(name not in claims for name in _REQUIRED_CLAIMS):
        raise TokenInvalid("claims")
    if claims["iss"] != issuer:
        raise TokenInvalid("iss")
    # RFC 7519 §2: a NumericDate is a JSON number (never a string, never a boolean).
    if not all(_is_number(claims[name]) for name in ("exp", "iat", "nbf") if name in claims):
        raise TokenInvalid("dates")
    now = time.time()
    if claims["exp"] <= now - leeway:
        raise TokenInvalid("expired")
    if claims["iat"] > now + leeway or claims.get("nbf", 0) > now + leeway:
        raise TokenInvalid("not yet valid")
    if claims["exp"] - claims["iat"] > max_lifetime:  # never ours, however it came signed
        raise TokenInvalid("lifetime")
    aud = claims["aud"]
    if not (isinstance(aud, str) or (isinstance(aud, list) and aud
                                     and all(isinstance(a, str) for a in aud))):
        raise TokenInvalid("aud")
    for name in ("sub", "jti", "client_id", "scope"):
        if not isinstance(claims[name], str):
            raise TokenInvalid(name)
    Lineage.from_claim(claims["lineage"])


def audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims["aud"]
    return [aud] if isinstance(aud, str) else list(aud)
