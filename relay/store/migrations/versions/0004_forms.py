"""Several forms: the form a message came from, and the index that filters the log by it.

Messages accepted before this revision came from the one form there was, so they get
"default" (the form of the RELAY_ variables, at /form); an alert mailed to the operator has
no form (NULL).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with a server default: existing rows read "default", no table copy.
    op.add_column(
        "messages",
        sa.Column("form_id", sa.String(64), nullable=True, server_default="default"),
    )
    # `relay log --form` and the console's form filter: one form's log, newest first.
    op.create_index("ix_messages_form_created", "messages", ["form_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_messages_form_created", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("form_id")
