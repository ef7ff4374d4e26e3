"""Token revocation (RFC 7009) that cascades, is durable, and holds on every instance.

No row is written per issued token. Instead each token carries its lineage (see
:class:`provider.tokens.Lineage`) and a revocation is one row in an append-only log:

- ``token``: an id (a token's ``jti``, a refresh family, a connection): every token with that id
  as its own ``jti`` or among its lineage ``ids`` is revoked;
- ``subject``: every chain for that ``sub`` whose root grant was made at or before the moment;
- ``client``: every chain the client held a token of at or before the moment.

So revoking a subject or a client with any number of derived tokens is one insert, and checking
a token is a few set look-ups in memory. Every instance reads the rows it has not seen yet at
most ``revocation_sync_interval`` seconds apart (0.25 s by default), and at once after its own
revocations, so a revocation holds everywhere within a second and survives restarts. Rows expire
when no token they could kill is still valid, and are then purged.

PostgreSQL hands out ids before commit, so a reader can see id 11 before id 10 commits; ids
skipped over are remembered as gaps and asked for again for ``_GAP_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from provider.errors import UnauthorizedClient
from provider.storage import Storage
from provider.tokens import TokenInvalid, verify_access_token

if TYPE_CHECKING:
    from provider.clients import Client
    from provider.service import Provider

log = logging.getLogger("provider.revocation")

_GAP_SECONDS = 30.0
_MAX_GAPS = 10000
_PURGE_SECONDS = 300.0


class RevocationList:
    """What this instance knows to be revoked, kept in step with the shared log."""

    def __init__(self, storage: Storage, interval: float, margin: int):
        self.storage = storage
        self.interval = interval
        # How long a subject or client revocation must be remembered: the longest an access
        # token issued just before it (or by an instance that had not seen it yet) can live.
        self.margin = margin
        self._ids: dict[str, int] = {}
        self._subjects: dict[str, tuple[int, int]] = {}
        self._clients: dict[str, tuple[int, int]] = {}
        self._high = 0
        self._primed = False  # the first read (at start-up) skips gap tracking: its gaps are purged rows
        self._gaps: dict[int, float] = {}
        self._synced_at = float("-inf")
        self._purged_at = time.monotonic()
        self._lock = threading.Lock()
        self.on_revoke: Callable[[str, str, str], None] = lambda kind, value, reason: None

    # Reading ------------------------------------------------------------------------------

    def is_revoked(self, claims: dict[str, Any]) -> bool:
        """True if the token, or anything it was derived from, is revoked."""
        self.sync()
        lineage = claims["lineage"]
        ids = self._ids
        if claims["jti"] in ids or any(i in ids for i in lineage["ids"]):
            return True
        subject = self._subjects.get(claims["sub"])
        if subject is not None and lineage["root"] <= subject[0]:
            return True
        if self._clients:
            for client_id, since in lineage["clients"].items():
                revoked = self._clients.get(client_id)
                if revoked is not None and since <= revoked[0]:
                    return True
        return False

    def is_id_revoked(self, value: str) -> bool:
        self.sync()
        return value in self._ids

    def sync(self, force: bool = False) -> None:
        """Read new rows if the interval has passed (or ``force``)."""
        if not force and time.monotonic() - self._synced_at < self.interval:
            return
        with self._lock:
            if not force and time.monotonic() - self._synced_at < self.interval:
                return
            self._read()

    def _read(self) -> None:
        started = time.monotonic()
        rows = self.storage.revocations_after(self._high)
        if self._gaps:
            rows += self.storage.revocation_ids_in(sorted(self._gaps))
        seen = set()
        for row in rows:
            self._apply(row)
            seen.add(row["id"])
            self._gaps.pop(row["id"], None)
        new_high = max([self._high, *seen])
        if self._primed:
            for missing in range(self._high + 1, new_high):
                if missing not in seen and len(self._gaps) < _MAX_GAPS:
                    self._gaps[missing] = started
        self._high = new_high
        self._primed = True
        self._gaps = {i: t for i, t in self._gaps.items() if started - t < _GAP_SECONDS}
        if started - self._purged_at > _PURGE_SECONDS:
            self._forget_expired()
        self._synced_at = started

    def _apply(self, row: dict[str, Any]) -> None:
        kind, value, at, expires = (row["kind"], row["value"], row["revoked_at_ms"],
                                    row["expires_at"])
        if expires < time.time():
            return
        if kind == "token":
            self._ids[value] = max(expires, self._ids.get(value, 0))
        elif kind in ("subject", "client"):
            table = self._subjects if kind == "subject" else self._clients
            previous = table.get(value)
            if previous is None or previous[0] < at:
                table[value] = (at, expires)

    def _forget_expired(self) -> None:
        now = time.time()
        self._ids = {k: v for k, v in self._ids.items() if v >= now}
        self._subjects = {k: v for k, v in self._subjects.items() if v[1] >= now}
        self._clients = {k: v for k, v in self._clients.items() if v[1] >= now}
        self._purged_at = time.monotonic()
        try:
            self.storage.purge_expired()
        except Exception:
            log.warning("could not purge expired revocations", exc_info=True)

    # Writing ------------------------------------------------------------------------------

    def revoke_ids(self, ids: list[tuple[str, int]], reason: str) -> None:
        """Revoke token, family or connection ids, each with when it stops mattering."""
        now_ms = int(time.time() * 1000)
        self.storage.add_revocations(
            {"kind": "token", "value": value, "revoked_at_ms": now_ms,
             "expires_at": expires_at, "reason": reason}
            for value, expires_at in ids
        )
        self.sync(force=True)
        for value, _ in ids:
            self.on_revoke("token", value, reason)

    def revoke_subject(self, subject: str, reason: str) -> None:
        self._revoke_all("subject", subject, reason)

    def revoke_client(self, client_id: str, reason: str) -> None:
        self._revoke_all("client", client_id, reason)

    def _revoke_all(self, kind: str, value: str, reason: str) -> None:
        now = time.time()
        self.storage.revoke_refresh_tokens(now, **{"subject" if kind == "subject" else "client_id": value})
        self.storage.add_revocations([{
            "kind": kind, "value": value, "revoked_at_ms": int(now * 1000),
            "expires_at": int(now) + self.margin, "reason": reason,
        }])
        self.sync(force=True)
        self.on_revoke(kind, value, reason)


def revoke_presented_token(provider: Provider, client: Client, token: str) -> None:
    """RFC 7009 §2.1: revoke ``token`` for ``client``.

    An unknown, malformed or already invalid token is answered like a revoked one (§2.2); a
    token of another client is refused with ``unauthorized_client`` and nothing changes, unless
    the client may revoke any token (``--revoke-any``). Revoking a token revokes everything
    derived from it.
    """
    settings = provider.settings
    if provider.refresh_tokens.revoke(client, token):
        return
    try:
        claims = verify_access_token(token, provider.keys, settings.issuer,
                                     settings.tokens.leeway)
    except TokenInvalid:
        return
    if claims["client_id"] != client.client_id and not client.can_revoke_any:
        raise UnauthorizedClient("the token was not issued to this client")
    if provider.revocations.is_revoked(claims):
        return
    provider.revocations.revoke_ids(
        [(claims["jti"], int(claims["exp"]) + settings.tokens.leeway)],
        reason=f"revoked by client {client.client_id}"[:64],
    )
