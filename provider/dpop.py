"""DPoP: sender-constrained tokens (RFC 9449).

A client that sends a ``DPoP`` proof to ``/token`` gets a token bound to the proof's key
(``cnf.jkt``, the RFC 7638 thumbprint; ``token_type: DPoP``). The gateway then accepts that token
only with the ``DPoP`` scheme and a fresh proof by the same key over that very request, whose
``ath`` is the token's hash: a stolen bound token is useless without the private key, and
cannot be downgraded to a bearer token (THREATS.md, promise 7).

A proof is checked as RFC 9449 §4.3 lists: one header, a JWT of ``typ: dpop+jwt``, an asymmetric
algorithm, a public ``jwk`` (no private members) that verifies the signature, ``htm`` and
``htu`` matching the request (query and fragment ignored), ``iat`` within ``dpop.iat_window``, a
``jti`` never seen before by any instance (the shared replay cache), ``ath`` at resources, and,
with ``dpop.require_nonce``, a server nonce (§8). Nonces are stateless: an HMAC of the current
five-minute window, so every instance with the same keys accepts every other's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from provider import jws
from provider.errors import OAuthError
from provider.keys import thumbprint
from provider.scopes import normalize_resource

if TYPE_CHECKING:
    from provider.service import Provider

PROOF_TYPE = "dpop+jwt"
ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "EdDSA")
MAX_PROOF_LENGTH = 8192
NONCE_WINDOW = 300
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
_REQUIRED_CLAIMS = ("jti", "htm", "htu", "iat")  # RFC 9449 §4.2


class InvalidDPoPProof(OAuthError):
    """RFC 9449 §5: The DPoP proof JWT is invalid (at the token endpoint: 400)."""

    error = "invalid_dpop_proof"
    default_description = "the DPoP proof is invalid"


class InvalidDPoPProofAtResource(InvalidDPoPProof):
    """RFC 9449 §7.1: at a resource, 401 with a DPoP challenge naming the algorithms."""

    status_code = 401

    def __init__(self, description: str | None = None):
        challenge = f'DPoP error="invalid_dpop_proof", algs="{" ".join(ALGORITHMS)}"'
        super().__init__(description, {"WWW-Authenticate": challenge})


class UseDPoPNonce(OAuthError):
    """RFC 9449 §8: Authorization server requires nonce in DPoP proof."""

    error = "use_dpop_nonce"
    default_description = "a DPoP nonce is required: retry with the one in DPoP-Nonce"

    def __init__(self, nonce: str):
        super().__init__(None, {"DPoP-Nonce": nonce})


class UseDPoPNonceAtResource(UseDPoPNonce):
    """RFC 9449 §9: at a resource, 401 with a DPoP challenge."""

    status_code = 401

    def __init__(self, nonce: str):
        super().__init__(nonce)
        self.headers["WWW-Authenticate"] = 'DPoP error="use_dpop_nonce"'


@dataclass(frozen=True)
class Proof:
    jkt: str  # RFC 7638 thumbprint of the proof's key
    jti: str


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url of the SHA-256 of the token's ASCII."""
    digest = hashlib.sha256(token.encode("ascii", errors="replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class DPoP:
    def __init__(self, provider: Provider):
        self.provider = provider
        self.settings = provider.settings
        self._nonce_key = provider.hasher.derive(b"dpop nonce")

    # Nonces (RFC 9449 §8) -------------------------------------------------------------------

    def nonce(self, at: float | None = None) -> str:
        window = int((time.time() if at is None else at) // NONCE_WINDOW)
        packed = struct.pack(">Q", window)
        mac = hmac.new(self._nonce_key, packed, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(packed + mac).rstrip(b"=").decode("ascii")

    def _nonce_is_fresh(self, value: Any) -> bool:
        if not isinstance(value, str) or len(value) > 64:
            return False
        now = time.time()
        return any(hmac.compare_digest(value, self.nonce(now - NONCE_WINDOW * back))
                   for back in (0, 1))

    # Proofs (RFC 9449 §4.3) -----------------------------------------------------------------

    def verify(self, headers: list[str], *, method: str, url: str,
               access_token: str | None = None) -> Proof:
        """The proof's key thumbprint; raises ``invalid_dpop_proof`` or ``use_dpop_nonce``.

        ``access_token`` is given at resources, where the proof must carry its ``ath``.
        """
        refuse = InvalidDPoPProof if access_token is None else InvalidDPoPProofAtResource
        if len(headers) != 1 or not headers[0] or len(headers[0]) > MAX_PROOF_LENGTH:
            raise refuse("exactly one DPoP proof is required")
        proof = headers[0]
        try:
            unverified = jws.read(proof, MAX_PROOF_LENGTH)
        except jws.JWSInvalid:
            raise refuse() from None
        header = unverified.header
        jwk, alg = header.get("jwk"), header.get("alg")
        if header.get("typ") != PROOF_TYPE or alg not in ALGORITHMS or "crit" in header:
            raise refuse()
        if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk) \
                or jwk.get("kty") not in ("EC", "RSA", "OKP"):
            raise refuse("the proof's jwk must be a public EC, RSA or OKP key")
        try:
            claims = unverified.verify(jwt.PyJWK(jwk, algorithm=alg).key, alg)
            jkt = thumbprint(jwk)
        except (jwt.PyJWTError, KeyError, ValueError, TypeError):  # JWSInvalid is a ValueError
            raise refuse() from None
        if any(name not in claims for name in _REQUIRED_CLAIMS):
            raise refuse()
        self._check_claims(claims, method, url, access_token, refuse)
        iat = claims["iat"]
        window = self.settings.dpop.iat_window
        replay_key = hashlib.sha256(f"dpop\0{jkt}\0{claims['jti']}".encode()).hexdigest()
        if not self.provider.replay.first_use(replay_key, int(iat) + window + 1):
            raise refuse("the DPoP proof was used before")
        return Proof(jkt, claims["jti"])

    def _check_claims(self, claims: dict[str, Any], method: str, url: str,
                      access_token: str | None, refuse: type[InvalidDPoPProof]) -> None:
        jti, htm, htu, iat = claims["jti"], claims["htm"], claims["htu"], claims["iat"]
        if not isinstance(jti, str) or not 0 < len(jti) <= 255:
            raise refuse()
        if htm != method:
            raise refuse("the proof's htm does not match the request method")
        if not isinstance(htu, str) or _without_query(htu) != normalize_resource(url):
            raise refuse("the proof's htu does not match the request URL")
        if not isinstance(iat, int | float) or isinstance(iat, bool) \
                or abs(time.time() - iat) > self.settings.dpop.iat_window:
            raise refuse("the proof's iat is outside the accepted window")
        if access_token is not None and not (
                isinstance(claims.get("ath"), str)
                and hmac.compare_digest(claims["ath"], access_token_hash(access_token))):
            raise refuse("the proof's ath does not match the access token")
        if self.settings.dpop.require_nonce and not self._nonce_is_fresh(claims.get("nonce")):
            raise (UseDPoPNonce if access_token is None else UseDPoPNonceAtResource)(self.nonce())


def _without_query(htu: str) -> str | None:
    """RFC 9449 §4.3 step 9: compare ignoring the query and fragment."""
    return normalize_resource(htu.split("#", 1)[0].split("?", 1)[0])
