"""Hostile access tokens, presented wherever the provider reads one (THREATS.md promises 1 and 9).

Every token here is crafted with joserfc, an independent JOSE library, never with provider code.
Where a case needs a valid signature plus one bad header or claim, it is signed "as the
provider" with the provider's own private key, read from ``keys_dir/signing/<kid>.pem``; the
kid and public JWK come from the published JWKS. The hostile tokens reuse the ``jti`` and
lineage of a genuine token of the same client, so that a provider which acted on an unverified
token (revoking its ``jti``, say) would visibly kill the genuine one.

Each case is presented three ways:

- to ``/introspect``: exactly ``{"active": false}`` (RFC 7662 §2.2, CONTRACT.md);
- as ``subject_token`` of a token exchange: 400 ``invalid_request`` (RFC 8693 §2.2.2);
- to ``/revoke``: 200 and nothing revoked (RFC 7009 §2.2).

Afterwards no revocation row was written and the genuine token is still active.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, RSAKey

from provider import config, create_app
from provider.service import initialize
from tests.support import ACCESS_TOKEN_TYPE, EXCHANGE, ISSUER, Registered, claims_of

pytestmark = pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")

AUDIENCE = "https://api.example/v1"
ACCESS_TOKEN_MAX = 16384  # the longest token the provider reads (provider/tokens.py MAX_TOKEN_LENGTH)


class _AnyHeader(jws.JWSRegistry):
    """joserfc validates headers before signing; an attacker's library does not."""

    def check_header(self, header: dict[str, Any]) -> None:
        return None


FORGERY = _AnyHeader(algorithms=["none", "HS256", "ES256", "ES384", "RS256", "EdDSA"])
ATTACKER_EC = ECKey.generate_key("P-256")
ATTACKER_RSA = RSAKey.generate_key(2048)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Shared checks (also imported by the other attack tables) ------------------------------------

LEAK_MARKERS = ("Traceback", 'File "', "PRIVATE KEY", "sqlalchemy", "werkzeug", "jwt.exceptions")


RATE_LIMITS_OFF = {"rate_limits": {"token": "100000/minute", "introspect": "100000/minute",
                                   "failed_client_auth": "100000/minute"}}


def attack_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    """One provider (own keys, own SQLite database) for a whole attack table.

    Building a provider costs a vault RSA key and its validation, far too slow to repeat for
    each of hundreds of rows. So each table module shares one, and every test keeps to itself:
    its own clients (unique ids), its own tokens, and state compared before and after it
    (revocation rows newer than the last one it saw), never absolute counts.
    Isolated from the developer's PROVIDER_* settings as the per-test fixtures are.
    """
    base = tmp_path_factory.mktemp("attack-provider")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("PROVIDER_") and not name.startswith("PROVIDER_TEST_"):
                patch.delenv(name)
        (base / "provider.toml").write_text("")
        patch.setenv("PROVIDER_CONFIG", str(base / "provider.toml"))
        app_config = {"issuer": ISSUER, "database_url": f"sqlite:///{base}/provider.db",
                      "keys_dir": str(base / "keys"), **RATE_LIMITS_OFF}
        initialize(config.load(overrides=app_config))
        application = create_app(app_config)
        application.config["TESTING"] = True
    yield application, app_config
    application.extensions["provider"].storage.engine.dispose()


def unique(prefix: str) -> str:
    """A client id no other test in the shared provider uses."""
    return f"{prefix}-{secrets.token_hex(4)}"


def last_revocation(app: Any) -> int:
    """The newest row id of the revocation log, read directly from the database."""
    with app.extensions["provider"].storage.engine.connect() as connection:
        return connection.execute(sa.text("SELECT coalesce(max(id), 0) FROM revocations")).scalar_one()


def revocations_since(app: Any, last: int) -> int:
    """Rows written to the revocation log after row ``last``."""
    with app.extensions["provider"].storage.engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM revocations WHERE id > :last"),
                                  {"last": last}).scalar_one()


def is_active(oauth: Any, introspector: Registered, token: str) -> bool:
    response = oauth.post("/introspect", introspector, {"token": token})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["active"]


def assert_safe_response(response: Any, *, secrets: tuple[str, ...] = ()) -> None:
    """No 5xx, JSON, never cacheable, and nothing in the body an attacker should not see."""
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert "no-store" in response.headers.get("Cache-Control", "")
    text = response.get_data(as_text=True)
    for marker in LEAK_MARKERS:
        assert marker not in text
    for secret in secrets:
        if secret and len(secret) >= 8:
            assert secret not in text
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert set(body) <= {"error", "error_description"} and isinstance(body["error"], str)


def assert_error(response: Any, status: int, error: str) -> None:
    assert (response.status_code, response.get_json().get("error")) == (status, error), \
        response.get_data(as_text=True)
    if status == 401:
        assert response.headers.get("WWW-Authenticate")


# The forger -----------------------------------------------------------------------------------


@dataclass
class Forge:
    """Signs whatever it is asked to, the way an attacker (or a compromised key) would."""

    kid: str
    provider_key: ECKey
    public_jwk: dict[str, Any]
    genuine: str
    header: dict[str, Any]
    claims: dict[str, Any]
    introspector: Registered
    last_revocation: int  # the newest revocation row before the test

    def sign(self, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
             key: Any = "provider", payload: bytes | None = None) -> str:
        header = dict(self.header if header is None else header)
        if payload is None:
            payload = json.dumps(self.claims if claims is None else claims).encode()
        if key == "provider":
            key = self.provider_key
        return jws.serialize_compact(header, payload, key, registry=FORGERY)

    def with_header(self, **changes: Any) -> str:
        """A valid provider signature over the genuine claims, under a changed header."""
        return self.sign(header=_changed(self.header, changes))

    def with_claims(self, **changes: Any) -> str:
        """A valid provider signature over changed claims (``None`` drops a claim)."""
        return self.sign(claims=_changed(self.claims, changes))

    def valid(self) -> str:
        return self.sign()


_DROP = object()


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for name, value in changes.items():
        if value is _DROP:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def self_signed_certificate(key: ECKey) -> str:
    private = key.private_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .sign(private, hashes.SHA256()))
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


def flip_signature_bit(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def sign_segments(f: Forge, header_segment: str, payload_segment: str) -> str:
    """A provider ES256 signature over segments exactly as given, however malformed."""
    signing_input = f"{header_segment}.{payload_segment}"
    der = f.provider_key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def with_raw_claim(f: Forge, name: str, json_text: str) -> str:
    """A provider signature over the genuine claims with ``name`` spelt as ``json_text``."""
    marker = "\u0000raw\u0000"
    payload = json.dumps(_changed(f.claims, {name: marker})).replace(json.dumps(marker), json_text)
    return f.sign(payload=payload.encode())


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An unsecured JWS for an ``alg`` spelling joserfc will not produce."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def now() -> int:
    return int(time.time())


# The cases ------------------------------------------------------------------------------------

Case = Callable[[Forge], str]
_ATTACKER_KID = ATTACKER_EC.thumbprint()

CASES: dict[str, Case] = {
    # RFC 8725 §2.1, §3.1: the token chooses neither the algorithm nor the key.
    "alg-none": lambda f: f.sign(header={"alg": "none", "typ": "at+jwt", "kid": f.kid}, key=None),
    "alg-none-uppercase": lambda f: unsigned({"alg": "NONE", "typ": "at+jwt", "kid": f.kid},
                                             f.claims),
    "alg-none-without-kid": lambda f: f.sign(header={"alg": "none", "typ": "at+jwt"}, key=None),
    "signature-stripped": lambda f: f.valid().rsplit(".", 1)[0] + ".",
    "hs256-keyed-with-public-pem": lambda f: f.sign(
        header={"alg": "HS256", "typ": "at+jwt", "kid": f.kid},
        key=_oct(f.provider_key.as_pem(private=False))),
    "hs256-keyed-with-public-jwk-json": lambda f: f.sign(
        header={"alg": "HS256", "typ": "at+jwt", "kid": f.kid},
        key=_oct(json.dumps(f.public_jwk).encode())),
    "hs256-keyed-with-public-jwk-compact": lambda f: f.sign(
        header={"alg": "HS256", "typ": "at+jwt", "kid": f.kid},
        key=_oct(json.dumps(f.public_jwk, separators=(",", ":"), sort_keys=True).encode())),
    "attacker-es256-key-with-our-kid": lambda f: f.sign(key=ATTACKER_EC),
    "attacker-rs256-key-with-our-kid": lambda f: f.sign(
        header={"alg": "RS256", "typ": "at+jwt", "kid": f.kid}, key=ATTACKER_RSA),
    "unknown-kid": lambda f: f.sign(header={"alg": "ES256", "typ": "at+jwt", "kid": _ATTACKER_KID},
                                    key=ATTACKER_EC),
    "kid-missing": lambda f: f.with_header(kid=_DROP),
    "kid-path-traversal": lambda f: f.with_header(kid="../../../../etc/passwd"),
    "kid-path-traversal-to-own-key": lambda f: f.with_header(kid=f"../signing/{f.kid}"),
    "kid-sql-injection": lambda f: f.with_header(kid="' OR '1'='1' --"),
    "kid-very-long": lambda f: f.with_header(kid="k" * 8000),
    "kid-number": lambda f: f.with_header(kid=1),
    "kid-null": lambda f: f.with_header(kid=None),
    "kid-list": lambda f: f.with_header(kid=[f.kid]),
    "kid-object": lambda f: f.with_header(kid={"$ne": ""}),
    "kid-with-nul": lambda f: f.with_header(kid=f.kid + "\x00"),
    # Keys carried by the token are never trusted; these headers are refused, not ignored.
    "jku-attacker-url": lambda f: f.sign(
        header={"alg": "ES256", "typ": "at+jwt", "kid": _ATTACKER_KID,
                "jku": "https://attacker.example/jwks.json"}, key=ATTACKER_EC),
    "jwk-embedded-attacker-key": lambda f: f.sign(
        header={"alg": "ES256", "typ": "at+jwt",
                "jwk": ATTACKER_EC.as_dict(private=False)}, key=ATTACKER_EC),
    "jwk-embedded-attacker-key-with-our-kid": lambda f: f.sign(
        header={"alg": "ES256", "typ": "at+jwt", "kid": f.kid,
                "jwk": ATTACKER_EC.as_dict(private=False)}, key=ATTACKER_EC),
    "x5u-attacker-url": lambda f: f.sign(
        header={"alg": "ES256", "typ": "at+jwt", "x5u": "https://attacker.example/cert.pem"},
        key=ATTACKER_EC),
    "x5c-attacker-certificate": lambda f: f.sign(
        header={"alg": "ES256", "typ": "at+jwt", "x5c": [self_signed_certificate(ATTACKER_EC)]},
        key=ATTACKER_EC),
    "jku-with-provider-signature": lambda f: f.with_header(jku=f"{ISSUER}/.well-known/jwks.json"),
    "jwk-our-own-key-with-provider-signature": lambda f: f.with_header(jwk=f.public_jwk),
    # RFC 7515 §4.1.11: an extension we do not implement is refused.
    "crit-exp": lambda f: f.with_header(crit=["exp"], exp=now() + 60),
    "crit-unknown-extension": lambda f: f.with_header(crit=["http://attacker.example/ext"],
                                                      **{"http://attacker.example/ext": True}),
    "crit-empty-list": lambda f: f.with_header(crit=[]),
    # RFC 9068 §2.1 / RFC 8725 §3.11: typ separates token kinds.
    "typ-missing": lambda f: f.with_header(typ=_DROP),
    "typ-JWT": lambda f: f.with_header(typ="JWT"),
    "typ-dpop+jwt": lambda f: f.with_header(typ="dpop+jwt"),
    "typ-client-assertion": lambda f: f.with_header(typ="client-authentication+jwt"),
    "typ-number": lambda f: f.with_header(typ=1),
    # RFC 7519 §4.1, RFC 8725 §3.8-3.10: every claim is checked, with a small leeway.
    "other-issuer": lambda f: f.with_claims(iss="https://attacker.example"),
    "issuer-with-trailing-slash": lambda f: f.with_claims(iss=ISSUER + "/"),
    "expired-beyond-leeway": lambda f: f.with_claims(iat=now() - 600, exp=now() - 31 - 30),
    "nbf-in-the-future": lambda f: f.with_claims(nbf=now() + 600),
    "iat-far-in-the-future": lambda f: f.with_claims(iat=now() + 3600, exp=now() + 7200),
    "exp-not-a-number": lambda f: f.with_claims(exp="tomorrow"),
    # Python's json reads these non-JSON constants; a token that never expires must not pass.
    "exp-infinity": lambda f: f.with_claims(exp=float("inf")),
    "exp-nan": lambda f: f.with_claims(exp=float("nan")),
    "iat-minus-infinity": lambda f: f.with_claims(iat=float("-inf")),
    # A number beyond a double's range (Python's json reads it as infinity).
    "exp-beyond-a-double": lambda f: with_raw_claim(f, "exp", "1e400"),
    # A lifetime longer than the provider mints (max_access_token_ttl): never one of ours.
    "lifetime-of-thirty-days": lambda f: f.with_claims(exp=now() + 30 * 86400),
    "exp-beyond-64-bits": lambda f: f.with_claims(exp=2**70),
    "iat-below-64-bits": lambda f: f.with_claims(iat=-(2**70)),
    # RFC 8259 §8.2: a lone surrogate escape is no Unicode character.
    "sub-lone-surrogate": lambda f: with_raw_claim(f, "sub", '"svc\\ud800"'),
    "exp-numeric-string": lambda f: f.with_claims(exp=str(f.claims["exp"])),
    "iat-numeric-string": lambda f: f.with_claims(iat=str(f.claims["iat"])),
    "nbf-numeric-string": lambda f: f.with_claims(nbf=str(f.claims["iat"])),
    "missing-iss": lambda f: f.with_claims(iss=_DROP),
    "missing-sub": lambda f: f.with_claims(sub=_DROP),
    "missing-aud": lambda f: f.with_claims(aud=_DROP),
    "missing-exp": lambda f: f.with_claims(exp=_DROP),
    "missing-iat": lambda f: f.with_claims(iat=_DROP),
    "missing-jti": lambda f: f.with_claims(jti=_DROP),
    "missing-client_id": lambda f: f.with_claims(client_id=_DROP),
    "missing-scope": lambda f: f.with_claims(scope=_DROP),
    "missing-lineage": lambda f: f.with_claims(lineage=_DROP),
    "sub-not-a-string": lambda f: f.with_claims(sub=["svc"]),
    "client_id-not-a-string": lambda f: f.with_claims(client_id={"id": "svc"}),
    "scope-not-a-string": lambda f: f.with_claims(scope=["read", "write"]),
    "jti-not-a-string": lambda f: f.with_claims(jti=12345),
    "aud-empty-list": lambda f: f.with_claims(aud=[]),
    "aud-number": lambda f: f.with_claims(aud=7),
    "lineage-string": lambda f: f.with_claims(lineage="root"),
    "lineage-list": lambda f: f.with_claims(lineage=[0, [], 0, {}]),
    "lineage-depth-string": lambda f: f.with_claims(lineage={**f.claims["lineage"], "depth": "0"}),
    "lineage-ids-not-a-list": lambda f: f.with_claims(lineage={**f.claims["lineage"], "ids": "x"}),
    "lineage-ids-not-strings": lambda f: f.with_claims(lineage={**f.claims["lineage"], "ids": [1]}),
    "lineage-root-missing": lambda f: f.with_claims(
        lineage={k: v for k, v in f.claims["lineage"].items() if k != "root"}),
    "lineage-clients-list": lambda f: f.with_claims(lineage={**f.claims["lineage"], "clients": []}),
    "lineage-clients-not-times": lambda f: f.with_claims(
        lineage={**f.claims["lineage"], "clients": {"svc": "yesterday"}}),
    "payload-not-an-object": lambda f: f.sign(payload=b'["svc"]'),
    "payload-not-json": lambda f: f.sign(payload=b"svc read write"),
    # RFC 7519 §7.2: the claims are UTF-8 JSON (Python's json would also read UTF-16 or -32).
    "payload-utf-16": lambda f: f.sign(payload=json.dumps(f.claims).encode("utf-16")),
    "payload-utf-32": lambda f: f.sign(payload=json.dumps(f.claims).encode("utf-32")),
    # RFC 7515 §2: base64url without padding; a padded segment is another signing input.
    "padded-payload-segment": lambda f: sign_segments(
        f, f.valid().split(".")[0], b64url(json.dumps(f.claims).encode()) + "=="),
    # Damaged genuine tokens.
    "truncated": lambda f: f.genuine[:-12],
    "truncated-to-header-and-payload": lambda f: f.genuine.rsplit(".", 1)[0],
    "flipped-signature-bit": lambda f: flip_signature_bit(f.genuine),
    "genuine-with-trailing-dot": lambda f: f.genuine + ".",
    "genuine-payload-under-other-header": lambda f: (
        b64url(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": f.kid, "x": 1}).encode())
        + "." + f.genuine.split(".", 1)[1]),
    # Garbage of many shapes and sizes.
    "garbage-empty": lambda f: "",
    "garbage-1-char": lambda f: "x",
    "garbage-10KiB": lambda f: "A" * 10 * 1024,
    "garbage-17KiB": lambda f: "A" * 17 * 1024,
    "garbage-non-ascii": lambda f: "ÿ€\u202e🔑.ünïcødé.签名",
    "garbage-dots-only": lambda f: "...",
    "garbage-a.b.c": lambda f: "a.b.c",
    "garbage-five-segments": lambda f: "a.b.c.d.e",
    "garbage-header-is-a-list": lambda f: b64url(b"[1]") + "." + b64url(b"{}") + ".AAAA",
    "garbage-header-is-null": lambda f: b64url(b"null") + "." + b64url(b"{}") + ".AAAA",
    "garbage-jwe-looking": lambda f: b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"})
                                            .encode()) + ".a.b.c.d",
}


def _oct(secret: bytes) -> OctKey:
    """An HMAC key made of public key bytes: joserfc refuses to import one, so build it."""
    return OctKey(secret, secret)


# RFC 6749 §3.1: "Parameters sent without a value MUST be treated as if they were omitted
# from the request." An empty token is a missing token, which is invalid_request everywhere.
EMPTY_IS_MISSING = {"garbage-empty"}


def rows(endpoint: str) -> list[Any]:
    result = []
    for case_id, build in CASES.items():
        result.append(pytest.param(case_id, build, id=case_id))
    return result


# Fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _attack_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    yield from attack_provider(tmp_path_factory)


@pytest.fixture
def app(_attack_provider: tuple[Any, dict[str, Any]]) -> Any:
    return _attack_provider[0]


@pytest.fixture
def app_config(_attack_provider: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    return _attack_provider[1]


@pytest.fixture
def svc(oauth: Any) -> Registered:
    return oauth.register(unique("svc"), audiences=[AUDIENCE])


@pytest.fixture
def introspector(oauth: Any) -> Registered:
    return oauth.register(unique("introspector"), ("client_credentials",), "introspect",
                          introspect=True)


@pytest.fixture
def forge(client: Any, app: Any, app_config: dict[str, Any], oauth: Any, svc: Registered,
          introspector: Registered) -> Forge:
    jwks = client.get("/.well-known/jwks.json").get_json()
    (public_jwk,) = jwks["keys"]
    kid = public_jwk["kid"]
    pem = (Path(app_config["keys_dir"]) / "signing" / f"{kid}.pem").read_bytes()
    genuine = oauth.access_token(svc)
    header = {"alg": "ES256", "typ": "at+jwt", "kid": kid}
    return Forge(kid=kid, provider_key=ECKey.import_key(pem), public_jwk=public_jwk,
                 genuine=genuine, header=header, claims=claims_of(genuine),
                 introspector=introspector, last_revocation=last_revocation(app))


def introspect(oauth: Any, introspector: Registered, token: str) -> Any:
    return oauth.post("/introspect", introspector, {"token": token})


def assert_nothing_changed(oauth: Any, forge: Forge) -> None:
    assert revocations_since(oauth.app, forge.last_revocation) == 0
    assert is_active(oauth, forge.introspector, forge.genuine)


# The control: the forger is good enough that only the hostile part is refused -----------------


def test_forged_token_without_hostile_part_is_accepted_everywhere(oauth, svc, introspector, forge):
    """Without this, every row below could pass because the forger is broken."""
    token = forge.valid()
    body = introspect(oauth, introspector, token).get_json()
    assert body["active"] is True and body["jti"] == forge.claims["jti"]
    assert oauth.exchange(svc, token, scope="read").status_code == 200
    for variant in (forge.with_header(typ="application/at+jwt"), forge.with_claims(nbf=now())):
        assert introspect(oauth, introspector, variant).get_json()["active"] is True
    assert oauth.revoke(svc, token).status_code == 200
    assert revocations_since(oauth.app, forge.last_revocation) == 1
    assert not is_active(oauth, introspector, forge.genuine)


def test_every_forged_case_fits_the_token_size_limit_unless_meant_to(forge):
    for case_id, build in CASES.items():
        if case_id != "garbage-17KiB":
            assert len(build(forge)) <= ACCESS_TOKEN_MAX, case_id


# The tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("case_id", "build"), rows("introspect"))
def test_introspection_reports_inactive_for_hostile_token(oauth, introspector, forge, case_id, build):
    token = build(forge)
    response = introspect(oauth, introspector, token)
    assert_safe_response(response, secrets=(token, introspector.secret or ""))
    if case_id in EMPTY_IS_MISSING:
        assert_error(response, 400, "invalid_request")
    else:
        assert response.status_code == 200
        assert response.get_json() == {"active": False}
    assert_nothing_changed(oauth, forge)


@pytest.mark.parametrize(("case_id", "build"), rows("exchange"))
def test_exchange_refuses_hostile_subject_token(oauth, svc, forge, case_id, build):
    token = build(forge)
    response = oauth.post("/token", svc, {"grant_type": EXCHANGE, "subject_token": token,
                                          "subject_token_type": ACCESS_TOKEN_TYPE})
    assert_safe_response(response, secrets=(token, svc.secret or ""))
    assert_error(response, 400, "invalid_request")
    assert "access_token" not in response.get_json()
    assert_nothing_changed(oauth, forge)


@pytest.mark.parametrize(("case_id", "build"), rows("revoke"))
def test_revocation_ignores_hostile_token(oauth, svc, forge, case_id, build):
    token = build(forge)
    response = oauth.revoke(svc, token)
    assert_safe_response(response, secrets=(token, svc.secret or ""))
    if case_id in EMPTY_IS_MISSING:
        assert_error(response, 400, "invalid_request")
    else:
        assert response.status_code == 200, response.get_data(as_text=True)
    assert_nothing_changed(oauth, forge)
