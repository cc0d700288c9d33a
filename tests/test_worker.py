"""The delivery worker: the state machine through the deliver seam, then end to end against
the real MX peer (aiosmtpd), real DKIM signing, the real resolver, and real `relay worker`
processes killed mid-DATA.

Every test runs over SQLite and a fresh PostgreSQL database (`database_url`), except the
many-workers test, which is about PostgreSQL's SKIP LOCKED claims.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.errors import SigningError, StoreUnavailable
from relay.mail.mx import make_resolver
from relay.mail.signing import Signer
from relay.ops.doctor import startup_checks
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import SUPPORT_DOMAIN
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.store.records import Claimed, Finished
from relay.store.retry import Decision
from relay.worker.delivery import Worker
from tests.peers.smtp import ScriptedHandler, SMTPPeer
from tests.store.test_outbox import FakeClock, built, delivered, greylisted, refused

RELAY = str(Path(sys.executable).with_name("relay"))


class GatedHandler(ScriptedHandler):
    """Holds one DATA reply until released, so a test knows an attempt is inside DATA."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_data = False
        self.in_data = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hold_data:
            self.hold_data = False
            self.in_data.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
            return "451 4.3.0 Held (the client is gone by now)"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def mx_handler() -> GatedHandler:
    return GatedHandler()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def quick_settings(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: SMTPPeer
) -> Settings:
    """The test world with a schedule of minutes: first retry after 60-72 s, at most 600 s,
    give up after an hour."""
    return make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_RETRY_INITIAL="60",
        RELAY_RETRY_MAX="600",
        RELAY_RETRY_GIVE_UP="3600",
        RELAY_WORKER_CONCURRENCY="3",
    )


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Outbox]:
    outbox = Outbox(database_url, clock=clock)
    yield outbox
    outbox.dispose()


class ScriptedDeliver:
    """The deliver seam: same signature as relay.smtp.deliver, answers from a script."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.calls: list[dict[str, Any]] = []

    async def __call__(
        self,
        signed: bytes,
        *,
        recipient: str,
        envelope_from: str,
        settings: Settings,
        resolver: Any,
    ) -> Any:
        self.calls.append({"signed": signed, "recipient": recipient, "from": envelope_from})
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


def worker_for(store: Outbox, settings: Settings, deliver: Any = None, **kw: Any) -> Worker:
    return Worker(store, settings, deliver=deliver, poll_interval=0.05, **kw)


# --- the state machine, through the deliver seam -------------------------------------------


async def test_schedule_is_persisted_across_restarts(
    store: Outbox, database_url: str, clock: FakeClock, quick_settings: Settings
) -> None:
    message = built(quick_settings)
    outbox_id = store.enqueue(message)
    deliver = ScriptedDeliver(greylisted(), delivered())

    await worker_for(store, quick_settings, deliver).run(once=True)
    row = store.get(outbox_id)
    assert row.status == "deferred"
    assert row.next_attempt_at is not None
    delay = (row.next_attempt_at - clock()).total_seconds()
    assert 60 <= delay <= 72
    store.dispose()

    # A new process: a new store and a new worker read the persisted schedule.
    restarted = Outbox(database_url, clock=clock)
    try:
        clock.advance(delay - 1)
        await worker_for(restarted, quick_settings, deliver).run(once=True)
        assert len(deliver.calls) == 1  # not due yet
        clock.advance(1)
        await worker_for(restarted, quick_settings, deliver).run(once=True)
        assert len(deliver.calls) == 2
        detail = restarted.show(outbox_id)
    finally:
        restarted.dispose()
    assert detail.message.status == "delivered"
    assert [(a.number, a.outcome) for a in detail.attempts] == [(1, "temporary"), (2, "delivered")]
    for call in deliver.calls:  # signed at each attempt, the Message-ID never changes
        assert call["signed"].startswith(b"DKIM-Signature:")
        assert message.message_id.encode() in call["signed"]
        assert call["signed"].endswith(message.raw)
        assert call["recipient"] == f"help@{SUPPORT_DOMAIN}"


async def test_gives_up_after_the_configured_age(
    store: Outbox, clock: FakeClock, quick_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(quick_settings))
    deliver = ScriptedDeliver(greylisted())
    worker = worker_for(store, quick_settings, deliver)
    delays = []
    for _ in range(100):
        await worker.run(once=True)
        row = store.get(outbox_id)
        if row.status != "deferred":
            break
        assert row.next_attempt_at is not None
        delays.append((row.next_attempt_at - clock()).total_seconds())
        clock.now = row.next_attempt_at
    assert row.status == "failed"
    assert clock() - row.created_at >= timedelta(seconds=3600)
    assert all(0 < d <= 600 for d in delays)
    assert all(d >= 60 for d in delays[:-1])  # the last one is cut to the deadline
    assert row.attempts == len(deliver.calls) == len(delays) + 1
    assert row.failure_reason is not None
    assert "gave up" in row.failure_reason
    assert "451 4.7.1 Greylisted" in row.failure_reason


async def test_permanent_failure_is_not_retried(
    store: Outbox, clock: FakeClock, quick_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(quick_settings))
    deliver = ScriptedDeliver(refused())
    await worker_for(store, quick_settings, deliver).run(once=True)
    clock.advance(86400)
    await worker_for(store, quick_settings, deliver).run(once=True)
    assert len(deliver.calls) == 1
    row = store.get(outbox_id)
    assert row.status == "failed"
    assert row.last_text == "No such user"


async def test_signing_failure_defers_instead_of_losing(
    store: Outbox, quick_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(quick_settings))
    deliver = ScriptedDeliver(delivered())

    def broken_sign(raw: bytes) -> bytes:
        raise SigningError("key unusable")

    await worker_for(store, quick_settings, deliver, sign=broken_sign).run(once=True)
    row = store.get(outbox_id)
    assert deliver.calls == []
    assert row.status == "deferred"
    assert row.last_text == "key unusable"


async def test_a_crashing_deliver_defers(store: Outbox, quick_settings: Settings) -> None:
    outbox_id = store.enqueue(built(quick_settings))

    async def crashing(signed: bytes, **_: Any) -> Any:
        raise RuntimeError("bug")

    await worker_for(store, quick_settings, crashing).run(once=True)
    row = store.get(outbox_id)
    assert row.status == "deferred"
    assert row.attempts == 1


async def test_concurrency_is_bounded(store: Outbox, quick_settings: Settings) -> None:
    ids = [store.enqueue(built(quick_settings, n)) for n in range(10)]
    running = 0
    peak = 0

    async def slow(signed: bytes, **_: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return delivered()

    await worker_for(store, quick_settings, slow).run(once=True)
    assert peak == quick_settings.worker_concurrency == 3
    assert {store.get(i).status for i in ids} == {"delivered"}


async def test_stop_lets_the_attempt_in_flight_finish(
    store: Outbox, quick_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(quick_settings))
    started = asyncio.Event()
    finish = asyncio.Event()

    async def waits(signed: bytes, **_: Any) -> Any:
        started.set()
        await finish.wait()
        return delivered()

    worker = worker_for(store, quick_settings, waits)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    later = store.enqueue(built(quick_settings, 2))
    finish.set()
    await asyncio.wait_for(task, 10)
    assert store.get(outbox_id).status == "delivered"
    assert store.get(later).status == "queued"  # not claimed after stop


async def test_stop_past_the_grace_period_hands_the_message_back(
    store: Outbox, quick_settings: Settings
) -> None:
    outbox_id = store.enqueue(built(quick_settings))
    started = asyncio.Event()

    async def hangs(signed: bytes, **_: Any) -> Any:
        started.set()
        await asyncio.sleep(3600)
        return delivered()

    worker = worker_for(store, quick_settings, hangs, shutdown_grace=0.1)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    detail = store.show(outbox_id)
    assert detail.message.status == "deferred"
    assert detail.message.lease_owner is None
    assert detail.message.possible_duplicate
    assert [a.outcome for a in detail.attempts] == ["interrupted"]
    assert store.claim("other", 1, 60)[0].attempt == 2


async def test_heartbeat_renews_the_lease_of_a_long_attempt(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(RELAY_WORKER_LEASE="10")
    store = Outbox(database_url)  # the real clock
    try:
        outbox_id = store.enqueue(built(settings))
        started = asyncio.Event()
        finish = asyncio.Event()

        async def slow(signed: bytes, **_: Any) -> Any:
            started.set()
            await finish.wait()
            return delivered()

        worker = worker_for(store, settings, slow, heartbeat_interval=0.2)
        task = asyncio.create_task(worker.run(once=True))
        await asyncio.wait_for(started.wait(), 10)
        first = store.get(outbox_id).lease_expires_at
        assert first is not None
        deadline = time.monotonic() + 10
        while store.get(outbox_id).lease_expires_at == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            await asyncio.sleep(0.2)
        renewed = store.get(outbox_id)
        assert renewed.lease_expires_at is not None
        assert renewed.lease_expires_at > first
        assert renewed.lease_owner == worker.id
        finish.set()
        await asyncio.wait_for(task, 10)
        assert store.get(outbox_id).status == "delivered"
    finally:
        store.dispose()


async def test_postgres_notify_wakes_an_idle_worker(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    """With a poll far longer than the test, only enqueue's NOTIFY can start the delivery."""
    settings = make_settings()
    store = Outbox(postgres_url)
    try:
        store.ping()
        deliver = ScriptedDeliver(delivered())
        worker = Worker(store, settings, deliver=deliver, poll_interval=3600)
        task = asyncio.create_task(worker.run())
        async with asyncio.timeout(20):
            while worker.listening is None or not worker.listening.is_set() or worker.claims < 1:
                await asyncio.sleep(0.02)
            outbox_id = await asyncio.to_thread(store.enqueue, built(settings))
            while store.get(outbox_id).status != "delivered":
                assert not task.done()
                await asyncio.sleep(0.05)
        assert len(deliver.calls) == 1
        worker.stop()
        await asyncio.wait_for(task, 10)
    finally:
        store.dispose()


# --- claim coalescing and the group commit -------------------------------------------------


class CountingOutbox(Outbox):
    """The real store, counting the claims that took messages and the size of each group
    commit; `fail_batches` group commits fail as a store outage would."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.claimed: list[int] = []
        self.batches: list[int] = []
        self.fail_batches = 0

    def claim(self, owner: str, limit: int, lease_seconds: float, **kw: Any) -> list[Claimed]:
        items = super().claim(owner, limit, lease_seconds, **kw)
        if items:
            self.claimed.append(len(items))
        return items

    def record_attempts(self, finished: Sequence[Finished], **kw: Any) -> list[Decision]:
        if self.fail_batches:
            self.fail_batches -= 1
            raise StoreUnavailable("outbox store unavailable: disk I/O error (injected)")
        self.batches.append(len(finished))
        return super().record_attempts(finished, **kw)


@pytest.fixture
def counting(database_url: str, clock: FakeClock) -> Iterator[CountingOutbox]:
    outbox = CountingOutbox(database_url, clock=clock)
    yield outbox
    outbox.dispose()


class HeldDeliver:
    """The deliver seam: call number n returns `delivered()` once `release(n)` is called."""

    def __init__(self) -> None:
        self.calls = 0
        self.gates: dict[int, asyncio.Event] = {}
        self.arrived = asyncio.Event()

    def gate(self, n: int) -> asyncio.Event:
        return self.gates.setdefault(n, asyncio.Event())

    def release(self, *numbers: int) -> None:
        for n in numbers:
            self.gate(n).set()

    async def __call__(self, signed: bytes, **_: Any) -> Any:
        n = self.calls
        self.calls += 1
        self.arrived.set()
        await self.gate(n).wait()
        return delivered()

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(10):
            while self.calls < count:
                self.arrived.clear()
                await self.arrived.wait()


async def test_outcomes_that_end_together_are_committed_together(
    counting: CountingOutbox, quick_settings: Settings
) -> None:
    """Each attempt keeps its own row (reply, enhanced status, MX), but the three that end
    together cost one transaction, and the three slots they free one claim."""
    ids = [counting.enqueue(built(quick_settings, n)) for n in range(6)]
    deliver = HeldDeliver()
    worker = worker_for(counting, quick_settings, deliver)
    task = asyncio.create_task(worker.run(once=True))
    await deliver.wait_calls(3)
    deliver.release(0, 1, 2)
    await deliver.wait_calls(6)
    deliver.release(3, 4, 5)
    await asyncio.wait_for(task, 10)
    assert counting.batches == [3, 3]
    assert counting.claimed == [3, 3]
    assert worker.record_commits == 2
    for outbox_id in ids:
        detail = counting.show(outbox_id)
        assert detail.message.status == "delivered"
        assert [
            (a.number, a.outcome, a.code, a.enhanced_status, a.mx_host) for a in detail.attempts
        ] == [(1, "delivered", 250, "2.0.0", "mx1.support.test")]


async def test_freed_slots_add_up_before_the_next_claim(
    counting: CountingOutbox, make_settings: Callable[..., Settings]
) -> None:
    """One attempt of four ends: its slot waits (here for as long as it takes) until a
    second one is free, then one claim fills both."""
    settings = make_settings(RELAY_WORKER_CONCURRENCY="4")
    ids = [counting.enqueue(built(settings, n)) for n in range(6)]
    deliver = HeldDeliver()
    worker = worker_for(counting, settings, deliver, claim_coalesce=3600, record_window=0)
    task = asyncio.create_task(worker.run(once=True))
    await deliver.wait_calls(4)
    deliver.release(0)
    async with asyncio.timeout(10):
        while counting.batches != [1]:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert counting.claimed == [4]  # one free slot of four: no claim yet
    deliver.release(1)
    await deliver.wait_calls(6)
    assert counting.claimed == [4, 2]
    deliver.release(2, 3, 4, 5)
    await asyncio.wait_for(task, 10)
    assert {counting.get(i).status for i in ids} == {"delivered"}


async def test_a_lone_attempt_that_ends_claims_at_once(
    store: Outbox, quick_settings: Settings
) -> None:
    """Coalescing never holds a claim back when nothing else is in flight: with a poll and a
    coalescing wait of an hour, only the claim after the first attempt can start the second."""
    first = store.enqueue(built(quick_settings, 1))
    deliver = HeldDeliver()
    worker = Worker(store, quick_settings, deliver=deliver, poll_interval=3600, claim_coalesce=3600)
    task = asyncio.create_task(worker.run())
    await deliver.wait_calls(1)
    second = store.enqueue(built(quick_settings, 2))
    deliver.release(0, 1)
    async with asyncio.timeout(10):
        while store.get(second).status != "delivered":
            await asyncio.sleep(0.02)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert store.get(first).status == "delivered"


async def test_a_failed_group_commit_is_retried_per_attempt(
    counting: CountingOutbox, quick_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A store error during the group commit is handled as one per outcome was: logged,
    retried for each attempt on its own, nothing lost and nothing recorded twice."""
    ids = [counting.enqueue(built(quick_settings, n)) for n in range(3)]
    counting.fail_batches = 1
    caplog.set_level(logging.INFO, logger="relay.worker")
    deliver = HeldDeliver()
    worker = worker_for(counting, quick_settings, deliver)
    task = asyncio.create_task(worker.run(once=True))
    await deliver.wait_calls(3)
    deliver.release(0, 1, 2)
    await asyncio.wait_for(task, 20)
    assert counting.batches == [1, 1, 1]  # the retries, one attempt each
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    failed = [line for line in lines if line.startswith("delivery.record_failed")]
    assert len(failed) == 3
    assert all("tries=1" in line and "injected" in line for line in failed)
    assert sum(line.startswith("delivery.delivered") for line in lines) == 3
    for outbox_id in ids:
        detail = counting.show(outbox_id)
        assert detail.message.status == "delivered"
        assert [a.outcome for a in detail.attempts] == ["delivered"]


async def test_stop_commits_an_outcome_still_waiting_for_the_group_commit(
    store: Outbox, quick_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Until its outcome is committed a message stays leased (a crash then loses nothing:
    the lease expires and it is redelivered); a graceful stop commits it before exiting."""
    ids = [store.enqueue(built(quick_settings, n)) for n in range(2)]
    caplog.set_level(logging.INFO, logger="relay.worker")
    deliver = HeldDeliver()
    # The writer waits for the attempt still running (for an hour, here) before committing.
    worker = worker_for(store, quick_settings, deliver, record_window=3600, shutdown_grace=0.2)
    task = asyncio.create_task(worker.run())
    await deliver.wait_calls(2)
    deliver.release(0)  # one of the two ends; the other never does
    await asyncio.sleep(0.2)
    rows = [store.get(i) for i in ids]
    assert {r.status for r in rows} == {"sending"}
    assert {r.lease_owner for r in rows} == {worker.id}
    worker.stop()
    await asyncio.wait_for(task, 10)
    details = [store.show(i) for i in ids]
    outcomes = sorted(tuple(a.outcome for a in d.attempts) for d in details)
    assert outcomes == [("delivered",), ("interrupted",)]
    assert sorted(d.message.status for d in details) == ["deferred", "delivered"]
    assert all(d.message.lease_owner is None for d in details)
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    assert sum(line.startswith("delivery.delivered") for line in lines) == 1


# --- end to end: real signing, DNS and SMTP ------------------------------------------------


async def test_greylisted_then_delivered_on_the_first_retry(
    store: Outbox, clock: FakeClock, quick_settings: Settings, mx_server: SMTPPeer
) -> None:
    mx_server.handler.greylist_seconds = 0.5
    message = built(quick_settings)
    outbox_id = store.enqueue(message)

    await worker_for(store, quick_settings).run(once=True)
    row = store.get(outbox_id)
    assert row.status == "deferred"
    assert row.last_code == 451
    assert mx_server.messages == []

    time.sleep(0.6)  # the greylist's own (real) delay
    assert row.next_attempt_at is not None
    clock.now = row.next_attempt_at
    await worker_for(store, quick_settings).run(once=True)

    detail = store.show(outbox_id)
    assert detail.message.status == "delivered"
    assert [(a.outcome, a.code, a.enhanced_status) for a in detail.attempts] == [
        ("temporary", 451, "4.7.1"),
        ("delivered", 250, "2.0.0"),
    ]
    assert detail.attempts[0].hosts[0].mx_host == f"mx1.{SUPPORT_DOMAIN}"
    assert detail.attempts[0].hosts[0].ip == "127.0.0.2"
    assert detail.attempts[0].hosts[0].stage == "rcpt"
    (received,) = mx_server.messages
    assert received.message["Message-ID"] == message.message_id
    assert received.data.startswith(b"DKIM-Signature:")
    assert received.rcpt_tos == [f"help@{SUPPORT_DOMAIN}"]


async def test_550_fails_with_the_reply_text(
    store: Outbox, quick_settings: Settings, mx_server: SMTPPeer
) -> None:
    mx_server.handler.rcpt.append("550 5.1.1 No such mailbox here")
    outbox_id = store.enqueue(built(quick_settings))
    await worker_for(store, quick_settings).run(once=True)
    row = store.get(outbox_id)
    assert row.status == "failed"
    assert row.last_code == 550
    assert row.last_enhanced_status == "5.1.1"
    assert row.last_text == "No such mailbox here"
    assert row.failure_reason is not None
    assert "No such mailbox here" in row.failure_reason
    assert mx_server.messages == []


async def test_dropped_mid_data_is_retried(
    store: Outbox, clock: FakeClock, quick_settings: Settings, mx_server: SMTPPeer
) -> None:
    mx_server.handler.mid_data.append("DROP")
    outbox_id = store.enqueue(built(quick_settings))
    await worker_for(store, quick_settings).run(once=True)
    row = store.get(outbox_id)
    assert row.status == "deferred"
    assert row.next_attempt_at is not None
    clock.now = row.next_attempt_at
    await worker_for(store, quick_settings).run(once=True)
    assert store.get(outbox_id).status == "delivered"
    assert len(mx_server.messages) == 1


def _run_worker(worker: Worker) -> None:
    asyncio.run(worker.run(once=True))


@pytest.mark.slow
def test_two_workers_deliver_500_messages_exactly_once(
    postgres_url: str,
    make_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
) -> None:
    settings = make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_WORKER_CONCURRENCY="10",
    )
    setup = Outbox(postgres_url)
    ids = {setup.enqueue(built(settings, n)) for n in range(500)}
    stores = [Outbox(postgres_url), Outbox(postgres_url)]
    signer = Signer.from_settings(settings)
    workers = [
        Worker(s, settings, sign=signer.sign, poll_interval=0.05, worker_id=f"w{n}")
        for n, s in enumerate(stores)
    ]
    threads = [threading.Thread(target=_run_worker, args=(w,)) for w in workers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        rows = setup.list_messages(limit=1000)
    finally:
        for s in [setup, *stores]:
            s.dispose()
    assert {r.id for r in rows} == ids
    assert {r.status for r in rows} == {"delivered"}
    assert {r.attempts for r in rows} == {1}
    message_ids = [m.message["Message-ID"] for m in mx_server.messages]
    assert len(message_ids) == 500
    assert len(set(message_ids)) == 500
    assert sum(w.attempts_made for w in workers) == 500


# --- a real `relay worker` process, killed mid-DATA ------------------------------------------


def worker_env(base_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(base_env)
    env.update(extra)
    return env


def start_worker(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [RELAY, "worker"], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.mark.slow
def test_worker_killed_mid_data_is_delivered_after_restart(
    database_url: str,
    base_env: dict[str, str],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    handler = mx_server.handler
    assert isinstance(handler, GatedHandler)
    env = worker_env(
        base_env,
        RELAY_DATABASE_URL=database_url,
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_WORKER_LEASE="10",
        RELAY_RETRY_INITIAL="1",
        RELAY_RETRY_MAX="2",
    )
    settings = make_settings(RELAY_DATABASE_URL=database_url)
    store = Outbox(database_url)
    log = tmp_path / "worker.log"
    first: subprocess.Popen[bytes] | None = None
    second: subprocess.Popen[bytes] | None = None
    try:
        message = built(settings)
        outbox_id = store.enqueue(message)
        handler.hold_data = True
        first = start_worker(env, tmp_path, log)
        assert handler.in_data.wait(30), log.read_text()
        assert store.get(outbox_id).status == "sending"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        handler.release.set()

        second = start_worker(env, tmp_path, log)
        received = mx_server.wait_for(1, timeout=40)
        deadline = time.monotonic() + 10
        while store.get(outbox_id).status != "delivered":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, log.read_text()
        detail = store.show(outbox_id)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        store.dispose()
    assert len(received) == 1
    assert received[0].message["Message-ID"] == message.message_id
    assert [a.outcome for a in detail.attempts] == ["interrupted", "delivered"]
    assert detail.message.possible_duplicate
    text = log.read_text()
    assert "delivery.delivered" in text
    assert f"id={outbox_id}" in text
    assert "worker.stopped" in text


async def test_startup_checks_log_the_doctor_findings(
    make_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_HELO_HOSTNAME="mail.nowhere.test"
    )
    # A CLI test earlier in the run may have pointed the relay logger at its own stderr.
    monkeypatch.setattr(logging.getLogger("relay"), "propagate", True)
    caplog.set_level(logging.INFO, logger="relay")
    await startup_checks(settings, make_resolver(settings))
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    assert any(line.startswith("doctor.check check=helo status=FAIL") for line in lines)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_lets_the_attempt_in_flight_finish(
    database_url: str,
    base_env: dict[str, str],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    handler = mx_server.handler
    assert isinstance(handler, GatedHandler)
    env = worker_env(
        base_env,
        RELAY_DATABASE_URL=database_url,
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
    )
    store = Outbox(database_url)
    log = tmp_path / "worker.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        outbox_id = store.enqueue(built(make_settings()))
        handler.hold_data = True
        proc = start_worker(env, tmp_path, log)
        assert handler.in_data.wait(30), log.read_text()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the worker left before its attempt ended"
        handler.release.set()  # the held DATA now ends with 451
        assert proc.wait(20) == 0, log.read_text()
        row = store.get(outbox_id)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.dispose()
    assert row.status == "deferred"
    assert row.last_code == 451
    assert row.lease_owner is None
    assert "delivery.deferred" in log.read_text()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_second_signal_exits_at_once_and_the_next_worker_takes_over(
    database_url: str,
    base_env: dict[str, str],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """SIGTERM, then SIGTERM again while an attempt is held inside DATA: the worker leaves at
    once (128 + 15) without handing anything back; a worker started on the same host sees
    the old process is gone and delivers the message without waiting for any timeout."""
    handler = mx_server.handler
    assert isinstance(handler, GatedHandler)
    env = worker_env(
        base_env,
        RELAY_DATABASE_URL=database_url,
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
    )
    store = Outbox(database_url)
    log = tmp_path / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        outbox_id = store.enqueue(built(make_settings()))
        handler.hold_data = True
        procs.append(start_worker(env, tmp_path, log))
        assert handler.in_data.wait(30), log.read_text()
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert procs[0].poll() is None, "the first signal waits for the attempt"
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(5) == 128 + signal.SIGTERM, log.read_text()
        assert store.get(outbox_id).status == "sending"  # nothing released
        restarted = time.monotonic()
        procs.append(start_worker(env, tmp_path, log))
        deadline = restarted + 15  # well inside RELAY_WORKER_DEAD_AFTER and the lease
        while store.get(outbox_id).status != "delivered":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(20) == 0, log.read_text()
        detail = store.show(outbox_id)
    finally:
        handler.release.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        store.dispose()
    assert [a.outcome for a in detail.attempts] == ["interrupted", "delivered"]
    text = log.read_text()
    assert "worker.stop_forced" in text
    assert "worker.dead dead=" in text
    assert 'reason="process gone"' in text  # worker.reclaimed's


# --- leases lost and graceful stops ---------------------------------------------------------


class GatedSeam:
    """A delivery that asks `before_dot` as relay.mail.smtp does: it waits at "DATA" until
    `go`, asks, then (past the dot) waits for `finish` and reports a delivery."""

    def __init__(self) -> None:
        self.at_data = asyncio.Event()
        self.go = asyncio.Event()
        self.finish = asyncio.Event()
        self.past_dot = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, signed: bytes, *, before_dot: Any, **_: Any) -> Any:
        self.at_data.set()
        try:
            await self.go.wait()
            await before_dot()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.past_dot.set()
        await self.finish.wait()
        return delivered()


DEAD_AFTER = 15


@pytest.mark.parametrize("learnt_at", ["beat", "dot"])
async def test_a_lease_lost_before_the_dot_cuts_the_attempt_off(
    learnt_at: str,
    store: Outbox,
    clock: FakeClock,
    quick_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker was silent past RELAY_WORKER_DEAD_AFTER and another took the message: at
    its next beat, or when it asks before the final dot, the attempt is cancelled unsent."""
    caplog.set_level(logging.INFO, logger="relay.worker")
    outbox_id = store.enqueue(built(quick_settings))
    seam = GatedSeam()
    worker = Worker(
        store, quick_settings, gated_deliver=seam, poll_interval=0.05, heartbeat_interval=3600
    )
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(seam.at_data.wait(), 10)
    clock.advance(DEAD_AFTER + 1)
    (taken,) = store.claim("thief", 1, 300, dead_after=DEAD_AFTER)
    assert taken.token == 2
    if learnt_at == "beat":
        assert await worker.leases.beat()
    else:
        worker.leases.confirm_window = 0  # every dot asks the store first
        seam.go.set()
    async with asyncio.timeout(10):
        while seam.cancelled == 0:
            await asyncio.sleep(0.01)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert not seam.past_dot.is_set()
    detail = store.show(outbox_id)
    assert (detail.message.status, detail.message.lease_owner) == ("sending", "thief")
    assert [(a.outcome, a.worker) for a in detail.attempts] == [("interrupted", worker.id)]
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    (lost,) = [line for line in lines if line.startswith("worker.leases_lost")]
    assert f"ids={outbox_id}" in lost
    assert "cut_off=1 finishing=0" in lost
    assert any(
        line.startswith(f"delivery.interrupted id={outbox_id}")
        and "reason=lease_lost sent=0" in line
        for line in lines
    )


async def test_an_attempt_past_the_dot_is_recorded_when_its_lease_was_lost(
    store: Outbox, clock: FakeClock, quick_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Too late to cut off: it ends, its delivery is stored against the message (which it
    ends, taking it from the new owner) and flagged as a possible duplicate."""
    caplog.set_level(logging.INFO, logger="relay")
    outbox_id = store.enqueue(built(quick_settings))
    seam = GatedSeam()
    seam.go.set()
    worker = Worker(
        store, quick_settings, gated_deliver=seam, poll_interval=0.05, heartbeat_interval=3600
    )
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(seam.past_dot.wait(), 10)
    clock.advance(DEAD_AFTER + 1)
    (taken,) = store.claim("thief", 1, 300, dead_after=DEAD_AFTER)
    assert await worker.leases.beat()
    seam.finish.set()
    async with asyncio.timeout(10):
        while store.get(outbox_id).status != "delivered":
            await asyncio.sleep(0.02)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert seam.cancelled == 0
    row = store.get(outbox_id)
    assert row.possible_duplicate
    assert row.claim_token == taken.token + 1  # the thief's own record is fenced off now
    lines = [r.getMessage() for r in caplog.records]
    assert any("worker.leases_lost" in line and "cut_off=0 finishing=1" in line for line in lines)
    assert any(
        line.startswith(f"delivery.lease_lost id={outbox_id}") and "took_over=True" in line
        for line in lines
    )


async def test_stop_hands_back_an_attempt_cut_off_before_the_dot_without_a_duplicate_flag(
    store: Outbox,
    quick_settings: Settings,
    mx_server: SMTPPeer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real SMTP: the MX never answers RCPT. Past the stop timeout the attempt is cut off;
    it never got to the dot, so the message is due again at once and not a possible
    duplicate; the worker deregisters."""
    from tests.peers.smtp import HANG

    caplog.set_level(logging.INFO, logger="relay.worker")
    mx_server.handler.rcpt.append(HANG)
    outbox_id = store.enqueue(built(quick_settings))
    worker = Worker(store, quick_settings, poll_interval=0.05, shutdown_grace=0.3)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        while store.get(outbox_id).status != "sending":
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # inside RCPT by now
    worker.stop()
    await asyncio.wait_for(task, 10)
    detail = store.show(outbox_id)
    assert detail.message.status == "deferred"
    assert not detail.message.possible_duplicate
    assert [(a.outcome, a.possible_duplicate) for a in detail.attempts] == [("interrupted", False)]
    assert store.claim("next", 1, 300)[0].id == outbox_id  # due now
    (row,) = store.workers.list_workers()
    assert row.stop_reason == "stopped"
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    assert any(line.startswith("worker.stopping") and "in_flight=1" in line for line in lines)
    assert any(line.startswith(f"worker.released id={worker.id} count=1") for line in lines)
    assert any(line.startswith("worker.deregistered") for line in lines)


async def test_a_message_leased_to_the_worker_that_it_never_heard_of_is_handed_back(
    store: Outbox, clock: FakeClock, quick_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim made under the worker's name whose reply it never got: after DEAD_AFTER its
    beat hands the message back (an interrupted attempt that may have been sent), and it is
    delivered, instead of waiting for the 300 s lease."""
    caplog.set_level(logging.INFO, logger="relay.worker")
    deliver = ScriptedDeliver(delivered())
    worker = Worker(store, quick_settings, deliver=deliver, poll_interval=0.05)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        while not worker.leases.registered:
            await asyncio.sleep(0.01)
    outbox_id = store.enqueue(built(quick_settings))
    (lost_reply,) = store.claim(worker.id, 1, 300)
    clock.advance(DEAD_AFTER + 1)
    assert await worker.leases.beat()
    async with asyncio.timeout(10):
        while store.get(outbox_id).status != "delivered":
            await asyncio.sleep(0.02)
    worker.stop()
    await asyncio.wait_for(task, 10)
    detail = store.show(outbox_id)
    assert [(a.number, a.outcome) for a in detail.attempts] == [
        (1, "interrupted"),
        (2, "delivered"),
    ]
    assert detail.message.possible_duplicate
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.worker"]
    assert any(
        line.startswith("worker.released")
        and f"ids={lost_reply.id}" in line
        and "reason=not_held" in line
        for line in lines
    )
