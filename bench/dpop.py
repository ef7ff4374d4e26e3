"""DPoP proofs (RFC 9449) for the bench, made beforehand because wrk's Lua cannot sign ES256.

A proof's ``jti`` is single use (the provider's replay cache refuses it a second time), so each
request wrk sends needs a proof of its own. :class:`ProofKey` makes them with joserfc, an
independent library, as the tests do (``tests/test_dpop.py``), with ``iat`` = now: the bench
config's ``dpop.iat_window`` (600 s) covers the few seconds between making and sending them.
They are made in batches, one per timed wrk run, just before it, and written one a line to the
file the run's Lua script reads (see :mod:`bench.wrk`).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey


class ProofKey:
    """One client's DPoP key (P-256), making proofs for ``htm`` ``htu``."""

    def __init__(self, htu: str, htm: str = "POST"):
        self.htu = htu
        self.htm = htm
        self.key = ECKey.generate_key("P-256")
        self._header = {"alg": "ES256", "typ": "dpop+jwt", "jwk": self.key.as_dict(private=False)}
        self.generated = 0

    def proof(self) -> str:
        claims = {"jti": secrets.token_urlsafe(16), "htm": self.htm, "htu": self.htu,
                  "iat": int(time.time())}
        self.generated += 1
        return jwt.encode(self._header, claims, self.key, algorithms=["ES256"])

    def write(self, path: Path, count: int) -> Path:
        """``count`` fresh proofs in ``path``, one a line."""
        path.write_text("".join(self.proof() + "\n" for _ in range(count)), encoding="ascii")
        return path
