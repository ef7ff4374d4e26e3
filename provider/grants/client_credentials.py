"""Client credentials grant (RFC 6749 §4.4): a token for the client itself.

``sub`` is the client id; scope and audience are the client's registered ones, or narrower
(``scope``, RFC 8707 ``resource``, RFC 8693-style ``audience``).
"""

from __future__ import annotations

import time
from typing import Any

from provider.clients import Client
from provider.grants import Grant
from provider.schemas import ClientCredentialsRequest, load
from provider.tokens import Lineage, mint_access_token


class ClientCredentialsGrant(Grant):
    GRANT_TYPE = "client_credentials"
    CHECKS_ADMISSION_BEFORE_MINTING = True
    schema = ClientCredentialsRequest()

    def issue(self, client: Client, params: dict[str, Any]) -> dict[str, Any]:
        request = load(self.schema, params)
        scope = self.narrow_scope(request.get("scope"), client.scope)
        audience = self.narrow_audience(
            list(client.audiences), request.get("audience", []), request.get("resource", [])
        )
        self.admitted()
        now = time.time()
        token, claims = mint_access_token(
            self.provider.keys,
            issuer=self.settings.issuer,
            sub=client.client_id,
            client_id=client.client_id,
            audience=audience,
            scope=scope,
            now=int(now),
            expires_at=int(now) + self.lifetime(client),
            lineage=Lineage.root(client.client_id, int(now * 1000)),
            may_act={"sub": client.may_act} if client.may_act else None,
            cnf=self.cnf,
        )
        return self.response(token, claims)
