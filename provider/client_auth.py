"""Client authentication: RFC 6749 §2.3 (client secrets) and RFC 7523 §2.2 (private_key_jwt).

One method per request (RFC 6749 §2.3: the client MUST NOT use more than one); the method must
be the one the client registered. Every failure is the same ``invalid_client``, whether the
client exists or not, and unknown clients cost the same keyed hash as known ones.

A client assertion must be signed by a key of the client's registered JWK Set with an
asymmetric algorithm that key allows, carry ``iss`` = ``sub`` = the client id, ``aud`` naming this
provider's issuer or token endpoint (or the endpoint called), an ``exp`` at most five minutes
ahead, and a ``jti`` never seen before (RFC 7523 §3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import jwt

from provider.clients import CLIENT_ID, Client
from provider.errors import InvalidClient, InvalidRequest

if TYPE_CHECKING:
    from provider.service import Provider

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300
MAX_ASSERTION_LENGTH = 8192
_REFUSED_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit")
# typ values that belong to other kinds of JWT and are never a client assertion.
_OTHER_TYPES = ("at+jwt", "application/at+jwt", "dpop+jwt", "application/dpop+jwt")
_ALGORITHMS = {
    ("EC", "P-256"): {"ES256"},
    ("EC", "P-384"): {"ES384"},
    ("EC", "P-521"): {"ES512"},
    ("RSA", None): {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    ("OKP", "Ed25519"): {"EdDSA"},
}
_DUMMY_HASH = bytes(32)


def authenticate(
    provider: Provider,
    form: dict[str, Any],
    authorization: str | None,
    remote_addr: str | None,
    endpoint: Callable[[], str],
) -> Client:
    """The authenticated client; raises ``invalid_client`` (or ``invalid_request``).

    ``endpoint`` gives the URL called, one of the audiences a client assertion may name; it is
    only computed for an assertion."""
    basic = authorization is not None
    post = "client_secret" in form
    assertion = "client_assertion" in form or "client_assertion_type" in form
    if basic + post + assertion > 1:
        raise InvalidRequest("use exactly one client authentication method per request")
    if basic:
        client_id, secret = _basic_credentials(authorization or "")
        method = "client_secret_basic"
        if form.get("client_id") not in (None, client_id):
            raise InvalidClient()
    elif post:
        client_id, secret, method = form.get("client_id"), form["client_secret"], "client_secret_post"
    elif assertion:
        return _authenticate_assertion(provider, form, remote_addr, endpoint)
    else:
        raise InvalidClient()
    if not isinstance(client_id, str) or not CLIENT_ID.match(client_id):
        provider.hasher.matches(secret, _DUMMY_HASH)
        raise InvalidClient()
    client = provider.clients.get(client_id)
    stored = client.secret_hash if client else _DUMMY_HASH
    secret_ok = provider.hasher.matches(secret, stored)
    if client is None or not secret_ok or client.auth_method != method:
        raise InvalidClient()
    return _from_allowed_address(client, remote_addr)


def _basic_credentials(authorization: str) -> tuple[str, str]:
    """RFC 7617 credentials, each form-urlencoded per RFC 6749 §2.3.1."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise InvalidClient()
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            raise InvalidClient()
        return unquote_plus(client_id, errors="strict"), unquote_plus(secret, errors="strict")
    except (binascii.Error, ValueError):  # ValueError: non-ASCII base64, bad UTF-8
        raise InvalidClient() from None


def _from_allowed_address(client: Client, remote_addr: str | None) -> Client:
    if not client.allows_address(remote_addr):
        raise InvalidClient()
    return client


def _authenticate_assertion(
    provider: Provider, form: dict[str, Any], remote_addr: str | None, endpoint: Callable[[], str]
) -> Client:
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise InvalidRequest(f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion")
    if not isinstance(assertion, str) or not assertion or len(assertion) > MAX_ASSERTION_LENGTH:
        raise InvalidClient()
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise InvalidClient() from None
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or not CLIENT_ID.match(client_id):
        raise InvalidClient()
    if form.get("client_id") not in (None, client_id):
        raise InvalidClient()
    client = provider.clients.get(client_id)
    if client is None or client.auth_method != "private_key_jwt":
        raise InvalidClient()
    typ = header.get("typ")
    if (isinstance(typ, str) and typ.lower() in _OTHER_TYPES) or any(
            h in header for h in _REFUSED_HEADERS):
        raise InvalidClient()
    key = _assertion_key(client, header)
    settings = provider.settings
    try:
        claims = jwt.decode(
            assertion,
            key.key,
            algorithms=[header["alg"]],
            audience=[settings.issuer, settings.token_endpoint, endpoint()],
            issuer=client_id,
            leeway=settings.tokens.leeway,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.InvalidTokenError:
        raise InvalidClient() from None
    jti, exp = claims["jti"], claims["exp"]
    if claims["sub"] != client_id or not isinstance(jti, str) or not jti or len(jti) > 255:
        raise InvalidClient()
    # RFC 7519 §2: a NumericDate is a JSON number (PyJWT also takes "123").
    if not isinstance(exp, int | float) or isinstance(exp, bool) \
            or exp > time.time() + MAX_ASSERTION_LIFETIME + settings.tokens.leeway:
        raise InvalidClient()
    # Only now, for a verified assertion, is its jti spent: a forged one cannot burn ids.
    replay_key = hashlib.sha256(f"{client_id}\0{jti}".encode()).hexdigest()
    if not provider.replay.first_use(replay_key, int(exp) + settings.tokens.leeway):
        raise InvalidClient()
    return _from_allowed_address(client, remote_addr)


def _assertion_key(client: Client, header: dict[str, Any]) -> jwt.PyJWK:
    """The client's key that ``kid`` names (or its only key), if it allows ``alg``."""
    alg, kid = header.get("alg"), header.get("kid")
    candidates = [k for k in client.signing_keys if kid is None or k.key_id == kid]
    if kid is None and len(candidates) != 1:
        candidates = [k for k in candidates if alg in _allowed_algorithms(k)]
    for key in candidates:
        if alg in _allowed_algorithms(key):
            return key
    raise InvalidClient()


def _allowed_algorithms(key: jwt.PyJWK) -> set[str]:
    jwk = key._jwk_data
    kty = jwk.get("kty")
    allowed = _ALGORITHMS.get((kty, None if kty == "RSA" else jwk.get("crv")), set())
    if "alg" in jwk:
        allowed &= {jwk["alg"]}
    return allowed
