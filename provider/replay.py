"""Single-use ids shared by every instance: client assertion ``jti`` (RFC 7523 §3 item 7), and
later DPoP proof ``jti`` (RFC 9449 §11.1).

With Redis configured, an id is spent with one ``SET NX EXAT``; without it, with one insert into
a table whose primary key is the id, so that several processes sharing one database still spend
each id once. Either way the check fails closed: if the store cannot answer, the request is
refused with 503 rather than let a replay through.
"""

from __future__ import annotations

import logging
from typing import Any

from provider.errors import TemporarilyUnavailable
from provider.storage import Storage

log = logging.getLogger("provider.replay")


class ReplayCache:
    def __init__(self, storage: Storage, redis: Any | None = None):
        self.storage = storage
        self.redis = redis

    def first_use(self, key: str, expires_at: int) -> bool:
        """Spend ``key`` until ``expires_at``; False if it was spent already."""
        try:
            if self.redis is not None:
                return bool(self.redis.set(f"provider:once:{key}", 1, nx=True, exat=expires_at))
            return self.storage.claim_once(key, expires_at)
        except Exception as exc:  # noqa: BLE001 - any store failure must fail closed.
            log.error("replay cache unavailable: %s", type(exc).__name__)
            raise TemporarilyUnavailable("try again later") from None
