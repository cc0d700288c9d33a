"""The store under the console: keyset pages and filters, held messages, purging one body,
the queue's state, and the alert tables (failure events recorded with the failure, grouping,
leased deliveries). Over SQLite and a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from relay.errors import MessageNotFound
from relay.settings import Settings
from relay.store.alerts import MESSAGE_FAILED, NewEvent
from relay.store.browse import Cursor, LogFilter, walk
from relay.store.outbox import Outbox
from tests.store.test_outbox import POLICY, FakeClock, built, delivered, refused


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Outbox]:
    outbox = Outbox(database_url, clock=clock)
    yield outbox
    outbox.dispose()


@pytest.fixture
def plain(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def fail_one(store: Outbox, outbox_id: str) -> None:
    (claimed,) = [c for c in store.claim("w1", 50, 60) if c.id == outbox_id]
    store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)


def test_keyset_pages_cover_the_log_once_newest_first(
    store: Outbox, clock: FakeClock, plain: Settings
) -> None:
    ids = []
    for n in range(23):
        ids.append(store.enqueue(built(plain, n)))
        if n % 3:  # several rows share a created_at: the id breaks the tie
            clock.advance(1)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.browse(LogFilter(), cursor, limit=5)
        seen.extend(row.id for row in page.rows)
        pages += 1
        if page.next is None:
            break
        cursor = Cursor.decode(page.next.encode())
    assert pages == 5
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))
    created = [store.get(i).created_at for i in seen]
    assert created == sorted(created, reverse=True)
    assert [row.id for row in walk(store.browse, LogFilter(), batch=4)] == seen


def test_filters_by_status_age_and_text(store: Outbox, clock: FakeClock, plain: Settings) -> None:
    old = store.enqueue(built(plain, 1))
    clock.advance(3 * 86400)
    failed = store.enqueue(built(plain, 2))
    fail_one(store, failed)
    recent = store.enqueue(built(plain, 3))
    message_id = store.get(recent).message_id

    def ids(**kwargs: object) -> set[str]:
        return {row.id for row in store.browse(LogFilter(**kwargs)).rows}  # type: ignore[arg-type]

    assert ids(status="failed") == {failed}
    assert ids(since=timedelta(days=1)) == {failed, recent}
    assert ids(text="order 1 IS") == {old}  # subject, any case
    assert ids(text="ada@visitor") == {old, failed, recent}  # the visitor's address
    assert ids(text=message_id) == {recent}
    assert ids(text=message_id.strip("<>")) == {recent}
    assert ids(text=recent.upper()) == {recent}
    assert ids(text="100%_") == set()  # LIKE's wildcards are literal
    assert ids(status="failed", text="order 3") == set()
    with pytest.raises(ValueError, match="unknown status"):
        LogFilter(status="lost")


def test_a_foreign_cursor_is_the_first_page() -> None:
    for text in (None, "", "abc", "1.ABC", "99999999999999999999.x", "1.a;drop"):
        assert Cursor.decode(text) is None


def test_held_messages_wait_until_released_or_discarded(store: Outbox, plain: Settings) -> None:
    held = store.enqueue(built(plain, 1), held_by="words.message: casino")
    other = store.enqueue(built(plain, 2), held_by="max_links: 4 > 3")
    row = store.get(held)
    assert (row.status, row.held_by, row.next_attempt_at) == ("held", "words.message: casino", None)
    assert store.claim("w1", 10, 60) == []
    assert store.queue_stats().counts == {"held": 2}
    assert store.release_held(held)
    assert not store.release_held(held)  # queued now
    (claimed,) = store.claim("w1", 10, 60)
    assert claimed.id == held
    assert store.discard_held(other)
    with pytest.raises(MessageNotFound):
        store.get(other)
    with pytest.raises(MessageNotFound):
        store.discard_held(other)
    assert not store.discard_held(held)  # only held ones


def test_purge_one_body(store: Outbox, plain: Settings) -> None:
    done = store.enqueue(built(plain, 1))
    waiting = store.enqueue(built(plain, 2))
    (claimed,) = [c for c in store.claim("w1", 10, 60) if c.id == done]
    store.record_attempt(claimed, delivered(), owner="w1", policy=POLICY)
    assert not store.purge_message(waiting)  # not delivered or failed: kept
    assert store.purge_message(done)
    assert store.show(done).body is None
    assert store.get(done).purged_at is not None
    assert not store.purge_message(done)
    with pytest.raises(MessageNotFound):
        store.purge_message("nosuchmessage")


def test_queue_stats_and_purge_preview(store: Outbox, clock: FakeClock, plain: Settings) -> None:
    first = store.enqueue(built(plain, 1))
    clock.advance(120)
    store.enqueue(built(plain, 2))
    fail_one(store, first)
    stats = store.queue_stats()
    assert stats.counts == {"failed": 1, "sending": 1}
    assert stats.due == 0  # the other one is leased for 60 s
    assert stats.oldest_age == 0  # and it was queued just now
    clock.advance(61)
    stats = store.queue_stats()
    assert stats.due == 1  # its lease expired
    assert stats.oldest_age == pytest.approx(61)
    assert store.retryable_failed() == 1
    assert store.purgeable(timedelta(seconds=100)) == 1
    assert store.purgeable(timedelta(days=1)) == 0


def test_a_permanent_failure_records_its_alert_event(store: Outbox, plain: Settings) -> None:
    failed = store.enqueue(built(plain, 1))
    notice = store.enqueue(built(plain, 2), purpose="alert")
    for claimed in store.claim("w1", 10, 60):
        store.record_attempt(claimed, refused(), owner="w1", policy=POLICY)
    assert store.alerts.pending_events() == 1  # the alert mail raised none
    assert store.alerts.group(timedelta(0), ["webhook"]) != []
    (alert,) = store.alerts.recent()
    assert alert.kind == MESSAGE_FAILED
    assert alert.fields["subjects"] == [failed]
    assert "550 5.1.1 No such user" in alert.text
    assert notice not in alert.fields["subjects"]


def test_events_in_one_window_are_one_alert(store: Outbox, clock: FakeClock) -> None:
    store.alerts.record(
        [NewEvent(MESSAGE_FAILED, f"failure {n}", subject=f"m{n}") for n in range(50)]
    )
    clock.advance(10)
    assert store.alerts.group(timedelta(seconds=30), ["webhook", "email"]) == []  # still open
    clock.advance(25)
    store.alerts.record([NewEvent("queue_age", "waited", subject="m9")])
    (made,) = store.alerts.group(timedelta(seconds=30), ["webhook", "email"])
    (alert,) = store.alerts.recent()
    assert (alert.id, alert.count, alert.kind) == (made, 50, MESSAGE_FAILED)
    assert alert.text == "50 events; the latest: failure 49"
    assert len(alert.fields["subjects"]) == 20
    assert [d.channel for d in alert.deliveries] == ["webhook", "email"]
    assert store.alerts.pending_events() == 1  # the queue_age one has its own window


def test_deliveries_are_leased_retried_and_finished(store: Outbox, clock: FakeClock) -> None:
    alert_id = store.alerts.create(NewEvent("test", "a test"), ["webhook", "email"])
    first = store.alerts.claim(30)
    assert sorted(c.channel for c in first) == ["email", "webhook"]
    assert store.alerts.claim(30) == []  # leased
    webhook = next(c for c in first if c.channel == "webhook")
    email = next(c for c in first if c.channel == "email")
    store.alerts.not_sent(webhook.id, "HTTP 500", clock.now + timedelta(seconds=60))
    store.alerts.sent(email.id)
    clock.advance(31)
    assert store.alerts.claim(30) == []  # the webhook waits for its retry time
    clock.advance(30)
    (again,) = store.alerts.claim(30, alert_id=alert_id)
    assert (again.id, again.attempt) == (webhook.id, 2)
    store.alerts.not_sent(again.id, "HTTP 500 again", None)
    (alert,) = store.alerts.recent()
    states = {d.channel: (d.status, d.attempts, d.last_error) for d in alert.deliveries}
    assert states == {"webhook": ("failed", 2, "HTTP 500 again"), "email": ("sent", 1, None)}


def test_messages_waiting_too_long_are_reported_once(
    store: Outbox, clock: FakeClock, plain: Settings
) -> None:
    waiting = store.enqueue(built(plain, 1))
    store.enqueue(built(plain, 2), purpose="alert")
    clock.advance(30)
    assert store.alerts.waiting_longer_than(timedelta(seconds=60)) == []
    clock.advance(60)
    (row,) = store.alerts.waiting_longer_than(timedelta(seconds=60))
    assert row.id == waiting
    store.alerts.record([NewEvent("queue_age", "waited", subject=waiting)])
    assert store.alerts.waiting_longer_than(timedelta(seconds=60)) == []
