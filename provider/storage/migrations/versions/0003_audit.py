"""The audit trail: one append-only table of structured events.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(32), nullable=True),
        sa.Column("client_id", sa.String(255), nullable=True),
        sa.Column("sub", sa.String(255), nullable=True),
        sa.Column("jti", sa.String(64), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_events_time", "audit_events", ["time"])
    op.create_index("ix_audit_events_sub", "audit_events", ["sub"])


def downgrade() -> None:
    op.drop_table("audit_events")
