"""OAuth 2.0 Token Exchange (RFC 8693), for narrowing and delegation only.

The issued token is never more than its subject token: its scope is within the subject's
(``invalid_scope`` otherwise), its audience and resources within the subject's audience
(``invalid_target``), its ``exp`` no later than the subject's (or the actor's), and its chain no
deeper than ``max_exchange_depth``. A client exchanges only tokens meant for it: issued to it,
naming it in ``aud``, or naming it in ``may_act``. Any subject or actor token that is invalid,
expired, revoked (itself or any ancestor) or foreign gets one and the same ``invalid_request``
(RFC 8693 §2.2.2), so the answer tells an attacker nothing about why.

What peers got wrong and this refuses (THREATS.md, promise 3): exchanging another client's
token; renewing forever by re-exchanging (``exp`` is capped by the subject's and depth is
bounded); a subject token that fails verification being replaced by the client's own identity
(there is no fallback: no valid subject, no token); a refresh token or another kind of JWT
accepted as an access token (``typ`` must be ``at+jwt``).
"""

from __future__ import annotations

import time
from typing import Any

from provider import metrics
from provider.clients import Client
from provider.errors import InvalidRequest
from provider.grants import Grant
from provider.schemas import TokenExchangeRequest, load
from provider.tokens import Lineage, TokenInvalid, audiences, mint_access_token, verify_access_token

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
REFRESH_TOKEN = "urn:ietf:params:oauth:token-type:refresh_token"
ISSUABLE_TYPES = (ACCESS_TOKEN, JWT)
SUBJECT_TYPES = (ACCESS_TOKEN, JWT, REFRESH_TOKEN)
ACTOR_TYPES = (ACCESS_TOKEN, JWT)
MAX_LINEAGE_IDS = 64


class TokenExchangeGrant(Grant):
    GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
    CHECKS_ADMISSION_BEFORE_MINTING = True  # up to minting, it only reads and verifies
    schema = TokenExchangeRequest()

    def issue(self, client: Client, params: dict[str, Any]) -> dict[str, Any]:
        request = load(self.schema, params)
        issued_type = self._issued_type(request)
        subject = self._subject(client, request)
        actor = self._actor(client, request, subject)

        # Depth: a root token is depth 0 and each exchange adds one.
        depth = subject["lineage"]["depth"] + 1
        if depth > self.settings.tokens.max_exchange_depth:
            raise InvalidRequest("the subject token may not be exchanged further")

        # RFC 8693 §2.1 scope, audience, resource: narrowing only.
        scope = self.narrow_scope(request.get("scope"), subject["scope"])
        audience = self.narrow_audience(
            audiences(subject), request.get("audience", []), request.get("resource", [])
        )

        # Never outlive the subject token (nor the actor token).
        self.admitted()
        now = time.time()
        expires_at = min(int(now) + self.lifetime(client), subject["exp"],
                         actor["exp"] if actor else subject["exp"])

        # RFC 8693 §4.1: ``act`` names the current actor and nests the prior ones.
        act = subject.get("act")
        if actor is not None:
            act = {"sub": actor["sub"], "client_id": actor["client_id"]}
            if "act" in subject:
                act["act"] = subject["act"]

        lineage = Lineage.from_claim(subject["lineage"]).derive(
            subject["jti"], client.client_id, int(now * 1000),
            actor=(actor["jti"], Lineage.from_claim(actor["lineage"])) if actor else None,
        )
        if len(lineage.ids) > MAX_LINEAGE_IDS:
            raise InvalidRequest("the subject token may not be exchanged further")

        token, claims = mint_access_token(
            self.provider.keys,
            issuer=self.settings.issuer,
            sub=subject["sub"],
            client_id=client.client_id,
            audience=audience,
            scope=scope,
            now=int(now),
            expires_at=expires_at,
            lineage=lineage,
            act=act,
            may_act={"sub": client.may_act} if client.may_act else None,
            cnf=self.cnf,
        )
        metrics.TOKENS_EXCHANGED.inc()
        return self.response(token, claims, issued_token_type=issued_type, audit={
            "subject_jti": subject["jti"], "actor_jti": actor["jti"] if actor else None})

    # Steps --------------------------------------------------------------------------------

    @staticmethod
    def _issued_type(request: dict[str, Any]) -> str:
        """RFC 8693 §2.1 ``requested_token_type``: we issue access tokens (JWTs) only."""
        if "actor_token" in request and "actor_token_type" not in request:
            raise InvalidRequest("actor_token_type is required with actor_token")
        if "actor_token_type" in request and "actor_token" not in request:
            raise InvalidRequest("actor_token_type must not be sent without actor_token")
        if request["subject_token_type"] not in SUBJECT_TYPES:
            raise InvalidRequest("subject_token_type is not supported")
        if request.get("actor_token_type", ACCESS_TOKEN) not in ACTOR_TYPES:
            raise InvalidRequest("actor_token_type is not supported")
        issued_type = request.get("requested_token_type", ACCESS_TOKEN)
        if issued_type not in ISSUABLE_TYPES:
            raise InvalidRequest("requested_token_type is not supported")
        return issued_type

    def _subject(self, client: Client, request: dict[str, Any]) -> dict[str, Any]:
        claims = self._accepted_token(client, request["subject_token"],
                                      request["subject_token_type"])
        if claims is None:
            raise InvalidRequest("subject_token is not acceptable")
        return claims

    def _actor(self, client: Client, request: dict[str, Any],
               subject: dict[str, Any]) -> dict[str, Any] | None:
        if "actor_token" not in request:
            return None
        actor = self._accepted_token(client, request["actor_token"], request["actor_token_type"])
        # RFC 8693 §4.4: when the subject says who may act for it, no one else may.
        may_act = subject.get("may_act")
        if actor is not None and isinstance(may_act, dict) and may_act.get("sub") != actor["sub"]:
            actor = None
        if actor is None:
            raise InvalidRequest("actor_token is not acceptable")
        return actor

    def _accepted_token(self, client: Client, token: str, token_type: str) -> dict[str, Any] | None:
        """The claims of a valid, unrevoked access token meant for ``client``, else None."""
        if token_type == REFRESH_TOKEN:
            return self._refresh_token_claims(client, token)
        try:
            claims = verify_access_token(token, self.provider.keys, self.settings.issuer,
                                         self.settings.tokens.leeway)
        except TokenInvalid:
            return None
        if self.provider.revocations.is_revoked(claims) or not _meant_for(client, claims):
            return None
        # RFC 9449: a DPoP-bound token is usable only with a proof by its key, never as bearer.
        cnf = claims.get("cnf")
        if isinstance(cnf, dict) and cnf.get("jkt") != self.dpop_jkt:
            return None
        return claims

    def _refresh_token_claims(self, client: Client, token: str) -> dict[str, Any] | None:
        """A refresh token as the subject: only the client's own, live and unused; it is not
        spent, and what is issued derives from its family (revoking the family revokes it)."""
        found = self.provider.refresh_tokens.active(client, token)
        if found is None:
            return None
        family, expires_at = found
        return family.claims(expires_at)


def _meant_for(client: Client, claims: dict[str, Any]) -> bool:
    """Issued to the client, or naming it in ``aud`` or ``may_act``."""
    if claims["client_id"] == client.client_id or client.client_id in audiences(claims):
        return True
    may_act = claims.get("may_act")
    return isinstance(may_act, dict) and may_act.get("sub") == client.client_id
