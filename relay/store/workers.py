"""The registry of delivery workers: who runs, where, since when, their last heartbeat and what
they hold.

A lease belongs to a worker. Each worker registers, then beats every few seconds; one beat
renews its row and the lease of every message it is working on, and tells it which of those
it lost (their fencing token, `messages.claim_token`, is no longer the one it holds: another
worker reclaimed the message while this one was silent). `Outbox.claim` reclaims at once the
messages of a worker whose last beat is older than RELAY_WORKER_DEAD_AFTER or that
deregistered; the lease's own expiry stays the bound for an owner that never registered.

A worker's row names its node (boot id and PID namespace): on the same node a beat can ask the
kernel whether a sibling's process still exists, so a worker killed and restarted at once
(systemd, a crash loop) has its messages back in seconds instead of waiting for its heartbeat
to go stale. Nothing but the same node is ever judged that way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from relay.errors import StoreError
from relay.logs import event
from relay.store.engine import Database, replayed
from relay.store.schema import messages, workers

log = logging.getLogger("relay.outbox")

PRUNE_AFTER = timedelta(days=7)  # rows of workers gone this long (holding nothing) are dropped
PROCESS_GONE = "process gone"

State = Literal["live", "dead", "stopped"]


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself when it registers."""

    id: str
    host: str
    node: str  # "" when unknown: its pid is then never checked by a sibling
    pid: int
    version: str
    concurrency: int


@dataclass(frozen=True)
class Reaped:
    """A worker on this node whose process no longer exists."""

    id: str
    pid: int
    since_beat: float


@dataclass(frozen=True)
class Beat:
    """What one heartbeat learnt."""

    lost: frozenset[str]  # held messages whose lease is no longer this worker's
    since_beat: float | None  # seconds since the previous beat the store had (None: no row)
    given_up: bool  # the row said stopped (a sibling judged the process gone) or was missing
    reaped: tuple[Reaped, ...] = ()
    strays: Mapping[str, int] = field(default_factory=dict)  # leased to us, not held: id -> token


@dataclass(frozen=True)
class WorkerRow:
    id: str
    host: str
    node: str
    pid: int
    version: str
    concurrency: int
    started_at: datetime
    beat_at: datetime
    stopped_at: datetime | None
    stop_reason: str | None
    holds: tuple[str, ...] = ()

    def since_beat(self, now: datetime) -> float:
        return (now - self.beat_at).total_seconds()

    def state(self, now: datetime, dead_after: float) -> State:
        if self.stopped_at is not None:
            return "stopped"
        return "dead" if self.since_beat(now) > dead_after else "live"

    def as_dict(self, now: datetime, dead_after: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "concurrency": self.concurrency,
            "state": self.state(now, dead_after),
            "started_at": self.started_at.isoformat(),
            "beat_at": self.beat_at.isoformat(),
            "since_beat_seconds": round(self.since_beat(now), 1),
            "stopped_at": self.stopped_at.isoformat() if self.stopped_at else None,
            "stop_reason": self.stop_reason,
            "holds": list(self.holds),
        }


def dead_clause(now: datetime, dead_after: float) -> sa.ColumnElement[bool]:
    """A worker row whose leases may be taken: deregistered, or silent for `dead_after`."""
    w = workers.c
    return w.stopped_at.is_not(None) | (w.beat_at < now - timedelta(seconds=dead_after))


class Registry:
    """The workers table of one store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @replayed
    def register(
        self, info: WorkerInfo, *, alive: Callable[[int], bool] | None = None
    ) -> tuple[Reaped, ...]:
        """Insert (or renew) this worker's row, drop rows long gone, and mark the dead
        siblings on this node stopped (`alive(pid)` asks the kernel); returns those."""
        now = self.db.clock()
        with self.db.tx() as conn:
            self._upsert(conn, info, now, fresh=True)
            self._prune(conn, now)
            return self._reap(conn, info, now, alive) if alive is not None else ()

    @replayed
    def beat(
        self,
        info: WorkerInfo,
        held: Mapping[str, int],
        lease_seconds: float,
        *,
        alive: Callable[[int], bool] | None = None,
        strays_after: float | None = None,
    ) -> Beat:
        """One heartbeat: this worker's row, then the lease of each held message (id ->
        claim token), in one transaction. Returns the held ids another claim took, and (with
        `strays_after`) the messages leased to it for that long that it does not hold: a
        claim whose reply was lost, an outcome the store never took."""
        now = self.db.clock()
        w, m = workers.c, messages.c
        with self.db.tx() as conn:
            previous = conn.execute(
                sa.select(w.beat_at, w.stopped_at).where(w.id == info.id)
            ).first()
            self._upsert(conn, info, now, fresh=previous is None)
            renewed: set[tuple[str, int]] = set()
            taken: set[str] = set()
            if held:
                expires = now + timedelta(seconds=lease_seconds)
                rows = conn.execute(
                    messages.update()
                    .where(
                        sa.tuple_(m.id, m.claim_token).in_(list(held.items())),
                        m.lease_owner == info.id,
                        m.status == "sending",
                    )
                    .values(lease_expires_at=expires, next_attempt_at=expires)
                    .returning(m.id, m.claim_token)
                ).all()
                renewed = {(row.id, int(row.claim_token)) for row in rows}
                taken = self._taken(conn, {i: t for i, t in held.items() if (i, t) not in renewed})
            reaped = self._reap(conn, info, now, alive) if alive is not None else ()
            strays: dict[str, int] = {}
            if strays_after is not None:
                query = sa.select(m.id, m.claim_token).where(
                    m.lease_owner == info.id,
                    m.status == "sending",
                    m.claimed_at < now - timedelta(seconds=strays_after),
                )
                if held:
                    query = query.where(m.id.not_in(list(held)))
                strays = {row.id: int(row.claim_token) for row in conn.execute(query)}
        lost = frozenset(taken)
        since = (now - previous.beat_at).total_seconds() if previous is not None else None
        given_up = previous is None or previous.stopped_at is not None
        return Beat(lost, since, given_up, reaped, strays)

    @replayed
    def deregister(self, worker_id: str, reason: str = "stopped") -> bool:
        """Mark this worker stopped: whatever it still holds is reclaimable at once."""
        now = self.db.clock()
        w = workers.c
        with self.db.tx() as conn:
            result = conn.execute(
                workers.update()
                .where(w.id == worker_id, w.stopped_at.is_(None))
                .values(stopped_at=now, stop_reason=reason)
            )
        return bool(result.rowcount)

    @replayed
    def list_workers(self, *, since: timedelta | None = None) -> list[WorkerRow]:
        """Every worker that beat within `since` (all when None), each with the ids of the
        messages it holds; latest beat first."""
        w, m = workers.c, messages.c
        query = sa.select(workers).order_by(w.beat_at.desc(), w.id)
        if since is not None:
            query = query.where(w.beat_at >= self.db.clock() - since)
        with self.db.tx() as conn:
            rows = conn.execute(query).all()
            held = conn.execute(
                sa.select(m.lease_owner, m.id)
                .where(m.status == "sending", m.lease_owner.in_([r.id for r in rows]))
                .order_by(m.claimed_at)
            ).all()
        holds: dict[str, list[str]] = {}
        for owner, message in held:
            holds.setdefault(owner, []).append(message)
        return [WorkerRow(**dict(row._mapping), holds=tuple(holds.get(row.id, ()))) for row in rows]

    @replayed
    def latest_beat(self) -> WorkerRow | None:
        """The running (not deregistered) worker that beat last, if any."""
        w = workers.c
        with self.db.tx() as conn:
            row = conn.execute(
                sa.select(workers).where(w.stopped_at.is_(None)).order_by(w.beat_at.desc()).limit(1)
            ).first()
        return WorkerRow(**dict(row._mapping)) if row is not None else None

    @replayed
    def beats_of(self, ids: Sequence[str]) -> dict[str, WorkerRow]:
        if not ids:
            return {}
        with self.db.tx() as conn:
            rows = conn.execute(sa.select(workers).where(workers.c.id.in_(list(ids)))).all()
        return {row.id: WorkerRow(**dict(row._mapping)) for row in rows}

    def log_reclaimed(
        self, claimer: str, rows: Sequence[Any], now: datetime, dead_after: float | None
    ) -> None:
        """`worker.reclaimed`, one line per worker that lost messages to a claim: which, how
        long after its last heartbeat, and why (stopped, process gone, no heartbeat, or only
        the lease's expiry). Rows the claim took from a dead worker carry what the claim saw
        of it (`owner_beat_at`, ...); for the others the registry is read now."""
        by_owner: dict[str, list[str]] = {}
        seen: dict[str, tuple[datetime, datetime | None, str | None]] = {}
        for row in rows:
            owner = row.lease_owner or "-"
            by_owner.setdefault(owner, []).append(row.id)
            fields = row._mapping
            if fields.get("owner_beat_at") is not None:
                seen[owner] = (
                    fields["owner_beat_at"],
                    fields["owner_stopped_at"],
                    fields["owner_stop_reason"],
                )
        unknown = [owner for owner in by_owner if owner not in seen]
        try:
            later = self.beats_of(unknown)
        except StoreError:  # only the log line's detail: the claim is committed
            later = {}
        for owner, row in later.items():
            seen[owner] = (row.beat_at, row.stopped_at, row.stop_reason)
        for dead, ids in by_owner.items():
            known = seen.get(dead)
            since = round((now - known[0]).total_seconds(), 1) if known is not None else None
            if known is not None and known[1] is not None:
                why = known[2] or "stopped"
            elif since is not None and dead_after is not None and since > dead_after:
                why = "no heartbeat"
            else:
                why = "lease expired"
            event(
                log,
                "worker.reclaimed",
                logging.WARNING,
                worker=claimer,
                dead=dead,
                ids=",".join(ids),
                count=len(ids),
                since_beat=since,
                reason=why,
            )

    # --- inside a transaction ---

    def _upsert(self, conn: Connection, info: WorkerInfo, now: datetime, *, fresh: bool) -> None:
        values: dict[str, Any] = {
            "host": info.host[:255],
            "node": info.node[:128],
            "pid": info.pid,
            "version": info.version[:32],
            "concurrency": info.concurrency,
            "beat_at": now,
            "stopped_at": None,
            "stop_reason": None,
        }
        if fresh:
            values["started_at"] = now
        updated = conn.execute(
            workers.update().where(workers.c.id == info.id).values(**values)
        ).rowcount
        if not updated:
            conn.execute(workers.insert().values({"started_at": now, **values, "id": info.id}))

    def _taken(self, conn: Connection, unrenewed: Mapping[str, int]) -> set[str]:
        """Of held messages the renewal missed, those another claim took (their token moved
        on, or they are gone); the others only ended, their outcome committed by this
        worker's writer while the beat ran."""
        if not unrenewed:
            return set()
        m = messages.c
        rows = conn.execute(sa.select(m.id, m.claim_token).where(m.id.in_(list(unrenewed))))
        tokens = {row.id: int(row.claim_token) for row in rows}
        return {i for i, token in unrenewed.items() if tokens.get(i) != token}

    def _prune(self, conn: Connection, now: datetime) -> None:
        w, m = workers.c, messages.c
        holding = sa.exists().where(m.lease_owner == w.id, m.status == "sending")
        conn.execute(
            workers.delete().where(
                sa.func.coalesce(w.stopped_at, w.beat_at) < now - PRUNE_AFTER, ~holding
            )
        )

    def _reap(
        self, conn: Connection, info: WorkerInfo, now: datetime, alive: Callable[[int], bool]
    ) -> tuple[Reaped, ...]:
        """Siblings on this node (same boot, same PID namespace) whose process is gone."""
        if not info.node:
            return ()
        w = workers.c
        siblings = conn.execute(
            sa.select(w.id, w.pid, w.beat_at).where(
                w.node == info.node, w.id != info.id, w.stopped_at.is_(None)
            )
        ).all()
        reaped = tuple(
            Reaped(row.id, int(row.pid), (now - row.beat_at).total_seconds())
            for row in siblings
            if not alive(int(row.pid))
        )
        if reaped:
            conn.execute(
                workers.update()
                .where(w.id.in_([r.id for r in reaped]), w.stopped_at.is_(None))
                .values(stopped_at=now, stop_reason=PROCESS_GONE)
            )
        return reaped
