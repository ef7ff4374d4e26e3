"""RFC 7662 introspection and RFC 8414 metadata."""

from __future__ import annotations

import pytest

from tests.support import ACCESS_TOKEN_TYPE, claims_of


def test_active_token_shows_its_claims_and_bearer_type(oauth):
    svc = oauth.register("svc", audiences=["https://api.example"])
    token = oauth.access_token(svc, scope="read")
    body = oauth.introspect(token)
    claims = claims_of(token)
    assert body == {"active": True, "scope": "read", "client_id": "svc", "sub": "svc",
                    "aud": "https://api.example", "iss": "http://localhost", "exp": claims["exp"],
                    "iat": claims["iat"], "jti": claims["jti"], "token_type": "Bearer"}


def test_introspection_shows_act_of_a_delegated_token(oauth):
    user = oauth.register("user-agent", may_act="helper")
    helper = oauth.register("helper")
    delegated = oauth.exchanged(helper, oauth.access_token(user),
                                actor_token=oauth.access_token(helper),
                                actor_token_type=ACCESS_TOKEN_TYPE)
    assert oauth.introspect(delegated)["act"] == {"sub": "helper", "client_id": "helper"}


def test_introspection_response_is_not_cacheable(oauth):
    resource_server = oauth.register("rs", introspect=True)
    response = oauth.post("/introspect", resource_server, {"token": "x"})
    assert response.headers["Cache-Control"] == "no-store"
    assert response.get_json() == {"active": False}


def test_metadata_lists_every_endpoint_and_supported_value(oauth):
    body = oauth.http.get("/.well-known/oauth-authorization-server").get_json()
    assert body["issuer"] == "http://localhost"
    for name, path in (("token_endpoint", "/token"), ("introspection_endpoint", "/introspect"),
                       ("revocation_endpoint", "/revoke"), ("jwks_uri", "/.well-known/jwks.json")):
        assert body[name] == "http://localhost" + path
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in body["grant_types_supported"]
    assert "private_key_jwt" in body["token_endpoint_auth_methods_supported"]
    assert "none" not in body["token_endpoint_auth_signing_alg_values_supported"]
    assert not any(a.startswith("HS") for a in body["token_endpoint_auth_signing_alg_values_supported"])


def test_healthz_reports_ready(oauth):
    response = oauth.http.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["checks"] == {"database": "ok", "keys": "ok", "redis": "unused"}


def test_healthz_liveness_holds_while_a_dependency_is_down(oauth, monkeypatch):
    """A liveness probe restarts what fails it: a database or Redis outage must not restart
    every instance. ``probe=live`` says only that the process answers; readiness still fails."""
    def outage():
        raise RuntimeError("simulated outage")

    monkeypatch.setattr(oauth.provider.storage, "ping", outage)
    assert oauth.http.get("/healthz").status_code == 503
    assert oauth.http.get("/healthz?probe=ready").status_code == 503
    live = oauth.http.get("/healthz?probe=live")
    assert live.status_code == 200
    assert live.get_json() == {"status": "ok"}
    assert live.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("query", ["probe=alive", "probe=", "probe=LIVE", "probe=live&probe=live",
                                   "probe=live&probe=ready", "probe=%FF"])
def test_healthz_refuses_an_unknown_or_repeated_probe(oauth, query):
    response = oauth.http.get(f"/healthz?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"
