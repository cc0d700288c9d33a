"""enqueue's group commit: concurrent enqueues of one process share a transaction, and no
caller is told its message is accepted before the transaction holding its row committed.

The groups are made deterministic by another client holding the store's write lock (SQLite:
BEGIN IMMEDIATE; PostgreSQL: LOCK TABLE) while the callers queue up behind the leader.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from relay.errors import StoreUnavailable
from relay.mail.message import BuiltMessage
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.store.schema import messages
from tests.conftest import POSTGRES_ADMIN_URL
from tests.store.test_outbox import built


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class Result:
    """What one caller was told, and what another connection saw right after."""

    subject: str
    outbox_id: str | None = None
    error: BaseException | None = None
    seen_subject: str | None = None  # the row as another connection read it on return


class Callers:
    """Threads that each enqueue one message and, the moment enqueue returns, read the row
    back through a connection of their own (not the store's)."""

    def __init__(self, store: Outbox) -> None:
        self.store = store
        kwargs: dict[str, Any] = {}
        if store.dialect == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False}
        self.reader = sa.create_engine(store.url, **kwargs)
        self.results: list[Result] = []
        self.threads: list[threading.Thread] = []

    def start(self, message: BuiltMessage) -> Result:
        result = Result(message.subject)
        self.results.append(result)
        thread = threading.Thread(target=self._run, args=(message, result))
        self.threads.append(thread)
        thread.start()
        return result

    def _run(self, message: BuiltMessage, result: Result) -> None:
        try:
            outbox_id = self.store.enqueue(message)
        except Exception as exc:
            result.error = exc
            return
        result.outbox_id = outbox_id
        with self.reader.connect() as conn:
            result.seen_subject = conn.execute(
                sa.select(messages.c.subject).where(messages.c.id == outbox_id)
            ).scalar()

    def join(self) -> list[Result]:
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), "an enqueue never returned"
        self.reader.dispose()
        return self.results


def stored_subjects(store: Outbox) -> list[str]:
    return sorted(row.subject for row in store.list_messages(limit=1000))


def count_commits(store: Outbox) -> list[int]:
    """COMMITs the store's engine issues from now on (the schema is made first)."""
    store.ping()
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    event.listen(store.engine, "commit", on_commit)
    return commits


@contextmanager
def writes_held(store: Outbox) -> Iterator[Callable[[], None]]:
    """Another client holds the write lock on `messages`; yields a function releasing it."""
    if store.dialect == "sqlite":
        database = sa.make_url(store.url).database
        assert database is not None
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        import psycopg

        url = sa.make_url(store.url).set(drivername="postgresql", query={})
        pg = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        pg.execute("BEGIN")
        pg.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            if store.dialect == "sqlite":
                holder.execute("ROLLBACK")
                holder.close()
            else:
                pg.execute("ROLLBACK")
                pg.close()

    try:
        yield release
    finally:
        release()


@pytest.fixture
def plain_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def store(database_url: str) -> Iterator[Outbox]:
    outbox = Outbox(database_url, busy_timeout=60)
    outbox.ping()  # the schema exists (and SQLite is in WAL mode) before a test holds the lock
    yield outbox
    outbox.dispose()


def queue_behind_leader(store: Outbox, callers: Callers, batch: list[BuiltMessage]) -> None:
    """The first caller leads and waits for the held lock; the others queue for the next
    group. On SQLite the leader takes its group only once BEGIN IMMEDIATE returns, so it is
    still queued itself; on PostgreSQL BEGIN costs nothing and its INSERT waits instead."""
    callers.start(batch[0])
    wait_until(lambda: store._enqueue.leading, "the leader")
    for message in batch[1:]:
        callers.start(message)
    queued = len(batch) if store.dialect == "sqlite" else len(batch) - 1
    wait_until(lambda: store._enqueue.waiting == queued, "the callers to queue")


def test_concurrent_enqueues_share_a_commit(store: Outbox, plain_settings: Settings) -> None:
    commits = count_commits(store)
    batch = [built(plain_settings, n) for n in range(12)]
    callers = Callers(store)
    with writes_held(store) as release:
        queue_behind_leader(store, callers, batch)
        assert commits == [0]
        release()
        results = callers.join()
    enqueue_commits = commits[0]

    assert [r.error for r in results] == [None] * len(batch)
    ids = [r.outbox_id for r in results]
    assert len(set(ids)) == len(batch)
    # Each caller's row was committed, and was its own, when enqueue returned.
    assert [r.seen_subject for r in results] == [m.subject for m in batch]
    assert stored_subjects(store) == sorted(m.subject for m in batch)
    # SQLite: everyone in the leader's transaction; PostgreSQL: the leader alone, then the rest.
    assert enqueue_commits == (1 if store.dialect == "sqlite" else 2)


def test_many_threads_free_running(store: Outbox, plain_settings: Settings) -> None:
    """No lock held: whatever the grouping, every id is distinct and committed on return."""
    commits = count_commits(store)
    batch = [built(plain_settings, n) for n in range(64)]
    callers = Callers(store)
    for message in batch:
        callers.start(message)
    results = callers.join()
    enqueue_commits = commits[0]
    assert [r.error for r in results] == [None] * len(batch)
    assert len({r.outbox_id for r in results}) == len(batch)
    assert [r.seen_subject for r in results] == [m.subject for m in batch]
    assert stored_subjects(store) == sorted(m.subject for m in batch)
    assert 1 <= enqueue_commits <= len(batch)


def test_a_bad_row_fails_only_its_own_caller(
    store: Outbox, plain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A row violating a constraint fails its group's transaction before COMMIT; each row is
    then stored in a transaction of its own, so only the bad one's caller hears an error."""
    caplog.set_level(logging.INFO, logger="relay.outbox")
    batch = [built(plain_settings, n) for n in range(8)]
    bad = dataclasses.replace(batch[5], recipient=cast(str, None))  # NOT NULL
    batch[5] = bad
    callers = Callers(store)
    with writes_held(store) as release:
        queue_behind_leader(store, callers, batch)
        release()
        results = callers.join()

    assert isinstance(results[5].error, StoreUnavailable)
    assert results[5].outbox_id is None
    good = [r for n, r in enumerate(results) if n != 5]
    assert [r.error for r in good] == [None] * 7
    assert [r.seen_subject for r in good] == [r.subject for r in good]
    assert stored_subjects(store) == sorted(r.subject for r in good)
    assert any("store.group_failed" in r.getMessage() for r in caplog.records)


def test_a_store_that_stays_locked_fails_every_queued_caller(
    tmp_path: Any, plain_settings: Settings
) -> None:
    """SQLite's lock not granted within busy_timeout: StoreUnavailable for the leader and for
    everyone queued behind it, nothing stored."""
    store = Outbox(f"sqlite:///{tmp_path / 'o.sqlite3'}", busy_timeout=0.5)
    try:
        commits = count_commits(store)
        callers = Callers(store)
        with writes_held(store):
            for n in range(6):
                callers.start(built(plain_settings, n))
            results = callers.join()
        assert commits == [0]
        assert all(isinstance(r.error, StoreUnavailable) for r in results)
        assert all("locked" in str(r.error) for r in results)
        assert all(r.outbox_id is None for r in results)
        assert stored_subjects(store) == []
        assert not store._enqueue.waiting
        assert not store._enqueue.leading
        store.enqueue(built(plain_settings, 9))  # and the next caller leads again
        assert stored_subjects(store) == ["Order 9 is late"]
    finally:
        store.dispose()


def test_killed_backend_replays_a_group_once_never_twice(
    postgres_url: str, plain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend on the leader's connection while its INSERT waits: the group runs
    once more on a fresh connection; killed again, its callers hear StoreUnavailable and
    nothing of theirs is stored, and the next group is unaffected."""
    import psycopg

    app = "relay-group-test"
    store = Outbox(f"{postgres_url}?application_name={app}")
    store.ping()
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    killed: set[int] = set()

    def blocked() -> int | None:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            (app,),
        ).fetchall()
        fresh = [pid for (pid,) in rows if pid not in killed]
        return fresh[0] if fresh else None

    def kill_the_blocked_leader() -> None:
        wait_until(lambda: blocked() is not None, "the leader's INSERT to wait for the lock")
        pid = blocked()
        assert pid is not None
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        killed.add(pid)

    caplog.set_level(logging.INFO, logger="relay.outbox")
    batch = [built(plain_settings, n) for n in range(6)]
    callers = Callers(store)
    try:
        with writes_held(store) as release:
            queue_behind_leader(store, callers, batch)
            kill_the_blocked_leader()  # the first group (the leader alone) runs again...
            kill_the_blocked_leader()  # ...and is not replayed a second time
            wait_until(lambda: not store._enqueue.waiting, "the next leader to take the rest")
            kill_the_blocked_leader()  # the second group runs again and commits
            wait_until(lambda: blocked() is not None, "the second group's replay")
            release()
            results = callers.join()
        stored = stored_subjects(store)
    finally:
        admin.close()
        store.dispose()

    assert isinstance(results[0].error, StoreUnavailable)
    assert [r.error for r in results[1:]] == [None] * 5
    assert [r.seen_subject for r in results[1:]] == [m.subject for m in batch[1:]]
    assert stored == sorted(m.subject for m in batch[1:])
    reconnects = [r.getMessage() for r in caplog.records if "store.reconnect" in r.getMessage()]
    assert [line.split()[1:3] for line in reconnects] == [
        ["method=enqueue", "rows=1"],
        ["method=enqueue", "rows=5"],
    ]
