"""Authorization code grant (RFC 6749 §4.1.3) for codes from the connect flow; PKCE S256 is
required (RFC 7636 §4.6). A code is single use: a second redemption revokes what the first
one issued (RFC 6749 §4.1.2: the server SHOULD revoke all tokens previously issued on it)."""

from __future__ import annotations

import hmac
import time
from typing import Any

from provider.clients import Client
from provider.connect import PKCE_VALUE, s256, sha256_hex
from provider.connections import issue_tokens
from provider.errors import InvalidGrant
from provider.grants import Grant
from provider.schemas import AuthorizationCodeRequest, load


class AuthorizationCodeGrant(Grant):
    GRANT_TYPE = "authorization_code"
    schema = AuthorizationCodeRequest()

    def issue(self, client: Client, params: dict[str, Any]) -> dict[str, Any]:
        request = load(self.schema, params)
        storage = self.provider.storage
        code_hash = sha256_hex(request["code"])
        row = storage.get_authorization_code(code_hash)
        if row is None or row["client_id"] != client.client_id:
            raise InvalidGrant("code is invalid")
        if storage.use_authorization_code(code_hash, time.time()) is None:
            self.provider.refresh_tokens.revoke_family(row["family_id"], "authorization code replayed")
            raise InvalidGrant("code is invalid")
        # Spent from here on, whatever follows: a wrong verifier does not get a second try.
        verifier = request["code_verifier"]
        if (row["expires_at"] <= time.time()
                or not hmac.compare_digest(row["redirect_uri"], request["redirect_uri"])
                or not PKCE_VALUE.match(verifier)
                or not hmac.compare_digest(s256(verifier), row["code_challenge"])):
            raise InvalidGrant("code is invalid")
        if self.provider.revocations.is_id_revoked(row["connection_id"]) or \
                storage.get_connection(row["connection_id"]) is None:
            raise InvalidGrant("code is invalid")
        return issue_tokens(self.provider, client, connection_id=row["connection_id"],
                            subject=row["subject"], upstream=row["upstream"], scope=row["scope"],
                            grant_type=self.GRANT_TYPE,
                            family_id=row["family_id"], cnf=self.cnf)
