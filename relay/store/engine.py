"""The connection to the store: engines, SQLite's durability settings, schema migrations and
transactions that turn a database's "not now" into StoreUnavailable.

SQLite is the embedded default (WAL, synchronous=FULL, so a commit survives power loss, and
BEGIN IMMEDIATE, so a write transaction never fails to upgrade its lock); PostgreSQL lets any
number of web nodes and workers share one store. The schema is versioned with Alembic
(`relay db upgrade`); a store is created or migrated on first use.

No pool_pre_ping: it costs a round trip per transaction. A pooled connection the server has
closed fails the transaction's first statement instead, before anything is committed, and
the store method runs once more on a fresh connection (`replayed`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from relay.errors import StoreUnavailable
from relay.logs import event as log_event
from relay.store.schema import messages

log = logging.getLogger("relay.outbox")

SQLITE_BUSY_TIMEOUT = 5.0  # seconds a write waits for SQLite's lock before StoreUnavailable
MIGRATION_LOCK_KEY = 0x7265_6C61_7900  # "relay\0": pg_advisory_xact_lock for migrations
MIGRATIONS = Path(__file__).parent / "migrations"
# Alembic keeps its migration context in module globals: one migration at a time per process.
# Across processes and nodes, PostgreSQL's advisory lock (migrations/env.py) serialises them.
_MIGRATION_LOCK = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(UTC)


def sqlite_path(url: str | sa.URL) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    parsed = sa.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database:
        return None
    if database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, *, busy_timeout: float = SQLITE_BUSY_TIMEOUT) -> Engine:
    """An engine for the outbox; SQLite tuned for durability."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(parsed)
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


class StaleConnection(StoreUnavailable):
    """The connection was found dead before the transaction committed anything: the server
    closed it while it sat in the pool (restart, idle timeout, pg_terminate_backend)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def replayed(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a store method once more when its connection turned out to be dead before COMMIT.

    Nothing of the first run was committed (a lost COMMIT is never replayed: it stays a
    StoreUnavailable), and SQLAlchemy has invalidated the pool, so the second run gets a
    fresh connection. This replaces pool_pre_ping's round trip on every checkout."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except StaleConnection as exc:
            log_event(log, "store.reconnect", method=method.__name__, error=str(exc))
            return method(*args, **kwargs)

    return wrapper


class Database:
    """One store: its engine (opened at first use), its schema and its transactions."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        auto_migrate: bool = True,
        busy_timeout: float = SQLITE_BUSY_TIMEOUT,
    ) -> None:
        self.url = url
        self.clock = clock
        self.auto_migrate = auto_migrate
        self.busy_timeout = busy_timeout
        self.dialect = sa.make_url(url).get_backend_name()
        self._engine: Engine | None = None
        self._schema_ready = False
        self._lock = threading.Lock()

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
        with _MIGRATION_LOCK, self.errors(), self.engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
        self._schema_ready = True

    @replayed
    def current_revision(self) -> str | None:
        with self.errors(replayable=True), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def ready(self) -> None:
        """Migrate on first use (unless auto_migrate is off)."""
        if self._schema_ready or not self.auto_migrate:
            return
        with _MIGRATION_LOCK:
            current = self.current_revision()
        if current != self.head_revision():
            self.upgrade()
        self._schema_ready = True

    @replayed
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and the schema is in place."""
        self.ready()
        with self.errors(replayable=True), self.engine.connect() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(messages).where(sa.false()))

    # --- transactions ---

    @contextmanager
    def errors(self, *, replayable: bool = False) -> Iterator[None]:
        """Turn the database's way of saying "not now" into StoreUnavailable; `replayable`:
        nothing in the block commits, so a dead connection may be retried (`replayed`)."""
        try:
            yield
        except DBAPIError as exc:
            if replayable and exc.connection_invalidated:
                raise StaleConnection(f"outbox store connection lost: {exc}") from exc
            raise StoreUnavailable(f"outbox store unavailable: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"outbox store unavailable: {exc}") from exc

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction. A connection lost inside it (before COMMIT) raises
        StaleConnection, which a `replayed` method retries once."""
        self.ready()
        with self.errors(), self.engine.begin() as conn:
            try:
                yield conn
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise StaleConnection(f"outbox store connection lost: {exc}") from exc
                raise
