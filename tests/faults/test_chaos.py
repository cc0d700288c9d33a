"""Chaos soak: the whole system under load while its processes are killed, and a count at the
end of what happened to every submission.

Two worlds run at once, each behind its own gunicorn (2 workers x 4 threads): one on a
PostgreSQL server of the test's own (two `relay worker` processes), one on SQLite (one
worker). Concurrent HTTP clients post the form (JSON and HTML) to both. The MX greylists each
new sender once, answers a share of transactions 421/451 at random, and takes 0.2-1.5 s to
answer the final dot of the rest. Every few seconds a
random gunicorn worker or relay worker gets SIGKILL (a killed relay worker comes back after
0-5 s, as systemd's RestartSec=5s would bring it back); once, PostgreSQL is stopped and
started again under load; once, a PostgreSQL worker is paused (SIGSTOP) for longer than
RELAY_WORKER_DEAD_AFTER and resumed. RELAY_WORKER_LEASE keeps its 300 s default: recovery
comes from the heartbeats, not from leases running out.

The report (tests/artifacts/chaos.json) counts submissions accepted (202/303), refused with
a clear 4xx or 503, other 5xx (must be 0) and without an answer (a killed gunicorn worker);
every accepted message must be delivered, a second copy (counted by Message-ID, as the
receiver dedups) only if the outbox flagged it possible_duplicate; and the time from each
relay worker's kill to the reclaim of what it held.

`make test` runs the short soak (320 submissions, about a minute); `make soak` (RELAY_SOAK=1)
the long one (5,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.store.outbox import Outbox
from tests.faults.conftest import FaultHandler
from tests.faults.corpus import VALID
from tests.faults.harness import (
    FINAL,
    Proc,
    Visitor,
    free_port,
    gunicorn_proc,
    http_ready,
    message_id_of,
    wait_until,
    worker_proc,
)
from tests.faults.pgcluster import PrivatePostgres
from tests.peers.smtp import SMTPPeer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SOAK = os.environ.get("RELAY_SOAK") == "1"
SUBMISSIONS = {"postgres": 3200, "sqlite": 1800} if SOAK else {"postgres": 200, "sqlite": 120}
CLIENTS = {"postgres": 16, "sqlite": 8}
THINK = (0.2, 1.0) if SOAK else (1.0, 3.0)  # seconds a client waits between submissions
KILL_EVERY = (2.0, 4.0)
RESTART_AFTER = (0.0, 5.0)
FAULT_RATE = 0.05
SCAN = (0.2, 1.5)  # seconds the MX takes to answer the final dot
DEAD_AFTER = 5
SEED = int(os.environ.get("RELAY_SOAK_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
_REGISTERED = re.compile(r"worker\.registered id=(\S+) host=\S+ pid=(\d+)")
_RECLAIMED = re.compile(
    r"^(\S+ \S+) WARNING relay\.outbox worker\.reclaimed worker=\S+ dead=(\S+) "
    r".*count=(\d+) (?:since_beat=(\S+) )?reason=(\"[^\"]*\"|\S+)",
    re.M,
)


class ChaosHandler(FaultHandler):
    """Greylists each new sender (the visitor's address, in Reply-To) once, and answers a
    share of transactions 421 at MAIL or 451 at RCPT or DATA."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        super().__init__()
        self.rng = rng
        self.rate = rate
        self.senders: set[str] = set()
        self.faults: Counter[str] = Counter()

    def _roll(self, what: str) -> bool:
        with self.lock:
            hit = self.rng.random() < self.rate
            if hit:
                self.faults[what] += 1
        return hit

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._roll("421 at MAIL"):
            return "421 4.3.2 Too busy, try again later"
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._roll("451 at RCPT"):
            return "451 4.3.0 Temporary lookup failure"
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = message_from_bytes(bytes(envelope.original_content or b""))
        sender = parseaddr(str(message["Reply-To"]))[1].lower()
        with self.lock:
            first = sender not in self.senders
            self.senders.add(sender)
            if first:
                self.greylisted += 1
        if first:
            return "451 4.7.1 Greylisted, please try again later"
        if self._roll("451 at DATA"):
            return "451 4.3.0 Queue file write error"
        # Ours now; the reply comes after a scan, so kills land with attempts in flight and
        # some after the final dot (a second copy the outbox must flag).
        self.received(session, envelope)
        with self.lock:
            scan = self.rng.uniform(*SCAN)
        await asyncio.sleep(scan)
        return "250 2.0.0 Queued"


@pytest.fixture
def mx_handler() -> ChaosHandler:
    return ChaosHandler(random.Random(SEED), FAULT_RATE)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)  # subjects
    refused_4xx: Counter[int] = field(default_factory=Counter)
    refused_503: int = 0
    refused_503_without_retry_after: int = 0
    other_5xx: Counter[int] = field(default_factory=Counter)
    no_answer: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        return (
            len(self.accepted)
            + sum(self.refused_4xx.values())
            + self.refused_503
            + sum(self.other_5xx.values())
            + sum(self.no_answer.values())
        )


@dataclass
class World:
    store: str
    env: dict[str, str]
    cwd: Path
    outbox: Outbox
    web: Proc
    base: str
    workers: list[Proc]
    tally: Tally = field(default_factory=Tally)
    next_number: int = 0

    def take(self) -> int | None:
        with self.tally.lock:
            if self.next_number >= SUBMISSIONS[self.store]:
                return None
            self.next_number += 1
            return self.next_number - 1


@dataclass
class Kill:
    what: str  # "gunicorn" or "relay"
    store: str
    pid: int
    at: float  # time.time()
    worker: str | None = None
    restart_in: float | None = None
    reclaimed_after: float | None = None
    reclaimed: int = 0
    reason: str | None = None


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def registered_id(proc: Proc) -> str | None:
    for worker_id, pid in _REGISTERED.findall(proc.output()):
        if int(pid) == proc.pid:
            return str(worker_id)
    return None


def submit(world: World, rng: random.Random, stop: threading.Event) -> None:
    """One client: posts until the world's share is taken; a 503 is retried after a short
    pause (embed.js lets the visitor retry), a request that got no answer is sent again."""
    visitor = Visitor(base_url=world.base)
    tally = world.tally
    try:
        while not stop.is_set() and (n := world.take()) is not None:
            fields = {**VALID, "email": f"v{n}.{world.store}@visitor.test"}
            as_json = n % 4 != 0
            for attempt in range(10):
                subject = f"chaos {world.store} {n} try {attempt}"
                try:
                    reply = visitor.post({**fields, "subject": subject}, as_json=as_json)
                except Exception as exc:  # the gunicorn worker died under the request
                    with tally.lock:
                        tally.no_answer[type(exc).__name__] += 1
                    visitor.close()
                    visitor = Visitor(base_url=world.base)
                    time.sleep(0.2)
                    continue
                if reply.status in (202, 303):
                    with tally.lock:
                        tally.accepted.append(subject)
                    break
                if reply.status == 503:
                    with tally.lock:
                        tally.refused_503 += 1
                        if "retry-after" not in reply.headers:
                            tally.refused_503_without_retry_after += 1
                    time.sleep(0.5)
                    continue
                with tally.lock:
                    if reply.status >= 500:
                        tally.other_5xx[reply.status] += 1
                    else:
                        tally.refused_4xx[reply.status] += 1
                break
            time.sleep(rng.uniform(*THINK))
    finally:
        visitor.close()


class Chaos:
    """The loop that kills, restarts, pauses and restarts PostgreSQL."""

    def __init__(
        self, worlds: list[World], postgres: PrivatePostgres, procs: list[Proc], rng: random.Random
    ) -> None:
        self.worlds = worlds
        self.postgres = postgres
        self.procs = procs
        self.rng = rng
        self.kills: list[Kill] = []
        self.restarts: list[tuple[float, World, int]] = []  # (due, world, slot)
        self.pg_restart: dict[str, Any] = {}
        self.pause: dict[str, Any] = {}
        self.paused: Proc | None = None
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def progress(self) -> float:
        done = sum(w.next_number for w in self.worlds)
        return done / sum(SUBMISSIONS[w.store] for w in self.worlds)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.errors.append(exc)

    def _loop(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY)
        while not self.stop.wait(0.1):
            now = time.monotonic()
            self._restart_due(now)
            self._unpause(now)
            if not self.pg_restart and self.progress() >= 0.4:
                self._restart_postgres()
            if not self.pause and self.progress() >= 0.6:
                self._pause()
            if now >= next_kill:
                self._kill()
                next_kill = now + self.rng.uniform(*KILL_EVERY)

    def _kill(self) -> None:
        world = self.rng.choice(self.worlds)
        if self.rng.random() < 0.5:
            kids = children(world.web.pid)
            if not kids:
                return
            pid = self.rng.choice(kids)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.kills.append(Kill("gunicorn", world.store, pid, time.time()))
            return
        slots = [
            i
            for i, proc in enumerate(world.workers)
            if proc.alive() and proc is not self.paused and registered_id(proc)
        ]
        if not slots:
            return
        slot = self.rng.choice(slots)
        proc = world.workers[slot]
        worker = registered_id(proc)
        proc.kill(signal.SIGKILL)
        delay = self.rng.uniform(*RESTART_AFTER)
        self.kills.append(Kill("relay", world.store, proc.pid, time.time(), worker, delay))
        self.restarts.append((time.monotonic() + delay, world, slot))

    def _restart_due(self, now: float) -> None:
        for entry in list(self.restarts):
            due, world, slot = entry
            if due <= now:
                self.restarts.remove(entry)
                self._start_worker(world, slot)

    def _start_worker(self, world: World, slot: int) -> None:
        proc = worker_proc(world.env, world.cwd, name=f"worker-{slot}").start()
        self.procs.append(proc)
        world.workers[slot] = proc

    def _restart_postgres(self) -> None:
        at = time.time()
        self.pg_restart = {"at": at, "down_seconds": round(self.postgres.restart(down=2.0), 2)}

    def _pause(self) -> None:
        world = next(w for w in self.worlds if w.store == "postgres")
        proc = next((p for p in world.workers if p.alive() and registered_id(p)), None)
        if proc is None:
            return
        os.kill(proc.pid, signal.SIGSTOP)
        self.paused = proc
        self.pause = {
            "at": time.time(),
            "worker": registered_id(proc),
            "seconds": DEAD_AFTER + 3,
            "resume_at": time.monotonic() + DEAD_AFTER + 3,
        }

    def _unpause(self, now: float) -> None:
        if self.paused is not None and now >= self.pause["resume_at"]:
            os.kill(self.paused.pid, signal.SIGCONT)
            self.paused = None

    def settle(self) -> None:
        """After the run: resume the paused worker, start every killed one again."""
        self.stop.set()
        if self.paused is not None:
            os.kill(self.paused.pid, signal.SIGCONT)
            self.paused = None
        for _due, world, slot in self.restarts:
            self._start_worker(world, slot)
        self.restarts = []
        for world in self.worlds:
            for slot, proc in enumerate(world.workers):
                if not proc.alive():
                    self._start_worker(world, slot)


def make_world(
    store: str,
    url: str,
    relay_env: dict[str, str],
    workdir: Path,
    procs: list[Proc],
    workers: int,
) -> World:
    env = {k: v for k, v in relay_env.items() if k != "RELAY_WORKER_LEASE"}  # the 300 s default
    env.update(
        {
            "RELAY_DATABASE_URL": url,
            "RELAY_WORKER_DEAD_AFTER": str(DEAD_AFTER),
            "RELAY_WORKER_CONCURRENCY": "16",
            "RELAY_LOG_LEVEL": "INFO",
        }
    )
    cwd = workdir / store
    cwd.mkdir()
    outbox = Outbox(url)
    outbox.upgrade()
    port = free_port()
    web = gunicorn_proc(env, cwd, port, workers=2, threads=4).start()
    procs.append(web)
    started = [worker_proc(env, cwd, name=f"worker-{n}").start() for n in range(workers)]
    procs.extend(started)
    return World(store, env, cwd, outbox, web, f"http://127.0.0.1:{port}", started)


def reclaims(worlds: list[World]) -> list[tuple[float, str, int, str, str | None]]:
    """Every worker.reclaimed line of every relay worker: (time, dead, count, reason, since)."""
    found = []
    for world in worlds:
        for log in world.cwd.glob("worker-*.log"):
            for stamp, dead, count, since, reason in _RECLAIMED.findall(log.read_text()):
                at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
                found.append((at.timestamp(), dead, int(count), reason.strip('"'), since or None))
    return sorted(found)


def settle_and_wait(worlds: list[World], timeout: float) -> list[dict[str, Any]]:
    """Wait until every stored message is final; returns what was pending every 5 s."""
    timeline: list[dict[str, Any]] = []
    started = time.monotonic()

    def final() -> bool:
        pending = {
            w.store: {s: n for s, n in w.outbox.counts().items() if s not in FINAL and n}
            for w in worlds
        }
        elapsed = time.monotonic() - started
        if not timeline or elapsed - timeline[-1]["at"] >= 5:
            timeline.append({"at": round(elapsed, 1), "pending": pending})
        return not any(pending.values())

    wait_until(final, timeout=timeout, interval=1.0, what="every stored message final")
    return timeline


def keep_events(worlds: list[World]) -> None:
    """The relay workers' event lines but the per-message ones, for reading a run later."""
    noise = ("smtp.reply", "delivery.delivered", "delivery.deferred", "doctor.check")
    with (ARTIFACTS / ("chaos-soak-events.log" if SOAK else "chaos-events.log")).open("w") as out:
        for world in worlds:
            for log in sorted(world.cwd.glob("*.log")):
                for line in log.read_text(errors="replace").splitlines():
                    if not any(word in line for word in noise):
                        out.write(f"{world.store}/{log.stem} {line}\n")


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": round(ordered[0], 2),
        "median": round(statistics.median(ordered), 2),
        "p95": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2),
        "max": round(ordered[-1], 2),
    }


def evidence(world: World, copies: Counter[str]) -> dict[str, Any]:
    """What became of the world's submissions, from its outbox and the MX."""
    rows = {row.subject: row for row in world.outbox.list_messages(limit=1_000_000)}
    accepted = world.tally.accepted
    lost = [
        s
        for s in accepted
        if s not in rows or rows[s].status != "delivered" or not copies[rows[s].message_id]
    ]
    duplicated = [row for row in rows.values() if copies[row.message_id] > 1]
    with world.outbox.engine.connect() as conn:
        outcomes = Counter(
            outcome for (outcome,) in conn.exec_driver_sql("SELECT outcome FROM attempts")
        )
    tally = world.tally
    return {
        "submissions": {
            "total": tally.total,
            "accepted": len(accepted),
            "refused_4xx": dict(tally.refused_4xx),
            "refused_503": tally.refused_503,
            "refused_503_without_retry_after": tally.refused_503_without_retry_after,
            "other_5xx": dict(tally.other_5xx),
            "no_answer": dict(tally.no_answer),
        },
        "stored": len(rows),
        "stored_not_acknowledged": len(set(rows) - set(accepted)),
        "statuses": dict(Counter(row.status for row in rows.values())),
        "accepted_delivered": len(accepted) - len(lost),
        "lost": lost,
        "duplicates_flagged": sum(1 for row in duplicated if row.possible_duplicate),
        "duplicates_unflagged": [row.id for row in duplicated if not row.possible_duplicate],
        "flagged_possible_duplicate": sum(1 for row in rows.values() if row.possible_duplicate),
        "attempts": dict(outcomes),
    }


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_chaos_soak_loses_nothing(
    database_url: str,
    relay_env: dict[str, str],
    private_postgres: PrivatePostgres,
    mx_handler: ChaosHandler,
    mx_server: SMTPPeer,
    workdir: Path,
    procs: list[Proc],
) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    worlds = [
        make_world("postgres", private_postgres.url, relay_env, workdir, procs, workers=2),
        make_world("sqlite", database_url, relay_env, workdir, procs, workers=1),
    ]
    try:
        _soak(worlds, private_postgres, procs, rng, mx_handler, mx_server, started)
    finally:
        for world in worlds:
            world.outbox.dispose()


def _soak(
    worlds: list[World],
    postgres: PrivatePostgres,
    procs: list[Proc],
    rng: random.Random,
    mx_handler: ChaosHandler,
    mx_server: SMTPPeer,
    started: float,
) -> None:
    for world in worlds:
        wait_until(lambda w=world: http_ready(f"{w.base}/healthz"), timeout=30, what="gunicorn")
    chaos = Chaos(worlds, postgres, procs, rng)
    loop = threading.Thread(target=chaos.run, name="chaos", daemon=True)
    stop = threading.Event()
    clients = [
        threading.Thread(
            target=submit, args=(world, random.Random(rng.random()), stop), name=f"client-{n}"
        )
        for world in worlds
        for n in range(CLIENTS[world.store])
    ]
    loop.start()
    for client in clients:
        client.start()
    try:
        for client in clients:
            client.join(timeout=1800)
    finally:
        stop.set()
        chaos.stop.set()
        loop.join(30)
    submitted = time.monotonic()
    chaos.settle()
    timeline = settle_and_wait(worlds, timeout=300 if SOAK else 120)
    drained = time.monotonic()
    ARTIFACTS.mkdir(exist_ok=True)
    keep_events(worlds)

    copies = Counter(message_id_of(r.data) for r in mx_server.messages)
    found = reclaims(worlds)
    for kill in chaos.kills:
        if kill.what != "relay":
            continue
        mine = [entry for entry in found if entry[1] == kill.worker and entry[0] >= kill.at - 0.05]
        if mine:
            kill.reclaimed_after = round(mine[0][0] - kill.at, 2)
            kill.reclaimed = sum(entry[2] for entry in mine)
            kill.reason = mine[0][3]
    pause_ends = chaos.pause.get("at", 0) + DEAD_AFTER + 3
    paused = [
        entry
        for entry in found
        if chaos.pause and entry[1] == chaos.pause["worker"] and entry[0] <= pause_ends
    ]
    if paused:
        chaos.pause["reclaimed_after"] = round(paused[0][0] - chaos.pause["at"], 2)
        chaos.pause["reclaimed"] = sum(entry[2] for entry in paused)
    relay_kills = [k for k in chaos.kills if k.what == "relay"]
    report = {
        "mode": "soak" if SOAK else "short",
        "seed": SEED,
        "seconds": {
            "submitting": round(submitted - started, 1),
            "draining": round(drained - submitted, 1),
        },
        "clients": dict(CLIENTS),
        "mx": {
            "received": len(mx_server.messages),
            "distinct_message_ids": len(copies),
            "greylisted": mx_handler.greylisted,
            "random_faults": dict(mx_handler.faults),
        },
        "stores": {world.store: evidence(world, copies) for world in worlds},
        "kills": {
            "gunicorn": sum(1 for k in chaos.kills if k.what == "gunicorn"),
            "relay": len(relay_kills),
            "relay_detail": [asdict(k) for k in relay_kills],
            "kill_to_reclaim_seconds": summary(
                [k.reclaimed_after for k in relay_kills if k.reclaimed_after is not None]
            ),
            "relay_kills_holding_nothing": sum(1 for k in relay_kills if not k.reclaimed),
        },
        "drain": timeline,
        "postgres_restart": chaos.pg_restart,
        "pause": {k: v for k, v in chaos.pause.items() if k != "resume_at"},
    }
    name = "chaos-soak.json" if SOAK else "chaos.json"
    (ARTIFACTS / name).write_text(json.dumps(report, indent=2, default=str) + "\n")

    assert not chaos.errors, chaos.errors
    stores = report["stores"]
    assert sum(s["submissions"]["total"] for s in stores.values()) >= sum(SUBMISSIONS.values())
    for store, seen in stores.items():
        assert seen["submissions"]["other_5xx"] == {}, (store, seen["submissions"])
        assert seen["submissions"]["refused_4xx"] == {}, (store, seen["submissions"])
        assert seen["submissions"]["refused_503_without_retry_after"] == 0
        assert seen["lost"] == [], (store, seen["lost"][:10])
        assert seen["duplicates_unflagged"] == [], (store, seen["duplicates_unflagged"][:10])
        assert seen["statuses"].keys() == {"delivered"}, seen["statuses"]
    assert report["mx"]["distinct_message_ids"] == sum(s["stored"] for s in stores.values())
    assert chaos.pg_restart, "PostgreSQL was not restarted"
    assert report["kills"]["gunicorn"] >= 1
    assert relay_kills, "no relay worker was killed"
    for kill in relay_kills:
        if kill.reclaimed_after is not None:
            # Reclaimed at the next start on this host or by a sibling's beat, at the latest
            # after DEAD_AFTER once the restart came: never the 300 s lease.
            assert kill.reclaimed_after < RESTART_AFTER[1] + DEAD_AFTER + 10, asdict(kill)
