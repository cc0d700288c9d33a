"""The rows the outbox hands out and takes in, as frozen dataclasses.

`Claimed` goes to the worker with a lease; `Finished` comes back with the attempt's result;
`MessageRow`, `AttemptRecord` and `MessageDetail` are what the operator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from relay.mail.attempt import AttemptResult, HostTry, format_reply
from relay.store.schema import messages


@dataclass(frozen=True)
class Claimed:
    id: str
    message_id: str
    body: bytes
    recipient: str
    envelope_from: str
    attempt: int  # the number this attempt will have
    created_at: datetime
    claimed_at: datetime
    token: int = 0  # messages.claim_token of this claim: what renewals and records must match


@dataclass(frozen=True)
class Finished:
    """One ended attempt for `Outbox.record_attempts`."""

    claimed: Claimed
    result: AttemptResult
    started_at: datetime | None = None  # None: when it was claimed
    finished_at: datetime | None = None  # None: the time of the commit


@dataclass(frozen=True)
class MessageRow:
    id: str
    message_id: str
    recipient: str
    envelope_from: str
    subject: str
    meta: dict[str, Any]
    status: str
    attempts: int
    size: int
    created_at: datetime
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    last_code: int | None
    last_enhanced_status: str | None
    last_mx: str | None
    last_text: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    claimed_at: datetime | None
    possible_duplicate: bool
    failure_reason: str | None
    purged_at: datetime | None
    held_by: str | None = None
    visitor: str | None = None
    purpose: str = "form"
    claim_token: int = 0
    form_id: str | None = "default"

    @property
    def last_reply(self) -> str:
        return format_reply(self.last_code, self.last_enhanced_status, self.last_mx, self.last_text)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True)
class AttemptRecord:
    number: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    code: int | None
    enhanced_status: str | None
    mx_host: str | None
    text: str | None
    possible_duplicate: bool
    worker: str | None
    hosts: tuple[HostTry, ...] = ()


@dataclass(frozen=True)
class MessageDetail:
    message: MessageRow
    body: bytes | None
    attempts: tuple[AttemptRecord, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class QueueStats:
    """The queue at one moment, from the store: what any node reports alike."""

    counts: dict[str, int]
    due: int  # queued or deferred whose time has come (and expired leases)
    oldest_pending_at: datetime | None  # the oldest message not delivered, failed or held
    at: datetime

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest pending message has waited; 0 when nothing is pending."""
        if self.oldest_pending_at is None:
            return 0.0
        return max(0.0, (self.at - self.oldest_pending_at).total_seconds())


@dataclass(frozen=True)
class QueueHealth:
    ok: bool
    reason: str
    counts: dict[str, int]


MESSAGE_COLUMNS = [c for c in messages.c if c.name != "body"]


def message_row(row: sa.Row[Any]) -> MessageRow:
    data = dict(row._mapping)
    data.pop("body", None)
    data["meta"] = dict(data["meta"] or {})
    data["possible_duplicate"] = bool(data["possible_duplicate"])
    return MessageRow(**data)
