"""The log as the operator reads and acts on it: list, browse, show, retry, purge, release
and discard held messages, counts, the queue's state and the queue check. `Outbox` builds on
it with the accept and delivery side."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from relay.errors import MessageNotFound
from relay.mail.attempt import HostTry
from relay.store.browse import Cursor, LogFilter, Page, page_query, to_page
from relay.store.engine import Database, replayed
from relay.store.notify import notify
from relay.store.records import (
    MESSAGE_COLUMNS,
    AttemptRecord,
    MessageDetail,
    MessageRow,
    QueueHealth,
    QueueStats,
    message_row,
)
from relay.store.retry import human_age
from relay.store.schema import (
    DUE_STATUSES,
    FINISHED_STATUSES,
    PENDING_STATUSES,
    attempt_hosts,
    attempts,
    messages,
)
from relay.store.workers import Registry


class MessageLog(Database):
    """Reads and operator actions on the messages and their attempts."""

    @replayed
    def list_messages(
        self,
        *,
        status: str | None = None,
        since: timedelta | None = None,
        limit: int = 50,
        form: str | None = None,
    ) -> list[MessageRow]:
        """Newest first; `form`: only that form's messages."""
        m = messages.c
        query = sa.select(*MESSAGE_COLUMNS).order_by(m.created_at.desc(), m.id).limit(limit)
        if status:
            query = query.where(m.status == status)
        if form:
            query = query.where(m.form_id == form)
        if since is not None:
            query = query.where(m.created_at >= self.clock() - since)
        with self.tx() as conn:
            return [message_row(row) for row in conn.execute(query).all()]

    @replayed
    def browse(self, log_filter: LogFilter, after: Cursor | None = None, limit: int = 50) -> Page:
        """One keyset page of the log, newest first (see relay.store.browse)."""
        query = page_query(log_filter, self.clock(), after, limit + 1)
        with self.tx() as conn:
            return to_page(conn.execute(query).all(), limit)

    @replayed
    def get(self, outbox_id: str) -> MessageRow:
        with self.tx() as conn:
            row = conn.execute(
                sa.select(*MESSAGE_COLUMNS).where(messages.c.id == outbox_id)
            ).first()
        if row is None:
            raise MessageNotFound(outbox_id)
        return message_row(row)

    @replayed
    def show(self, outbox_id: str) -> MessageDetail:
        """The message, its (unsigned) body if kept, and every attempt with every host."""
        with self.tx() as conn:
            row = conn.execute(sa.select(messages).where(messages.c.id == outbox_id)).first()
            if row is None:
                raise MessageNotFound(outbox_id)
            attempt_rows = conn.execute(
                sa.select(attempts)
                .where(attempts.c.outbox_id == outbox_id)
                .order_by(attempts.c.number, attempts.c.id)
            ).all()
            host_rows = conn.execute(
                sa.select(attempt_hosts)
                .join(attempts, attempts.c.id == attempt_hosts.c.attempt_id)
                .where(attempts.c.outbox_id == outbox_id)
                .order_by(attempt_hosts.c.attempt_id, attempt_hosts.c.position)
            ).all()
        hosts_by_attempt: dict[int, list[HostTry]] = {}
        for h in host_rows:
            data = dict(h._mapping)
            attempt_id = data.pop("attempt_id")
            data.pop("id")
            data.pop("position")
            hosts_by_attempt.setdefault(attempt_id, []).append(HostTry(**data))
        records = []
        for a in attempt_rows:
            data = dict(a._mapping)
            attempt_id = data.pop("id")
            data.pop("outbox_id")
            data["possible_duplicate"] = bool(data["possible_duplicate"])
            records.append(AttemptRecord(**data, hosts=tuple(hosts_by_attempt.get(attempt_id, []))))
        body = bytes(row.body) if row.body is not None else None
        return MessageDetail(message_row(row), body, tuple(records))

    @replayed
    def retry(self, outbox_id: str) -> bool:
        """Make a failed or deferred message due now; False if it is in another state."""
        m = messages.c
        with self.tx() as conn:
            exists = conn.execute(sa.select(m.status).where(m.id == outbox_id)).first()
            if exists is None:
                raise MessageNotFound(outbox_id)
            changed = conn.execute(self._retry_update().where(m.id == outbox_id)).rowcount
            notify(conn)
            return bool(changed)

    @replayed
    def retry_failed(self) -> int:
        """Make every failed message due now."""
        with self.tx() as conn:
            changed = conn.execute(self._retry_update().where(messages.c.status == "failed"))
            notify(conn)
            return int(changed.rowcount)

    def _retry_update(self) -> sa.Update:
        m = messages.c
        return (
            messages.update()
            .where(m.status.in_(("failed", "deferred")), m.body.is_not(None))
            .values(
                status="deferred",
                next_attempt_at=self.clock(),
                failure_reason=None,
                finished_at=None,
            )
        )

    @replayed
    def retryable_failed(self) -> int:
        """How many failed messages `retry_failed` would make due (those with a body)."""
        m = messages.c
        with self.tx() as conn:
            query = sa.select(sa.func.count()).where(m.status == "failed", m.body.is_not(None))
            return int(conn.execute(query).scalar_one())

    def _purgeable(self, older_than: timedelta) -> list[sa.ColumnElement[bool]]:
        m = messages.c
        return [
            m.status.in_(FINISHED_STATUSES),
            m.created_at < self.clock() - older_than,
            m.body.is_not(None),
        ]

    @replayed
    def purge(self, older_than: timedelta) -> int:
        """Drop the bodies of delivered and failed messages older than that; keep the log."""
        with self.tx() as conn:
            return int(
                conn.execute(
                    messages.update()
                    .where(*self._purgeable(older_than))
                    .values(body=None, purged_at=self.clock())
                ).rowcount
            )

    @replayed
    def purgeable(self, older_than: timedelta) -> int:
        """How many bodies `purge(older_than)` would drop now."""
        with self.tx() as conn:
            query = sa.select(sa.func.count()).where(*self._purgeable(older_than))
            return int(conn.execute(query).scalar_one())

    @replayed
    def purge_message(self, outbox_id: str) -> bool:
        """Drop one delivered or failed message's body; False if it is in another state or
        its body is gone already."""
        m = messages.c
        with self.tx() as conn:
            if conn.execute(sa.select(m.id).where(m.id == outbox_id)).first() is None:
                raise MessageNotFound(outbox_id)
            changed = conn.execute(
                messages.update()
                .where(m.id == outbox_id, m.status.in_(FINISHED_STATUSES), m.body.is_not(None))
                .values(body=None, purged_at=self.clock())
            ).rowcount
            return bool(changed)

    # --- held for review ---

    @replayed
    def release_held(self, outbox_id: str) -> bool:
        """Queue a held message for delivery now; False if it is not held."""
        m = messages.c
        now = self.clock()
        with self.tx() as conn:
            if conn.execute(sa.select(m.id).where(m.id == outbox_id)).first() is None:
                raise MessageNotFound(outbox_id)
            changed = conn.execute(
                messages.update()
                .where(m.id == outbox_id, m.status == "held")
                .values(status="queued", next_attempt_at=now)
            ).rowcount
            notify(conn)
            return bool(changed)

    @replayed
    def discard_held(self, outbox_id: str) -> bool:
        """Delete a held message (it was spam): no body, no row; False if it is not held."""
        m = messages.c
        with self.tx() as conn:
            if conn.execute(sa.select(m.id).where(m.id == outbox_id)).first() is None:
                raise MessageNotFound(outbox_id)
            changed = conn.execute(
                messages.delete().where(m.id == outbox_id, m.status == "held")
            ).rowcount
            return bool(changed)

    # --- the queue ---

    @replayed
    def queue_stats(self) -> QueueStats:
        """Counts by status, how many are due now, and the oldest pending message."""
        now = self.clock()
        m = messages.c
        with self.tx() as conn:
            counts = {
                status: int(count)
                for status, count in conn.execute(
                    sa.select(m.status, sa.func.count()).group_by(m.status)
                ).all()
            }
            due = conn.execute(
                sa.select(sa.func.count()).where(
                    m.status.in_(DUE_STATUSES), m.next_attempt_at <= now, m.body.is_not(None)
                )
            ).scalar_one()
            oldest = conn.execute(
                sa.select(sa.func.min(m.created_at)).where(m.status.in_(PENDING_STATUSES))
            ).scalar()
        return QueueStats(counts, int(due), oldest, now)

    @replayed
    def counts(self) -> dict[str, int]:
        m = messages.c
        with self.tx() as conn:
            rows = conn.execute(sa.select(m.status, sa.func.count()).group_by(m.status)).all()
        return {status: int(count) for status, count in rows}

    @replayed
    def queue_check(
        self,
        max_age: timedelta,
        *,
        failed_within: timedelta | None = None,
        dead_after: timedelta | None = None,
    ) -> QueueHealth:
        """Healthy unless a message failed (within `failed_within` of now, when given), mail
        has been due for longer than `dead_after` while no worker beat within it (a stopped
        worker is the most common way mail silently stops), or a message not delivered has
        waited longer than `max_age`."""
        now = self.clock()
        m = messages.c
        counts = self.counts()
        with self.tx() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(m.created_at)).where(m.status.in_(PENDING_STATUSES))
            ).scalar()
            failed_query = sa.select(m.id, m.failure_reason).where(m.status == "failed")
            if failed_within is not None:
                failed_query = failed_query.where(m.finished_at >= now - failed_within)
            failed = conn.execute(failed_query.order_by(m.finished_at.desc()).limit(1)).first()
        pending = sum(counts.get(s, 0) for s in PENDING_STATUSES)
        if failed is not None:
            return QueueHealth(
                False,
                f"{counts.get('failed', 0)} failed message(s); latest {failed.id}: "
                f"{failed.failure_reason or 'failed'}",
                counts,
            )
        if dead_after is not None:
            stalled = self.stalled(dead_after, now=now)
            if stalled is not None:
                return QueueHealth(False, stalled, counts)
        if oldest is not None and now - oldest > max_age:
            return QueueHealth(
                False,
                f"{pending} undelivered message(s); the oldest has waited "
                f"{human_age(now - oldest)} (limit {human_age(max_age)})",
                counts,
            )
        return QueueHealth(
            True,
            f"ok {pending} pending, {counts.get('delivered', 0)} delivered, "
            f"{counts.get('failed', 0)} failed",
            counts,
        )

    @replayed
    def stalled(self, dead_after: timedelta, *, now: datetime | None = None) -> str | None:
        """Why the queue stands still, if it does: mail due for `dead_after` and no worker
        that beat within it (queue-check and the no-worker alert)."""
        now = now or self.clock()
        m = messages.c
        with self.tx() as conn:
            due = conn.execute(
                sa.select(sa.func.count()).where(
                    m.status.in_(DUE_STATUSES),
                    m.next_attempt_at <= now - dead_after,
                    m.body.is_not(None),
                )
            ).scalar()
        if not due:
            return None
        latest = Registry(self).latest_beat()
        if latest is not None and now - latest.beat_at <= dead_after:
            return None
        limit = human_age(dead_after)
        if latest is None:
            seen = "no worker is registered"
        else:
            seen = (
                f"the last heartbeat came {human_age(now - latest.beat_at)} ago from "
                f"{latest.id} (pid {latest.pid} on {latest.host})"
            )
        return (
            f"{due} message(s) due and no worker has sent a heartbeat within {limit} "
            f"(RELAY_WORKER_DEAD_AFTER): {seen}; is `relay worker` running?"
        )
