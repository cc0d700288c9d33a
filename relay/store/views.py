"""The log as text: pure formatting of outbox records for `relay log` and `relay show`."""

from __future__ import annotations

import csv
import email.policy
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from typing import Any

from relay.mail.attempt import format_reply
from relay.store.records import MessageDetail, MessageRow
from relay.store.retry import human_age
from relay.store.workers import WorkerRow

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """ "90", "90s", "5m", "2h", "3d", "1w" -> timedelta; ValueError otherwise."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 5m, 2h, 3d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def next_try(row: MessageRow, now: datetime) -> str:
    if row.status == "sending":
        return "sending"
    if row.status == "held":
        return "held"
    if row.status not in ("queued", "deferred") or row.next_attempt_at is None:
        return "-"
    wait = row.next_attempt_at - now
    return "now" if wait.total_seconds() <= 0 else "in " + human_age(wait)


def log_table(rows: Sequence[MessageRow], now: datetime, *, reply_width: int | None = 60) -> str:
    """An aligned table, newest first: id, age, status, attempts, last reply, next try."""
    header = ("ID", "AGE", "STATUS", "TRIES", "LAST REPLY", "NEXT")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        reply = row.last_reply or "-"
        if reply_width is not None and len(reply) > reply_width:
            reply = reply[: reply_width - 1] + "…"
        status = row.status + ("*" if row.possible_duplicate else "")
        lines.append(
            (
                row.id,
                human_age(now - row.created_at),
                status,
                str(row.attempts),
                reply,
                next_try(row, now),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    ]
    if any(row.possible_duplicate for row in rows):
        out.append("* possible duplicate: a connection dropped after the message was sent")
    return "\n".join(out)


def workers_table(
    rows: Sequence[WorkerRow], now: datetime, dead_after: float, *, shown: int = 3
) -> str:
    """`relay workers`: one line per worker, latest beat first, with what it holds."""
    header = ("ID", "STATE", "LAST BEAT", "HOST", "PID", "STARTED", "HOLDS")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        holds = str(len(row.holds))
        if row.holds:
            more = "…" if len(row.holds) > shown else ""
            holds += ": " + ",".join(row.holds[:shown]) + more
        state: str = row.state(now, dead_after)
        if state == "stopped" and row.stop_reason not in (None, "stopped"):
            state += f" ({row.stop_reason})"
        lines.append(
            (
                row.id,
                state,
                human_age(now - row.beat_at) + " ago",
                row.host,
                str(row.pid),
                human_age(now - row.started_at) + " ago",
                holds,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    )


def log_record(row: MessageRow, now: datetime) -> dict[str, Any]:
    """One JSON line of `relay log --json`."""
    return {
        "id": row.id,
        "message_id": row.message_id,
        "created_at": row.created_at.isoformat(),
        "age_seconds": int((now - row.created_at).total_seconds()),
        "status": row.status,
        "attempts": row.attempts,
        "last_code": row.last_code,
        "last_enhanced_status": row.last_enhanced_status,
        "last_mx": row.last_mx,
        "last_text": row.last_text,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
        "possible_duplicate": row.possible_duplicate,
        "failure_reason": row.failure_reason,
        "subject": row.subject,
        "held_by": row.held_by,
        "form_id": row.form_id,
    }


CSV_COLUMNS = (
    "id",
    "created_at",
    "status",
    "attempts",
    "subject",
    "visitor",
    "message_id",
    "last_code",
    "last_enhanced_status",
    "last_mx",
    "last_text",
    "next_attempt_at",
    "finished_at",
    "possible_duplicate",
    "failure_reason",
    "held_by",
    "purpose",
    "form_id",
)
# A cell a spreadsheet would run as a formula (OWASP's CSV injection): visitors write subjects.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_lines(rows: Iterable[MessageRow]) -> Iterator[str]:
    """The log as CSV (RFC 4180, CRLF), a header line first: `relay log --csv` and the
    console's export. Text that a spreadsheet would evaluate is prefixed with a quote."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(values: Sequence[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield line(CSV_COLUMNS)
    for row in rows:
        yield line([_cell(getattr(row, name)) for name in CSV_COLUMNS])


def message_headers(body: bytes | None) -> list[tuple[str, str]]:
    """The header fields of the stored (unsigned) message, unfolded."""
    if body is None:
        return []
    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(body)
    return [(name, re.sub(r"\r?\n[ \t]+", " ", str(value))) for name, value in parsed.items()]


def detail_record(detail: MessageDetail) -> dict[str, Any]:
    """`relay show --json`: the message, its headers and every attempt with every host."""
    out = detail.message.as_dict()
    out["headers"] = [[name, value] for name, value in message_headers(detail.body)]
    out["attempts_detail"] = [
        {
            **{k: v.isoformat() if isinstance(v, datetime) else v for k, v in _fields(a).items()},
            "hosts": [
                {k: v.isoformat() if isinstance(v, datetime) else v for k, v in _fields(h).items()}
                for h in a.hosts
            ],
        }
        for a in detail.attempts
    ]
    return out


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__ if name != "hosts"}


def _when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value else "-"


def detail_text(detail: MessageDetail, now: datetime) -> str:
    """`relay show`: readable, one attempt per block, one host per line."""
    m = detail.message
    status = m.status + (" (possible duplicate)" if m.possible_duplicate else "")
    lines = [
        f"id:             {m.id}",
        f"message-id:     {m.message_id}",
        f"status:         {status}",
        f"recipient:      {m.recipient}",
        f"envelope from:  {m.envelope_from}",
        f"subject:        {m.subject}",
        f"created:        {_when(m.created_at)} ({human_age(now - m.created_at)} ago)",
        f"attempts:       {m.attempts} (first {_when(m.first_attempt_at)}, "
        f"last {_when(m.last_attempt_at)})",
        f"next try:       {next_try(m, now)}",
    ]
    if m.last_reply:
        lines.append(f"last reply:     {m.last_reply}")
    if m.failure_reason:
        lines.append(f"failure:        {m.failure_reason}")
    if m.held_by:
        lines.append(f"held by:        {m.held_by} (`relay release {m.id}` sends it)")
    for key, value in sorted(m.meta.items()):
        lines.append(f"meta {key}: {value}")
    lines.append("")
    if detail.body is None:
        lines.append(f"headers: (body purged {_when(m.purged_at)})")
    else:
        lines.append(f"headers ({m.size} bytes, unsigned):")
        lines.extend(f"  {name}: {value}" for name, value in message_headers(detail.body))
    for a in detail.attempts:
        reply = format_reply(a.code, a.enhanced_status, a.mx_host, a.text)
        dup = " [possible duplicate]" if a.possible_duplicate else ""
        lines.append("")
        lines.append(f"attempt {a.number}  {_when(a.started_at)}  {a.outcome}{dup}")
        if reply:
            lines.append(f"  reply: {reply}")
        for h in a.hosts:
            where = f"[{h.ip}]:{h.port}" if h.ip else f":{h.port}"
            parts = [
                f"  - {h.mx_host} {where}",
                f"tls={h.tls or 'none'}",
                f"stage={h.stage}",
                str(h.code or ""),
                h.enhanced_status or "",
                h.text,
                f"({h.duration:.2f}s)",
            ]
            lines.append(" ".join(p for p in parts if p))
    return "\n".join(lines)
