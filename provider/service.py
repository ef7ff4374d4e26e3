"""The provider's long-lived parts, built once per process from validated settings.

Protocol modules take a :class:`Provider` and know nothing of Flask; the views pass
``current_app.extensions["provider"]``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import sqlalchemy as sa

from provider import metrics
from provider.alerts import Alerts
from provider.audit import REQUEST_ID, AuditLog
from provider.clients import ClientRegistry, SecretHasher
from provider.config import ConfigError, Settings
from provider.connections import revoke_connection
from provider.dpop import DPoP
from provider.errors import TemporarilyUnavailable
from provider.gateway import Gateway
from provider.keys import KeySet
from provider.ratelimit import Limiter, NoLimits
from provider.refresh import RefreshTokens
from provider.replay import ReplayCache
from provider.revocation import RevocationList
from provider.storage import Storage, create_engine
from provider.upstreams import UpstreamHTTP
from provider.vault import Vault

log = logging.getLogger("provider")


class Provider:
    def __init__(self, settings: Settings):
        self.settings = settings
        tokens = settings.tokens
        self.storage = Storage(create_engine(settings.database_url))
        self.hasher = SecretHasher.load(settings.keys_dir)
        self.keys = KeySet(self.storage, settings.keys_dir,
                           token_expiry=tokens.max_access_token_ttl + tokens.leeway)
        self.clients = ClientRegistry(self.storage)
        self.redis = _redis(settings.redis_url)
        self.replay = ReplayCache(self.storage, self.redis)
        self.revocations = RevocationList(
            self.storage,
            interval=settings.revocation_sync_interval,
            margin=self.revocation_horizon(),
        )
        self.refresh_tokens = RefreshTokens(self)
        self.vault = Vault.load(settings.keys_dir, settings.role)
        self.upstream_http = UpstreamHTTP(settings.gateway)
        self.gateway = Gateway(self)
        self.dpop = DPoP(self)
        self.audit = AuditLog(self.storage, enabled=settings.audit.enabled)
        self.limiter: Limiter | NoLimits = (
            Limiter(settings, settings.redis_url) if settings.rate_limits.enabled else NoLimits())
        self.alerts = Alerts(settings.alerts.webhook_url, timeout=2.0)
        self.revocations.on_revoke = self._revoked

    def revocation_horizon(self) -> int:
        """How long a revocation of a family, connection, subject or client must be remembered:
        as long as any refresh token it covers could still be used, plus the access tokens that
        one could mint. Refresh-token rows are marked revoked too, but a successor inserted by a
        rotation racing the revocation is caught only by this log entry."""
        tokens = self.settings.tokens
        return tokens.refresh_token_ttl + tokens.max_access_token_ttl + tokens.leeway + 60

    def event(self, type: str, **fields: Any) -> None:
        """One audit event for the request being served (its id comes from the context)."""
        self.audit.record(type, request_id=REQUEST_ID.get(), **fields)

    def issued(self, claims: dict[str, Any], grant_type: str, **fields: Any) -> None:
        """Count and audit an issued access token (never the token: its jti)."""
        metrics.count(metrics.TOKENS_ISSUED, grant_type)
        self.event("token.issued", grant_type=grant_type, client_id=claims["client_id"],
                   sub=claims["sub"], jti=claims["jti"], scope=claims["scope"], **fields)

    def _revoked(self, kind: str, value: str, reason: str) -> None:
        metrics.count(metrics.REVOCATIONS, kind)
        field = {"token": "jti", "subject": "sub", "client": "client_id"}[kind]
        self.event("revocation", reason=reason, **{field: value})

    def suspend(self, kind: str, value: str, reason: str) -> None:
        """A circuit breaker tripped: revoke with a reason, then count, audit and alert, once.

        Several requests, on several instances, can see the threshold crossed before the
        revocation reaches them (instances sync within a second): each revokes (the same
        revocation again), and only the first alerts, so that one incident pages once."""
        until = int(time.time()) + self.revocation_horizon()
        if kind == "connection":
            revoke_connection(self, value, reason, delete=False)
        else:
            self.revocations.revoke_ids([(value, until)], reason)
        if not self._first_suspension(kind, value, until):
            return
        metrics.count(metrics.SUSPENSIONS, kind)
        self.event("alert", kind=f"{kind} suspended", suspended=value, reason=reason)
        self.alerts.send(f"{kind} suspended", suspended=value, reason=reason)

    def _first_suspension(self, kind: str, value: str, until: int) -> bool:
        """Whether this is the first suspension of ``value`` seen by any instance (claimed in the
        replay cache until ``until``, when its revocation lapses too)."""
        key = hashlib.sha256(f"suspension\0{kind}\0{value}".encode()).hexdigest()
        try:
            return self.replay.first_use(key, until)
        except TemporarilyUnavailable:  # the shared store is away: alert twice rather than never
            return True

    def start(self) -> None:
        """Load keys and revocations now, so that a missing ``init`` fails at start-up."""
        try:
            self.keys.reload()
            self.revocations.sync(force=True)
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(
                f"database_url: cannot read the provider's tables ({type(exc).__name__}): "
                "run token-provider init"
            ) from None
        try:
            self.keys.signer()
        except Exception:  # noqa: BLE001 - reported as the configuration problem it is.
            raise ConfigError(
                f"keys_dir: no usable signing key in {self.settings.keys_dir}/signing: "
                "run token-provider init"
            ) from None

    def after_fork(self) -> None:
        """Give a forked worker its own database and Redis connections."""
        self.storage.dispose()
        if self.redis is not None:
            self.redis.connection_pool.reset()
        self.limiter.after_fork()


def initialize(settings: Settings) -> dict[str, bool]:
    """``token-provider init``: schema, client-secret hash key, vault key pair and a first
    signing key.

    Idempotent: what exists is left alone. Returns what was created.
    """
    from provider.keys import ensure_signing_key
    from provider.storage import migrate

    engine = create_engine(settings.database_url)
    try:
        migrate(engine)
        created = {
            "client_secret_key_created": SecretHasher.create(settings.keys_dir),
            "vault_key_created": Vault.create(settings.keys_dir),
            "signing_key_created": ensure_signing_key(Storage(engine), settings.keys_dir,
                                                      settings.keys.algorithm),
        }
    finally:
        engine.dispose()
    return created


def _redis(url: str) -> Any | None:
    if not url:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
