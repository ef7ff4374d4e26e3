"""Hostile client assertions: ``private_key_jwt`` (RFC 7523 §2.2, §3; RFC 7521 §4.2).

Assertions are crafted with joserfc, never with provider code. A valid assertion is signed by
the client's registered EC key, names the client in ``iss`` and ``sub``, names the token
endpoint (or the issuer) in ``aud``, expires within a minute and carries a fresh ``jti``; each
row changes one thing. THREATS.md promise 8: one method per request, bounded clock window,
fixed audience, single-use assertions, and failures that all look alike (401 ``invalid_client``
with ``WWW-Authenticate``).
"""

from __future__ import annotations

import json
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, RSAKey

from provider.clients import RegistrationError
from tests.support import ISSUER
from tests.test_attacks_tokens import (
    _DROP,
    _changed,
    _oct,
    assert_error,
    assert_safe_response,
    attack_provider,
    last_revocation,
    revocations_since,
    unique,
    unsigned,
)

pytestmark = pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_ENDPOINT = f"{ISSUER}/token"


class _AnyHeader(jws.JWSRegistry):
    """joserfc validates headers before signing; an attacker's library does not."""

    def check_header(self, header: dict[str, Any]) -> None:
        return None


FORGERY = _AnyHeader(algorithms=["none", "HS256", "ES256", "RS256"])
CLIENT_KEY = ECKey.generate_key("P-256", parameters={"kid": "client-key-1"})
OTHER_KEY = ECKey.generate_key("P-256")
OTHER_RSA = RSAKey.generate_key(2048)
with warnings.catch_warnings():  # joserfc warns of the short key, which is the point
    warnings.simplefilter("ignore")
    SHORT_RSA = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505


def public_jwk(key: Any) -> dict[str, Any]:
    return key.as_dict(private=False)


@dataclass
class Assertions:
    kid: str
    client_id: str

    def header(self, **changes: Any) -> dict[str, Any]:
        return _changed({"alg": "ES256", "kid": self.kid}, changes)

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        base = {"iss": self.client_id, "sub": self.client_id, "aud": TOKEN_ENDPOINT, "iat": now,
                "exp": now + 60, "jti": secrets.token_urlsafe(16)}
        return _changed(base, changes)

    def make(self, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
             key: Any = CLIENT_KEY) -> str:
        payload = json.dumps(self.claims() if claims is None else claims).encode()
        return jws.serialize_compact(self.header() if header is None else header, payload, key,
                                     registry=FORGERY)

    def with_header(self, key: Any = CLIENT_KEY, **changes: Any) -> str:
        return self.make(header=self.header(**changes), key=key)

    def with_claims(self, **changes: Any) -> str:
        return self.make(claims=self.claims(**changes))


@pytest.fixture(scope="module")
def _attack_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    yield from attack_provider(tmp_path_factory)


@pytest.fixture
def app(_attack_provider: tuple[Any, dict[str, Any]]) -> Any:
    return _attack_provider[0]


@pytest.fixture
def pkj(oauth: Any) -> Assertions:
    client_id = unique("pkj")
    oauth.register(client_id, ("client_credentials",), "read", auth_method="private_key_jwt",
                   jwks={"keys": [public_jwk(CLIENT_KEY)]})
    return Assertions(kid=CLIENT_KEY.kid, client_id=client_id)


def present(client: Any, assertion: str, **extra: Any) -> Any:
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, **extra}
    return client.post("/token", data=data)


# What works ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aud", [TOKEN_ENDPOINT, ISSUER, [TOKEN_ENDPOINT, "https://other.example"]],
                         ids=["token-endpoint", "issuer", "list-naming-token-endpoint"])
def test_client_assertion_is_accepted_with_either_audience(client, pkj, aud):
    response = present(client, pkj.with_claims(aud=aud))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["token_type"] == "Bearer"


def test_client_assertion_without_kid_is_accepted_for_a_single_key_client(client, pkj):
    assert present(client, pkj.with_header(kid=_DROP)).status_code == 200


# The table -------------------------------------------------------------------------------------

Row = Callable[[Assertions], dict[str, Any]]


def _assertion(build: Callable[[Assertions], str]) -> Row:
    return lambda a: {"client_assertion": build(a)}


REFUSED: list[Any] = [
    # RFC 7523 §3 item 3: aud names this authorization server.
    ("aud-wrong", _assertion(lambda a: a.with_claims(aud="https://attacker.example/token")), 401),
    ("aud-issuer-with-trailing-slash", _assertion(lambda a: a.with_claims(aud=ISSUER + "/")), 401),
    ("aud-other-endpoint-of-ours", _assertion(lambda a: a.with_claims(aud=f"{ISSUER}/revoke")), 401),
    ("aud-missing", _assertion(lambda a: a.with_claims(aud=_DROP)), 401),
    ("aud-empty-list", _assertion(lambda a: a.with_claims(aud=[])), 401),
    # RFC 7523 §3 item 4: exp required; RFC 7523 §3 item 5/6: nbf, iat sane; short lifetime.
    ("exp-missing", _assertion(lambda a: a.with_claims(exp=_DROP)), 401),
    ("exp-one-hour-ahead", _assertion(lambda a: a.with_claims(exp=int(time.time()) + 3600)), 401),
    ("expired", _assertion(lambda a: a.with_claims(iat=int(time.time()) - 600,
                                                   exp=int(time.time()) - 120)), 401),
    ("exp-not-a-number", _assertion(lambda a: a.with_claims(exp="soon")), 401),
    # RFC 7519 §2: a NumericDate is a JSON number (PyJWT alone would take "123" via int()).
    ("exp-numeric-string", _assertion(lambda a: a.with_claims(exp=str(int(time.time()) + 60))), 401),
    ("nbf-in-the-future", _assertion(lambda a: a.with_claims(nbf=int(time.time()) + 600)), 401),
    ("iat-in-the-future", _assertion(lambda a: a.with_claims(iat=int(time.time()) + 600)), 401),
    # RFC 7523 §3 items 1-2: iss and sub are the client id.
    ("iss-not-sub", _assertion(lambda a: a.with_claims(sub="someone-else")), 401),
    ("sub-missing", _assertion(lambda a: a.with_claims(sub=_DROP)), 401),
    ("iss-missing", _assertion(lambda a: a.with_claims(iss=_DROP)), 401),
    ("iss-and-sub-unknown-client", _assertion(lambda a: a.with_claims(iss="ghost", sub="ghost")), 401),
    ("client_id-param-differs", lambda a: {"client_assertion": a.make(), "client_id": "ghost"}, 401),
    # RFC 7523 §3 item 7: jti.
    ("jti-missing", _assertion(lambda a: a.with_claims(jti=_DROP)), 401),
    ("jti-empty", _assertion(lambda a: a.with_claims(jti="")), 401),
    ("jti-not-a-string", _assertion(lambda a: a.with_claims(jti=12345)), 401),
    # RFC 8725 §3.1: the assertion does not choose the algorithm or the key.
    ("hs256-keyed-with-public-pem", _assertion(lambda a: a.with_header(
        alg="HS256", key=_oct(CLIENT_KEY.as_pem(private=False)))), 401),
    ("hs256-keyed-with-public-jwk-json", _assertion(lambda a: a.with_header(
        alg="HS256", key=_oct(json.dumps(public_jwk(CLIENT_KEY)).encode()))), 401),
    ("alg-none", _assertion(lambda a: a.with_header(alg="none", key=None)), 401),
    ("alg-none-without-kid", _assertion(lambda a: a.make(header={"alg": "none"}, key=None)), 401),
    ("signed-by-another-key-with-client-kid", _assertion(lambda a: a.make(key=OTHER_KEY)), 401),
    ("signed-by-another-key-without-kid", _assertion(lambda a: a.with_header(kid=_DROP,
                                                                           key=OTHER_KEY)), 401),
    ("rs256-by-another-key-with-client-kid", _assertion(lambda a: a.with_header(
        alg="RS256", key=OTHER_RSA)), 401),
    ("kid-number", _assertion(lambda a: a.with_header(kid=1)), 401),
    ("alg-missing", _assertion(lambda a: unsigned({"kid": a.kid}, a.claims())), 401),
    ("unknown-kid", _assertion(lambda a: a.with_header(kid="no-such-key")), 401),
    ("jwk-header-embedding-attacker-key", _assertion(lambda a: a.with_header(
        kid=_DROP, jwk=public_jwk(OTHER_KEY), key=OTHER_KEY)), 401),
    ("jku-header", _assertion(lambda a: a.with_header(jku="https://attacker.example/jwks")), 401),
    ("x5u-header", _assertion(lambda a: a.with_header(x5u="https://attacker.example/cert")), 401),
    ("crit-exp", _assertion(lambda a: a.with_header(crit=["exp"], exp=int(time.time()) + 60)), 401),
    ("flipped-signature-bit", _assertion(lambda a: _flip(a.make())), 401),
    ("signature-stripped", _assertion(lambda a: a.make().rsplit(".", 1)[0] + "."), 401),
    # RFC 8725 §3.11: another kind of JWT is never a client assertion.
    ("typ-at+jwt", _assertion(lambda a: a.with_header(typ="at+jwt")), 401),
    ("typ-dpop+jwt", _assertion(lambda a: a.with_header(typ="dpop+jwt")), 401),
    # Malformed.
    ("garbage", lambda a: {"client_assertion": "a.b.c"}, 401),
    ("oversized", lambda a: {"client_assertion": a.make(claims=a.claims(pad="x" * 9000))}, 401),
    # RFC 7521 §4.2: the assertion type is exactly the JWT bearer one.
    ("client_assertion_type-wrong", lambda a: {
        "client_assertion": a.make(),
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"}, 400),
    ("client_assertion_type-missing", lambda a: {"client_assertion": a.make(),
                                                 "client_assertion_type": ""}, 400),
]


def _flip(token: str) -> str:
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    replacement = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{replacement}{signature[middle + 1:]}"


def _rows(table: list[Any]) -> list[Any]:
    result = []
    for case_id, build, status, *bug in table:
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug[0])] if bug else []
        result.append(pytest.param(build, status, id=case_id, marks=marks))
    return result


@pytest.mark.parametrize(("build", "status"), _rows(REFUSED))
def test_token_endpoint_refuses_hostile_client_assertion(app, client, pkj, build, status):
    before = last_revocation(app)
    params = build(pkj)
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE, **params}
    if data["client_assertion_type"] == "":
        del data["client_assertion_type"]
    response = client.post("/token", data=data)
    assert_safe_response(response, secrets=(params["client_assertion"],))
    assert_error(response, status, "invalid_client" if status == 401 else "invalid_request")
    assert "access_token" not in response.get_json()
    assert revocations_since(app, before) == 0


def test_replayed_client_assertion_is_refused(client, pkj):
    assertion = pkj.make()
    assert present(client, assertion).status_code == 200
    replay = present(client, assertion)
    assert_safe_response(replay)
    assert_error(replay, 401, "invalid_client")


def test_replayed_jti_in_a_new_assertion_is_refused(client, pkj):
    jti = secrets.token_urlsafe(16)
    assert present(client, pkj.with_claims(jti=jti)).status_code == 200
    assert_error(present(client, pkj.with_claims(jti=jti, aud=ISSUER)), 401, "invalid_client")


def test_forged_assertion_does_not_spend_the_jti(client, pkj):
    """An attacker who guesses a jti must not be able to lock out the real assertion."""
    jti = secrets.token_urlsafe(16)
    forged = pkj.make(claims=pkj.claims(jti=jti), key=OTHER_KEY)
    assert_error(present(client, forged), 401, "invalid_client")
    assert present(client, pkj.with_claims(jti=jti)).status_code == 200


def test_assertion_and_basic_together_is_invalid_request(client, pkj, oauth):
    other = oauth.register(unique("svc"), ("client_credentials",), "read")
    response = client.post("/token", headers=other.basic, data={
        "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": pkj.make()})
    assert_safe_response(response, secrets=(other.secret or "",))
    assert_error(response, 400, "invalid_request")


def test_secret_client_cannot_authenticate_with_an_assertion(client, oauth):
    """A client registered for client_secret_basic gets nothing from a self-signed assertion."""
    secret_client = oauth.register(unique("svc"), ("client_credentials",), "read")
    forged = Assertions(kid=CLIENT_KEY.kid, client_id=secret_client.client_id).make()
    assert_error(present(client, forged), 401, "invalid_client")


# Registration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("jwks", [
    pytest.param({"keys": [CLIENT_KEY.as_dict(private=True)]}, id="ec-private-key"),
    pytest.param({"keys": [OTHER_RSA.as_dict(private=True)]}, id="rsa-private-key"),
    pytest.param({"keys": [public_jwk(OTHER_KEY), CLIENT_KEY.as_dict(private=True)]},
                 id="private-key-among-public-keys"),
    pytest.param({"keys": [OctKey.generate_key(256).as_dict()]}, id="oct-key"),
    pytest.param({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, id="oct-key-minimal"),
    pytest.param({"keys": []}, id="empty"),
    pytest.param({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]},
                 id="ec-key-not-on-curve"),
    pytest.param({"keys": "not-a-list"}, id="keys-not-a-list"),
    pytest.param([public_jwk(CLIENT_KEY)], id="not-a-jwk-set"),
    # RFC 7518 §3.3: RSA keys of 2048 bits or more.
    pytest.param({"keys": [public_jwk(SHORT_RSA)]}, id="rsa-1024"),
])
def test_registration_refuses_unusable_client_jwks(oauth, jwks):
    client_id = unique("pkj")
    with pytest.raises(RegistrationError):
        oauth.register(client_id, ("client_credentials",), "read", auth_method="private_key_jwt",
                       jwks=jwks)
    with oauth.app.extensions["provider"].storage.engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT count(*) FROM clients WHERE client_id = :id"),
                                    {"id": client_id}).scalar_one()
    assert stored == 0
