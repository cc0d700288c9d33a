"""The durable outbox: a message is accepted only once it is committed here.

The API the web, the worker and the operator use. Enqueue stores an unsigned message, due
now (concurrent enqueues share a transaction: `group_commit`). Claiming hands a due message
to one worker under a lease: on PostgreSQL claimers skip each other's rows (FOR UPDATE SKIP
LOCKED); on SQLite the claim is one short BEGIN IMMEDIATE transaction. Recording an attempt
stores it with every host it tried and moves the message on as `retry.decide` says.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.config import Settings
from relay.logs import event as log_event
from relay.mail.attempt import format_reply, reply_fields
from relay.store.alerts import AlertStore, add_failure_event
from relay.store.engine import SQLITE_BUSY_TIMEOUT, replayed, utcnow
from relay.store.group_commit import GroupCommit
from relay.store.log import MessageLog
from relay.store.notify import notify
from relay.store.records import (
    Claimed,
    Finished,
)
from relay.store.retry import Decision, RetryPolicy, decide, human_age
from relay.store.schema import DUE_STATUSES, attempt_hosts, attempts, messages

log = logging.getLogger("relay.outbox")

INTERRUPTED = (
    "the worker lost its lease mid-attempt (killed or stalled); "
    "the server may have accepted the message"
)
STOPPED = "the worker stopped during the attempt; the server may have accepted the message"


def new_id() -> str:
    """16 characters of base32 (80 random bits): URL-safe, never starts with "-", unguessable."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


class BuiltLike(Protocol):
    """relay.mail.message.BuiltMessage, as far as the outbox reads it."""

    @property
    def message_id(self) -> str: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def recipient(self) -> str: ...
    @property
    def envelope_from(self) -> str: ...
    @property
    def subject(self) -> str: ...


def _insert_messages(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    conn.execute(messages.insert(), list(rows))
    notify(conn)


class Outbox(MessageLog):
    """The durable store of messages and their delivery history."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        auto_migrate: bool = True,
        busy_timeout: float = SQLITE_BUSY_TIMEOUT,
    ) -> None:
        super().__init__(url, clock=clock, auto_migrate=auto_migrate, busy_timeout=busy_timeout)
        self._enqueue = GroupCommit(self, _insert_messages)
        self.alerts = AlertStore(self)

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> Outbox:
        return cls(settings.sqlalchemy_url, clock=clock)

    # --- accept path ---

    def enqueue(
        self,
        built: BuiltLike,
        *,
        metadata: Mapping[str, str] | None = None,
        held_by: str | None = None,
        purpose: str = "form",
        form_id: str | None = "default",
    ) -> str:
        """Store an unsigned message, due now (or, `held_by` a hold rule, held for the
        operator's review); returns its outbox id only after the commit. `form_id` is the
        form it came from (None for an alert)."""
        now = self.clock()
        outbox_id = new_id()
        self._enqueue.write(
            {
                "id": outbox_id,
                "message_id": built.message_id,
                "body": built.raw,
                "size": len(built.raw),
                "recipient": built.recipient,
                "envelope_from": built.envelope_from,
                "subject": built.subject,
                "meta": dict(metadata or {}),
                "status": "held" if held_by else "queued",
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": None if held_by else now,
                "possible_duplicate": False,
                "held_by": held_by,
                "visitor": getattr(built, "reply_to", None) or None,
                "purpose": purpose,
                "form_id": form_id,
            }
        )
        return outbox_id

    # --- worker side ---

    @replayed
    def claim(
        self, owner: str, limit: int, lease_seconds: float, *, give_up: float | None = None
    ) -> list[Claimed]:
        """Take up to `limit` due messages under a lease held by `owner`.

        A message still `sending` whose lease expired lost its worker mid-attempt: that attempt
        is recorded as interrupted and the message flagged as a possible duplicate, since the
        worker may have died after the server accepted it. Past `give_up` seconds of age such
        a message fails instead, so one that kills every worker cannot loop for ever.
        """
        if limit <= 0:
            return []
        now = self.clock()
        expires = now + timedelta(seconds=lease_seconds)
        m = messages.c
        lease: dict[str, Any] = {
            "status": "sending",
            "lease_owner": owner,
            "lease_expires_at": expires,
            "next_attempt_at": expires,
            "claimed_at": now,
            "first_attempt_at": sa.func.coalesce(m.first_attempt_at, now),
        }
        claimed: list[Claimed] = []
        fresh: list[str] = []  # queued or deferred: one UPDATE claims them all
        with self.tx() as conn:
            for row in conn.execute(self._due(now, limit)).all():
                number = row.attempts + 1
                if row.status == "sending":
                    number = self._reclaim(conn, row, now, lease, give_up)
                    if number is None:
                        continue
                else:
                    fresh.append(row.id)
                claimed.append(
                    Claimed(
                        id=row.id,
                        message_id=row.message_id,
                        body=bytes(row.body),
                        recipient=row.recipient,
                        envelope_from=row.envelope_from,
                        attempt=number,
                        created_at=row.created_at,
                        claimed_at=now,
                    )
                )
            if fresh:
                conn.execute(messages.update().where(m.id.in_(fresh)).values(**lease))
        return claimed

    def _due(self, now: datetime, limit: int) -> sa.Select[Any]:
        """The messages a claim takes: due, not purged, longest waiting first."""
        m = messages.c
        query = (
            sa.select(
                m.id,
                m.message_id,
                m.body,
                m.recipient,
                m.envelope_from,
                m.attempts,
                m.created_at,
                m.status,
                m.claimed_at,
                m.lease_owner,
            )
            .where(m.status.in_(DUE_STATUSES), m.next_attempt_at <= now, m.body.is_not(None))
            .order_by(m.next_attempt_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True, of=messages)
        return query

    def _reclaim(
        self,
        conn: Connection,
        row: Any,
        now: datetime,
        lease: dict[str, Any],
        give_up: float | None,
    ) -> int | None:
        """Take over a message whose lease expired mid-attempt: record that attempt as
        interrupted and claim the message again (the number of the new attempt), or, past
        `give_up`, fail it (None)."""
        number = int(row.attempts) + 1
        self._record_interrupted(
            conn,
            outbox_id=row.id,
            number=number,
            started=row.claimed_at or now,
            now=now,
            worker=row.lease_owner,
        )
        interrupted = {"attempts": number, "possible_duplicate": True, "last_attempt_at": now}
        update = messages.update().where(messages.c.id == row.id)
        if give_up is not None and (now - row.created_at).total_seconds() >= give_up:
            reason = (
                f"gave up after {number} attempts over {human_age(now - row.created_at)}: "
                "the last one was interrupted (worker killed or stalled)"
            )
            conn.execute(
                update.values(
                    **interrupted,
                    status="failed",
                    finished_at=now,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    failure_reason=reason,
                )
            )
            add_failure_event(conn, row.id, reason, now)
            return None
        conn.execute(update.values(**lease, **interrupted))
        return number + 1

    def _record_interrupted(
        self,
        conn: Connection,
        *,
        outbox_id: str,
        number: int,
        started: datetime,
        now: datetime,
        worker: str | None,
        text: str = INTERRUPTED,
    ) -> None:
        conn.execute(
            attempts.insert().values(
                outbox_id=outbox_id,
                number=number,
                started_at=started,
                finished_at=now,
                outcome="interrupted",
                text=text,
                possible_duplicate=True,
                worker=worker,
            )
        )
        conn.execute(
            messages.update()
            .where(messages.c.id == outbox_id)
            .values(last_code=None, last_enhanced_status=None, last_mx=None, last_text=text)
        )

    @replayed
    def renew(self, owner: str, ids: Sequence[str], lease_seconds: float) -> int:
        """Extend the lease of messages still being sent (the worker's heartbeat)."""
        if not ids:
            return 0
        expires = self.clock() + timedelta(seconds=lease_seconds)
        m = messages.c
        with self.tx() as conn:
            result = conn.execute(
                messages.update()
                .where(m.id.in_(list(ids)), m.lease_owner == owner, m.status == "sending")
                .values(lease_expires_at=expires, next_attempt_at=expires)
            )
            return int(result.rowcount)

    @replayed
    def release(self, owner: str, ids: Sequence[str], *, started: bool = False) -> int:
        """Hand claimed messages back, due now (shutdown). `started`: an attempt was cut off,
        so it is recorded as interrupted and flagged as a possible duplicate."""
        if not ids:
            return 0
        now = self.clock()
        m = messages.c
        count = 0
        with self.tx() as conn:
            rows = conn.execute(
                sa.select(m.id, m.attempts, m.claimed_at).where(
                    m.id.in_(list(ids)), m.lease_owner == owner, m.status == "sending"
                )
            ).all()
            for row in rows:
                values: dict[str, Any] = {
                    "status": "deferred" if started or row.attempts else "queued",
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "next_attempt_at": now,
                }
                if started:
                    self._record_interrupted(
                        conn,
                        outbox_id=row.id,
                        number=row.attempts + 1,
                        started=row.claimed_at or now,
                        now=now,
                        worker=owner,
                        text=STOPPED,
                    )
                    values.update(
                        attempts=row.attempts + 1, possible_duplicate=True, last_attempt_at=now
                    )
                conn.execute(messages.update().where(m.id == row.id).values(**values))
                count += 1
        return count

    def record_attempt(
        self,
        claimed: Claimed,
        result: Any,
        *,
        owner: str,
        policy: RetryPolicy,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
    ) -> Decision:
        """Store one attempt and every host it tried, then move the message on.

        If another worker took the message over meanwhile (our lease expired), the attempt is
        still recorded; only a delivery changes the message's state then.
        """
        (decision,) = self.record_attempts(
            [Finished(claimed, result, started_at, finished_at)], owner=owner, policy=policy
        )
        return decision

    @replayed
    def record_attempts(
        self, finished: Sequence[Finished], *, owner: str, policy: RetryPolicy
    ) -> list[Decision]:
        """`record_attempt` for several attempts in one transaction: the worker's group
        commit, one fsync for all that ended within a few milliseconds. All or nothing: if it
        fails, none is stored and the messages stay leased to `owner`."""
        if not finished:
            return []
        now = self.clock()
        rows = [_attempt_row(item, now, owner) for item in finished]
        decisions = [_decision(item, row, policy) for item, row in zip(finished, rows, strict=True)]
        with self.tx() as conn:
            self._insert_attempts(conn, finished, rows)
            lost = []
            for index, (item, decision, row) in enumerate(
                zip(finished, decisions, rows, strict=True)
            ):
                if not self._move_on(conn, item, decision, row, owner):
                    lost.append(index)
                elif decision.status == "failed":
                    add_failure_event(conn, item.claimed.id, decision.reason or "failed", now)
        for index in lost:
            decisions[index] = dataclasses.replace(decisions[index], applied=False)
            log_event(
                log,
                "delivery.lease_lost",
                logging.WARNING,
                id=finished[index].claimed.id,
                attempt=finished[index].claimed.attempt,
                outcome=finished[index].result.outcome,
            )
        return decisions

    def _insert_attempts(
        self, conn: Connection, finished: Sequence[Finished], rows: list[dict[str, Any]]
    ) -> None:
        """The attempt rows, and a row per host each attempt tried."""
        attempt_ids = (
            conn.execute(
                attempts.insert().returning(attempts.c.id, sort_by_parameter_order=True), rows
            )
            .scalars()
            .all()
        )
        host_rows = [
            {"attempt_id": attempt_id, "position": position, **dataclasses.asdict(host)}
            for attempt_id, item in zip(attempt_ids, finished, strict=True)
            for position, host in enumerate(item.result.hosts)
        ]
        if host_rows:
            conn.execute(attempt_hosts.insert(), host_rows)

    def _move_on(
        self,
        conn: Connection,
        item: Finished,
        decision: Decision,
        row: dict[str, Any],
        owner: str,
    ) -> bool:
        """Apply the decision to the message; False when the lease was lost (another worker
        took it over), unless it was delivered, which applies whoever holds it now."""
        m = messages.c
        values: dict[str, Any] = {
            "status": decision.status,
            "attempts": item.claimed.attempt,
            "last_attempt_at": row["finished_at"],
            "next_attempt_at": decision.next_attempt_at,
            "last_code": row["code"],
            "last_enhanced_status": row["enhanced_status"],
            "last_mx": row["mx_host"],
            "last_text": row["text"],
            "lease_owner": None,
            "lease_expires_at": None,
            "failure_reason": decision.reason,
            "finished_at": (
                row["finished_at"] if decision.status in ("delivered", "failed") else None
            ),
        }
        if item.result.possible_duplicate:
            values["possible_duplicate"] = True
        owned = (m.lease_owner == owner) & (m.status == "sending")
        if decision.status == "delivered":
            owned = owned | m.status.in_(DUE_STATUSES)
        update = messages.update().where(m.id == item.claimed.id, owned).values(**values)
        return bool(conn.execute(update).rowcount)


def _attempt_row(item: Finished, now: datetime, owner: str) -> dict[str, Any]:
    """The attempts row for one ended attempt: the reply that decided it."""
    reply = reply_fields(item.result)
    return {
        "outbox_id": item.claimed.id,
        "number": item.claimed.attempt,
        "started_at": item.started_at or item.claimed.claimed_at,
        "finished_at": item.finished_at or now,
        "outcome": item.result.outcome,
        "code": reply.code,
        "enhanced_status": reply.enhanced_status,
        "mx_host": reply.mx_host,
        "text": reply.text,
        "possible_duplicate": item.result.possible_duplicate,
        "worker": owner,
    }


def _decision(item: Finished, row: dict[str, Any], policy: RetryPolicy) -> Decision:
    summary = format_reply(row["code"], row["enhanced_status"], row["mx_host"], row["text"])
    return decide(
        item.result.outcome,
        attempt=item.claimed.attempt,
        created_at=item.claimed.created_at,
        now=row["finished_at"],
        policy=policy,
        summary=summary,
    )
