"""Refresh token grant (RFC 6749 §6): rotate the refresh token, never widen the scope."""

from __future__ import annotations

from typing import Any

from provider.clients import Client
from provider.grants import Grant
from provider.schemas import RefreshTokenRequest, load


class RefreshTokenGrant(Grant):
    GRANT_TYPE = "refresh_token"
    schema = RefreshTokenRequest()

    def issue(self, client: Client, params: dict[str, Any]) -> dict[str, Any]:
        request = load(self.schema, params)
        refresh_tokens = self.provider.refresh_tokens
        # §6: the scope "MUST NOT include any scope not originally granted". Checked before the
        # token is spent, so a bad request costs the client nothing.
        family = refresh_tokens.active_family(client, request["refresh_token"])
        scope = self.narrow_scope(request.get("scope"), family.scope) if family else None
        refresh_token, family = refresh_tokens.rotate(client, request["refresh_token"])
        token, claims = refresh_tokens.mint_access_token(client, family, scope or family.scope,
                                                         self.cnf)
        return self.response(token, claims, audit={"family_id": family.family_id},
                             refresh_token=refresh_token)
