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
