"""Alerts as the store keeps them: events, the alerts they are grouped into, and one delivery
per channel, retried with backoff.

An event is recorded where the thing happens, in the same transaction when it can be (a
message that fails records its event with the failure: neither exists without the other).
`group` turns the events of one kind whose group window has closed into one alert (fifty
failures in a burst are one alert, not fifty) and queues a delivery on every channel;
`claim` hands due deliveries out under a lease, so several dispatchers (every worker, the
`relay alerts check` timer) never send one twice while they all stay alive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.store.engine import Database, replayed
from relay.store.schema import (
    PENDING_STATUSES,
    alert_deliveries,
    alert_events,
    alerts,
    messages,
)

GROUP_LOCK_KEY = 0x7265_6C61_7901  # pg_try_advisory_xact_lock: one grouper at a time
SUBJECTS_KEPT = 20  # subjects (message ids) an alert lists; the count says how many in all
MESSAGE_FAILED = "message_failed"
QUEUE_AGE = "queue_age"


@dataclass(frozen=True)
class NewEvent:
    kind: str
    text: str
    subject: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryState:
    channel: str
    status: str  # pending, sending, sent, failed
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class AlertRow:
    id: int
    kind: str
    count: int
    text: str
    fields: dict[str, Any]
    first_at: datetime
    last_at: datetime
    created_at: datetime
    deliveries: tuple[DeliveryState, ...] = ()


@dataclass(frozen=True)
class DeliveryClaim:
    """One channel's delivery of one alert, leased to the caller."""

    id: int
    channel: str
    attempt: int
    alert: AlertRow


def add_event(conn: Connection, event: NewEvent, now: datetime) -> None:
    conn.execute(
        alert_events.insert().values(
            kind=event.kind,
            subject=event.subject,
            text=event.text,
            fields=dict(event.fields),
            created_at=now,
        )
    )


def add_failure_event(conn: Connection, outbox_id: str, reason: str, now: datetime) -> None:
    """The event of a message that failed for good, in the transaction that failed it; none
    for an alert mail (a failing RELAY_ALERT_EMAIL must not alert about itself)."""
    m = messages.c
    row = conn.execute(sa.select(m.purpose, m.subject).where(m.id == outbox_id)).first()
    if row is None or row.purpose == "alert":
        return
    add_event(
        conn,
        NewEvent(MESSAGE_FAILED, reason, subject=outbox_id, fields={"subject": row.subject}),
        now,
    )


def _alert_row(row: Any, deliveries: Sequence[DeliveryState] = ()) -> AlertRow:
    return AlertRow(
        id=row.id,
        kind=row.kind,
        count=row.count,
        text=row.text,
        fields=dict(row.fields or {}),
        first_at=row.first_at,
        last_at=row.last_at,
        created_at=row.created_at,
        deliveries=tuple(deliveries),
    )


def _delivery_state(row: Any) -> DeliveryState:
    return DeliveryState(
        row.channel, row.status, row.attempts, row.next_attempt_at, row.last_error, row.sent_at
    )


class AlertStore:
    """The alert tables of one store (`Outbox.alerts`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @replayed
    def record(self, events: Sequence[NewEvent]) -> int:
        if not events:
            return 0
        now = self.db.clock()
        with self.db.tx() as conn:
            for item in events:
                add_event(conn, item, now)
        return len(events)

    @replayed
    def waiting_longer_than(self, age: timedelta, limit: int = 200) -> list[Any]:
        """Pending messages (not alert mail) older than `age` that no queue_age event names
        yet: each message is reported once, however long it waits."""
        m = messages.c
        e = alert_events.c
        seen = sa.select(e.id).where(e.kind == QUEUE_AGE, e.subject == m.id)
        query = (
            sa.select(m.id, m.subject, m.created_at, m.status, m.attempts, m.last_text)
            .where(
                m.status.in_(PENDING_STATUSES),
                m.created_at < self.db.clock() - age,
                m.purpose != "alert",
                ~seen.exists(),
            )
            .order_by(m.created_at)
            .limit(limit)
        )
        with self.db.tx() as conn:
            return list(conn.execute(query).all())

    @replayed
    def group(
        self, window: timedelta, channels: Sequence[str], *, at_once: Sequence[str] = ()
    ) -> list[int]:
        """One alert per kind whose oldest ungrouped event is at least `window` old (or of a
        kind in `at_once`: one event that never comes in bursts), with a pending delivery
        on each channel; the ids of the alerts made."""
        now = self.db.clock()
        e = alert_events.c
        made: list[int] = []
        with self.db.tx() as conn:
            if (
                conn.dialect.name == "postgresql"
                and not conn.execute(
                    sa.select(sa.func.pg_try_advisory_xact_lock(GROUP_LOCK_KEY))
                ).scalar()
            ):
                return []  # another dispatcher is grouping right now
            ready = conn.execute(
                sa.select(e.kind)
                .where(e.alert_id.is_(None))
                .group_by(e.kind)
                .having(
                    sa.or_(sa.func.min(e.created_at) <= now - window, e.kind.in_(list(at_once)))
                )
            ).scalars()
            for kind in list(ready):
                made.append(self._group_kind(conn, kind, channels, now))
        return made

    def _group_kind(
        self, conn: Connection, kind: str, channels: Sequence[str], now: datetime
    ) -> int:
        e = alert_events.c
        rows = conn.execute(
            sa.select(e.id, e.subject, e.text, e.fields, e.created_at)
            .where(e.alert_id.is_(None), e.kind == kind)
            .order_by(e.created_at, e.id)
        ).all()
        latest = rows[-1]
        listed = rows[-SUBJECTS_KEPT:]
        count = len(rows)
        text = latest.text if count == 1 else f"{count} events; the latest: {latest.text}"
        fields = {
            "events": [
                {
                    "subject": r.subject,
                    "text": r.text,
                    "at": r.created_at.isoformat(),
                    **dict(r.fields or {}),
                }
                for r in listed
            ],
            "subjects": [r.subject for r in rows if r.subject][:SUBJECTS_KEPT],
        }
        alert_id = int(
            conn.execute(
                alerts.insert()
                .values(
                    kind=kind,
                    count=count,
                    text=text,
                    fields=fields,
                    first_at=rows[0].created_at,
                    last_at=latest.created_at,
                    created_at=now,
                )
                .returning(alerts.c.id)
            ).scalar_one()
        )
        conn.execute(
            alert_events.update().where(e.id.in_([r.id for r in rows])).values(alert_id=alert_id)
        )
        self._queue(conn, alert_id, channels, now)
        return alert_id

    def _queue(
        self, conn: Connection, alert_id: int, channels: Sequence[str], now: datetime
    ) -> None:
        if channels:
            conn.execute(
                alert_deliveries.insert(),
                [
                    {
                        "alert_id": alert_id,
                        "channel": channel,
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": now,
                    }
                    for channel in channels
                ],
            )

    @replayed
    def create(self, event: NewEvent, channels: Sequence[str]) -> int:
        """An alert of its own, not grouped (`relay alerts test`), due on every channel."""
        now = self.db.clock()
        with self.db.tx() as conn:
            alert_id = int(
                conn.execute(
                    alerts.insert()
                    .values(
                        kind=event.kind,
                        count=1,
                        text=event.text,
                        fields={"events": [{"subject": event.subject, **dict(event.fields)}]},
                        first_at=now,
                        last_at=now,
                        created_at=now,
                    )
                    .returning(alerts.c.id)
                ).scalar_one()
            )
            self._queue(conn, alert_id, channels, now)
        return alert_id

    @replayed
    def claim(
        self, lease: float, *, limit: int = 20, alert_id: int | None = None
    ) -> list[DeliveryClaim]:
        """Due deliveries (pending, or sending with an expired lease), leased for `lease`
        seconds; `alert_id`: only that alert's."""
        now = self.db.clock()
        d = alert_deliveries.c
        query = (
            sa.select(d.id, d.alert_id, d.channel, d.attempts)
            .where(d.status.in_(("pending", "sending")), d.next_attempt_at <= now)
            .order_by(d.next_attempt_at, d.id)
            .limit(limit)
        )
        if alert_id is not None:
            query = query.where(d.alert_id == alert_id)
        if self.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True, of=alert_deliveries)
        with self.db.tx() as conn:
            rows = conn.execute(query).all()
            if not rows:
                return []
            conn.execute(
                alert_deliveries.update()
                .where(d.id.in_([r.id for r in rows]))
                .values(
                    status="sending",
                    attempts=d.attempts + 1,
                    next_attempt_at=now + timedelta(seconds=lease),
                )
            )
            found = {
                r.id: _alert_row(r)
                for r in conn.execute(
                    sa.select(alerts).where(alerts.c.id.in_({r.alert_id for r in rows}))
                ).all()
            }
        return [DeliveryClaim(r.id, r.channel, r.attempts + 1, found[r.alert_id]) for r in rows]

    @replayed
    def sent(self, delivery_id: int) -> None:
        d = alert_deliveries.c
        with self.db.tx() as conn:
            conn.execute(
                alert_deliveries.update()
                .where(d.id == delivery_id)
                .values(status="sent", sent_at=self.db.clock(), next_attempt_at=None)
            )

    @replayed
    def not_sent(self, delivery_id: int, error: str, retry_at: datetime | None) -> None:
        """A failed try: due again at `retry_at`, or failed for good when it is None."""
        d = alert_deliveries.c
        values: dict[str, Any] = {"last_error": error[:2000], "next_attempt_at": retry_at}
        values["status"] = "pending" if retry_at is not None else "failed"
        with self.db.tx() as conn:
            conn.execute(alert_deliveries.update().where(d.id == delivery_id).values(**values))

    @replayed
    def recent(self, limit: int = 50) -> list[AlertRow]:
        """The newest alerts, each with its deliveries."""
        a = alerts.c
        with self.db.tx() as conn:
            rows = conn.execute(
                sa.select(alerts).order_by(a.created_at.desc(), a.id.desc()).limit(limit)
            ).all()
            by_alert: dict[int, list[DeliveryState]] = {}
            if rows:
                for d in conn.execute(
                    sa.select(alert_deliveries)
                    .where(alert_deliveries.c.alert_id.in_([r.id for r in rows]))
                    .order_by(alert_deliveries.c.id)
                ).all():
                    by_alert.setdefault(d.alert_id, []).append(_delivery_state(d))
        return [_alert_row(r, by_alert.get(r.id, ())) for r in rows]

    @replayed
    def has_event(self, kind: str, subject: str, within: timedelta) -> bool:
        """Whether an event of `kind` about `subject` was recorded within that time."""
        e = alert_events.c
        query = sa.select(e.id).where(
            e.kind == kind, e.subject == subject, e.created_at >= self.db.clock() - within
        )
        with self.db.tx() as conn:
            return conn.execute(query.limit(1)).first() is not None

    @replayed
    def pending_events(self) -> int:
        """Events not grouped into an alert yet."""
        with self.db.tx() as conn:
            query = sa.select(sa.func.count()).where(alert_events.c.alert_id.is_(None))
            return int(conn.execute(query).scalar_one())
