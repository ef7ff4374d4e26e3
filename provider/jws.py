"""JWS Compact Serialization (RFC 7515 §7.1), signed and verified by PyJWT's algorithms.

``jwt.decode`` checks each character of a token in a Python loop before decoding it: about
70 µs for one of our access tokens, more than half the ES256 verification itself, on every
exchange, introspection and gateway call. A caller that must read the header first (to choose
the key by ``kid``, or take a DPoP proof's ``jwk``) pays it twice. Here one regular expression
checks the whole token, each segment is decoded once, and the signature is made and checked by
PyJWT's own algorithm objects (the code ``jwt.decode`` and ``jwt.encode`` run, including its key
checks, such as an EC key's curve). JSON is read and written by :mod:`provider.fastjson`
(stricter than ``json.loads``, and cheaper). What the claims mean is the caller's to check.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from provider import fastjson

# Three non-empty base64url segments without padding (RFC 7515 §2, §7.1).
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_ALGORITHMS = get_default_algorithms()


class JWSInvalid(ValueError):
    """Not a compact JWS, or its signature does not verify. Never says which."""


def b64url_decode(segment: str) -> bytes:
    """Decode an unpadded base64url segment (its alphabet already checked)."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _json_object(data: bytes) -> dict[str, Any]:
    """A JSON object in UTF-8 (RFC 7515 §5.2), without NaN or Infinity (RFC 8259 §6)."""
    try:
        value = fastjson.loads(data)
    except fastjson.JSONDecodeError:
        raise JWSInvalid() from None
    if not isinstance(value, dict):
        raise JWSInvalid()
    return value


@dataclass(frozen=True, slots=True)
class Unverified:
    """A compact JWS split and its header decoded: the header may choose the key, and nothing
    else in it may be trusted until :meth:`verify` returns."""

    header: dict[str, Any]
    signing_input: bytes
    payload_segment: str
    signature_segment: str

    def verify(self, key: Any, alg: str) -> dict[str, Any]:
        """The payload (a JSON object) if the header's ``alg`` is ``alg`` and the signature
        verifies with ``key``; else :class:`JWSInvalid`. ``alg`` is the verifier's, never the
        token's: the header only has to agree with it (RFC 8725 §3.1)."""
        algorithm = _ALGORITHMS.get(alg)
        if algorithm is None or self.header.get("alg") != alg:
            raise JWSInvalid()
        try:
            signature = b64url_decode(self.signature_segment)
            prepared = algorithm.prepare_key(key)
            # RFC 7518 §3.3: RSA keys under 2048 bits are refused (PyJWT's decode only warns).
            valid = (algorithm.check_key_length(prepared) is None
                     and algorithm.verify(self.signing_input, prepared, signature))
        except (PyJWTError, ValueError, TypeError):  # a wrong key type or curve, bad base64
            raise JWSInvalid() from None
        if not valid:
            raise JWSInvalid()
        try:
            payload = b64url_decode(self.payload_segment)
        except ValueError:
            raise JWSInvalid() from None
        return _json_object(payload)


def read(token: str, max_length: int) -> Unverified:
    """Split a compact JWS of at most ``max_length`` characters and decode its header."""
    if not isinstance(token, str) or len(token) > max_length:
        raise JWSInvalid()
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise JWSInvalid()
    header_segment, payload_segment, signature_segment = match.groups()
    try:
        header = _json_object(b64url_decode(header_segment))
    except ValueError:  # binascii.Error: a segment one character too long to be base64
        raise JWSInvalid() from None
    signing_input = token[: match.end(2)].encode("ascii")
    return Unverified(header, signing_input, payload_segment, signature_segment)


def sign(payload: dict[str, Any], header: dict[str, Any], key: Any, alg: str) -> str:
    """A compact JWS of ``payload`` signed with ``key`` by ``alg`` (set in the header)."""
    algorithm = _ALGORITHMS[alg]
    signing_input = (b64url_encode(fastjson.dumps({"alg": alg, **header}))
                     + b"." + b64url_encode(fastjson.dumps(payload)))
    signature = algorithm.sign(signing_input, algorithm.prepare_key(key))
    return (signing_input + b"." + b64url_encode(signature)).decode("ascii")
