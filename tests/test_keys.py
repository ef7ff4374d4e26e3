"""Signing keys: RFC 7638 kids, JWKS, rotation with a publish delay, retirement."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from werkzeug.serving import make_server

from provider import config, create_app
from provider.keys import (
    KeyOperationError,
    add_signing_key,
    generate_private_key,
    key_states,
    public_jwk,
    read_private_key,
    retire_signing_key,
    thumbprint,
)
from provider.service import initialize
from tests.conftest import on_every_backend
from tests.support import ISSUER, OAuth, claims_of, header_of


@pytest.fixture
def served(app) -> Iterator[str]:
    """The app on a real loopback port, for clients that fetch over HTTP."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def provider_of(app):
    return app.extensions["provider"]


def rotate(app, delay: float = 0) -> str:
    provider = provider_of(app)
    row = add_signing_key(provider.storage, provider.settings.keys_dir, "ES256", delay)
    provider.keys.reload()
    return row["kid"]


def verify_with_jwks(url: str, token: str) -> dict:
    client = jwt.PyJWKClient(f"{url}/.well-known/jwks.json", cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["ES256"], issuer=ISSUER,
                      options={"verify_aud": False})


def test_rfc7638_thumbprint_matches_the_rfc_example():
    # RFC 7638 §3.1.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
             "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGj"
             "QR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-b"
             "FTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwks_publishes_public_keys_with_kid_use_and_alg(oauth):
    response = oauth.http.get("/.well-known/jwks.json")
    keys = response.get_json()["keys"]
    assert response.status_code == 200
    assert response.mimetype == "application/jwk-set+json"
    assert len(keys) == 1
    key = keys[0]
    assert key["use"] == "sig" and key["alg"] == "ES256" and key["kty"] == "EC"
    assert key["kid"] == thumbprint(key)
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)


def test_issued_token_has_typ_kid_and_es256(oauth):
    token = oauth.access_token(oauth.register("svc"))
    header = header_of(token)
    assert header == {"alg": "ES256", "kid": header["kid"], "typ": "at+jwt"}
    assert set(claims_of(token)) >= {"iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"}


def test_private_key_files_are_owner_only(app):
    directory = Path(provider_of(app).settings.keys_dir)
    files = [*(directory / "signing").glob("*.pem"), directory / "client-secret.key"]
    assert files
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_tokens_verify_with_pyjwkclient_across_a_rotation(oauth, app, served):
    svc = oauth.register("svc")
    before = oauth.access_token(svc)
    assert verify_with_jwks(served, before)["sub"] == "svc"
    new_kid = rotate(app)
    after = oauth.access_token(svc)
    assert header_of(after)["kid"] == new_kid != header_of(before)["kid"]
    # Both verify against the served JWKS, and the provider still honours the old one.
    assert verify_with_jwks(served, before)["sub"] == "svc"
    assert verify_with_jwks(served, after)["sub"] == "svc"
    assert oauth.active(before) and oauth.active(after)


@pytest.mark.parametrize("settings_overrides", [{"keys": {"publish_delay": 3600}}])
def test_rotated_key_is_published_before_it_signs(oauth, app):
    svc = oauth.register("svc")
    old_kid = header_of(oauth.access_token(svc))["kid"]
    new_kid = rotate(app, delay=3600)
    kids = [k["kid"] for k in oauth.http.get("/.well-known/jwks.json").get_json()["keys"]]
    assert new_kid in kids and old_kid in kids
    assert header_of(oauth.access_token(svc))["kid"] == old_kid
    states = {s["kid"]: s["state"] for s in key_states(
        provider_of(app).storage.list_signing_keys(), time.time(), 3630)}
    assert states == {old_kid: "signing", new_kid: "published"}


def test_retiring_the_signing_key_is_refused_even_with_force(app):
    provider = provider_of(app)
    kid = provider.keys.signer().kid
    for force in (False, True):
        with pytest.raises(KeyOperationError, match="rotate first"):
            retire_signing_key(provider.storage, provider.settings.keys_dir, kid, 3630, force)


@on_every_backend
def test_retiring_a_replaced_key_waits_for_its_tokens_unless_forced(oauth, app):
    provider = provider_of(app)
    svc = oauth.register("svc")
    old_token = oauth.access_token(svc)
    old_kid = header_of(old_token)["kid"]
    rotate(app)
    with pytest.raises(KeyOperationError, match="may be valid"):
        retire_signing_key(provider.storage, provider.settings.keys_dir, old_kid, 3630)
    assert oauth.active(old_token)
    retire_signing_key(provider.storage, provider.settings.keys_dir, old_kid, 3630, force=True)
    provider.keys.reload()
    # A compromised key: every token it signed stops validating, and it leaves JWKS.
    assert not oauth.active(old_token)
    kids = [k["kid"] for k in oauth.http.get("/.well-known/jwks.json").get_json()["keys"]]
    assert old_kid not in kids
    assert not (Path(provider.settings.keys_dir) / "signing" / f"{old_kid}.pem").exists()


def test_retiring_is_allowed_once_every_token_of_the_key_has_expired(app):
    provider = provider_of(app)
    old_kid = provider.keys.signer().kid
    rotate(app)
    time.sleep(1.1)
    retired = retire_signing_key(provider.storage, provider.settings.keys_dir, old_kid, expiry=1)
    assert retired["state"] == "retired"


def test_unknown_kid_from_another_instance_is_found_without_waiting(oauth, app):
    """A key rotated in elsewhere verifies here at once: its public half is in the database."""
    provider = provider_of(app)
    svc = oauth.register("svc")
    row = add_signing_key(provider.storage, provider.settings.keys_dir, "ES256", 0)
    provider.keys._loaded_at -= 2  # the last reload was over a second ago
    private = read_private_key(Path(provider.settings.keys_dir) / "signing" / f"{row['kid']}.pem")
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISSUER, "sub": "svc", "aud": ISSUER, "exp": now + 60, "iat": now, "jti": "x" * 22,
         "client_id": "svc", "scope": "read",
         "lineage": {"depth": 0, "ids": [], "root": now * 1000, "clients": {"svc": now * 1000}}},
        private, algorithm="ES256", headers={"kid": row["kid"], "typ": "at+jwt"})
    assert svc and oauth.active(token)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_every_configured_algorithm_signs_and_verifies(alg, tmp_path):
    overrides = {"issuer": ISSUER, "database_url": f"sqlite:///{tmp_path}/p.db",
                 "keys_dir": str(tmp_path / "keys"), "keys": {"algorithm": alg}}
    initialize(config.load(overrides=overrides))
    application = create_app(overrides)
    oauth = OAuth(application, application.test_client())
    token = oauth.access_token(oauth.register("svc"))
    assert header_of(token)["alg"] == alg
    assert oauth.active(token)
    jwk = oauth.http.get("/.well-known/jwks.json").get_json()["keys"][0]
    assert jwk["alg"] == alg and jwk["kid"] == thumbprint(jwk)
    application.extensions["provider"].storage.engine.dispose()


def test_public_jwk_has_only_public_members():
    for alg in ("ES256", "RS256", "EdDSA"):
        jwk = public_jwk(generate_private_key(alg).public_key(), alg)
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
