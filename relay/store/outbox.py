"""The durable outbox: a message is accepted only once it is committed here.

SQLAlchemy Core over SQLite (embedded default: WAL, synchronous=FULL, so a commit survives
power loss) or PostgreSQL (any number of web nodes and workers share it). The schema is
versioned with Alembic (`relay db upgrade`); a store is created or migrated on first use.

Claiming hands a due message to one worker under a lease. On PostgreSQL claimers skip each
other's rows (FOR UPDATE SKIP LOCKED); on SQLite the claim is one short BEGIN IMMEDIATE
transaction. While a message is `sending`, `next_attempt_at` holds the lease expiry, so a
message whose worker died becomes due again through the same (status, next_attempt_at) index.

The retry decision is a pure function (`decide`) of the attempt outcome, the message's age and
the attempt number; the next attempt time is persisted, so a restarted worker keeps the
schedule.
"""

from __future__ import annotations

import base64
import dataclasses
import email.policy
import functools
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from relay.config import Settings
from relay.errors import (
    ConnectionFailure,
    DNSError,
    MessageNotFound,
    SMTPReplyError,
    StoreUnavailable,
)
from relay.logs import event as log_event

log = logging.getLogger("relay.outbox")

Status = Literal["queued", "sending", "deferred", "delivered", "failed"]
STATUSES: tuple[str, ...] = ("queued", "sending", "deferred", "delivered", "failed")
DUE_STATUSES = ("queued", "deferred", "sending")
MIGRATION_LOCK_KEY = 0x7265_6C61_7900  # "relay\0": pg_advisory_xact_lock for migrations
NOTIFY_CHANNEL = "relay_outbox"  # PostgreSQL: NOTIFY at commit wakes idle workers at once
SQLITE_BUSY_TIMEOUT = 5.0  # seconds a write waits for SQLite's lock before StoreUnavailable
ENQUEUE_GROUP_MAX = 64  # rows in one enqueue transaction (a process has a few threads)
MIGRATIONS = Path(__file__).parent / "migrations"
# Alembic keeps its migration context in module globals: one migration at a time per process.
# Across processes and nodes, PostgreSQL's advisory lock (migrations/env.py) serialises them.
_MIGRATION_LOCK = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """16 characters of base32 (80 random bits): URL-safe, never starts with "-", unguessable."""
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


# --- what the outbox stores: shapes of the callers' objects ----------------------------------


class BuiltLike(Protocol):
    """relay.message.BuiltMessage, as far as the outbox reads it."""

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


class HostTryLike(Protocol):
    """relay.smtp.HostTry, as far as the outbox reads it."""

    @property
    def mx_host(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> str | None: ...
    @property
    def code(self) -> int | None: ...
    @property
    def enhanced_status(self) -> str | None: ...
    @property
    def text(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def duration(self) -> float: ...
    @property
    def started_at(self) -> datetime: ...


class AttemptLike(Protocol):
    """relay.smtp.AttemptResult, as far as the outbox reads it."""

    @property
    def outcome(self) -> str: ...
    @property
    def hosts(self) -> Sequence[HostTryLike]: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def possible_duplicate(self) -> bool: ...


# --- schema ------------------------------------------------------------------------------------


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
    sa.Index("ix_messages_due", "status", "next_attempt_at"),
    sa.Index("ix_messages_created", "created_at"),
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


# --- the retry schedule: pure ------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter from `initial` up to `maximum`; fail past `give_up` age."""

    initial: float = 300
    maximum: float = 3600
    give_up: float = 432000

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_initial, settings.retry_max, settings.retry_give_up)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), from tenacity's
        wait_exponential_jitter called as a pure function of the attempt number."""
        wait = wait_exponential_jitter(
            multiplier=self.initial, max=self.maximum, jitter=self.initial * 0.2
        )
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = max(1, attempt)
        return float(wait(state))


@dataclass(frozen=True)
class Decision:
    status: Status
    next_attempt_at: datetime | None = None
    reason: str | None = None
    applied: bool = True  # False: another worker had taken the message over meanwhile


def decide(
    outcome: str,
    *,
    attempt: int,
    created_at: datetime,
    now: datetime,
    policy: RetryPolicy,
    summary: str = "",
) -> Decision:
    """What becomes of a message after attempt number `attempt` ended with `outcome`."""
    if outcome == "delivered":
        return Decision("delivered")
    if outcome == "permanent":
        return Decision("failed", reason=f"permanent failure: {summary}".rstrip(": "))
    deadline = created_at + timedelta(seconds=policy.give_up)
    if now >= deadline:
        age = _human_seconds((now - created_at).total_seconds())
        return Decision(
            "failed",
            reason=f"gave up after {attempt} attempts over {age}: {summary}".rstrip(": "),
        )
    # The last try happens at the deadline rather than never.
    next_at = min(now + timedelta(seconds=policy.delay(attempt)), deadline)
    return Decision("deferred", next_attempt_at=next_at)


def _human_seconds(seconds: float) -> str:
    return human_age(timedelta(seconds=seconds))


def human_age(delta: timedelta) -> str:
    """ "45s", "3m", "2h", "4d": the one largest unit, for a readable log."""
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{sign}{seconds // size}{unit}"
    return f"{sign}{seconds}s"


@dataclass(frozen=True)
class ReplyFields:
    code: int | None
    enhanced_status: str | None
    mx_host: str | None
    text: str


def reply_fields(result: AttemptLike) -> ReplyFields:
    """The reply that decided an attempt: the deciding error's data, else the last host's."""
    last = result.hosts[-1] if result.hosts else None
    last_mx = last.mx_host if last is not None else None
    error = result.error
    if result.outcome != "delivered" and isinstance(error, SMTPReplyError):
        return ReplyFields(error.code, error.enhanced_status, error.mx_host or last_mx, error.text)
    if result.outcome != "delivered" and isinstance(error, ConnectionFailure):
        return ReplyFields(None, None, error.mx_host or last_mx, str(error))
    if result.outcome != "delivered" and isinstance(error, DNSError):
        return ReplyFields(None, None, None, str(error))
    if last is not None:
        return ReplyFields(last.code, last.enhanced_status, last.mx_host, last.text)
    return ReplyFields(None, None, None, str(error) if error else "")


def format_reply(code: int | None, enhanced: str | None, mx: str | None, text: str | None) -> str:
    """One line: "451 4.7.1 Greylisted (mx1.support.test)"."""
    parts = [str(code) if code else "", enhanced or "", (text or "").strip()]
    line = " ".join(p for p in parts if p)
    return f"{line} ({mx})" if mx else line


# --- records handed to the worker and the CLI ---------------------------------------------------


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
class HostRecord:
    mx_host: str
    ip: str | None
    port: int
    tls: str | None
    code: int | None
    enhanced_status: str | None
    text: str
    stage: str
    duration: float
    started_at: datetime | None


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
    hosts: tuple[HostRecord, ...] = ()


@dataclass(frozen=True)
class MessageDetail:
    message: MessageRow
    body: bytes | None
    attempts: tuple[AttemptRecord, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class QueueHealth:
    ok: bool
    reason: str
    counts: dict[str, int]


_MESSAGE_COLUMNS = [c for c in messages.c if c.name != "body"]


def _message_row(row: sa.Row[Any]) -> MessageRow:
    data = dict(row._mapping)
    data.pop("body", None)
    data["meta"] = dict(data["meta"] or {})
    data["possible_duplicate"] = bool(data["possible_duplicate"])
    return MessageRow(**data)


# --- engines -----------------------------------------------------------------------------------


def _sqlite_path(url: sa.URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, *, busy_timeout: float = SQLITE_BUSY_TIMEOUT) -> Engine:
    """An engine for the outbox; SQLite tuned for durability.

    No pool_pre_ping: it costs a round trip per transaction. A pooled connection the server
    has closed fails the transaction's first statement instead, before anything is
    committed, and the store method runs again once on a fresh connection (`_replayed`)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_path(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
        )

        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            _sqlite_on_connect(dbapi_connection, int(busy_timeout * 1000))

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return sa.create_engine(parsed, pool_size=5, max_overflow=10, pool_recycle=1800)


def _sqlite_on_connect(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's deferred BEGIN:
    # a write transaction takes the lock at its start, so it never fails to upgrade later.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config built in code, pointing into the installed package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


class _StaleConnection(StoreUnavailable):
    """The connection was found dead before the transaction committed anything: the server
    closed it while it sat in the pool (restart, idle timeout, pg_terminate_backend)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _replayed(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a store method once more when its connection turned out to be dead before COMMIT.

    Nothing of the first run was committed (a lost COMMIT is never replayed: it stays a
    StoreUnavailable), and SQLAlchemy has invalidated the pool, so the second run gets a
    fresh connection. This replaces pool_pre_ping's round trip on every checkout."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except _StaleConnection as exc:
            log_event(log, "store.reconnect", method=method.__name__, error=str(exc))
            return method(*args, **kwargs)

    return wrapper


@dataclass(eq=False)
class _Waiting:
    """An `enqueue` waiting for the group transaction that holds its row."""

    row: dict[str, Any]
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # commits the next group
    committed: bool = False
    alone: bool = False  # its group failed before COMMIT: store it in a transaction of its own
    error: BaseException | None = None


class _GroupFailure(Exception):
    """enqueue's group transaction failed at `stage`; before "commit" nothing was written."""

    def __init__(self, stage: Literal["begin", "insert", "commit"], error: BaseException) -> None:
        self.stage = stage
        self.error = error
        invalidated = isinstance(error, DBAPIError) and error.connection_invalidated
        self.stale = stage != "commit" and invalidated
        super().__init__(f"{stage}: {error}")


@dataclass(frozen=True)
class Finished:
    """One ended attempt for `Outbox.record_attempts`."""

    claimed: Claimed
    result: AttemptLike
    started_at: datetime | None = None  # None: when it was claimed
    finished_at: datetime | None = None  # None: the time of the commit


# --- the outbox ----------------------------------------------------------------------------------


class Outbox:
    """The durable store of messages and their delivery history."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        auto_migrate: bool = True,
        busy_timeout: float = SQLITE_BUSY_TIMEOUT,
    ) -> None:
        self.url = url
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.auto_migrate = auto_migrate
        self._engine: Engine | None = None
        self._schema_ready = False
        self._lock = threading.Lock()
        # enqueue's group commit: the rows waiting for a transaction, and whether a leader
        # thread is committing (only one at a time, so on SQLite a process's accepting
        # threads queue here instead of in the busy handler's sleeps).
        self._group_mutex = threading.Lock()
        self._group: list[_Waiting] = []
        self._group_leading = False

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> Outbox:
        return cls(settings.sqlalchemy_url, clock=clock)

    @property
    def dialect(self) -> str:
        return sa.make_url(self.url).get_backend_name()

    def listen_url(self) -> str | None:
        """A libpq URL for LISTEN on PostgreSQL; None for SQLite (workers poll)."""
        if self.dialect != "postgresql":
            return None
        url = sa.make_url(self.url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _notify(self, conn: Connection) -> None:
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = make_engine(self.url, busy_timeout=self.busy_timeout)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot open the outbox store: {exc}") from exc
            return self._engine

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # --- schema ---

    def upgrade(self, revision: str = "head") -> None:
        """Create or migrate the schema (idempotent; safe from several nodes at once)."""
        with _MIGRATION_LOCK, self._store(), self.engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
        self._schema_ready = True

    @_replayed
    def current_revision(self) -> str | None:
        with self._store(replayable=True), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def _ready(self) -> None:
        if self._schema_ready or not self.auto_migrate:
            return
        with _MIGRATION_LOCK:
            current = self.current_revision()
        if current != self.head_revision():
            self.upgrade()
        self._schema_ready = True

    @contextmanager
    def _store(self, *, replayable: bool = False) -> Iterator[None]:
        """Turn the database's way of saying "not now" into StoreUnavailable; `replayable`:
        nothing in the block commits, so a dead connection may be retried (`_replayed`)."""
        try:
            yield
        except DBAPIError as exc:
            if replayable and exc.connection_invalidated:
                raise _StaleConnection(f"outbox store connection lost: {exc}") from exc
            raise StoreUnavailable(f"outbox store unavailable: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"outbox store unavailable: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction. A connection lost inside it (before COMMIT) raises
        _StaleConnection, which a `_replayed` method retries once."""
        self._ready()
        with self._store(), self.engine.begin() as conn:
            try:
                yield conn
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise _StaleConnection(f"outbox store connection lost: {exc}") from exc
                raise

    # --- accept path ---

    def enqueue(self, built: BuiltLike, *, metadata: Mapping[str, str] | None = None) -> str:
        """Store an unsigned message, due now; returns its outbox id only after the commit.

        Concurrent calls from one process's threads share a transaction (`_lead_group`): one
        fsync on SQLite, one round trip to COMMIT on PostgreSQL. A call alone does not wait."""
        now = self.clock()
        outbox_id = new_id()
        waiting = _Waiting(
            {
                "id": outbox_id,
                "message_id": built.message_id,
                "body": built.raw,
                "size": len(built.raw),
                "recipient": built.recipient,
                "envelope_from": built.envelope_from,
                "subject": built.subject,
                "meta": dict(metadata or {}),
                "status": "queued",
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
                "possible_duplicate": False,
            },
        )
        with self._group_mutex:
            self._group.append(waiting)
            waiting.lead = not self._group_leading
            self._group_leading = True
        if not waiting.lead:
            waiting.woken.wait()  # committed, failed, or handed the lead
        if waiting.lead:
            self._lead_group(waiting)
        if waiting.error is not None:
            raise waiting.error
        if waiting.alone:
            self._insert_alone(waiting.row)
        elif not waiting.committed:
            raise StoreUnavailable("outbox store unavailable: the group commit did not finish")
        return outbox_id

    @_replayed
    def _insert_alone(self, row: dict[str, Any]) -> None:
        """One row in a transaction of its own, after its group failed before COMMIT (so that
        one bad row does not refuse the others)."""
        with self._tx() as conn:
            conn.execute(messages.insert().values(**row))
            self._notify(conn)

    def _lead_group(self, own: _Waiting) -> None:
        """Commit the waiting rows in one transaction, tell each waiter, hand the lead on.

        A connection found dead before COMMIT is replaced and the group committed once more
        (as `_replayed` does); a lost COMMIT is never replayed. If the transaction fails,
        nobody in the group is told success: a failed statement sends each row of a larger
        group to a transaction of its own, any other failure is StoreUnavailable for each."""
        group: list[_Waiting] = []
        try:
            for replay in (False, True):
                try:
                    self._commit_group(group)
                except _GroupFailure as failure:
                    if failure.stale and not replay:
                        log_event(
                            log,
                            "store.reconnect",
                            method="enqueue",
                            rows=len(group),
                            error=str(failure.error),
                        )
                        continue
                    self._fail_group(group, failure)
                else:
                    for waiting in group:
                        waiting.committed = True
                break
        finally:
            with self._group_mutex:
                if own in self._group:  # interrupted before taking its group: not committed
                    self._group.remove(own)
                following = self._group[0] if self._group else None
                if following is not None:
                    following.lead = True
                self._group_leading = following is not None
            if following is not None:
                following.woken.set()
            for waiting in group:
                waiting.woken.set()

    def _take_group(self, group: list[_Waiting]) -> None:
        if not group:
            with self._group_mutex:
                group.extend(self._group[:ENQUEUE_GROUP_MAX])
                del self._group[: len(group)]

    def _commit_group(self, group: list[_Waiting]) -> None:
        """One transaction for the waiting rows, taken once BEGIN has returned: on SQLite the
        rows that arrive while the leader waits for the write lock join it."""
        stage: Literal["begin", "insert", "commit"] = "begin"
        try:
            self._ready()
            with self.engine.connect() as conn:
                transaction = conn.begin()
                self._take_group(group)
                stage = "insert"
                conn.execute(messages.insert(), [waiting.row for waiting in group])
                self._notify(conn)
                stage = "commit"
                transaction.commit()
        except Exception as exc:
            self._take_group(group)
            raise _GroupFailure(stage, exc) from exc

    def _fail_group(self, group: list[_Waiting], failure: _GroupFailure) -> None:
        error = failure.error
        if failure.stage == "insert" and len(group) > 1 and not failure.stale:
            log_event(log, "store.group_failed", logging.WARNING, rows=len(group), error=str(error))
            for waiting in group:
                waiting.alone = True
            return
        if len(group) == 1 and not isinstance(error, (DBAPIError, OSError)):
            group[0].error = error  # StoreUnavailable from _ready, or the row's own error
            return
        text = (
            str(error)
            if isinstance(error, StoreUnavailable)
            else f"outbox store unavailable: {error}"
        )
        for waiting in group:
            waiting.error = StoreUnavailable(text)
            waiting.error.__cause__ = error

    @_replayed
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and the schema is in place."""
        self._ready()
        with self._store(replayable=True), self.engine.connect() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(messages).where(sa.false()))

    # --- worker side ---

    @_replayed
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
        claimed: list[Claimed] = []
        values: dict[str, Any] = {
            "status": "sending",
            "lease_owner": owner,
            "lease_expires_at": expires,
            "next_attempt_at": expires,
            "claimed_at": now,
            "first_attempt_at": sa.func.coalesce(m.first_attempt_at, now),
        }
        fresh: list[str] = []  # queued or deferred: one UPDATE claims them all
        with self._tx() as conn:
            for row in conn.execute(query).all():
                number = row.attempts + 1
                if row.status == "sending":
                    self._record_interrupted(
                        conn,
                        outbox_id=row.id,
                        number=number,
                        started=row.claimed_at or now,
                        now=now,
                        worker=row.lease_owner,
                    )
                    age = (now - row.created_at).total_seconds()
                    if give_up is not None and age >= give_up:
                        conn.execute(
                            messages.update()
                            .where(m.id == row.id)
                            .values(
                                attempts=number,
                                possible_duplicate=True,
                                last_attempt_at=now,
                                status="failed",
                                finished_at=now,
                                next_attempt_at=None,
                                lease_owner=None,
                                lease_expires_at=None,
                                failure_reason=f"gave up after {number} attempts over "
                                f"{human_age(now - row.created_at)}: the last one was "
                                "interrupted (worker killed or stalled)",
                            )
                        )
                        continue
                    conn.execute(
                        messages.update()
                        .where(m.id == row.id)
                        .values(
                            **values,
                            attempts=number,
                            possible_duplicate=True,
                            last_attempt_at=now,
                        )
                    )
                    number += 1
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
                conn.execute(messages.update().where(m.id.in_(fresh)).values(**values))
        return claimed

    def _record_interrupted(
        self,
        conn: Connection,
        *,
        outbox_id: str,
        number: int,
        started: datetime,
        now: datetime,
        worker: str | None,
        text: str = "the worker lost its lease mid-attempt (killed or stalled); "
        "the server may have accepted the message",
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

    @_replayed
    def renew(self, owner: str, ids: Sequence[str], lease_seconds: float) -> int:
        """Extend the lease of messages still being sent (the worker's heartbeat)."""
        if not ids:
            return 0
        expires = self.clock() + timedelta(seconds=lease_seconds)
        m = messages.c
        with self._tx() as conn:
            result = conn.execute(
                messages.update()
                .where(m.id.in_(list(ids)), m.lease_owner == owner, m.status == "sending")
                .values(lease_expires_at=expires, next_attempt_at=expires)
            )
            return int(result.rowcount)

    @_replayed
    def release(self, owner: str, ids: Sequence[str], *, started: bool = False) -> int:
        """Hand claimed messages back, due now (shutdown). `started`: an attempt was cut off,
        so it is recorded as interrupted and flagged as a possible duplicate."""
        if not ids:
            return 0
        now = self.clock()
        m = messages.c
        count = 0
        with self._tx() as conn:
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
                        text="the worker stopped during the attempt; "
                        "the server may have accepted the message",
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
        result: AttemptLike,
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

    @_replayed
    def record_attempts(
        self, finished: Sequence[Finished], *, owner: str, policy: RetryPolicy
    ) -> list[Decision]:
        """`record_attempt` for several attempts in one transaction: the worker's group
        commit, one fsync for all that ended within a few milliseconds. All or nothing: if it
        fails, none is stored and the messages stay leased to `owner`."""
        if not finished:
            return []
        now = self.clock()
        m = messages.c
        rows: list[dict[str, Any]] = []
        decisions: list[Decision] = []
        for item in finished:
            claimed, result = item.claimed, item.result
            ended = item.finished_at or now
            reply = reply_fields(result)
            summary = format_reply(reply.code, reply.enhanced_status, reply.mx_host, reply.text)
            decisions.append(
                decide(
                    result.outcome,
                    attempt=claimed.attempt,
                    created_at=claimed.created_at,
                    now=ended,
                    policy=policy,
                    summary=summary,
                )
            )
            rows.append(
                {
                    "outbox_id": claimed.id,
                    "number": claimed.attempt,
                    "started_at": item.started_at or claimed.claimed_at,
                    "finished_at": ended,
                    "outcome": result.outcome,
                    "code": reply.code,
                    "enhanced_status": reply.enhanced_status,
                    "mx_host": reply.mx_host,
                    "text": reply.text,
                    "possible_duplicate": result.possible_duplicate,
                    "worker": owner,
                }
            )
        lost: list[int] = []
        with self._tx() as conn:
            attempt_ids = (
                conn.execute(
                    attempts.insert().returning(attempts.c.id, sort_by_parameter_order=True),
                    rows,
                )
                .scalars()
                .all()
            )
            host_rows = [
                {
                    "attempt_id": attempt_id,
                    "position": position,
                    "mx_host": host.mx_host,
                    "ip": host.ip,
                    "port": host.port,
                    "tls": host.tls,
                    "code": host.code,
                    "enhanced_status": host.enhanced_status,
                    "text": host.text,
                    "stage": host.stage,
                    "duration": host.duration,
                    "started_at": host.started_at,
                }
                for attempt_id, item in zip(attempt_ids, finished, strict=True)
                for position, host in enumerate(item.result.hosts)
            ]
            if host_rows:
                conn.execute(attempt_hosts.insert(), host_rows)
            for index, (item, decision, row) in enumerate(
                zip(finished, decisions, rows, strict=True)
            ):
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
                updated = conn.execute(
                    messages.update().where(m.id == item.claimed.id, owned).values(**values)
                ).rowcount
                if not updated:
                    lost.append(index)
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

    # --- operator side ---

    @_replayed
    def list_messages(
        self,
        *,
        status: str | None = None,
        since: timedelta | None = None,
        limit: int = 50,
    ) -> list[MessageRow]:
        """Newest first."""
        m = messages.c
        query = sa.select(*_MESSAGE_COLUMNS).order_by(m.created_at.desc(), m.id).limit(limit)
        if status:
            query = query.where(m.status == status)
        if since is not None:
            query = query.where(m.created_at >= self.clock() - since)
        with self._tx() as conn:
            return [_message_row(row) for row in conn.execute(query).all()]

    @_replayed
    def get(self, outbox_id: str) -> MessageRow:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(*_MESSAGE_COLUMNS).where(messages.c.id == outbox_id)
            ).first()
        if row is None:
            raise MessageNotFound(outbox_id)
        return _message_row(row)

    @_replayed
    def show(self, outbox_id: str) -> MessageDetail:
        """The message, its (unsigned) body if kept, and every attempt with every host."""
        with self._tx() as conn:
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
        hosts_by_attempt: dict[int, list[HostRecord]] = {}
        for h in host_rows:
            data = dict(h._mapping)
            attempt_id = data.pop("attempt_id")
            data.pop("id")
            data.pop("position")
            hosts_by_attempt.setdefault(attempt_id, []).append(HostRecord(**data))
        records = []
        for a in attempt_rows:
            data = dict(a._mapping)
            attempt_id = data.pop("id")
            data.pop("outbox_id")
            data["possible_duplicate"] = bool(data["possible_duplicate"])
            records.append(AttemptRecord(**data, hosts=tuple(hosts_by_attempt.get(attempt_id, []))))
        body = bytes(row.body) if row.body is not None else None
        return MessageDetail(_message_row(row), body, tuple(records))

    @_replayed
    def retry(self, outbox_id: str) -> bool:
        """Make a failed or deferred message due now; False if it is in another state."""
        m = messages.c
        with self._tx() as conn:
            exists = conn.execute(sa.select(m.status).where(m.id == outbox_id)).first()
            if exists is None:
                raise MessageNotFound(outbox_id)
            changed = conn.execute(self._retry_update().where(m.id == outbox_id)).rowcount
            self._notify(conn)
            return bool(changed)

    @_replayed
    def retry_failed(self) -> int:
        """Make every failed message due now."""
        with self._tx() as conn:
            changed = conn.execute(self._retry_update().where(messages.c.status == "failed"))
            self._notify(conn)
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

    @_replayed
    def purge(self, older_than: timedelta) -> int:
        """Drop the bodies of delivered and failed messages older than that; keep the log."""
        now = self.clock()
        m = messages.c
        with self._tx() as conn:
            return int(
                conn.execute(
                    messages.update()
                    .where(
                        m.status.in_(("delivered", "failed")),
                        m.created_at < now - older_than,
                        m.body.is_not(None),
                    )
                    .values(body=None, purged_at=now)
                ).rowcount
            )

    @_replayed
    def counts(self) -> dict[str, int]:
        m = messages.c
        with self._tx() as conn:
            rows = conn.execute(sa.select(m.status, sa.func.count()).group_by(m.status)).all()
        return {status: int(count) for status, count in rows}

    @_replayed
    def queue_check(
        self, max_age: timedelta, *, failed_within: timedelta | None = None
    ) -> QueueHealth:
        """Healthy unless a message failed (within `failed_within` of now, when given), or one
        not delivered has waited longer than `max_age`."""
        now = self.clock()
        m = messages.c
        counts = self.counts()
        with self._tx() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(m.created_at)).where(
                    m.status.in_(("queued", "sending", "deferred"))
                )
            ).scalar()
            failed_query = sa.select(m.id, m.failure_reason).where(m.status == "failed")
            if failed_within is not None:
                failed_query = failed_query.where(m.finished_at >= now - failed_within)
            failed = conn.execute(failed_query.order_by(m.finished_at.desc()).limit(1)).first()
        pending = sum(counts.get(s, 0) for s in ("queued", "sending", "deferred"))
        if failed is not None:
            return QueueHealth(
                False,
                f"{counts.get('failed', 0)} failed message(s); latest {failed.id}: "
                f"{failed.failure_reason or 'failed'}",
                counts,
            )
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


# --- operator views: pure formatting for `relay log` and `relay show` ---------------------------

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
    }


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


__all__ = [
    "STATUSES",
    "AttemptLike",
    "Claimed",
    "Decision",
    "Finished",
    "MessageDetail",
    "MessageRow",
    "Outbox",
    "QueueHealth",
    "RetryPolicy",
    "StoreUnavailable",
    "decide",
    "human_age",
    "utcnow",
]
