"""Refresh tokens (RFC 6749 §6, RFC 9700 §4.14): opaque, stored hashed, rotated on every use,
bound to their client, and reuse-detecting.

Every refresh token belongs to a family: the tokens rotated from one grant (a deposit, a connect
flow). Using a token marks it used in one atomic update; a token presented again, whether by an
attacker or by the legitimate client racing the attacker, finds it used and revokes the whole
family, and with it every access token derived from the family (the family id is in their
lineage). There is no grace window.

Introspection never reports a refresh token as active: they are for their client and the token
endpoint only, and a resource server that trusted ``active`` must not be tricked into taking
one for an access token (THREATS.md, promise 3).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provider.errors import InvalidGrant, UnauthorizedClient
from provider.tokens import Lineage, mint_access_token, new_id

if TYPE_CHECKING:
    from provider.clients import Client
    from provider.service import Provider

MAX_REFRESH_TOKEN_LENGTH = 256


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_refresh_token(token: str) -> bool:
    """Ours are opaque and carry no dots; a JWT has two."""
    return 0 < len(token) <= MAX_REFRESH_TOKEN_LENGTH and "." not in token


@dataclass(frozen=True)
class Family:
    family_id: str
    client_id: str
    subject: str
    scope: str
    audience: list[str]
    connection_id: str | None
    root_ms: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Family:
        return cls(row["family_id"], row["client_id"], row["subject"], row["scope"],
                   list(row["audience"]), row["connection_id"], row["family_root_ms"])

    def lineage(self) -> Lineage:
        ids = (self.family_id, self.connection_id) if self.connection_id else (self.family_id,)
        return Lineage(0, ids, self.root_ms, ((self.client_id, self.root_ms),))

    def claims(self, expires_at: float | None = None) -> dict[str, Any]:
        """The family seen as a token: what the revocation check and, with ``expires_at``, an
        exchange of a refresh token (RFC 8693 subject_token_type refresh_token) need."""
        claims = {"jti": self.family_id, "sub": self.subject, "lineage": self.lineage().to_claim()}
        if expires_at is not None:
            claims.update(client_id=self.client_id, scope=self.scope, aud=self.audience,
                          exp=int(expires_at))
        return claims


class RefreshTokens:
    def __init__(self, provider: Provider):
        self.provider = provider
        self.storage = provider.storage

    def start_family(self, *, client_id: str, subject: str, scope: str, audience: list[str],
                     connection_id: str | None = None, family_id: str | None = None,
                     ) -> tuple[str, Family]:
        """A new family and its first refresh token."""
        family = Family(family_id or new_id(), client_id, subject, scope, audience,
                        connection_id, int(time.time() * 1000))
        return self._add(family), family

    def _add(self, family: Family) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        self.storage.add_refresh_token({
            "token_hash": token_hash(token), "family_id": family.family_id,
            "client_id": family.client_id, "subject": family.subject, "scope": family.scope,
            "audience": family.audience, "connection_id": family.connection_id,
            "family_root_ms": family.root_ms, "created_at": now,
            "expires_at": now + self.provider.settings.tokens.refresh_token_ttl,
        })
        # A reuse racing this request may have revoked the family meanwhile. It writes the log,
        # then marks the rows: either this check sees the log, or its marking covers the row
        # just inserted. Either way the successor does not outlive its family.
        self.provider.revocations.sync(force=True)
        if self.is_revoked(family) or self.storage.family_has_revoked(family.family_id):
            self.storage.revoke_refresh_tokens(time.time(), family_id=family.family_id)
            raise InvalidGrant("refresh_token is invalid")
        return token

    def active_family(self, client: Client, token: str) -> Family | None:
        """The family of a live, unused refresh token of ``client``, without using it."""
        found = self.active(client, token)
        return found[0] if found else None

    def active(self, client: Client, token: str) -> tuple[Family, float] | None:
        """The family and expiry of a live, unused refresh token of ``client``."""
        if not looks_like_refresh_token(token):
            return None
        row = self.storage.get_refresh_token(token_hash(token))
        if row is None or row["client_id"] != client.client_id:
            return None
        if row["used_at"] is not None or row["revoked_at"] is not None:
            return None
        family = Family.from_row(row)
        if row["expires_at"] <= time.time() or self.is_revoked(family):
            return None
        return family, row["expires_at"]

    def is_revoked(self, family: Family) -> bool:
        return self.provider.revocations.is_revoked(family.claims())

    def rotate(self, client: Client, token: str) -> tuple[str, Family]:
        """Spend ``token`` and return its successor; a reused token revokes its family."""
        if not looks_like_refresh_token(token):
            raise InvalidGrant("refresh_token is invalid")
        hashed = token_hash(token)
        row = self.storage.get_refresh_token(hashed)
        # RFC 6749 §5.2: invalid, expired, revoked, or issued to another client.
        if row is None or row["client_id"] != client.client_id:
            raise InvalidGrant("refresh_token is invalid")
        family = Family.from_row(row)
        if row["revoked_at"] is not None or row["expires_at"] <= time.time() or self.is_revoked(family):
            raise InvalidGrant("refresh_token is invalid")
        if self.storage.use_refresh_token(hashed, time.time()) is None:
            # Used before (or this very moment, by a concurrent request): the family is
            # compromised, so no member of it may live on (RFC 9700 §4.14.2).
            self.revoke_family(family.family_id, "refresh token reused")
            raise InvalidGrant("refresh_token is invalid")
        return self._add(family), family

    def revoke_family(self, family_id: str, reason: str) -> None:
        """Revoke the family in the log first (it covers a successor a racing rotation may be
        inserting right now), then mark its stored tokens."""
        expires_at = int(time.time()) + self.provider.revocation_horizon()
        self.provider.revocations.revoke_ids([(family_id, expires_at)], reason)
        self.storage.revoke_refresh_tokens(time.time(), family_id=family_id)

    def mint_access_token(self, client: Client, family: Family, scope: str,
                          cnf: dict[str, str] | None = None) -> tuple[str, dict]:
        """An access token of the family (depth 0), never beyond the family's scope."""
        settings = self.provider.settings
        now = time.time()
        ttl = min(client.token_ttl or settings.tokens.access_token_ttl,
                  settings.tokens.max_access_token_ttl)
        return mint_access_token(
            self.provider.keys, issuer=settings.issuer, sub=family.subject,
            client_id=family.client_id, audience=family.audience, scope=scope, now=int(now),
            expires_at=int(now) + ttl, lineage=family.lineage(),
            may_act={"sub": client.may_act} if client.may_act else None, cnf=cnf,
        )

    def revoke(self, client: Client, token: str) -> bool:
        """RFC 7009 for a refresh token: revoke its family. False if it is not ours at all;
        raises for another client's token."""
        if not looks_like_refresh_token(token):
            return False
        row = self.storage.get_refresh_token(token_hash(token))
        if row is None:
            return False
        if row["client_id"] != client.client_id and not client.can_revoke_any:
            raise UnauthorizedClient("the token was not issued to this client")
        self.revoke_family(row["family_id"], f"revoked by client {client.client_id}"[:64])
        return True
