"""Worker heartbeats: the workers registry and the claim counter (fencing token) per message.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("beat_at", ts, nullable=False),
        sa.Column("stopped_at", ts, nullable=True),
        sa.Column("stop_reason", sa.String(64), nullable=True),
    )
    op.create_index("ix_workers_beat", "workers", ["beat_at"])
    # Messages claimed before this revision keep token 0; their next claim makes it 1.
    op.add_column(
        "messages", sa.Column("claim_token", sa.Integer, nullable=False, server_default="0")
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("claim_token")
    op.drop_table("workers")
