"""The outbox: messages, attempts and the hosts tried in each attempt.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("envelope_from", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("first_attempt_at", ts, nullable=True),
        sa.Column("last_attempt_at", ts, nullable=True),
        sa.Column("next_attempt_at", ts, nullable=True),
        sa.Column("finished_at", ts, nullable=True),
        sa.Column("last_code", sa.Integer, nullable=True),
        sa.Column("last_enhanced_status", sa.String(16), nullable=True),
        sa.Column("last_mx", sa.String(255), nullable=True),
        sa.Column("last_text", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", ts, nullable=True),
        sa.Column("claimed_at", ts, nullable=True),
        sa.Column("possible_duplicate", sa.Boolean, nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("purged_at", ts, nullable=True),
    )
    op.create_index("ix_messages_due", "messages", ["status", "next_attempt_at"])
    op.create_index("ix_messages_created", "messages", ["created_at"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "outbox_id",
            sa.String(32),
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("finished_at", ts, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer, nullable=True),
        sa.Column("enhanced_status", sa.String(16), nullable=True),
        sa.Column("mx_host", sa.String(255), nullable=True),
        sa.Column("text", sa.Text, nullable=True),
        sa.Column("possible_duplicate", sa.Boolean, nullable=False),
        sa.Column("worker", sa.String(64), nullable=True),
    )
    op.create_index("ix_attempts_outbox_id", "attempts", ["outbox_id", "number"])
    op.create_table(
        "attempt_hosts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "attempt_id",
            sa.Integer,
            sa.ForeignKey("attempts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("mx_host", sa.String(255), nullable=False),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("tls", sa.String(32), nullable=True),
        sa.Column("code", sa.Integer, nullable=True),
        sa.Column("enhanced_status", sa.String(16), nullable=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("duration", sa.Float, nullable=False),
        sa.Column("started_at", ts, nullable=True),
    )
    op.create_index("ix_attempt_hosts_attempt_id", "attempt_hosts", ["attempt_id", "position"])


def downgrade() -> None:
    op.drop_table("attempt_hosts")
    op.drop_table("attempts")
    op.drop_table("messages")
