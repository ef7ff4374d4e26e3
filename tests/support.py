"""Helpers shared by the tests: registering clients and speaking OAuth through the test client."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import jwt

from provider.clients import register_client

ISSUER = "http://localhost"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Registered:
    client_id: str
    secret: str | None

    @property
    def basic(self) -> dict[str, str]:
        raw = f"{quote(self.client_id, safe='')}:{quote(self.secret or '', safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


def claims_of(token: str) -> dict[str, Any]:
    """The payload, unverified: for reading what the provider issued, not for trusting it."""
    return jwt.decode(token, options={"verify_signature": False})


def header_of(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


class OAuth:
    """Drives the provider's HTTP endpoints like a client would."""

    def __init__(self, app: Any, http: Any):
        self.app = app
        self.http = http
        self._introspector: Registered | None = None

    @property
    def provider(self) -> Any:
        return self.app.extensions["provider"]

    def register(self, client_id: str, grant_types: tuple[str, ...] = ("client_credentials", EXCHANGE),
                 scope: str = "read write admin", **options: Any) -> Registered:
        provider = self.provider
        _, secret = register_client(
            provider.storage, provider.hasher, issuer=provider.settings.issuer,
            max_ttl=provider.settings.tokens.max_access_token_ttl, client_id=client_id,
            grant_types=list(grant_types), scope=scope, **options)
        return Registered(client_id, secret)

    def post(self, path: str, client: Registered | None, data: dict[str, Any] | list, **kwargs: Any):
        headers = dict(kwargs.pop("headers", {}))
        if client is not None:
            headers.update(client.basic)
        if isinstance(data, list):  # repeated names, in order
            data, kwargs["content_type"] = urlencode(data), FORM
        return self.http.post(path, data=data, headers=headers, **kwargs)

    def token(self, client: Registered, **params: Any):
        return self.post("/token", client, {"grant_type": "client_credentials", **params})

    def access_token(self, client: Registered, **params: Any) -> str:
        response = self.token(client, **params)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["access_token"]

    def exchange(self, client: Registered, subject_token: str, **params: Any):
        data = {"grant_type": EXCHANGE, "subject_token": subject_token,
                "subject_token_type": ACCESS_TOKEN_TYPE, **params}
        return self.post("/token", client, data)

    def exchanged(self, client: Registered, subject_token: str, **params: Any) -> str:
        response = self.exchange(client, subject_token, **params)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["access_token"]

    def introspect(self, token: str) -> dict[str, Any]:
        if self._introspector is None:
            self._introspector = self.register("resource-server", ("client_credentials",),
                                               "introspect", introspect=True)
        response = self.post("/introspect", self._introspector, {"token": token})
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    def active(self, token: str) -> bool:
        return self.introspect(token)["active"]

    def revoke(self, client: Registered, token: str, **params: Any):
        return self.post("/revoke", client, {"token": token, **params})


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
