"""The whole story through HTTP against a real upstream on loopback: connect, token, exchange
down to one resource, gateway, refusals that never reach the upstream, refresh, revocation."""

from __future__ import annotations

import base64
import hashlib
import secrets
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from provider.storage import schema
from tests.support import REFRESH_TOKEN_TYPE, claims_of

GATEWAY = "http://localhost/gateway/drive"
REDIRECT = "https://app.example/callback"


@pytest.fixture
def settings_overrides(upstream):
    return {"upstreams": {"drive": {
        "base_url": upstream.base_url, "authorize_url": upstream.authorize_url,
        "token_url": upstream.token_url, "client_id": upstream.client_id,
        "client_secret": upstream.client_secret, "scopes": ["files.read"],
        "routes": [
            {"method": "GET", "path": "/files/{id}", "scope": "files:read"},
            {"method": "PUT", "path": "/files/{id}", "scope": "files:write"},
            {"method": "GET", "path": "/stream/{n}", "scope": "files:read"},
            {"method": "POST", "path": "/echo", "scope": "files:write"},
        ]}}}


@pytest.fixture
def app_client(oauth):
    return oauth.register("app", grant_types=("authorization_code", "refresh_token",
                                              "urn:ietf:params:oauth:grant-type:token-exchange"),
                          scope="files:read files:write", redirect_uris=[REDIRECT],
                          connections=True)


def no_redirect_get(url: str) -> str:
    """GET ``url`` from the browser's side and return where it redirects to."""
    class Stop(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        urllib.request.build_opener(Stop).open(url, timeout=10)
    except urllib.error.HTTPError as redirect:
        return redirect.headers["Location"]
    raise AssertionError("no redirect")


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def connect(oauth, client, subject="alice", scope="files:read files:write") -> dict:
    """The browser's and the client's side of the connect flow; the token response."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    started = oauth.post("/connect/drive", client, {
        "subject": subject, "redirect_uri": REDIRECT, "state": "client-state",
        "code_challenge": challenge.decode(), "code_challenge_method": "S256", "scope": scope})
    assert started.status_code == 201, started.get_json()
    to_upstream = oauth.http.get(path_of(started.get_json()["authorization_url"]))
    assert to_upstream.status_code == 303
    back = no_redirect_get(to_upstream.headers["Location"])
    to_client = oauth.http.get(path_of(back))
    assert to_client.status_code == 303
    answer = parse_qs(urlsplit(to_client.headers["Location"]).query)
    assert answer["state"] == ["client-state"] and answer["iss"] == ["http://localhost"]
    redeemed = oauth.post("/token", client, {
        "grant_type": "authorization_code", "code": answer["code"][0], "redirect_uri": REDIRECT,
        "code_verifier": verifier})
    assert redeemed.status_code == 200, redeemed.get_json()
    return redeemed.get_json()


def call(oauth, token, path="/files/abc", method="GET", **kwargs):
    return oauth.http.open(f"/gateway/drive{path}", method=method,
                           headers={"Authorization": f"Bearer {token}"}, **kwargs)


def test_connect_token_exchange_gateway_refresh_revoke(oauth, app_client, upstream):
    tokens = connect(oauth, app_client)
    access = tokens["access_token"]
    assert claims_of(access)["aud"] == GATEWAY and claims_of(access)["sub"] == "alice"

    # Exchange down to one file, read-only.
    narrow = oauth.exchanged(app_client, access, scope="files:read",
                             resource=f"{GATEWAY}/files/abc")
    ok = call(oauth, narrow)
    assert ok.status_code == 200, ok.get_json()
    assert ok.get_json()["path"] == "/api/files/abc"
    forwarded = upstream.requests[-1]
    assert forwarded.header("Authorization") in {f"Bearer {t}" for t in upstream.valid_access_tokens()}
    assert narrow not in str(forwarded.headers)

    # Outside the resource or the scope: refused, and the upstream hears nothing.
    seen = len(upstream.requests)
    assert call(oauth, narrow, "/files/other").status_code == 403
    assert call(oauth, narrow, "/files/abc", "PUT", data=b"x").status_code == 403
    assert len(upstream.requests) == seen

    # The upstream token expires: the gateway refreshes it once and retries.
    upstream.expire(forwarded.header("Authorization").split()[1])
    refreshes = sum(r.get("grant_type") == "refresh_token" for r in upstream.token_requests)
    assert call(oauth, narrow).status_code == 200
    assert sum(r.get("grant_type") == "refresh_token" for r in upstream.token_requests) == refreshes + 1
    assert call(oauth, narrow).status_code == 200
    assert sum(r.get("grant_type") == "refresh_token" for r in upstream.token_requests) == refreshes + 1

    # Revoking the connect token cascades to the exchanged one.
    assert oauth.revoke(app_client, access).status_code == 200
    refused = call(oauth, narrow)
    assert refused.status_code == 401
    assert refused.get_json()["error"] == "invalid_token"


def test_deposit_then_gateway_and_nothing_in_clear_in_the_database(oauth, app_client, upstream, app):
    upstream_tokens = upstream.issue_tokens()
    response = oauth.http.post("/connections", json={
        "subject": "bob", "upstream": "drive", "access_token": upstream_tokens["access_token"],
        "refresh_token": upstream_tokens["refresh_token"], "expires_in": 3600,
        "scope": "files:read"}, headers=app_client.basic)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert set(body) == {"connection_id", "access_token", "token_type", "expires_in",
                         "refresh_token", "scope"}
    assert body["scope"] == "files:read"
    assert call(oauth, body["access_token"]).status_code == 200
    assert call(oauth, body["access_token"], "/files/abc", "PUT", data=b"x").status_code == 403

    dump = b""
    with app.extensions["provider"].storage.engine.connect() as connection:
        for table in schema.metadata.sorted_tables:
            for row in connection.execute(sa.select(table)):
                dump += repr(tuple(row)).encode()
    for secret in (upstream_tokens["access_token"], upstream_tokens["refresh_token"],
                   body["refresh_token"]):
        assert secret.encode() not in dump


def test_refresh_token_rotates_and_reuse_revokes_the_family(oauth, app_client):
    tokens = connect(oauth, app_client)
    first = oauth.post("/token", app_client, {"grant_type": "refresh_token",
                                              "refresh_token": tokens["refresh_token"]})
    assert first.status_code == 200
    rotated = first.get_json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert call(oauth, rotated["access_token"]).status_code == 200
    # The old refresh token again: the whole family dies, access tokens included.
    reused = oauth.post("/token", app_client, {"grant_type": "refresh_token",
                                               "refresh_token": tokens["refresh_token"]})
    assert reused.status_code == 400 and reused.get_json()["error"] == "invalid_grant"
    assert not oauth.active(rotated["access_token"])
    assert oauth.post("/token", app_client, {"grant_type": "refresh_token",
                                             "refresh_token": rotated["refresh_token"]}).status_code == 400


def test_refresh_never_widens_scope(oauth, app_client):
    tokens = connect(oauth, app_client, scope="files:read")
    wider = oauth.post("/token", app_client, {"grant_type": "refresh_token",
                                              "refresh_token": tokens["refresh_token"],
                                              "scope": "files:read files:write"})
    assert wider.status_code == 400 and wider.get_json()["error"] == "invalid_scope"
    # The refused request did not spend the token.
    again = oauth.post("/token", app_client, {"grant_type": "refresh_token",
                                              "refresh_token": tokens["refresh_token"]})
    assert again.status_code == 200


def test_refresh_token_can_be_an_exchange_subject(oauth, app_client):
    tokens = connect(oauth, app_client)
    exchanged = oauth.exchange(app_client, tokens["refresh_token"],
                               subject_token_type=REFRESH_TOKEN_TYPE, scope="files:read")
    assert exchanged.status_code == 200, exchanged.get_json()
    narrow = exchanged.get_json()["access_token"]
    assert call(oauth, narrow).status_code == 200
    oauth.revoke(app_client, tokens["refresh_token"])
    assert call(oauth, narrow).status_code == 401


def test_replayed_code_revokes_what_it_issued(oauth, app_client, upstream):
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    started = oauth.post("/connect/drive", app_client, {
        "subject": "carol", "redirect_uri": REDIRECT, "code_challenge": challenge.decode(),
        "code_challenge_method": "S256"}).get_json()
    back = no_redirect_get(oauth.http.get(path_of(started["authorization_url"])).headers["Location"])
    code = parse_qs(urlsplit(oauth.http.get(path_of(back)).headers["Location"]).query)["code"][0]
    redeem = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
              "code_verifier": verifier}
    first = oauth.post("/token", app_client, redeem)
    assert first.status_code == 200
    second = oauth.post("/token", app_client, redeem)
    assert second.status_code == 400 and second.get_json()["error"] == "invalid_grant"
    assert not oauth.active(first.get_json()["access_token"])


def test_deleting_a_connection_revokes_its_tokens_and_its_ciphertext(oauth, app_client, app):
    tokens = connect(oauth, app_client)
    connection_id = claims_of(tokens["access_token"])["lineage"]["ids"][-1]
    shown = oauth.http.get(f"/connections/{connection_id}", headers=app_client.basic)
    assert shown.status_code == 200 and shown.get_json()["subject"] == "alice"
    assert "access_token" not in shown.get_json()
    assert oauth.http.delete(f"/connections/{connection_id}", headers=app_client.basic).status_code == 204
    assert call(oauth, tokens["access_token"]).status_code == 401
    assert app.extensions["provider"].storage.get_connection(connection_id) is None


def test_streams_the_upstream_answer_back(oauth, app_client, upstream):
    from tests.upstream import stream_body

    tokens = connect(oauth, app_client)
    response = call(oauth, tokens["access_token"], "/stream/64")
    assert response.status_code == 200
    assert response.get_data() == stream_body(64)
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("settings_overrides", [{"role": "web"}])
def test_web_role_cannot_forward(oauth):
    response = oauth.http.get("/gateway/drive/files/abc", headers={"Authorization": "Bearer x"})
    assert response.status_code == 503
    assert response.get_json()["error"] == "temporarily_unavailable"
