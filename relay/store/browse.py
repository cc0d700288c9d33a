"""The log as the console browses it: filters and keyset pages, newest first.

A page is the `limit` messages after a cursor, the (created_at, id) of the last row of the
page before: each page costs an index range scan however deep it is, where OFFSET would
read every row it skips. `ix_messages_created_id` serves the unfiltered log and
`ix_messages_status_created` a status; free text is a LIKE over subject and visitor (plus
exact id and Message-ID), scanned newest first until the page is full.

`LogFilter` is the one place a filter becomes SQL: a new filter is a field and a condition
there, and the console, the CSV export and `relay log` get it at once. One form's log
(`form`) is served by `ix_messages_form_created`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from relay.store.records import MESSAGE_COLUMNS, MessageRow, message_row
from relay.store.schema import STATUSES, UTCDateTime, messages

TEXT_MAX = 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^(\d{1,20})\.([a-z0-9]{1,32})$")


@dataclass(frozen=True)
class LogFilter:
    """What the operator asked to see; every part optional."""

    status: str | None = None
    since: timedelta | None = None  # only messages newer than this
    text: str = ""  # part of the subject or visitor address, or an exact id / Message-ID
    form: str | None = None  # only messages of this form ("default": the one at /form)

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    @property
    def query_text(self) -> str:
        return self.text.strip()[:TEXT_MAX]

    def conditions(self, now: datetime) -> list[sa.ColumnElement[bool]]:
        m = messages.c
        found: list[sa.ColumnElement[bool]] = []
        if self.status:
            found.append(m.status == self.status)
        if self.form:
            found.append(m.form_id == self.form)
        if self.since is not None:
            found.append(m.created_at >= now - self.since)
        text = self.query_text
        if text:
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", text.lower()) + "%"
            bare = text.strip("<>")
            found.append(
                sa.or_(
                    m.id == text.lower(),
                    m.message_id.in_([text, f"<{bare}>"]),
                    sa.func.lower(m.subject).like(pattern, escape="\\"),
                    sa.func.lower(m.visitor).like(pattern, escape="\\"),
                )
            )
        return found


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: strictly older than (created_at, id)."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        micros = (self.created_at - EPOCH) // timedelta(microseconds=1)
        return f"{micros}.{self.id}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        """None for no cursor or one that is not ours (a hand-edited URL): the first page."""
        match = _CURSOR.match(text or "")
        if match is None:
            return None
        try:
            when = EPOCH + timedelta(microseconds=int(match.group(1)))
        except OverflowError:
            return None
        return cls(when, match.group(2))

    @classmethod
    def after(cls, row: MessageRow) -> Cursor:
        return cls(row.created_at, row.id)


@dataclass(frozen=True)
class Page:
    rows: list[MessageRow]
    next: Cursor | None  # None: this is the last page


def page_query(
    log_filter: LogFilter, now: datetime, after: Cursor | None, limit: int
) -> sa.Select[Any]:
    m = messages.c
    query = sa.select(*MESSAGE_COLUMNS).where(*log_filter.conditions(now))
    if after is not None:
        query = query.where(
            sa.tuple_(m.created_at, m.id)
            < sa.tuple_(sa.literal(after.created_at, UTCDateTime()), sa.literal(after.id))
        )
    return query.order_by(m.created_at.desc(), m.id.desc()).limit(limit)


def to_page(rows: Sequence[Any], limit: int) -> Page:
    """`rows` were fetched with limit + 1: the extra one says whether a next page exists."""
    found = [message_row(row) for row in rows[:limit]]
    more = len(rows) > limit and bool(found)
    return Page(found, Cursor.after(found[-1]) if more else None)


def walk(fetch: Any, log_filter: LogFilter, *, batch: int = 500) -> Iterator[MessageRow]:
    """Every matching row, newest first, a keyset page at a time (`fetch(filter, cursor,
    limit)` is MessageLog.browse): the CSV export of a filtered view of any size."""
    cursor: Cursor | None = None
    while True:
        page: Page = fetch(log_filter, cursor, batch)
        yield from page.rows
        if page.next is None:
            return
        cursor = page.next
