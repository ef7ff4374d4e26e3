"""Single-use client assertion ids (RFC 7523 §3), in the database or in Redis, failing closed."""

from __future__ import annotations

import secrets
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.conftest import REDIS_URL, on_every_backend
from tests.support import FORM, ISSUER

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
STORES = ["database"] + (["redis"] if REDIS_URL else [])


@pytest.fixture(params=STORES)
def settings_overrides(request):
    return {"redis_url": REDIS_URL} if request.param == "redis" else {}


@pytest.fixture
def signer(oauth):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1"}
    oauth.register("jwt-client", auth_method="private_key_jwt", jwks={"keys": [jwk]})
    return key


def assertion(key, jti: str | None = None, **claims) -> str:
    now = int(time.time())
    body = {"iss": "jwt-client", "sub": "jwt-client", "aud": f"{ISSUER}/token",
            "iat": now, "exp": now + 60, "jti": jti or secrets.token_urlsafe(16), **claims}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k1"})


def token_request(oauth, client_assertion: str):
    return oauth.http.post("/token", content_type=FORM, data={
        "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion})


@on_every_backend
def test_client_assertion_is_accepted_once(oauth, signer):
    jti = secrets.token_urlsafe(8)  # Redis outlives the test: no fixed ids
    first = assertion(signer, jti=jti)
    assert token_request(oauth, first).status_code == 200
    replayed = token_request(oauth, first)
    assert replayed.status_code == 401
    assert replayed.get_json()["error"] == "invalid_client"
    # The same jti in a fresh assertion is a replay too.
    assert token_request(oauth, assertion(signer, jti=jti)).status_code == 401


def test_a_forged_assertion_does_not_burn_the_jti(oauth, signer):
    jti = secrets.token_urlsafe(8)
    forged = assertion(ec.generate_private_key(ec.SECP256R1()), jti=jti)
    assert token_request(oauth, forged).status_code == 401
    assert token_request(oauth, assertion(signer, jti=jti)).status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"redis_url": "redis://127.0.0.1:1/0"}])
def test_unreachable_replay_store_fails_closed_with_503(oauth, signer):
    response = token_request(oauth, assertion(signer))
    assert response.status_code == 503
    assert response.get_json()["error"] == "temporarily_unavailable"
    assert "redis" not in response.get_data(as_text=True).lower()


@on_every_backend
def test_the_database_spends_an_id_once_until_it_expires_even_when_raced(app):
    from concurrent.futures import ThreadPoolExecutor

    storage = app.extensions["provider"].storage
    now = int(time.time())
    assert storage.claim_once("spent", now + 60)
    assert not storage.claim_once("spent", now + 60)
    assert storage.claim_once("expired", now - 1)
    assert storage.claim_once("expired", now + 60)  # its first record had expired
    assert not storage.claim_once("expired", now + 60)

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: storage.claim_once("raced", now + 60), range(16)))
    assert wins.count(True) == 1


def test_an_sqlite_too_old_for_the_upsert_is_refused_at_start_naming_the_setting(monkeypatch):
    import sqlite3

    from provider.config import ConfigError
    from provider.storage import create_engine

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(ConfigError, match=r"SQLite 3\.34\.1 is too old for database_url"):
        create_engine("sqlite:///:memory:")
