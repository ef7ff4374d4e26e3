"""The baseline: a trivial Flask app doing only the work each endpoint inherently needs.

Served exactly like the provider (``gunicorn -w 2 -k provider.serving.SyncWorker --preload
bench.baseline_app:app``, the worker ``serve`` runs) and
sent exactly the same requests: the same Basic credentials (the provider's client ids and
secrets) and the same subject and introspected tokens (the provider's own, verified with its
public key). Per request:

- ``POST /token``, ``client_credentials``: parse the form, check the Basic secret (HMAC-SHA256,
  ``hmac.compare_digest``), one ES256 signature, JSON;
- ``POST /token``, token exchange: the same plus one ES256 verification of ``subject_token``;
- ``POST /introspect``: parse, check the secret, one ES256 verification, the claims as JSON;
- ``GET /gateway/{upstream}/{path}``: parse the Bearer header, one ES256 verification, call the
  upstream (``bench.upstream_app``) with the upstream token over a pooled urllib3 connection,
  return its body.

Its settings come from the JSON file named by ``BENCH_BASELINE_CONFIG``:
``{"issuer": ..., "clients": {client_id: secret}, "verify_jwk": {public JWK},
"upstream": {"base_url": ..., "token": ...} or null}``. Its signing key is generated at start-up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import jwt
import urllib3
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, jsonify, request
from jwt.algorithms import ECAlgorithm

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TTL = 300

_config = json.loads(Path(os.environ["BENCH_BASELINE_CONFIG"]).read_text(encoding="utf-8"))
ISSUER: str = _config["issuer"]
_HASH_KEY = secrets.token_bytes(32)
_SECRET_HASHES = {client_id: hmac.new(_HASH_KEY, secret.encode(), hashlib.sha256).digest()
                  for client_id, secret in _config["clients"].items()}
_VERIFY_KEY = ECAlgorithm.from_jwk(_config["verify_jwk"])
_SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
_SIGNING_KID = "baseline"
_UPSTREAM: dict[str, str] | None = _config.get("upstream")
_pools: dict[int, urllib3.PoolManager] = {}  # per process: made after gunicorn forks

app = Flask(__name__)


def _error(status: int, error: str):
    return jsonify({"error": error}), status


def _client_id() -> str | None:
    """The client whose Basic secret matches, else None."""
    scheme, _, encoded = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    presented = hmac.new(_HASH_KEY, secret.encode(), hashlib.sha256).digest()
    stored = _SECRET_HASHES.get(client_id, bytes(32))
    return client_id if hmac.compare_digest(presented, stored) and client_id in _SECRET_HASHES \
        else None


def _verify(token: str) -> dict[str, Any] | None:
    try:
        return jwt.decode(token, _VERIFY_KEY, algorithms=["ES256"], options={"verify_aud": False})
    except jwt.InvalidTokenError:
        return None


def _sign(sub: str, client_id: str, audience: str | list[str], scope: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": sub, "aud": audience, "exp": now + TTL, "iat": now,
              "jti": secrets.token_urlsafe(16), "client_id": client_id, "scope": scope}
    return jwt.encode(claims, _SIGNING_KEY, algorithm="ES256",
                      headers={"kid": _SIGNING_KID, "typ": "at+jwt"})


def _token_response(token: str, scope: str):
    return jsonify({"access_token": token, "token_type": "Bearer", "expires_in": TTL,
                    "scope": scope})


@app.post("/token")
def token():
    form = request.form
    client_id = _client_id()
    if client_id is None:
        return _error(401, "invalid_client")
    grant_type = form.get("grant_type")
    if grant_type == "client_credentials":
        scope = form.get("scope", "")
        return _token_response(_sign(client_id, client_id, ISSUER, scope), scope)
    if grant_type == EXCHANGE:
        subject = _verify(form.get("subject_token", ""))
        if subject is None:
            return _error(400, "invalid_request")
        scope = form.get("scope") or subject["scope"]
        audience = form.get("resource") or subject["aud"]
        return _token_response(_sign(subject["sub"], client_id, audience, scope), scope)
    return _error(400, "unsupported_grant_type")


@app.post("/introspect")
def introspect():
    form = request.form
    if _client_id() is None:
        return _error(401, "invalid_client")
    claims = _verify(form.get("token", ""))
    if claims is None:
        return jsonify({"active": False})
    return jsonify({"active": True, **claims})


def _pool() -> urllib3.PoolManager:
    pid = os.getpid()
    if pid not in _pools:
        _pools[pid] = urllib3.PoolManager(maxsize=8, retries=False,
                                          timeout=urllib3.Timeout(connect=5, read=30))
    return _pools[pid]


@app.get("/gateway/<upstream>/<path:path>")
def gateway(upstream: str, path: str):
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or _UPSTREAM is None or _verify(token.strip()) is None:
        return _error(401, "invalid_token")
    answer = _pool().request("GET", f"{_UPSTREAM['base_url']}/{path}",
                             headers={"Authorization": f"Bearer {_UPSTREAM['token']}"})
    return app.response_class(answer.data, status=answer.status,
                              content_type=answer.headers.get("Content-Type"))


@app.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})
