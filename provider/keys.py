"""Signing keys: generation, rotation, retirement and the JWK Set (RFC 7517, RFC 7638).

Each private key lives in ``keys/signing/<kid>.pem`` (PKCS#8, mode 0600, encrypted when
``PROVIDER_KEYS_PASSPHRASE`` is set). Its public half and its schedule live in the database,
shared by every instance, so a key rotated in on one host is verifiable on all of them at once.

A key's state follows from its schedule and the clock:

- ``published``: in JWKS, not signing yet (``signs_from`` is in the future; RFC 7517 consumers
  get time to fetch it before they meet it);
- ``signing``: the newest key whose ``signs_from`` has passed;
- ``retiring``: replaced, still in JWKS and still verified, until every token it signed has
  expired (``max_access_token_ttl`` plus ``leeway`` after it was replaced);
- ``retired``: gone from JWKS; tokens it signed no longer validate.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from provider.storage import Storage

log = logging.getLogger("provider.keys")

PASSPHRASE_VARIABLE = "PROVIDER_KEYS_PASSPHRASE"
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                       "OKP": ("crv", "kty", "x")}
_RELOAD_INTERVAL = 5.0


class KeyOperationError(Exception):
    """A key operation is refused; the message states the rule."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, sorted, without white space."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def generate_private_key(alg: str) -> Any:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise KeyOperationError(f"algorithm must be ES256, RS256 or EdDSA, not {alg}")


def public_jwk(public_key: Any, alg: str) -> dict[str, Any]:
    """The public JWK with ``kid`` (RFC 7638 thumbprint), ``use: sig`` and ``alg``."""
    converter = {"ES256": ECAlgorithm, "RS256": RSAAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    raw = converter.to_jwk(public_key, as_dict=True)
    jwk = {member: raw[member] for member in _THUMBPRINT_MEMBERS[raw["kty"]]}
    return {**jwk, "kid": thumbprint(jwk), "use": "sig", "alg": alg}


def _encryption() -> serialization.KeySerializationEncryption:
    passphrase = os.environ.get(PASSPHRASE_VARIABLE)
    if passphrase:
        return serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
    return serialization.NoEncryption()


def write_private_key(path: Path, private_key: Any) -> None:
    """Write a PKCS#8 PEM readable by its owner only, never visible with wider permissions."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)


def read_private_key(path: Path) -> Any:
    passphrase = os.environ.get(PASSPHRASE_VARIABLE)
    return serialization.load_pem_private_key(
        path.read_bytes(), password=passphrase.encode("utf-8") if passphrase else None
    )


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    jwk: dict[str, Any]
    created_at: float
    signs_from: float
    retired_at: float | None
    public_key: Any = field(repr=False, compare=False)
    private_key: Any = field(default=None, repr=False, compare=False)


def key_states(rows: list[dict[str, Any]], now: float, expiry: float) -> list[dict[str, Any]]:
    """Each key row with its ``state`` and, for a replaced key, when it may be retired.

    ``expiry`` is how long a token may outlive the moment its key was replaced
    (``max_access_token_ttl`` plus ``leeway``).
    """
    live = sorted((r for r in rows if r["retired_at"] is None),
                  key=lambda r: (r["signs_from"], r["created_at"]))
    signing = [r for r in live if r["signs_from"] <= now]
    current = signing[-1]["kid"] if signing else None
    replaced_at = {a["kid"]: b["signs_from"] for a, b in itertools.pairwise(live)}
    result = []
    for row in sorted(rows, key=lambda r: r["created_at"]):
        if row["retired_at"] is not None:
            state = "retired"
        elif row["kid"] == current:
            state = "signing"
        elif row["signs_from"] > now:
            state = "published"
        else:
            state = "retiring"
        entry = {**row, "state": state}
        if state == "retiring":
            entry["retirable_at"] = replaced_at[row["kid"]] + expiry
        result.append(entry)
    return result


class KeySet:
    """The keys this instance signs and verifies with, reloaded from the database."""

    def __init__(self, storage: Storage, keys_dir: str, token_expiry: float):
        self.storage = storage
        self.directory = Path(keys_dir) / "signing"
        self.token_expiry = token_expiry
        self._keys: dict[str, SigningKey] = {}
        self._jwks: dict[str, Any] = {"keys": []}
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def reload(self) -> None:
        keys: dict[str, SigningKey] = {}
        for row in self.storage.list_signing_keys():
            known = self._keys.get(row["kid"])
            private_key = known.private_key if known else None
            path = self.directory / f"{row['kid']}.pem"
            if private_key is None and row["retired_at"] is None and path.exists():
                private_key = read_private_key(path)
            keys[row["kid"]] = SigningKey(
                kid=row["kid"], alg=row["alg"], jwk=row["public_jwk"],
                created_at=row["created_at"], signs_from=row["signs_from"],
                retired_at=row["retired_at"],
                public_key=known.public_key if known else _load_public(row["public_jwk"]),
                private_key=private_key,
            )
        self._keys = keys
        self._jwks = {"keys": [k.jwk for k in keys.values() if k.retired_at is None]}
        self._loaded_at = time.monotonic()

    def _refresh(self, force: bool = False) -> None:
        elapsed = time.monotonic() - self._loaded_at
        if elapsed >= _RELOAD_INTERVAL or (force and elapsed >= 1.0):
            with self._lock:
                if time.monotonic() - self._loaded_at >= (1.0 if force else _RELOAD_INTERVAL):
                    self.reload()

    def signer(self) -> SigningKey:
        """The newest key whose time to sign has come and whose private half is here."""
        self._refresh()
        now = time.time()
        candidates = [k for k in self._keys.values()
                      if k.retired_at is None and k.signs_from <= now and k.private_key]
        if not candidates:
            raise KeyOperationError("no signing key is available: run token-provider init")
        return max(candidates, key=lambda k: (k.signs_from, k.created_at))

    def verification_key(self, kid: str) -> SigningKey | None:
        """Our unretired key named ``kid``; an unknown kid reloads at most once a second."""
        self._refresh()
        key = self._keys.get(kid)
        if key is None:
            self._refresh(force=True)
            key = self._keys.get(kid)
        if key is None or key.retired_at is not None:
            return None
        return key

    def jwks(self) -> dict[str, Any]:
        self._refresh()
        return self._jwks

    @property
    def algorithms(self) -> list[str]:
        return sorted({k.alg for k in self._keys.values() if k.retired_at is None})


def _load_public(jwk: dict[str, Any]) -> Any:
    converter = {"EC": ECAlgorithm, "RSA": RSAAlgorithm, "OKP": OKPAlgorithm}[jwk["kty"]]
    return converter.from_jwk(jwk)


# Operations (command line) ------------------------------------------------------------------


def add_signing_key(storage: Storage, keys_dir: str, alg: str, publish_delay: float) -> dict:
    """Generate a key, write its private half, and schedule it to sign after the delay."""
    private_key = generate_private_key(alg)
    jwk = public_jwk(private_key.public_key(), alg)
    write_private_key(Path(keys_dir) / "signing" / f"{jwk['kid']}.pem", private_key)
    now = time.time()
    row = {"kid": jwk["kid"], "alg": alg, "public_jwk": jwk, "created_at": now,
           "signs_from": now + publish_delay, "retired_at": None}
    storage.add_signing_key(row)
    return row


def ensure_signing_key(storage: Storage, keys_dir: str, alg: str) -> bool:
    """Create the first signing key if there is none; True if one was created."""
    if any(r["retired_at"] is None for r in storage.list_signing_keys()):
        return False
    add_signing_key(storage, keys_dir, alg, publish_delay=0)
    return True


def retire_signing_key(storage: Storage, keys_dir: str, kid: str, expiry: float,
                       force: bool = False) -> dict[str, Any]:
    """Retire ``kid``. The key that signs now is never retired (rotate first); a replaced key
    only once every token it signed has expired, unless ``force`` (a compromised key)."""
    now = time.time()
    states = {s["kid"]: s for s in key_states(storage.list_signing_keys(), now, expiry)}
    state = states.get(kid)
    if state is None:
        raise KeyOperationError(f"no key {kid}")
    if state["state"] == "retired":
        raise KeyOperationError(f"key {kid} is already retired")
    if state["state"] == "signing":
        raise KeyOperationError(f"key {kid} signs now and cannot be retired: rotate first")
    if state["state"] == "retiring" and now < state["retirable_at"] and not force:
        wait = int(state["retirable_at"] - now) + 1
        raise KeyOperationError(
            f"tokens signed by key {kid} may be valid for {wait} more seconds: "
            "retire it then, or use --force if the key is compromised"
        )
    storage.retire_signing_key(kid, now)
    path = Path(keys_dir) / "signing" / f"{kid}.pem"
    if path.exists():
        path.unlink()
    return {**state, "state": "retired", "retired_at": now}
