"""The outbox's tables, as SQLAlchemy Core metadata (Alembic migrations create them).

While a message is `sending`, `next_attempt_at` holds its lease expiry, so a message whose
worker stopped renewing it becomes due again through the same (status, next_attempt_at) index.
`claim_token` counts the claims of a message: the fencing token a worker's renewals and records
must match, so a worker that lost a message can never overwrite what its new owner did.
`workers` is the registry of delivery workers and their heartbeats (relay.store.workers): a
message whose worker stopped beating is reclaimed before its lease runs out. A `held`
message matched an operator's hold rule (`held_by`): stored, never claimed, until the
operator releases or discards it.

`alert_events` are what happened (a message failed, one waited too long); the dispatcher
groups the events of one kind into one `alerts` row and sends it on every channel, one
`alert_deliveries` row each, retried with backoff.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa

Status = Literal["queued", "sending", "deferred", "delivered", "failed", "held"]
STATUSES: tuple[str, ...] = ("queued", "sending", "deferred", "delivered", "failed", "held")
DUE_STATUSES = ("queued", "deferred", "sending")  # claimable once next_attempt_at has passed
PENDING_STATUSES = ("queued", "sending", "deferred")  # not delivered and not failed yet
FINISHED_STATUSES = ("delivered", "failed")  # whose bodies `purge` may drop
# messages.purpose: a visitor's submission, or an alert mailed to RELAY_ALERT_EMAIL (which
# never raises alerts of its own, so a failing alert address cannot feed itself).
PURPOSES = ("form", "alert")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; stored naive-UTC on SQLite, timestamptz on PostgreSQL."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the outbox; use aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()
_ts = UTCDateTime

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=True),  # unsigned; NULL once purged
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("recipient", sa.String(320), nullable=False),
    sa.Column("envelope_from", sa.String(320), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", _ts, nullable=False),
    sa.Column("first_attempt_at", _ts, nullable=True),
    sa.Column("last_attempt_at", _ts, nullable=True),
    sa.Column("next_attempt_at", _ts, nullable=True),
    sa.Column("finished_at", _ts, nullable=True),
    sa.Column("last_code", sa.Integer, nullable=True),
    sa.Column("last_enhanced_status", sa.String(16), nullable=True),
    sa.Column("last_mx", sa.String(255), nullable=True),
    sa.Column("last_text", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", _ts, nullable=True),
    sa.Column("claimed_at", _ts, nullable=True),
    sa.Column("possible_duplicate", sa.Boolean, nullable=False),
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("purged_at", _ts, nullable=True),
    sa.Column("held_by", sa.Text, nullable=True),  # the hold rule that matched
    sa.Column("visitor", sa.String(320), nullable=True),  # Reply-To, for the console's search
    sa.Column("purpose", sa.String(16), nullable=False, server_default="form"),
    sa.Column("claim_token", sa.Integer, nullable=False, server_default="0"),
    # The form it came from ("default": the RELAY_ variables' form); NULL for an alert.
    sa.Column("form_id", sa.String(64), nullable=True, server_default="default"),
    sa.Index("ix_messages_due", "status", "next_attempt_at"),
    # The console's log, newest first by keyset (created_at, id): all of it, or one status.
    sa.Index("ix_messages_created_id", "created_at", "id"),
    sa.Index("ix_messages_status_created", "status", "created_at", "id"),
    sa.Index("ix_messages_form_created", "form_id", "created_at", "id"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "outbox_id", sa.String(32), sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("started_at", _ts, nullable=False),
    sa.Column("finished_at", _ts, nullable=False),
    sa.Column(
        "outcome", sa.String(16), nullable=False
    ),  # delivered/temporary/permanent/interrupted
    sa.Column("code", sa.Integer, nullable=True),
    sa.Column("enhanced_status", sa.String(16), nullable=True),
    sa.Column("mx_host", sa.String(255), nullable=True),
    sa.Column("text", sa.Text, nullable=True),
    sa.Column("possible_duplicate", sa.Boolean, nullable=False),
    sa.Column("worker", sa.String(64), nullable=True),
    sa.Index("ix_attempts_outbox_id", "outbox_id", "number"),
)

attempt_hosts = sa.Table(
    "attempt_hosts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "attempt_id", sa.Integer, sa.ForeignKey("attempts.id", ondelete="CASCADE"), nullable=False
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
    sa.Column("started_at", _ts, nullable=True),
    sa.Index("ix_attempt_hosts_attempt_id", "attempt_id", "position"),
)

alert_events = sa.Table(
    "alert_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(64), nullable=True),  # a message id, a DKIM selector
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("fields", sa.JSON, nullable=False),
    sa.Column("created_at", _ts, nullable=False),
    sa.Column(
        "alert_id", sa.Integer, sa.ForeignKey("alerts.id", ondelete="SET NULL"), nullable=True
    ),
    sa.Index("ix_alert_events_open", "alert_id", "kind", "created_at"),
    sa.Index("ix_alert_events_subject", "kind", "subject"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("fields", sa.JSON, nullable=False),
    sa.Column("first_at", _ts, nullable=False),
    sa.Column("last_at", _ts, nullable=False),
    sa.Column("created_at", _ts, nullable=False),
    sa.Index("ix_alerts_created", "created_at"),
)

alert_deliveries = sa.Table(
    "alert_deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "alert_id", sa.Integer, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("channel", sa.String(16), nullable=False),  # webhook, email
    sa.Column("status", sa.String(16), nullable=False),  # pending, sending, sent, failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", _ts, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("sent_at", _ts, nullable=True),
    sa.Index("ix_alert_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_alert_deliveries_alert", "alert_id"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    # Boot id and PID namespace: where `pid` means something (a dead local worker is seen at once).
    sa.Column("node", sa.String(128), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("started_at", _ts, nullable=False),
    sa.Column("beat_at", _ts, nullable=False),
    sa.Column("stopped_at", _ts, nullable=True),
    sa.Column("stop_reason", sa.String(64), nullable=True),
    sa.Index("ix_workers_beat", "beat_at"),
)
