"""The console: held messages, the visitor's address and a message's purpose, the keyset
index of the log, and the alerts (events, grouped alerts, one delivery per channel).

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    # Plain ADD COLUMN (no batch copy of the table): nullable, or with a server default.
    op.add_column("messages", sa.Column("held_by", sa.Text, nullable=True))
    op.add_column("messages", sa.Column("visitor", sa.String(320), nullable=True))
    op.add_column(
        "messages",
        sa.Column("purpose", sa.String(16), nullable=False, server_default="form"),
    )
    # (created_at, id) orders the log without a sort; it serves all that (created_at) did.
    op.create_index("ix_messages_created_id", "messages", ["created_at", "id"])
    op.drop_index("ix_messages_created", "messages")
    op.create_index("ix_messages_status_created", "messages", ["status", "created_at", "id"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("first_at", ts, nullable=False),
        sa.Column("last_at", ts, nullable=False),
        sa.Column("created_at", ts, nullable=False),
    )
    op.create_index("ix_alerts_created", "alerts", ["created_at"])
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(64), nullable=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("fields", sa.JSON, nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column(
            "alert_id",
            sa.Integer,
            sa.ForeignKey("alerts.id", ondelete="SET NULL"),
            nullable=True,
        ),
    )
    op.create_index("ix_alert_events_open", "alert_events", ["alert_id", "kind", "created_at"])
    op.create_index("ix_alert_events_subject", "alert_events", ["kind", "subject"])
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "alert_id",
            sa.Integer,
            sa.ForeignKey("alerts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", ts, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("sent_at", ts, nullable=True),
    )
    op.create_index("ix_alert_deliveries_due", "alert_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_alert_deliveries_alert", "alert_deliveries", ["alert_id"])


def downgrade() -> None:
    op.drop_table("alert_deliveries")
    op.drop_table("alert_events")
    op.drop_table("alerts")
    op.drop_index("ix_messages_status_created", "messages")
    op.create_index("ix_messages_created", "messages", ["created_at"])
    op.drop_index("ix_messages_created_id", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("purpose")
        batch.drop_column("visitor")
        batch.drop_column("held_by")
