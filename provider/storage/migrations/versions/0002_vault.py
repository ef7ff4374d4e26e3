"""Connections (vault), refresh tokens, and the connect flow's requests and codes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("connection_id", sa.String(32), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("allowed_ips", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("upstream_expires_at", sa.Float, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("refresh_claimed_until", sa.Float, nullable=True),
    )
    op.create_index("ux_connections_subject_upstream", "connections", ["subject", "upstream"],
                    unique=True)
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("family_id", sa.String(32), nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("audience", sa.JSON, nullable=False),
        sa.Column("connection_id", sa.String(32), nullable=True),
        sa.Column("family_root_ms", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    for column in ("family_id", "connection_id", "subject", "client_id"):
        op.create_index(f"ix_refresh_tokens_{column}", "refresh_tokens", [column])
    op.create_table(
        "connect_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("upstream_state", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("client_state", sa.Text, nullable=True),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("upstream_verifier", sa.String(128), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("opened_at", sa.Float, nullable=True),
        sa.Column("completed_at", sa.Float, nullable=True),
    )
    op.create_index("ux_connect_requests_upstream_state", "connect_requests", ["upstream_state"],
                    unique=True)
    op.create_table(
        "authorization_codes",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("connection_id", sa.String(32), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("family_id", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("authorization_codes")
    op.drop_table("connect_requests")
    op.drop_table("refresh_tokens")
    op.drop_table("connections")
