"""Tables, in SQLAlchemy Core: one definition for SQLite and PostgreSQL.

Times are stored as numbers (seconds, or milliseconds where sub-second order matters) so that
both dialects compare them the same way without time-zone conversions. Alembic migrations in
``migrations/versions`` create exactly these tables; a test checks the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(255), primary_key=True),
    Column("secret_hash", LargeBinary(32), nullable=True),  # HMAC-SHA256 under client-secret.key
    Column("auth_method", String(32), nullable=False),
    Column("grant_types", JSON, nullable=False),
    Column("scope", Text, nullable=False),
    Column("audiences", JSON, nullable=False),
    Column("redirect_uris", JSON, nullable=False),
    Column("jwks", JSON, nullable=True),  # public keys for private_key_jwt (RFC 7523)
    Column("allowed_ips", JSON, nullable=False),
    Column("token_ttl", Integer, nullable=True),
    Column("may_act", String(255), nullable=True),
    Column("can_introspect", Boolean, nullable=False, default=False),
    Column("can_revoke_any", Boolean, nullable=False, default=False),
    Column("can_manage_connections", Boolean, nullable=False, default=False),
    Column("dpop_required", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),  # RFC 7638 thumbprint
    Column("alg", String(16), nullable=False),
    Column("public_jwk", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("signs_from", Float, nullable=False),
    Column("retired_at", Float, nullable=True),
)

# An append-only log: each instance reads rows it has not seen yet (see revocation.py).
revocations = Table(
    "revocations",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # "token", "subject" or "client"
    Column("value", String(255), nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=False),
    Column("expires_at", Integer, nullable=False),  # when no token it kills can still be valid
    Column("reason", String(64), nullable=False),
    Index("ix_revocations_expires_at", "expires_at"),
)

# Single-use client assertion ids (RFC 7523 §3 item 7), when no Redis is configured.
used_assertions = Table(
    "used_assertions",
    metadata,
    Column("key", String(64), primary_key=True),  # SHA-256 of client id and jti
    Column("expires_at", Integer, nullable=False),
    Index("ix_used_assertions_expires_at", "expires_at"),
)

# Vaulted upstream credentials: one per (subject, upstream). ``ciphertext`` is a vault envelope.
connections = Table(
    "connections",
    metadata,
    Column("connection_id", String(32), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("upstream", String(64), nullable=False),
    Column("scope", Text, nullable=False),  # internal scopes tokens for it may carry
    Column("ciphertext", LargeBinary, nullable=False),
    Column("allowed_ips", JSON, nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("upstream_expires_at", Float, nullable=True),  # when the upstream access token expires
    Column("version", Integer, nullable=False),  # bumped on every re-seal (upstream refresh)
    Column("refresh_claimed_until", Float, nullable=True),  # one process refreshes at a time
    Index("ux_connections_subject_upstream", "subject", "upstream", unique=True),
)

# Refresh tokens, stored as SHA-256 of the token (256 random bits: no slower hash is needed).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family_id", String(32), nullable=False),
    Column("client_id", String(255), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("scope", Text, nullable=False),
    Column("audience", JSON, nullable=False),
    Column("connection_id", String(32), nullable=True),
    Column("family_root_ms", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Index("ix_refresh_tokens_family_id", "family_id"),
    Index("ix_refresh_tokens_connection_id", "connection_id"),
    Index("ix_refresh_tokens_subject", "subject"),
    Index("ix_refresh_tokens_client_id", "client_id"),
)

# Connect flow (back-channel start, in the spirit of RFC 9126): one row per started connection.
connect_requests = Table(
    "connect_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),  # SHA-256 of the request_uri's secret part
    Column("upstream_state", String(64), nullable=False),  # SHA-256 of the state sent upstream
    Column("client_id", String(255), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("upstream", String(64), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("client_state", Text, nullable=True),
    Column("code_challenge", String(128), nullable=False),
    Column("scope", Text, nullable=False),
    Column("upstream_verifier", String(128), nullable=True),  # PKCE towards the upstream
    Column("expires_at", Float, nullable=False),
    Column("opened_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Index("ux_connect_requests_upstream_state", "upstream_state", unique=True),
)

# One-time codes the connect flow hands back to the client (RFC 6749 §4.1.2, RFC 7636).
authorization_codes = Table(
    "authorization_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(255), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("upstream", String(64), nullable=False),
    Column("connection_id", String(32), nullable=False),
    Column("scope", Text, nullable=False),
    Column("family_id", String(32), nullable=False),  # what a redemption issues; a replay revokes it
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
)

# The audit trail (provider/audit.py): append-only, written in batches by a background thread.
# ``data`` holds the event's other fields; nothing here is ever a token or a secret.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),  # seconds since the epoch, when the event happened
    Column("type", String(64), nullable=False),
    Column("request_id", String(32), nullable=True),
    Column("client_id", String(255), nullable=True),
    Column("sub", String(255), nullable=True),
    Column("jti", String(64), nullable=True),
    Column("data", JSON, nullable=False),
    Index("ix_audit_events_time", "time"),
    Index("ix_audit_events_sub", "sub"),
)
