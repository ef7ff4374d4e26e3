"""The vault: upstream credentials encrypted at rest with an asymmetric envelope.

Each record gets a fresh AES-256-GCM key; the key is wrapped with RSA-OAEP (SHA-256, MGF1
SHA-256) under the vault's public key, and the record's id and upstream are bound as associated
data, so a ciphertext moved to another row or upstream fails to open. Tampering fails closed:
GCM authenticates before anything is returned, so there is never partial plaintext.

The split is the point: a ``web`` instance loads only ``keys/vault/public.pem`` and can seal
credentials it never again reads; only ``gateway`` (and ``all``) instances load the private key.

Envelope layout (version 1)::

    0x01 | len(wrapped key), 2 bytes big-endian | wrapped key | 12-byte nonce | ciphertext+tag
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from provider.config import ConfigError
from provider.keys import read_private_key, write_private_key

VERSION = 1
MIN_RSA_BITS = 2048
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_HEADER = struct.Struct(">BH")


class VaultError(Exception):
    """A record cannot be opened: wrong key, tampered, moved, or no private key here."""


class Vault:
    def __init__(self, public_key: rsa.RSAPublicKey, private_key: rsa.RSAPrivateKey | None = None):
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"keys/vault/public.pem must be an RSA key of at least {MIN_RSA_BITS} bits")
        self._public_key = public_key
        self._private_key = private_key

    def __repr__(self) -> str:
        return f"Vault(can_open={self.can_open})"

    @property
    def can_open(self) -> bool:
        return self._private_key is not None

    @classmethod
    def load(cls, keys_dir: str, role: str) -> Vault:
        """The public key always; the private key only for the ``gateway`` and ``all`` roles."""
        directory = Path(keys_dir) / "vault"
        public_path = directory / "public.pem"
        if not public_path.exists():
            raise ConfigError(f"{public_path} is missing: run token-provider init")
        public_key = serialization.load_pem_public_key(public_path.read_bytes())
        private_key = None
        if role != "web":
            private_path = directory / "private.pem"
            if not private_path.exists():
                raise ConfigError(f"role {role} needs {private_path}: copy it here, or run as --role web")
            private_key = read_private_key(private_path)
            if private_key.public_key().public_numbers() != public_key.public_numbers():
                raise ConfigError("keys/vault/private.pem and public.pem are not one key pair")
        return cls(public_key, private_key)  # type: ignore[arg-type]

    @staticmethod
    def create(keys_dir: str, bits: int = 3072) -> bool:
        """Write a new vault key pair unless one exists; True if it was written."""
        directory = Path(keys_dir) / "vault"
        if (directory / "public.pem").exists():
            return False
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        write_private_key(directory / "private.pem", private_key)
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (directory / "public.pem").write_bytes(public_pem)
        return True

    def seal(self, record_id: str, upstream: str, plaintext: bytes) -> bytes:
        key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(12)
        wrapped = self._public_key.encrypt(key, _OAEP)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(record_id, upstream))
        return _HEADER.pack(VERSION, len(wrapped)) + wrapped + nonce + ciphertext

    def open(self, record_id: str, upstream: str, envelope: bytes) -> bytes:
        if self._private_key is None:
            raise VaultError("this instance holds no vault private key (role web)")
        try:
            version, wrapped_length = _HEADER.unpack_from(envelope)
            if version != VERSION:
                raise VaultError("unknown envelope version")
            start = _HEADER.size
            wrapped = envelope[start:start + wrapped_length]
            nonce = envelope[start + wrapped_length:start + wrapped_length + 12]
            ciphertext = envelope[start + wrapped_length + 12:]
            key = self._private_key.decrypt(wrapped, _OAEP)
            return AESGCM(key).decrypt(nonce, ciphertext, _associated_data(record_id, upstream))
        except (InvalidTag, ValueError, struct.error) as exc:
            raise VaultError("the record cannot be opened") from exc


def _associated_data(record_id: str, upstream: str) -> bytes:
    return b"token-provider/vault/v1\0" + record_id.encode() + b"\0" + upstream.encode()

