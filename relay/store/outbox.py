"""The durable outbox: a message is accepted only once it is committed here.

The API the web, the worker and the operator use. Enqueue stores an unsigned message, due
now (concurrent enqueues share a transaction: `group_commit`). Claiming hands a due message
to one worker under a lease and a new fencing token (`claim_token`): on PostgreSQL claimers
skip each other's rows (FOR UPDATE SKIP LOCKED); on SQLite the claim is one short BEGIN
IMMEDIATE transaction. A message still `sending` is claimed again when its worker is dead
(no heartbeat for `dead_after`, or deregistered: relay.store.workers) or its lease expired.
Recording an attempt stores it with every host it tried and moves the message on as
`retry.decide` says, but only for the claim that holds the message now.
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

from relay.logs import event as log_event
from relay.mail.attempt import format_reply, reply_fields
from relay.settings import Settings
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
from relay.store.schema import DUE_STATUSES, attempt_hosts, attempts, messages, workers
from relay.store.workers import Registry, dead_clause

log = logging.getLogger("relay.outbox")

INTERRUPTED = (
    "the worker lost its lease mid-attempt (killed or stalled); "
    "the server may have accepted the message"
)
STOPPED = "the worker stopped during the attempt; the server may have accepted the message"
NOT_SENT = "the worker stopped the attempt before the final dot; the server does not have it"


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
        self.workers = Registry(self)

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
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        give_up: float | None = None,
        dead_after: float | None = None,
        purpose: str | None = None,
    ) -> list[Claimed]:
        """Take up to `limit` due messages under a lease held by `owner`.

        A message still `sending` lost its worker mid-attempt: with `dead_after`, at once when
        that worker deregistered or has not beaten for `dead_after` seconds (those come
        first), otherwise when its lease expired. That attempt is recorded as interrupted and
        the message flagged as a possible duplicate, since the worker may have got as far as
        the server's acceptance. Past `give_up` seconds of age such a message fails instead,
        so one that kills every worker cannot loop for ever. `purpose`: only messages of that
        purpose (`alert`: the alert mail a process sends while no worker runs).
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
            "claim_token": m.claim_token + 1,
        }
        claimed: list[Claimed] = []
        fresh: list[str] = []  # queued or deferred: one UPDATE claims them all
        reclaimed: list[Any] = []
        with self.tx() as conn:
            rows: list[Any] = []
            if dead_after is not None:
                rows = list(
                    conn.execute(self._orphaned(owner, now, dead_after, limit, purpose)).all()
                )
            if len(rows) < limit:
                taken = [row.id for row in rows]
                rows += conn.execute(
                    self._due(now, limit - len(rows), exclude=taken, purpose=purpose)
                ).all()
            for row in rows:
                number = row.attempts + 1
                if row.status == "sending":
                    reclaimed.append(row)
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
                        token=int(row.claim_token) + 1,
                    )
                )
            if fresh:
                conn.execute(messages.update().where(m.id.in_(fresh)).values(**lease))
        if reclaimed:
            self.workers.log_reclaimed(owner, reclaimed, now, dead_after)
        return claimed

    _CLAIM_COLUMNS = (
        "id",
        "message_id",
        "body",
        "recipient",
        "envelope_from",
        "attempts",
        "created_at",
        "status",
        "claimed_at",
        "lease_owner",
        "claim_token",
    )

    def _due(
        self,
        now: datetime,
        limit: int,
        *,
        exclude: Sequence[str] = (),
        purpose: str | None = None,
    ) -> sa.Select[Any]:
        """The messages a claim takes: due, not purged, longest waiting first."""
        m = messages.c
        query = (
            sa.select(*(m[name] for name in self._CLAIM_COLUMNS))
            .where(m.status.in_(DUE_STATUSES), m.next_attempt_at <= now, m.body.is_not(None))
            .order_by(m.next_attempt_at)
            .limit(limit)
        )
        if exclude:
            query = query.where(m.id.not_in(list(exclude)))
        if purpose is not None:
            query = query.where(m.purpose == purpose)
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True, of=messages)
        return query

    def _orphaned(
        self, owner: str, now: datetime, dead_after: float, limit: int, purpose: str | None
    ) -> sa.Select[Any]:
        """Messages being sent by a worker that is dead or deregistered, whatever their
        lease says (never our own: our heartbeat renews those, or tells us they are lost)."""
        m = messages.c
        w = workers.c
        query = (
            sa.select(
                *(m[name] for name in self._CLAIM_COLUMNS),
                w.beat_at.label("owner_beat_at"),
                w.stopped_at.label("owner_stopped_at"),
                w.stop_reason.label("owner_stop_reason"),
            )
            .select_from(messages.join(workers, w.id == m.lease_owner))
            .where(
                m.status == "sending",
                m.lease_owner != owner,
                m.body.is_not(None),
                dead_clause(now, dead_after),
                m.purpose == purpose if purpose is not None else sa.true(),
            )
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
        possible_duplicate: bool = True,
    ) -> None:
        conn.execute(
            attempts.insert().values(
                outbox_id=outbox_id,
                number=number,
                started_at=started,
                finished_at=now,
                outcome="interrupted",
                text=text,
                possible_duplicate=possible_duplicate,
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
    def release(
        self,
        owner: str,
        ids: Sequence[str] | Mapping[str, int],
        *,
        started: bool = False,
        sent: bool = True,
    ) -> int:
        """Hand claimed messages back, due now (shutdown). `ids` may map each id to its claim
        token, and then only that claim is released. `started`: an attempt was cut off, so
        it is recorded as interrupted; `sent`: it may have got past the final dot, so the
        message is flagged as a possible duplicate."""
        if not ids:
            return 0
        now = self.clock()
        m = messages.c
        count = 0
        if isinstance(ids, Mapping):
            mine = sa.tuple_(m.id, m.claim_token).in_(list(ids.items()))
        else:
            mine = m.id.in_(list(ids))
        with self.tx() as conn:
            rows = conn.execute(
                sa.select(m.id, m.attempts, m.claimed_at).where(
                    mine, m.lease_owner == owner, m.status == "sending"
                )
            ).all()
            for row in rows:
                values: dict[str, Any] = {
                    "status": "deferred" if started or row.attempts else "queued",
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "next_attempt_at": row.claimed_at or now,  # ahead of what came after it
                }
                if started:
                    self._record_interrupted(
                        conn,
                        outbox_id=row.id,
                        number=row.attempts + 1,
                        started=row.claimed_at or now,
                        now=now,
                        worker=owner,
                        text=STOPPED if sent else NOT_SENT,
                        possible_duplicate=sent,
                    )
                    values.update(attempts=row.attempts + 1, last_attempt_at=now)
                    if sent:
                        values["possible_duplicate"] = True
                conn.execute(messages.update().where(m.id == row.id).values(**values))
                count += 1
            if count:
                notify(conn)
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

        If another claim holds the message now (this one's worker was given up for dead or
        its lease expired), the attempt is still recorded, and only a delivery changes the
        message: it was delivered, whoever holds it, flagged as a possible duplicate.
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
        stale: list[tuple[int, bool]] = []  # (index, whether its delivery was applied)
        with self.tx() as conn:
            attempt_ids = self._insert_attempts(conn, finished, rows)
            for index, (item, decision, row) in enumerate(
                zip(finished, decisions, rows, strict=True)
            ):
                if self._move_on(conn, item, decision, row, owner):
                    if decision.status == "failed":
                        add_failure_event(conn, item.claimed.id, decision.reason or "failed", now)
                    continue
                stale.append((index, self._stale(conn, item, decision, row, attempt_ids[index])))
        for index, took_over in stale:
            decisions[index] = dataclasses.replace(decisions[index], applied=took_over)
            item = finished[index]
            log_event(
                log,
                "delivery.lease_lost",
                logging.WARNING,
                id=item.claimed.id,
                attempt=item.claimed.attempt,
                token=item.claimed.token,
                worker=owner,
                outcome=item.result.outcome,
                possible_duplicate=True if item.result.outcome == "delivered" else None,
                took_over=True if took_over else None,
            )
        return decisions

    def _insert_attempts(
        self, conn: Connection, finished: Sequence[Finished], rows: list[dict[str, Any]]
    ) -> list[int]:
        """The attempt rows, and a row per host each attempt tried; the attempts' ids."""
        attempt_ids = list(
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
        return attempt_ids

    def _move_on(
        self,
        conn: Connection,
        item: Finished,
        decision: Decision,
        row: dict[str, Any],
        owner: str,
    ) -> bool:
        """Apply the decision to the message; False when this claim no longer holds it (its
        token is not the message's: another claim took over)."""
        m = messages.c
        values = _moved_on(item, decision, row)
        values["attempts"] = item.claimed.attempt
        owned = (
            (m.lease_owner == owner)
            & (m.status == "sending")
            & (m.claim_token == item.claimed.token)
        )
        update = messages.update().where(m.id == item.claimed.id, owned).values(**values)
        return bool(conn.execute(update).rowcount)

    def _stale(
        self,
        conn: Connection,
        item: Finished,
        decision: Decision,
        row: dict[str, Any],
        attempt_id: int,
    ) -> bool:
        """The outcome of a claim that lost the message. A delivery (or a lost connection
        after the dot) may be a second copy: the message and this attempt are flagged. A
        delivery also ends the message, whoever holds it (it did reach the server), with a
        new token, so the holder's own attempt is fenced off too and its worker, told at its
        next beat, cuts it off before the dot. True when that took the message over."""
        m = messages.c
        delivered = decision.status == "delivered"
        if not delivered and not item.result.possible_duplicate:
            return False
        conn.execute(
            attempts.update().where(attempts.c.id == attempt_id).values(possible_duplicate=True)
        )
        took_over = False
        if delivered:
            values = _moved_on(item, decision, row)
            values.update(possible_duplicate=True, claim_token=m.claim_token + 1)
            took_over = bool(
                conn.execute(
                    messages.update()
                    .where(m.id == item.claimed.id, m.status != "delivered")
                    .values(**values)
                ).rowcount
            )
        if not took_over:
            conn.execute(
                messages.update().where(m.id == item.claimed.id).values(possible_duplicate=True)
            )
        return took_over


def _moved_on(item: Finished, decision: Decision, row: Mapping[str, Any]) -> dict[str, Any]:
    """The message's columns after an attempt that decided `decision`."""
    values: dict[str, Any] = {
        "status": decision.status,
        "last_attempt_at": row["finished_at"],
        "next_attempt_at": decision.next_attempt_at,
        "last_code": row["code"],
        "last_enhanced_status": row["enhanced_status"],
        "last_mx": row["mx_host"],
        "last_text": row["text"],
        "lease_owner": None,
        "lease_expires_at": None,
        "failure_reason": decision.reason,
        "finished_at": row["finished_at"] if decision.status in ("delivered", "failed") else None,
    }
    if item.result.possible_duplicate:
        values["possible_duplicate"] = True
    return values


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
