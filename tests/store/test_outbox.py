"""The outbox store: durable accept path, claiming under leases, schedule, retention, views.

Every store test runs against SQLite and a fresh PostgreSQL database (`database_url`).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import relay.store
from relay.errors import (
    ConnectionFailure,
    DeliveryError,
    DNSPermanentError,
    MessageNotFound,
    SMTPReplyError,
    StoreUnavailable,
)
from relay.mail.attempt import AttemptResult, HostTry, Outcome, reply_fields
from relay.mail.message import BuiltMessage, Submission, build_message
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.store.records import Finished
from relay.store.retry import RetryPolicy, decide, human_age
from relay.store.schema import metadata
from relay.store.views import detail_text, log_table, parse_duration
from tests.conftest import POSTGRES_ADMIN_URL

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class FakeClock:
    """The injected clock: time moves only when a test says so."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def host_try(
    *,
    mx_host: str = "mx1.support.test",
    ip: str | None = "127.0.0.2",
    port: int = 25,
    tls: str | None = "TLSv1.3",
    code: int | None = 250,
    enhanced_status: str | None = "2.0.0",
    text: str = "Queued",
    stage: str = "data",
    duration: float = 0.05,
    started_at: datetime = T0,
) -> HostTry:
    return HostTry(mx_host, ip, port, tls, code, enhanced_status, text, stage, duration, started_at)


def attempt_result(
    outcome: Outcome,
    hosts: tuple[HostTry, ...] = (),
    error: DeliveryError | None = None,
    *,
    possible_duplicate: bool = False,
) -> AttemptResult:
    return AttemptResult(outcome, hosts, error, possible_duplicate)


def delivered() -> AttemptResult:
    return attempt_result("delivered", (host_try(),))


def greylisted() -> AttemptResult:
    err = SMTPReplyError(
        451, "Greylisted", enhanced_status="4.7.1", mx_host="mx1.support.test", stage="rcpt"
    )
    return attempt_result(
        "temporary",
        (host_try(code=451, enhanced_status="4.7.1", text="Greylisted", stage="rcpt"),),
        err,
    )


def refused() -> AttemptResult:
    err = SMTPReplyError(
        550, "No such user", enhanced_status="5.1.1", mx_host="mx1.support.test", stage="rcpt"
    )
    return attempt_result(
        "permanent",
        (host_try(code=550, enhanced_status="5.1.1", text="No such user", stage="rcpt"),),
        err,
    )


def built(settings: Settings, n: int = 0) -> BuiltMessage:
    return build_message(
        Submission(
            name="Ada Visitor",
            email="ada@visitor.test",
            subject=f"Order {n} is late",
            message="Hello,\nmy order has not arrived.\n",
            metadata={"page": "https://shop.test/contact"},
        ),
        settings,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Outbox]:
    outbox = Outbox(database_url, clock=clock)
    yield outbox
    outbox.dispose()


@pytest.fixture
def plain_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


POLICY = RetryPolicy(initial=60, maximum=600, give_up=3600)


# --- accept path --------------------------------------------------------------------------


def test_enqueue_commits_before_returning(
    store: Outbox, database_url: str, plain_settings: Settings
) -> None:
    message = built(plain_settings)
    outbox_id = store.enqueue(message, metadata={"ip": "203.0.113.9"})

    other = Outbox(database_url)  # a separate engine sees the committed row
    try:
        row = other.get(outbox_id)
        detail = other.show(outbox_id)
    finally:
        other.dispose()
    assert row.status == "queued"
    assert row.message_id == message.message_id
    assert row.recipient == "help@support.test"
    assert row.envelope_from == "form@relay.test"
    assert row.subject == "Order 0 is late"
    assert row.meta == {"ip": "203.0.113.9"}
    assert row.created_at == T0
    assert row.next_attempt_at == T0
    assert row.attempts == 0
    assert detail.body == message.raw  # stored unsigned, byte for byte
    assert b"DKIM-Signature" not in detail.body


def test_ids_are_short_url_safe_and_distinct(store: Outbox, plain_settings: Settings) -> None:
    ids = {store.enqueue(built(plain_settings, n)) for n in range(20)}
    assert len(ids) == 20
    for outbox_id in ids:
        assert len(outbox_id) == 16
        assert outbox_id.isalnum()
        assert outbox_id == outbox_id.lower()


def test_fresh_sqlite_store_created_in_instance_path(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    assert not settings.instance_path.exists()
    store = Outbox.from_settings(settings)
    try:
        store.enqueue(built(settings))
        assert store.current_revision() == store.head_revision()
    finally:
        store.dispose()
    path = settings.instance_path / "relay.sqlite3"
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    store = Outbox(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    try:
        for _ in range(3):
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            store.engine.dispose()
    finally:
        store.dispose()


def test_unreachable_postgres_is_store_unavailable(plain_settings: Settings) -> None:
    store = Outbox("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(StoreUnavailable):
        store.enqueue(built(plain_settings))
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.dispose()


def test_unwritable_sqlite_location_is_store_unavailable(
    tmp_path: Path, plain_settings: Settings
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = Outbox(f"sqlite:///{blocker / 'sub' / 'o.sqlite3'}")
    with pytest.raises(StoreUnavailable):
        store.enqueue(built(plain_settings))


def test_failed_enqueue_writes_nothing(store: Outbox, plain_settings: Settings) -> None:
    """One transaction: a row that cannot be stored leaves no trace."""
    message = built(plain_settings)
    store.enqueue(message)
    too_long = BuiltMessage(
        message_id="<" + "x" * 400 + "@relay.test>",  # longer than the column on PostgreSQL
        raw=message.raw,
        recipient=message.recipient,
        envelope_from=message.envelope_from,
        subject=message.subject,
    )
    if store.dialect == "sqlite":
        # SQLite does not enforce lengths; break the transaction after the insert instead.
        with pytest.raises(StoreUnavailable), store.tx() as conn:
            conn.execute(sa.text("INSERT INTO messages (id) VALUES ('x')"))
    else:
        with pytest.raises(StoreUnavailable):
            store.enqueue(too_long)
    assert len(store.list_messages()) == 1


def test_ping(store: Outbox) -> None:
    store.ping()


def test_upgrade_is_idempotent(store: Outbox) -> None:
    store.upgrade()
    store.upgrade()
    # The head is the newest migration file (0001_outbox.py, 0002_workers.py, ...).
    versions = Path(relay.store.__file__).parent / "migrations" / "versions"
    newest = max(p.name.split("_")[0] for p in versions.glob("[0-9]*_*.py"))
    assert store.current_revision() == store.head_revision() == newest


def test_concurrent_first_use_on_postgres(postgres_url: str, plain_settings: Settings) -> None:
    """Several nodes starting at once against an empty database all end up migrated."""
    errors: list[BaseException] = []

    def start() -> None:
        store = Outbox(postgres_url)
        try:
            store.enqueue(built(plain_settings))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check = Outbox(postgres_url)
    assert len(check.list_messages()) == 4
    check.dispose()


# --- claiming and leases ------------------------------------------------------------------


def test_claim_takes_due_messages_once(store: Outbox, plain_settings: Settings) -> None:
    ids = {store.enqueue(built(plain_settings, n)) for n in range(5)}
    first = store.claim("w1", 3, 60)
    second = store.claim("w2", 10, 60)
    assert len(first) == 3
    assert len(second) == 2
    assert {c.id for c in first} | {c.id for c in second} == ids
    assert store.claim("w3", 10, 60) == []
    assert all(c.attempt == 1 for c in first + second)
    row = store.get(first[0].id)
    assert row.status == "sending"
    assert row.lease_owner == "w1"
    assert row.first_attempt_at == T0


def test_expired_lease_is_reclaimed_as_interrupted(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    (claimed,) = store.claim("dead-worker", 1, 30)
    clock.advance(29)
    assert store.claim("w2", 1, 30) == []
    clock.advance(2)
    (again,) = store.claim("w2", 1, 30)
    assert again.id == outbox_id
    assert again.message_id == claimed.message_id
    assert again.attempt == 2
    detail = store.show(outbox_id)
    assert detail.message.possible_duplicate
    assert [(a.number, a.outcome) for a in detail.attempts] == [(1, "interrupted")]
    assert detail.attempts[0].worker == "dead-worker"


def test_heartbeat_keeps_the_lease(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    store.enqueue(built(plain_settings))
    (claimed,) = store.claim("w1", 1, 30)
    for _ in range(5):
        clock.advance(20)
        assert store.renew("w1", [claimed.id], 30) == 1
        assert store.claim("w2", 1, 30) == []
    assert store.renew("someone-else", [claimed.id], 30) == 0


def test_release_hands_back_due_now(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    a = store.enqueue(built(plain_settings, 1))
    b = store.enqueue(built(plain_settings, 2))
    store.claim("w1", 2, 300)
    assert store.release("w1", [a]) == 1
    assert store.release("w1", [b], started=True) == 1
    assert store.get(a).status == "queued"
    assert store.get(a).attempts == 0
    row_b = store.show(b)
    assert row_b.message.status == "deferred"
    assert row_b.message.possible_duplicate
    assert [x.outcome for x in row_b.attempts] == ["interrupted"]
    assert {c.id for c in store.claim("w2", 5, 300)} == {a, b}


# --- recording attempts -------------------------------------------------------------------


def test_greylist_then_delivered_history(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    (first,) = store.claim("w1", 1, 60)
    decision = store.record_attempt(first, greylisted(), owner="w1", policy=POLICY)
    assert decision.status == "deferred"
    assert decision.next_attempt_at is not None
    row = store.get(outbox_id)
    assert row.status == "deferred"
    assert row.next_attempt_at == decision.next_attempt_at
    assert row.last_reply == "451 4.7.1 Greylisted (mx1.support.test)"
    assert row.lease_owner is None

    assert store.claim("w1", 1, 60) == []  # not due yet
    clock.now = decision.next_attempt_at
    (second,) = store.claim("w1", 1, 60)
    assert second.attempt == 2
    assert store.record_attempt(second, delivered(), owner="w1", policy=POLICY).status == (
        "delivered"
    )

    detail = store.show(outbox_id)
    assert detail.message.status == "delivered"
    assert detail.message.attempts == 2
    assert detail.message.next_attempt_at is None
    assert [(a.number, a.outcome, a.code) for a in detail.attempts] == [
        (1, "temporary", 451),
        (2, "delivered", 250),
    ]
    host = detail.attempts[0].hosts[0]
    assert (host.mx_host, host.ip, host.port, host.tls, host.stage) == (
        "mx1.support.test",
        "127.0.0.2",
        25,
        "TLSv1.3",
        "rcpt",
    )
    assert host.enhanced_status == "4.7.1"
    text = detail_text(detail, clock())
    assert "451 4.7.1 Greylisted" in text
    assert "250 2.0.0 Queued" in text


def test_permanent_failure_keeps_the_reply(store: Outbox, plain_settings: Settings) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    (claimed,) = store.claim("w1", 1, 60)
    decision = store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    assert decision.status == "failed"
    row = store.get(outbox_id)
    assert row.status == "failed"
    assert row.last_code == 550
    assert row.last_text == "No such user"
    assert row.failure_reason is not None
    assert "550 5.1.1 No such user" in row.failure_reason


def test_possible_duplicate_is_flagged(store: Outbox, plain_settings: Settings) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    (claimed,) = store.claim("w1", 1, 60)
    dropped = attempt_result(
        "temporary",
        (host_try(code=None, enhanced_status=None, text="connection lost", stage="data-end"),),
        ConnectionFailure("connection lost after the final dot", mx_host="mx1.support.test"),
        possible_duplicate=True,
    )
    store.record_attempt(claimed, dropped, owner="w1", policy=POLICY)
    detail = store.show(outbox_id)
    assert detail.message.possible_duplicate
    assert detail.attempts[0].possible_duplicate


def test_lost_lease_does_not_overwrite_the_new_owner(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    (stale,) = store.claim("w1", 1, 30)
    clock.advance(31)
    store.claim("w2", 1, 30)
    assert not store.record_attempt(stale, greylisted(), owner="w1", policy=POLICY).applied
    row = store.get(outbox_id)
    assert row.status == "sending"
    assert row.lease_owner == "w2"


def test_record_attempts_stores_each_attempt_in_one_transaction(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """The worker's group commit: one row per attempt with its own reply and hosts, each
    message moved on by its own decision, a lost lease reported for that attempt only."""
    ids = [store.enqueue(built(plain_settings, n)) for n in range(3)]
    by_id = {c.id: c for c in store.claim("w1", 3, 30)}
    items = [by_id[i] for i in ids]
    clock.advance(20)
    assert store.renew("w1", ids[1:], 30) == 2
    clock.advance(11)  # the first one's lease expired: w2 takes it over
    (taken,) = store.claim("w2", 5, 30)
    assert taken.id == ids[0]
    clock.advance(1)
    started = T0 + timedelta(seconds=5)
    finished_at = T0 + timedelta(seconds=6)
    decisions = store.record_attempts(
        [
            Finished(items[0], greylisted(), started, finished_at),
            Finished(items[1], delivered(), started, finished_at),
            Finished(items[2], refused()),
        ],
        owner="w1",
        policy=POLICY,
    )
    assert [(d.status, d.applied) for d in decisions] == [
        ("deferred", False),
        ("delivered", True),
        ("failed", True),
    ]
    assert store.get(ids[0]).lease_owner == "w2"
    replies = []
    for outbox_id in ids:
        detail = store.show(outbox_id)
        last = detail.attempts[-1]
        replies.append((last.outcome, last.code, last.enhanced_status, last.mx_host))
        assert [h.mx_host for h in last.hosts] == ["mx1.support.test"]
        assert last.worker == "w1"
    assert replies == [
        ("temporary", 451, "4.7.1", "mx1.support.test"),
        ("delivered", 250, "2.0.0", "mx1.support.test"),
        ("permanent", 550, "5.1.1", "mx1.support.test"),
    ]
    delivered_row = store.show(ids[1])
    assert delivered_row.message.status == "delivered"
    assert delivered_row.message.finished_at == finished_at
    assert (delivered_row.attempts[0].started_at, delivered_row.attempts[0].finished_at) == (
        started,
        finished_at,
    )
    assert store.show(ids[2]).attempts[0].finished_at == clock()  # None: the commit's time
    assert store.record_attempts([], owner="w1", policy=POLICY) == []


def test_record_attempts_is_all_or_nothing(store: Outbox, plain_settings: Settings) -> None:
    """A batch the store refuses leaves every message leased, so nothing is half-recorded and
    the worker can retry each attempt on its own."""
    outbox_id = store.enqueue(built(plain_settings))
    (claimed,) = store.claim("w1", 1, 60)
    ghost = dataclasses.replace(claimed, id="no-such-message")  # violates the foreign key
    with pytest.raises(StoreUnavailable):
        store.record_attempts(
            [Finished(claimed, delivered()), Finished(ghost, delivered())],
            owner="w1",
            policy=POLICY,
        )
    detail = store.show(outbox_id)
    assert detail.message.status == "sending"
    assert detail.message.lease_owner == "w1"
    assert detail.attempts == ()
    assert store.record_attempt(claimed, delivered(), owner="w1", policy=POLICY).applied
    assert store.get(outbox_id).status == "delivered"


def test_a_connection_the_server_closed_is_replaced_without_a_ping(
    postgres_url: str, plain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """No pool_pre_ping: a pooled connection PostgreSQL terminated fails the next transaction
    before anything is committed, and the store method runs once more on a fresh one."""
    import psycopg

    app = "relay-stale-test"
    store = Outbox(f"{postgres_url}?application_name={app}")
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)

    def terminate() -> int:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    caplog.set_level(logging.INFO, logger="relay.outbox")
    try:
        first = store.enqueue(built(plain_settings, 1))
        assert terminate() >= 1
        second = store.enqueue(built(plain_settings, 2))
        assert terminate() >= 1
        assert {c.id for c in store.claim("w1", 5, 60)} == {first, second}
        assert terminate() >= 1
        store.ping()
        assert sorted(r.id for r in store.list_messages()) == sorted([first, second])
    finally:
        admin.close()
        store.dispose()
    reconnects = [r.getMessage() for r in caplog.records if "store.reconnect" in r.getMessage()]
    assert [line.split()[1] for line in reconnects] == [
        "method=enqueue",
        "method=claim",
        "method=ping",
    ]


# --- the schedule: pure -------------------------------------------------------------------


def test_retry_delays_grow_within_bounds() -> None:
    policy = RetryPolicy(initial=300, maximum=3600, give_up=432000)
    delays = [policy.delay(n) for n in range(1, 15)]
    assert all(300 <= d <= 3600 for d in delays)
    assert 300 <= delays[0] <= 360  # initial plus at most 20% jitter
    assert 600 <= delays[1] <= 660
    assert delays[-1] == 3600


def test_decide_gives_up_by_age_not_attempts() -> None:
    policy = RetryPolicy(initial=60, maximum=600, give_up=3600)
    young = decide("temporary", attempt=50, created_at=T0, now=T0 + timedelta(59), policy=policy)
    assert young.status == "failed"  # 59 days old
    early = decide(
        "temporary", attempt=1, created_at=T0, now=T0 + timedelta(seconds=10), policy=policy
    )
    assert early.status == "deferred"
    last = decide(
        "temporary",
        attempt=9,
        created_at=T0,
        now=T0 + timedelta(seconds=3500),
        policy=policy,
        summary="451 4.7.1 Greylisted (mx1.support.test)",
    )
    assert last.status == "deferred"
    assert last.next_attempt_at == T0 + timedelta(seconds=3600)  # one last try at the deadline
    final = decide(
        "temporary",
        attempt=10,
        created_at=T0,
        now=T0 + timedelta(seconds=3600),
        policy=policy,
        summary="451 4.7.1 Greylisted (mx1.support.test)",
    )
    assert final.status == "failed"
    assert final.reason is not None
    assert "gave up after 10 attempts over 1h" in final.reason
    assert "451 4.7.1 Greylisted" in final.reason
    assert decide("permanent", attempt=1, created_at=T0, now=T0, policy=policy).status == "failed"


def test_reply_fields_read_the_deciding_error() -> None:
    dns = attempt_result("permanent", (), DNSPermanentError("support.test", "null MX"))
    assert reply_fields(dns).text == "support.test: null MX"
    assert reply_fields(greylisted()).code == 451
    assert reply_fields(delivered()).code == 250


def test_durations_and_ages() -> None:
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("3d") == timedelta(days=3)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    assert human_age(timedelta(seconds=45)) == "45s"
    assert human_age(timedelta(minutes=3, seconds=5)) == "3m"
    assert human_age(timedelta(hours=2, minutes=59)) == "2h"
    assert human_age(timedelta(days=4)) == "4d"


# --- operator views -----------------------------------------------------------------------


def test_list_newest_first_with_filters(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    old = store.enqueue(built(plain_settings, 1))
    clock.advance(3 * 3600)
    new = store.enqueue(built(plain_settings, 2))
    assert [r.id for r in store.list_messages()] == [new, old]
    assert [r.id for r in store.list_messages(since=timedelta(hours=2))] == [new]
    assert [r.id for r in store.list_messages(limit=1)] == [new]
    (claimed,) = store.claim("w1", 1, 60)
    store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    assert [r.id for r in store.list_messages(status="failed")] == [old]
    table = log_table(store.list_messages(), clock())
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "AGE", "STATUS", "TRIES", "LAST", "REPLY", "NEXT"]
    assert lines[1].startswith(new)
    assert "3h" in lines[2]
    assert "550 5.1.1 No such user (mx1.support.test)" in lines[2]


def test_retry_makes_failed_and_deferred_due(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    failed_id = store.enqueue(built(plain_settings, 1))
    deferred_id = store.enqueue(built(plain_settings, 2))
    delivered_id = store.enqueue(built(plain_settings, 3))
    a, b, c = sorted(store.claim("w1", 3, 60), key=lambda x: x.id)
    results = {failed_id: refused(), deferred_id: greylisted(), delivered_id: delivered()}
    for item in (a, b, c):
        store.record_attempt(item, results[item.id], owner="w1", policy=POLICY)
    assert store.claim("w1", 3, 60) == []

    assert store.retry(deferred_id)
    assert not store.retry(delivered_id)
    with pytest.raises(MessageNotFound):
        store.retry("nosuchid")
    assert store.retry_failed() == 1
    row = store.get(failed_id)
    assert row.status == "deferred"
    assert row.failure_reason is None
    assert {x.id for x in store.claim("w1", 5, 60)} == {failed_id, deferred_id}


def test_purge_drops_bodies_keeps_log(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    done = store.enqueue(built(plain_settings, 1))
    waiting = store.enqueue(built(plain_settings, 2))
    items = {c.id: c for c in store.claim("w1", 2, 60)}
    store.record_attempt(items[done], delivered(), owner="w1", policy=POLICY)
    store.record_attempt(items[waiting], greylisted(), owner="w1", policy=POLICY)
    clock.advance(86400 * 31)
    fresh = store.enqueue(built(plain_settings, 3))
    (item,) = [c for c in store.claim("w1", 5, 60) if c.id == fresh] or [None]
    assert item is not None
    store.record_attempt(item, delivered(), owner="w1", policy=POLICY)

    assert store.purge(timedelta(days=30)) == 1
    purged = store.show(done)
    assert purged.body is None
    assert purged.message.purged_at == clock()
    assert purged.message.status == "delivered"
    assert [a.outcome for a in purged.attempts] == ["delivered"]
    assert "body purged" in detail_text(purged, clock())
    assert store.show(waiting).body is not None  # still to be delivered
    assert store.show(fresh).body is not None  # too young
    assert store.purge(timedelta(days=30)) == 0


def test_queue_check(store: Outbox, clock: FakeClock, plain_settings: Settings) -> None:
    assert store.queue_check(timedelta(minutes=10)).ok
    outbox_id = store.enqueue(built(plain_settings))
    health = store.queue_check(timedelta(minutes=10))
    assert health.ok
    assert health.reason.startswith("ok 1 pending")
    clock.advance(11 * 60)
    health = store.queue_check(timedelta(minutes=10))
    assert not health.ok
    assert "oldest has waited 11m" in health.reason
    (claimed,) = store.claim("w1", 1, 60)
    store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    health = store.queue_check(timedelta(days=1))
    assert not health.ok
    assert outbox_id in health.reason
    assert "550" in health.reason


def test_show_unknown_id(store: Outbox) -> None:
    with pytest.raises(MessageNotFound):
        store.show("nosuchid")


def test_locked_sqlite_is_store_unavailable_and_writes_nothing(
    tmp_path: Path, plain_settings: Settings
) -> None:
    """A writer holding SQLite's lock past busy_timeout: the web answers 503, nothing half-done."""
    path = tmp_path / "o.sqlite3"
    store = Outbox(f"sqlite:///{path}", busy_timeout=0.2)
    try:
        store.enqueue(built(plain_settings, 1))
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailable, match="locked"):
                store.enqueue(built(plain_settings, 2))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert [r.subject for r in store.list_messages()] == ["Order 1 is late"]
        store.enqueue(built(plain_settings, 3))  # and it recovers once the lock is gone
        assert len(store.list_messages()) == 2
    finally:
        store.dispose()


def test_queue_check_can_count_only_recent_failures(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    store.enqueue(built(plain_settings))
    (claimed,) = store.claim("w1", 1, 60)
    store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    assert not store.queue_check(timedelta(hours=1), failed_within=timedelta(days=1)).ok
    clock.advance(2 * 86400)
    health = store.queue_check(timedelta(hours=1), failed_within=timedelta(days=1))
    assert health.ok
    assert health.reason == "ok 0 pending, 0 delivered, 1 failed"
    assert not store.queue_check(timedelta(hours=1)).ok


def test_a_message_that_keeps_losing_its_worker_fails_by_age(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    store.claim("w1", 1, 600, give_up=3600)
    clock.advance(601)
    assert len(store.claim("w2", 1, 600, give_up=3600)) == 1  # reclaimed, young enough
    clock.advance(3600)
    assert store.claim("w3", 1, 600, give_up=3600) == []
    detail = store.show(outbox_id)
    assert detail.message.status == "failed"
    assert detail.message.failure_reason is not None
    assert "interrupted" in detail.message.failure_reason
    assert [a.outcome for a in detail.attempts] == ["interrupted", "interrupted"]


def test_migrations_match_the_tables(store: Outbox) -> None:
    """The Alembic history builds exactly the schema the code queries."""
    store.upgrade()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
