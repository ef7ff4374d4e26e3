"""DPoP (RFC 9449): binding at /token, proofs checked fully, no replay, no downgrade."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from tests.support import ACCESS_TOKEN_TYPE, claims_of
from tests.test_gateway import REDIRECT, connect, settings_overrides  # noqa: F401

TOKEN_URL = "http://localhost/token"


def proof(key: Any, *, htm: str = "POST", htu: str = TOKEN_URL, iat: float | None = None,
          jti: str | None = None, alg: str = "ES256", typ: str = "dpop+jwt",
          jwk: dict | None = None, **claims: Any) -> str:
    header = {"alg": alg, "typ": typ, "jwk": jwk if jwk is not None else key.as_dict(private=False)}
    body = {"jti": jti or secrets.token_urlsafe(12), "htm": htm, "htu": htu,
            "iat": int(time.time() if iat is None else iat), **claims}
    return jose_jwt.encode(header, body, key, algorithms=[alg])


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture
def key():
    return ECKey.generate_key("P-256")


@pytest.fixture
def svc(oauth):
    return oauth.register("svc")


def bound_token(oauth, client, key, **params) -> Any:
    return oauth.post("/token", client, {"grant_type": "client_credentials", **params},
                      headers={"DPoP": proof(key)})


def test_proof_binds_the_token_to_the_key(oauth, svc, key):
    response = bound_token(oauth, svc, key)
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["token_type"] == "DPoP"
    assert claims_of(body["access_token"])["cnf"] == {"jkt": key.thumbprint()}
    introspected = oauth.introspect(body["access_token"])
    assert introspected["token_type"] == "DPoP" and introspected["cnf"] == {"jkt": key.thumbprint()}


def test_client_that_requires_dpop_is_refused_without_proof(oauth, key):
    strict = oauth.register("strict", dpop_required=True)
    response = oauth.token(strict)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_dpop_proof"
    assert bound_token(oauth, strict, key).status_code == 200


def test_metadata_lists_dpop_algorithms(oauth):
    algorithms = oauth.http.get("/.well-known/oauth-authorization-server").get_json()[
        "dpop_signing_alg_values_supported"]
    assert "ES256" in algorithms and not any(a.startswith("HS") or a == "none" for a in algorithms)


def _private_jwk(key):
    return key.as_dict(private=True)


HOSTILE = {
    "wrong-typ": lambda k: proof(k, typ="JWT"),
    "access-token-typ": lambda k: proof(k, typ="at+jwt"),
    "hmac": lambda k: proof(OctKey.generate_key(256), alg="HS256", jwk={"kty": "oct", "k": "AAAA"}),
    "private-jwk": lambda k: proof(k, jwk=_private_jwk(k)),
    "jwk-of-another-key": lambda k: proof(k, jwk=ECKey.generate_key("P-256").as_dict(private=False)),
    "no-jwk": lambda k: jose_jwt.encode({"alg": "ES256", "typ": "dpop+jwt"},
                                        {"jti": "x", "htm": "POST", "htu": TOKEN_URL,
                                         "iat": int(time.time())}, k),
    "wrong-htm": lambda k: proof(k, htm="GET"),
    "wrong-htu": lambda k: proof(k, htu="http://localhost/introspect"),
    "other-host-htu": lambda k: proof(k, htu="http://evil.example/token"),
    "stale-iat": lambda k: proof(k, iat=time.time() - 600),
    "future-iat": lambda k: proof(k, iat=time.time() + 600),
    "string-iat": lambda k: _string_iat(k),
    "garbage": lambda k: "not.a.proof",
    # RFC 7518 §3.3: an RSA key must be 2048 bits or larger; a short one is refused, not warned of.
    "rsa-1024": lambda k: proof(_short_rsa(), alg="RS256"),
    # The alg fixes the curve: a P-384 key under ES256 is refused.
    "p384-key-as-es256": lambda k: _p384_as_es256(),
}


def _short_rsa():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505


def _p384_as_es256():
    """A proof that says ES256 but is signed, and carries a jwk, on P-384."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ECKey.generate_key("P-384")
    header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": key.as_dict(private=False)}
    body = {"jti": secrets.token_urlsafe(12), "htm": "POST", "htu": TOKEN_URL,
            "iat": int(time.time())}
    segments = [base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                for part in (header, body)]
    signing_input = ".".join(segments).encode()
    r, s = decode_dss_signature(key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = base64.urlsafe_b64encode(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    return f"{signing_input.decode()}.{signature.rstrip(b'=').decode()}"


def _string_iat(key):
    header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": key.as_dict(private=False)}
    body = {"jti": "x", "htm": "POST", "htu": TOKEN_URL, "iat": str(int(time.time()))}
    return jose_jwt.encode(header, body, key)


@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")  # the short RSA key
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_proofs_are_invalid_dpop_proof(oauth, svc, key, case):
    response = oauth.post("/token", svc, {"grant_type": "client_credentials"},
                          headers={"DPoP": HOSTILE[case](key)})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "invalid_dpop_proof"


def test_proof_htu_ignores_query_and_fragment(oauth, svc, key):
    response = oauth.post("/token", svc, {"grant_type": "client_credentials"},
                          headers={"DPoP": proof(key, htu=TOKEN_URL + "?x=1#f")})
    assert response.status_code == 200


def test_rsa_proofs_are_accepted(oauth, svc):
    rsa = RSAKey.generate_key(2048)
    response = oauth.post("/token", svc, {"grant_type": "client_credentials"},
                          headers={"DPoP": proof(rsa, alg="PS256")})
    assert response.status_code == 200
    assert claims_of(response.get_json()["access_token"])["cnf"]["jkt"] == rsa.thumbprint()


def test_a_proof_is_accepted_once(oauth, svc, key):
    once = proof(key)
    assert oauth.post("/token", svc, {"grant_type": "client_credentials"},
                      headers={"DPoP": once}).status_code == 200
    replay = oauth.post("/token", svc, {"grant_type": "client_credentials"}, headers={"DPoP": once})
    assert replay.status_code == 400 and replay.get_json()["error"] == "invalid_dpop_proof"


def test_two_proof_headers_are_refused(oauth, svc, key):
    response = oauth.http.post("/token", data={"grant_type": "client_credentials"},
                               headers=[*svc.basic.items(), ("DPoP", proof(key)), ("DPoP", proof(key))])
    assert response.status_code == 400


@pytest.mark.parametrize("settings_overrides", [{"dpop": {"require_nonce": True}}])
def test_server_nonce_is_required_when_configured(oauth, svc, key):
    first = bound_token(oauth, svc, key)
    assert first.status_code == 400 and first.get_json()["error"] == "use_dpop_nonce"
    nonce = first.headers["DPoP-Nonce"]
    second = oauth.post("/token", svc, {"grant_type": "client_credentials"},
                        headers={"DPoP": proof(key, nonce=nonce)})
    assert second.status_code == 200
    wrong = oauth.post("/token", svc, {"grant_type": "client_credentials"},
                       headers={"DPoP": proof(key, nonce="made-up")})
    assert wrong.get_json()["error"] == "use_dpop_nonce"


def test_exchange_of_a_bound_token_needs_a_proof_by_its_key(oauth, svc, key):
    subject = bound_token(oauth, svc, key).get_json()["access_token"]
    assert oauth.exchange(svc, subject).status_code == 400  # as a bearer token: refused
    other = ECKey.generate_key("P-256")
    assert oauth.post("/token", svc, {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE}, headers={"DPoP": proof(other)}).status_code == 400
    ok = oauth.post("/token", svc, {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE, "scope": "read"}, headers={"DPoP": proof(key)})
    assert ok.status_code == 200
    assert ok.get_json()["token_type"] == "DPoP"
    assert claims_of(ok.get_json()["access_token"])["cnf"] == {"jkt": key.thumbprint()}


def test_unbound_subject_exchanged_with_a_proof_becomes_bound(oauth, svc, key):
    subject = oauth.access_token(svc)
    ok = oauth.post("/token", svc, {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE}, headers={"DPoP": proof(key)})
    assert claims_of(ok.get_json()["access_token"])["cnf"] == {"jkt": key.thumbprint()}


# At the gateway -------------------------------------------------------------------------------

GATEWAY_URL = "http://localhost/gateway/drive/files/abc"


@pytest.fixture
def bound_gateway_token(oauth, upstream, key):
    app_client = oauth.register("app", grant_types=("authorization_code", "refresh_token",
                                                    "urn:ietf:params:oauth:grant-type:token-exchange"),
                                scope="files:read files:write", redirect_uris=[REDIRECT])
    tokens = connect(oauth, app_client)
    response = oauth.post("/token", app_client, {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": tokens["access_token"], "subject_token_type": ACCESS_TOKEN_TYPE,
        "scope": "files:read"}, headers={"DPoP": proof(key)})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def gateway_call(oauth, authorization: str, dpop: str | None = None):
    headers = {"Authorization": authorization}
    if dpop:
        headers["DPoP"] = dpop
    return oauth.http.get("/gateway/drive/files/abc", headers=headers)


def test_gateway_accepts_a_bound_token_with_a_proof_by_its_key(oauth, bound_gateway_token, key, upstream):
    token = bound_gateway_token
    response = gateway_call(oauth, f"DPoP {token}",
                            proof(key, htm="GET", htu=GATEWAY_URL, ath=ath(token)))
    assert response.status_code == 200, response.get_json()
    assert upstream.requests[-1].header("DPoP") is None


@pytest.mark.parametrize("case", ["as-bearer", "no-proof", "no-ath", "wrong-ath", "other-key",
                                  "wrong-htu", "replayed"])
def test_gateway_refuses_a_bound_token_without_a_matching_proof(oauth, bound_gateway_token, key,
                                                                upstream, case):
    token = bound_gateway_token
    good = proof(key, htm="GET", htu=GATEWAY_URL, ath=ath(token))
    attempts = {
        "as-bearer": (f"Bearer {token}", good),
        "no-proof": (f"DPoP {token}", None),
        "no-ath": (f"DPoP {token}", proof(key, htm="GET", htu=GATEWAY_URL)),
        "wrong-ath": (f"DPoP {token}", proof(key, htm="GET", htu=GATEWAY_URL, ath=ath("x"))),
        "other-key": (f"DPoP {token}", proof(ECKey.generate_key("P-256"), htm="GET",
                                             htu=GATEWAY_URL, ath=ath(token))),
        "wrong-htu": (f"DPoP {token}", proof(key, htm="GET", htu=GATEWAY_URL + "x", ath=ath(token))),
        "replayed": (f"DPoP {token}", good),
    }
    if case == "replayed":
        assert gateway_call(oauth, f"DPoP {token}", good).status_code == 200
    seen = len(upstream.requests)
    response = gateway_call(oauth, *attempts[case])
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error"] in ("invalid_token", "invalid_dpop_proof")
    assert len(upstream.requests) == seen


def test_gateway_refuses_an_unbound_token_under_the_dpop_scheme(oauth, upstream, key):
    app_client = oauth.register("app", grant_types=("authorization_code",),
                                scope="files:read", redirect_uris=[REDIRECT])
    token = connect(oauth, app_client, scope="files:read")["access_token"]
    response = gateway_call(oauth, f"DPoP {token}",
                            proof(key, htm="GET", htu=GATEWAY_URL, ath=ath(token)))
    assert response.status_code == 401
