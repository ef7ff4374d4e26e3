"""Clients, signing keys, the revocation log and single-use assertion ids.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(255), primary_key=True),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=True),
        sa.Column("auth_method", sa.String(32), nullable=False),
        sa.Column("grant_types", sa.JSON, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("audiences", sa.JSON, nullable=False),
        sa.Column("redirect_uris", sa.JSON, nullable=False),
        sa.Column("jwks", sa.JSON, nullable=True),
        sa.Column("allowed_ips", sa.JSON, nullable=False),
        sa.Column("token_ttl", sa.Integer, nullable=True),
        sa.Column("may_act", sa.String(255), nullable=True),
        sa.Column("can_introspect", sa.Boolean, nullable=False),
        sa.Column("can_revoke_any", sa.Boolean, nullable=False),
        sa.Column("can_manage_connections", sa.Boolean, nullable=False),
        sa.Column("dpop_required", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_jwk", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("signs_from", sa.Float, nullable=False),
        sa.Column("retired_at", sa.Float, nullable=True),
    )
    op.create_table(
        "revocations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
    )
    op.create_index("ix_revocations_expires_at", "revocations", ["expires_at"])
    op.create_table(
        "used_assertions",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_used_assertions_expires_at", "used_assertions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("used_assertions")
    op.drop_table("revocations")
    op.drop_table("signing_keys")
    op.drop_table("clients")
