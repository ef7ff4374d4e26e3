"""Registered clients: registration rules, secrets kept as a keyed hash, and a short cache.

Secrets are generated here (256 random bits), shown once, and stored only as HMAC-SHA256 under
``keys/client-secret.key``. A slow password hash would cap the token endpoint near 40 requests a
second per core and buys nothing for secrets with this much entropy; the key means a stolen
database alone does not let anyone test guesses offline.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from provider.config import ConfigError, address_in, parse_networks
from provider.scopes import parse_scope
from provider.storage import Storage

GRANT_TYPES = (
    "client_credentials",
    "refresh_token",
    "authorization_code",
    "urn:ietf:params:oauth:grant-type:token-exchange",
)
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,255}$")
_PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
_CACHE_SECONDS = 1.0
_CACHE_SIZE = 10000


class RegistrationError(Exception):
    """A client registration is refused; the message states the rule."""


class SecretHasher:
    """Keyed hash of client secrets, compared in constant time."""

    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ConfigError("client-secret.key must hold at least 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "SecretHasher(<key hidden>)"

    @classmethod
    def load(cls, keys_dir: str) -> SecretHasher:
        path = Path(keys_dir) / "client-secret.key"
        if not path.exists():
            raise ConfigError(f"{path} is missing: run token-provider init")
        return cls(path.read_bytes())

    @staticmethod
    def create(keys_dir: str) -> bool:
        """Write a new hash key unless one exists; True if it was written."""
        path = Path(keys_dir) / "client-secret.key"
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        return True

    def derive(self, label: bytes) -> bytes:
        """A key for another purpose (DPoP nonces), derived so that it never equals this one."""
        return hmac.new(self._key, b"token-provider derive\0" + label, hashlib.sha256).digest()

    def hash(self, secret: str) -> bytes:
        return hmac.new(self._key, secret.encode("utf-8"), hashlib.sha256).digest()

    def matches(self, secret: str, stored: bytes | None) -> bool:
        presented = self.hash(secret)
        return hmac.compare_digest(presented, stored or b"\0" * 32) and stored is not None


@dataclass(frozen=True)
class Client:
    client_id: str
    auth_method: str
    grant_types: frozenset[str]
    scope: tuple[str, ...]
    audiences: tuple[str, ...]
    redirect_uris: tuple[str, ...] = ()
    allowed_ips: tuple[Any, ...] = ()
    token_ttl: int | None = None
    may_act: str | None = None
    can_introspect: bool = False
    can_revoke_any: bool = False
    can_manage_connections: bool = False
    dpop_required: bool = False
    created_at: float = 0.0
    jwks: dict[str, Any] | None = field(default=None, repr=False)
    secret_hash: bytes | None = field(default=None, repr=False)
    signing_keys: tuple[jwt.PyJWK, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Client:
        jwks = row["jwks"]
        return cls(
            client_id=row["client_id"],
            auth_method=row["auth_method"],
            grant_types=frozenset(row["grant_types"]),
            scope=tuple(row["scope"].split()),
            audiences=tuple(row["audiences"]),
            redirect_uris=tuple(row["redirect_uris"]),
            allowed_ips=parse_networks(row["allowed_ips"]),
            token_ttl=row["token_ttl"],
            may_act=row["may_act"],
            can_introspect=row["can_introspect"],
            can_revoke_any=row["can_revoke_any"],
            can_manage_connections=row["can_manage_connections"],
            dpop_required=row["dpop_required"],
            created_at=row["created_at"],
            jwks=jwks,
            secret_hash=row["secret_hash"],
            signing_keys=tuple(jwt.PyJWKSet.from_dict(jwks).keys) if jwks else (),
        )

    def allows_address(self, address: str | None) -> bool:
        return address_in(self.allowed_ips, address)

    def describe(self) -> dict[str, Any]:
        """What ``clients show`` prints: everything but the secret hash and keys."""
        return {
            "client_id": self.client_id,
            "auth_method": self.auth_method,
            "grant_types": sorted(self.grant_types),
            "scope": " ".join(self.scope),
            "audiences": list(self.audiences),
            "redirect_uris": list(self.redirect_uris),
            "allowed_ips": [str(n) for n in self.allowed_ips],
            "token_ttl": self.token_ttl,
            "may_act": self.may_act,
            "introspect": self.can_introspect,
            "revoke_any": self.can_revoke_any,
            "connections": self.can_manage_connections,
            "dpop_required": self.dpop_required,
            "created_at": self.created_at,
        }


class ClientRegistry:
    """Clients by id, cached for a second so that the hot path rarely queries the database.

    A deleted client or a rotated secret takes effect on every instance within that second.
    Unknown ids are cached too, so a flood of made-up ids cannot flood the database.
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._cache: OrderedDict[str, tuple[float, Client | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, client_id: str) -> Client | None:
        now = time.monotonic()
        cached = self._cache.get(client_id)
        if cached is not None and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        row = self.storage.get_client(client_id)
        client = Client.from_row(row) if row else None
        with self._lock:
            self._cache[client_id] = (now, client)
            self._cache.move_to_end(client_id)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return client

    def forget(self, client_id: str) -> None:
        with self._lock:
            self._cache.pop(client_id, None)


def _absolute_uri(value: str, what: str, http_only: bool = False) -> str:
    parts = urlsplit(value)
    if not parts.scheme or (http_only and parts.scheme not in ("http", "https")) \
            or parts.fragment or any(ord(c) <= 0x20 for c in value):
        raise RegistrationError(f"{what} must be an absolute URI without a fragment: {value!r}")
    if parts.scheme in ("http", "https") and not parts.netloc:
        raise RegistrationError(f"{what} must name a host: {value!r}")
    return value


def check_public_jwks(jwks: Any) -> dict[str, Any]:
    """A client's JWK Set for private_key_jwt: asymmetric public keys only."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise RegistrationError("the JWKS file must hold {\"keys\": [...]} with at least one key")
    for key in jwks["keys"]:
        if not isinstance(key, dict) or key.get("kty") not in ("EC", "RSA", "OKP"):
            raise RegistrationError("client keys must be EC, RSA or OKP public keys")
        if _PRIVATE_JWK_MEMBERS & set(key):
            raise RegistrationError("the JWKS file holds private key material: publish public keys only")
    try:
        keys = jwt.PyJWKSet.from_dict(jwks).keys
    except jwt.PyJWTError as exc:
        raise RegistrationError(f"the JWKS file is not a valid JWK Set: {exc}") from None
    for key in keys:
        if key.Algorithm.check_key_length(key.key):  # RFC 7518 §3.3: RSA of 2048 bits or more
            raise RegistrationError("client RSA keys must be 2048 bits or larger")
    return jwks


def register_client(
    storage: Storage,
    hasher: SecretHasher,
    *,
    issuer: str,
    max_ttl: int,
    client_id: str,
    grant_types: list[str],
    scope: str,
    audiences: list[str] | None = None,
    redirect_uris: list[str] | None = None,
    auth_method: str = "client_secret_basic",
    jwks: dict[str, Any] | None = None,
    allowed_ips: list[str] | None = None,
    token_ttl: int | None = None,
    may_act: str | None = None,
    introspect: bool = False,
    revoke_any: bool = False,
    connections: bool = False,
    dpop_required: bool = False,
) -> tuple[Client, str | None]:
    """Validate and store a client; returns it and its secret (None for private_key_jwt)."""
    if not CLIENT_ID.match(client_id):
        raise RegistrationError("a client id is 1 to 255 printable ASCII characters without spaces")
    if not grant_types:
        raise RegistrationError("at least one --grant-type is required")
    for grant_type in grant_types:
        if grant_type not in GRANT_TYPES:
            raise RegistrationError(f"grant type must be one of {', '.join(GRANT_TYPES)}")
    scopes = parse_scope(scope)
    if not scopes:
        raise RegistrationError("scope must be one or more space-separated scope tokens")
    if auth_method not in AUTH_METHODS:
        raise RegistrationError(f"auth method must be one of {', '.join(AUTH_METHODS)}")
    if (auth_method == "private_key_jwt") != (jwks is not None):
        raise RegistrationError("--jwks-file is required with private_key_jwt, and only with it")
    if jwks is not None:
        check_public_jwks(jwks)
    if token_ttl is not None and not 1 <= token_ttl <= max_ttl:
        raise RegistrationError(f"token ttl must be between 1 and {max_ttl} seconds")
    if "authorization_code" in grant_types and not redirect_uris:
        raise RegistrationError("the authorization_code grant needs at least one --redirect-uri")
    if may_act is not None and not CLIENT_ID.match(may_act):
        raise RegistrationError("--may-act takes a subject: 1 to 255 printable ASCII characters")
    try:
        networks = parse_networks(allowed_ips or [])
    except ConfigError as exc:
        raise RegistrationError(f"--allow-ip: {exc}") from None
    audience_list = [_absolute_uri(a, "--audience") for a in (audiences or [issuer])]
    redirect_list = [_absolute_uri(r, "--redirect-uri", http_only=True) for r in redirect_uris or []]
    secret = None if auth_method == "private_key_jwt" else secrets.token_urlsafe(32)
    row = {
        "client_id": client_id,
        "secret_hash": hasher.hash(secret) if secret else None,
        "auth_method": auth_method,
        "grant_types": list(dict.fromkeys(grant_types)),
        "scope": " ".join(scopes),
        "audiences": list(dict.fromkeys(audience_list)),
        "redirect_uris": list(dict.fromkeys(redirect_list)),
        "jwks": jwks,
        "allowed_ips": [str(n) for n in networks],
        "token_ttl": token_ttl,
        "may_act": may_act,
        "can_introspect": introspect,
        "can_revoke_any": revoke_any,
        "can_manage_connections": connections,
        "dpop_required": dpop_required,
        "created_at": time.time(),
    }
    if not storage.add_client(row):
        raise RegistrationError(f"a client {client_id!r} exists already")
    return Client.from_row(row), secret


def rotate_secret(storage: Storage, hasher: SecretHasher, client_id: str) -> str:
    row = storage.get_client(client_id)
    if row is None:
        raise RegistrationError(f"no client {client_id!r}")
    if row["auth_method"] == "private_key_jwt":
        raise RegistrationError("a private_key_jwt client has no secret: change its JWKS instead")
    secret = secrets.token_urlsafe(32)
    storage.set_client_secret_hash(client_id, hasher.hash(secret))
    return secret
