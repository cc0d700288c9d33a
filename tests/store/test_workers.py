"""The worker registry and what it changes in the outbox: heartbeats that renew leases, the
reclaim of a dead worker's messages before their lease runs out, the fencing token that keeps
a stale worker's records from overwriting the new owner's, and the queue check's "no worker".

Every test runs against SQLite and a fresh PostgreSQL database (`database_url`), on the
injected clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from relay.mail.message import BuiltMessage
from relay.settings import Settings
from relay.store.engine import alembic_config
from relay.store.outbox import Outbox, new_id
from relay.store.schema import messages
from relay.store.views import workers_table
from relay.store.workers import PROCESS_GONE, WorkerInfo
from tests.store.test_outbox import POLICY, FakeClock, built, delivered, greylisted

DEAD_AFTER = 15.0
LEASE = 300.0


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


def info(worker_id: str, *, node: str = "boot/pid:[1]", pid: int = 100) -> WorkerInfo:
    return WorkerInfo(worker_id, "host-a", node, pid, "0.1.0", 10)


def register(
    store: Outbox, worker_id: str, *, node: str = "boot/pid:[1]", pid: int = 100
) -> WorkerInfo:
    me = info(worker_id, node=node, pid=pid)
    store.workers.register(me)
    return me


def test_a_live_worker_keeps_a_slow_attempt_for_as_long_as_it_beats(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """Ten minutes of DATA under a 300 s lease: every beat renews it, nobody reclaims it."""
    outbox_id = store.enqueue(built(plain_settings))
    me = register(store, "w1")
    (claimed,) = store.claim("w1", 1, LEASE, dead_after=DEAD_AFTER)
    register(store, "w2")
    for _ in range(120):
        clock.advance(5)
        beat = store.workers.beat(me, {claimed.id: claimed.token}, LEASE)
        assert beat.lost == frozenset()
        assert beat.since_beat == 5
        assert store.claim("w2", 5, LEASE, dead_after=DEAD_AFTER) == []
    row = store.get(outbox_id)
    assert row.lease_owner == "w1"
    assert row.lease_expires_at == clock() + timedelta(seconds=LEASE)


def test_a_silent_worker_loses_its_messages_after_dead_after_not_the_lease(
    store: Outbox, clock: FakeClock, plain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.outbox")
    ids = {store.enqueue(built(plain_settings, n)) for n in range(2)}
    me = register(store, "w1")
    claims = {c.id: c.token for c in store.claim("w1", 2, LEASE, dead_after=DEAD_AFTER)}
    assert set(claims) == ids
    assert set(claims.values()) == {1}
    register(store, "w2")
    clock.advance(DEAD_AFTER)
    assert store.claim("w2", 5, LEASE, dead_after=DEAD_AFTER) == []  # not yet
    clock.advance(1)
    taken = store.claim("w2", 5, LEASE, dead_after=DEAD_AFTER)
    assert {c.id for c in taken} == ids
    assert {c.token for c in taken} == {2}
    assert {c.attempt for c in taken} == {2}
    for outbox_id in ids:
        detail = store.show(outbox_id)
        assert [(a.number, a.outcome, a.worker) for a in detail.attempts] == [
            (1, "interrupted", "w1")
        ]
        assert detail.message.possible_duplicate
        assert detail.message.lease_owner == "w2"
    (line,) = [r.getMessage() for r in caplog.records if "worker.reclaimed" in r.getMessage()]
    assert "worker=w2 dead=w1" in line
    assert "since_beat=16.0" in line
    assert 'reason="no heartbeat"' in line
    assert "count=2" in line
    # w1 comes back (it was paused, not dead): its next beat says what it lost.
    beat = store.workers.beat(me, claims, LEASE)
    assert beat.lost == frozenset(ids)
    assert beat.since_beat == 16
    assert store.get(next(iter(ids))).lease_owner == "w2"


def test_a_deregistered_worker_s_messages_are_reclaimed_at_once(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(plain_settings))
    register(store, "w1")
    store.claim("w1", 1, LEASE, dead_after=DEAD_AFTER)
    assert store.workers.deregister("w1")
    (again,) = store.claim("w2", 1, LEASE, dead_after=DEAD_AFTER)
    assert again.id == outbox_id
    assert not store.workers.deregister("w1")  # once


def test_an_unregistered_owner_keeps_its_lease_until_it_expires(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """The lease stays the fallback bound: an owner with no row (an older worker) is not
    judged by a heartbeat it never sends."""
    store.enqueue(built(plain_settings))
    store.claim("old-worker", 1, 60, dead_after=DEAD_AFTER)
    clock.advance(59)
    assert store.claim("w2", 1, 60, dead_after=DEAD_AFTER) == []
    clock.advance(2)
    (again,) = store.claim("w2", 1, 60, dead_after=DEAD_AFTER)
    assert again.attempt == 2


def test_a_stale_claim_never_overwrites_the_new_owner(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """Same owner id, same message, a newer claim: only the token tells them apart."""
    outbox_id = store.enqueue(built(plain_settings))
    (first,) = store.claim("w1", 1, 30)
    clock.advance(31)
    (second,) = store.claim("w1", 1, 30)  # w1 itself took it again after the lease expired
    assert (first.token, second.token) == (1, 2)
    stale = store.record_attempt(first, greylisted(), owner="w1", policy=POLICY)
    assert not stale.applied
    row = store.get(outbox_id)
    assert (row.status, row.lease_owner, row.claim_token) == ("sending", "w1", 2)
    assert store.release("w1", {outbox_id: first.token}) == 0
    assert store.record_attempt(second, greylisted(), owner="w1", policy=POLICY).applied
    assert store.get(outbox_id).status == "deferred"


def test_a_stale_delivery_ends_the_message_and_fences_off_the_holder(
    store: Outbox, clock: FakeClock, plain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The paused worker's attempt reached the server after all: the message is delivered,
    flagged, and the worker that holds it now loses its claim (its beat will cut it off)."""
    caplog.set_level(logging.INFO, logger="relay.outbox")
    outbox_id = store.enqueue(built(plain_settings))
    register(store, "w1")
    (paused,) = store.claim("w1", 1, LEASE, dead_after=DEAD_AFTER)
    holder = register(store, "w2")
    clock.advance(DEAD_AFTER + 1)
    (current,) = store.claim("w2", 1, LEASE, dead_after=DEAD_AFTER)
    late = store.record_attempt(paused, delivered(), owner="w1", policy=POLICY)
    assert (late.status, late.applied) == ("delivered", True)
    detail = store.show(outbox_id)
    assert detail.message.status == "delivered"
    assert detail.message.possible_duplicate
    assert detail.message.lease_owner is None
    assert [(a.number, a.outcome, a.worker, a.possible_duplicate) for a in detail.attempts] == [
        (1, "interrupted", "w1", True),
        (1, "delivered", "w1", True),
    ]
    assert store.workers.beat(holder, {current.id: current.token}, LEASE).lost == {outbox_id}
    # The holder's own delivery, if it got that far, is a second copy: recorded and flagged.
    again = store.record_attempt(current, delivered(), owner="w2", policy=POLICY)
    assert not again.applied
    after = store.show(outbox_id)
    assert after.message.status == "delivered"
    assert after.attempts[-1].possible_duplicate
    lines = [r.getMessage() for r in caplog.records if "delivery.lease_lost" in r.getMessage()]
    assert len(lines) == 2
    assert "worker=w1" in lines[0]
    assert "took_over=True" in lines[0]
    assert "worker=w2" in lines[1]
    assert "took_over" not in lines[1]


def test_release_of_an_attempt_stopped_before_the_dot_is_no_duplicate(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    a = store.enqueue(built(plain_settings, 1))
    b = store.enqueue(built(plain_settings, 2))
    claims = {c.id: c.token for c in store.claim("w1", 2, LEASE)}
    clock.advance(3)
    assert store.release("w1", {a: claims[a]}, started=True, sent=False) == 1
    assert store.release("w1", {b: claims[b]}, started=True, sent=True) == 1
    not_sent, maybe = store.show(a), store.show(b)
    assert not not_sent.message.possible_duplicate
    assert [(x.outcome, x.possible_duplicate) for x in not_sent.attempts] == [
        ("interrupted", False)
    ]
    assert not_sent.attempts[0].text is not None
    assert "does not have it" in not_sent.attempts[0].text
    assert maybe.message.possible_duplicate
    assert not_sent.message.next_attempt_at == clock() - timedelta(seconds=3)  # due, first
    assert {c.id for c in store.claim("w2", 5, LEASE)} == {a, b}


def test_a_dead_process_on_the_same_node_is_given_up_at_once(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """A worker killed and started again on this host: its old row names a pid that is gone."""
    outbox_id = store.enqueue(built(plain_settings))
    register(store, "killed", pid=4001)
    register(store, "elsewhere", node="other-boot/pid:[1]", pid=4002)
    store.claim("killed", 1, LEASE, dead_after=DEAD_AFTER)
    gone = {4001, 4002}
    restarted = info("restarted", pid=4003)
    store.workers.register(restarted, alive=lambda pid: pid not in gone)
    (again,) = store.claim("restarted", 1, LEASE, dead_after=DEAD_AFTER)
    assert again.id == outbox_id
    rows = {r.id: r for r in store.workers.list_workers()}
    assert rows["killed"].stop_reason == PROCESS_GONE
    assert rows["elsewhere"].stopped_at is None  # another node: its pid means nothing here
    beat = store.workers.beat(restarted, {}, LEASE, alive=lambda pid: pid not in gone)
    assert beat.reaped == ()  # already given up


def test_workers_lists_states_and_holdings(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    ids = [store.enqueue(built(plain_settings, n)) for n in range(3)]
    register(store, "gone")
    store.workers.deregister("gone")
    register(store, "silent")
    store.claim("silent", 1, LEASE)
    clock.advance(30)
    live = register(store, "live")
    held = store.claim("live", 2, LEASE)
    store.workers.beat(live, {c.id: c.token for c in held}, LEASE)
    rows = store.workers.list_workers()
    assert [r.id for r in rows] == ["live", "gone", "silent"]  # latest beat first
    by_id = {r.id: r for r in rows}
    now = clock()
    assert by_id["live"].state(now, DEAD_AFTER) == "live"
    assert by_id["silent"].state(now, DEAD_AFTER) == "dead"
    assert by_id["gone"].state(now, DEAD_AFTER) == "stopped"
    assert set(by_id["live"].holds) == set(ids[1:])
    assert by_id["silent"].holds == (ids[0],)
    lines = workers_table(rows, now, DEAD_AFTER).splitlines()
    assert lines[0].split() == ["ID", "STATE", "LAST", "BEAT", "HOST", "PID", "STARTED", "HOLDS"]
    assert lines[3].split() == [
        "silent",
        "dead",
        "30s",
        "ago",
        "host-a",
        "100",
        "30s",
        "ago",
        "1:",
        ids[0],
    ]
    record = by_id["silent"].as_dict(now, DEAD_AFTER)
    assert record["state"] == "dead"
    assert record["since_beat_seconds"] == 30
    assert record["holds"] == [ids[0]]
    assert store.workers.list_workers(since=timedelta(seconds=10)) == [by_id["live"]]


def test_queue_check_fails_when_mail_is_due_and_no_worker_beats(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    dead_after = timedelta(seconds=DEAD_AFTER)
    hour = timedelta(hours=1)
    assert store.queue_check(hour, dead_after=dead_after).ok  # nothing due
    store.enqueue(built(plain_settings))
    assert store.queue_check(hour, dead_after=dead_after).ok  # just queued
    clock.advance(DEAD_AFTER + 1)
    health = store.queue_check(hour, dead_after=dead_after)
    assert not health.ok
    assert health.reason.startswith("1 message(s) due and no worker has sent a heartbeat")
    assert "no worker is registered" in health.reason
    me = register(store, "w1", pid=77)
    assert store.queue_check(hour, dead_after=dead_after).ok
    clock.advance(60)
    health = store.queue_check(hour, dead_after=dead_after)
    assert not health.ok
    assert "the last heartbeat came 1m ago from w1 (pid 77 on host-a)" in health.reason
    store.workers.beat(me, {}, LEASE)
    assert store.queue_check(hour, dead_after=dead_after).ok
    assert store.queue_check(hour).ok  # without dead_after, as before


def enqueue_as_0001(store: Outbox, message: BuiltMessage) -> str:
    """A message row as revision 0001 stored it: only the columns that schema has (today's
    enqueue writes columns of later revisions)."""
    now = store.clock()
    row = {
        "id": new_id(),
        "message_id": message.message_id,
        "body": message.raw,
        "size": len(message.raw),
        "recipient": message.recipient,
        "envelope_from": message.envelope_from,
        "subject": message.subject,
        "meta": {},
        "status": "queued",
        "attempts": 0,
        "created_at": now,
        "next_attempt_at": now,
        "possible_duplicate": False,
    }
    with store.engine.begin() as conn:
        present = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
        assert set(row) <= present
        conn.execute(sa.insert(messages).values(row))
    return str(row["id"])


def test_migration_0002_keeps_the_messages_of_0001(
    database_url: str, plain_settings: Settings
) -> None:
    store = Outbox(database_url, auto_migrate=False)
    try:
        store.upgrade("0001")
        with store.engine.begin() as conn:
            assert "workers" not in sa.inspect(conn).get_table_names()
        outbox_id = enqueue_as_0001(store, built(plain_settings))
        store.upgrade()
        (claimed,) = store.claim("w1", 1, LEASE)
        assert (claimed.id, claimed.token) == (outbox_id, 1)
        with store.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
            assert "workers" not in sa.inspect(conn).get_table_names()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("messages")}
        assert "claim_token" not in columns
    finally:
        store.dispose()


def test_a_beat_finds_the_messages_leased_to_its_worker_that_it_does_not_hold(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """A claim that committed but whose reply never came back (the connection died after
    COMMIT): the worker does not know it holds the message. Its beats find such strays once
    they are older than any claim in flight, instead of leaving them to the 300 s lease."""
    ids = [store.enqueue(built(plain_settings, n)) for n in range(2)]
    me = register(store, "w1")
    claims = {c.id: c.token for c in store.claim("w1", 2, LEASE)}
    held = {ids[0]: claims[ids[0]]}
    assert store.workers.beat(me, held, LEASE, strays_after=DEAD_AFTER).strays == {}
    clock.advance(DEAD_AFTER + 1)
    beat = store.workers.beat(me, held, LEASE, strays_after=DEAD_AFTER)
    assert beat.strays == {ids[1]: claims[ids[1]]}
    assert store.workers.beat(me, held, LEASE).strays == {}  # only when asked


def test_a_message_whose_outcome_was_just_recorded_is_not_lost(
    store: Outbox, clock: FakeClock, plain_settings: Settings
) -> None:
    """The worker's writer commits an outcome while a beat still lists the message as held:
    the renewal misses it, but the token never moved, so nobody took it."""
    store.enqueue(built(plain_settings))
    me = register(store, "w1")
    (claimed,) = store.claim("w1", 1, LEASE)
    store.record_attempt(claimed, greylisted(), owner="w1", policy=POLICY)
    assert store.workers.beat(me, {claimed.id: claimed.token}, LEASE).lost == frozenset()
