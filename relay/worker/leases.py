"""The messages one worker holds, and the heartbeat that keeps them its own.

A lease belongs to a worker (relay.store.workers). Every few seconds one beat renews the
worker's row and the lease of every message it holds, whatever each attempt is doing, so a
live worker's slow delivery (an SMTP DATA phase of minutes) is never taken from it; a worker
that stops beating for RELAY_WORKER_DEAD_AFTER has its messages reclaimed by another.

The race this guards against is a worker that was paused, not dead (SIGSTOP, a long GC or VM
pause): its beats stopped, its messages went to another worker, then it resumes in the middle
of their attempts. Each claim carries a fencing token, and the store takes nothing from a
claim that is no longer the message's (relay.store.outbox). The worker learns at its next
beat which leases it lost; an attempt that has not sent the final dot yet is cut off there and
then. Before any final dot the attempt also asks `before_dot`: if the store has not
confirmed its lease within half of min(DEAD_AFTER, LEASE), it beats first, and sends the dot
only if the lease is still its own. What that cannot cover (a pause between the check and the
write, or an attempt already past the dot) is recorded when it ends: a delivery by a claim that
lost the message is stored, flagged as a possible duplicate and logged `delivery.lease_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from relay.errors import StoreUnavailable
from relay.logs import event
from relay.store.outbox import Outbox
from relay.store.records import Claimed
from relay.store.workers import Beat, Reaped, WorkerInfo

log = logging.getLogger("relay.worker")


def node_identity() -> str:
    """This boot and PID namespace: workers that share it can check each other's pid. Empty
    where /proc cannot say (then no sibling ever judges this worker by its pid)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def process_alive(pid: int) -> bool:
    """Whether `pid` (on this node) is a process that has not exited; a zombie has."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def package_version() -> str:
    try:
        return metadata.version("formrelay")
    except metadata.PackageNotFoundError:
        return "unknown"


def worker_info(worker_id: str, concurrency: int) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id,
        host=socket.gethostname(),
        node=node_identity(),
        pid=os.getpid(),
        version=package_version(),
        concurrency=concurrency,
    )


@dataclass(eq=False)
class Held:
    """One claimed message as this worker holds it."""

    item: Claimed
    confirmed: float  # time.monotonic() when the store last confirmed the lease
    gated: bool  # its delivery awaits before_dot, so `sent` is known
    task: asyncio.Task[None] | None = None
    sent: bool = False  # the final dot may have been written
    delivering: bool = True  # the delivery has not returned yet
    lost: bool = False  # the store says another claim holds the message now
    cut: str | None = None  # why the attempt was cut off

    @property
    def maybe_sent(self) -> bool:
        return self.sent or not self.gated

    @property
    def claim(self) -> dict[str, int]:
        return {self.item.id: self.item.token}


class Leases:
    """This worker's registration, its heartbeat and the leases it holds."""

    def __init__(
        self,
        outbox: Outbox,
        info: WorkerInfo,
        *,
        lease: float,
        dead_after: float,
        interval: float,
        alive: Callable[[int], bool] | None = process_alive,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.on_beat = on_beat  # after each beat the store took (the heartbeat metric)
        self.registry = outbox.workers
        self.info = info
        self.lease = lease
        self.dead_after = dead_after
        self.interval = interval
        # Past this age a lease is confirmed again before a final dot: well inside the
        # smaller of the two bounds another worker goes by, less a margin for clock skew.
        self.confirm_window = min(dead_after, lease) / 2
        self.alive = alive
        self.held: dict[str, Held] = {}
        self.registered = False
        self.released: list[str] = []  # handed back at stop (the worker.released line)
        self.claiming = 0  # claims in flight: what they take is not held yet
        self._unreleased: dict[str, tuple[int, bool]] = {}  # id -> (token, maybe sent)
        self._lock: asyncio.Lock | None = None

    def __len__(self) -> int:
        return len(self.held)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [h.task for h in self.held.values() if h.task is not None]

    # --- registration ---

    async def register(self) -> None:
        """Raises StoreUnavailable; the claim loop retries with its backoff."""
        reaped = await asyncio.to_thread(self.registry.register, self.info, alive=self.alive)
        self.registered = True
        if self.on_beat is not None:  # registering is the first beat
            self.on_beat()
        info = self.info
        event(
            log,
            "worker.registered",
            id=info.id,
            host=info.host,
            pid=info.pid,
            version=info.version,
            concurrency=info.concurrency,
            dead_after=int(self.dead_after),
        )
        self._log_reaped(reaped)

    async def deregister(self) -> None:
        if not self.registered:
            return
        try:
            await asyncio.to_thread(self.registry.deregister, self.info.id)
        except StoreUnavailable as exc:
            event(log, "worker.deregister_failed", logging.WARNING, id=self.info.id, error=str(exc))
            return
        self.registered = False
        event(log, "worker.deregistered", id=self.info.id, unreleased=len(self._unreleased) or None)

    # --- holding ---

    def hold(self, item: Claimed, *, confirmed: float, gated: bool) -> Held:
        """A message just claimed. If this worker already works on it, that attempt's claim
        is gone (the store gave the message out again): it is treated as lost."""
        previous = self.held.get(item.id)
        if previous is not None:
            self.lose(previous)
        held = Held(item, confirmed, gated)
        self.held[item.id] = held
        return held

    def forget(self, held: Held) -> None:
        if self.held.get(held.item.id) is held:
            del self.held[held.item.id]

    def lose(self, held: Held) -> bool:
        """The store says another claim holds this message: cut the attempt off if it has
        not written the final dot (True), else let it end and be recorded as stale."""
        if held.lost:
            return False
        held.lost = True
        if held.gated and not held.sent and held.delivering and held.task is not None:
            held.cut = "lease_lost"
            held.task.cancel()
            return True
        return False

    # --- the heartbeat ---

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.registered:
                await self.beat()

    async def beat(self, fresh_enough: Callable[[], bool] | None = None) -> bool:
        """One beat; False when the store did not answer. `fresh_enough`: skip the beat if
        it holds by the time the previous one is over."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if fresh_enough is not None and fresh_enough():
                return True
            held = dict(self.held)
            started = time.monotonic()
            try:
                beat = await asyncio.to_thread(
                    self.registry.beat,
                    self.info,
                    {key: h.item.token for key, h in held.items()},
                    self.lease,
                    alive=self.alive,
                    strays_after=None if self.claiming else self.dead_after,
                )
            except StoreUnavailable as exc:
                event(log, "worker.heartbeat_failed", logging.WARNING, error=str(exc))
                return False
            self._learn(beat, held, started)
        if self.on_beat is not None:
            self.on_beat()
        await self._hand_back(beat.strays)
        await self.release_leftovers()
        return True

    async def _hand_back(self, strays: Mapping[str, int]) -> None:
        """Messages leased to this worker that it does not work on (a claim that committed
        but whose reply was lost, an outcome the store refused three times): due again now,
        as interrupted attempts that may have been sent, instead of after their lease."""
        if not strays:
            return
        try:
            await asyncio.to_thread(
                self.outbox.release, self.info.id, strays, started=True, sent=True
            )
        except StoreUnavailable:
            return
        event(
            log,
            "worker.released",
            logging.WARNING,
            id=self.info.id,
            count=len(strays),
            ids=",".join(sorted(strays)),
            reason="not_held",
        )

    def _learn(self, beat: Beat, held: dict[str, Held], started: float) -> None:
        cut_off = finishing = 0
        news = sorted(key for key in beat.lost if not held[key].lost)  # not reported before
        for key, h in held.items():
            if key not in beat.lost:
                h.confirmed = max(h.confirmed, started)
            elif h.lost:
                continue
            elif self.lose(h):
                cut_off += 1
            else:
                finishing += 1
        since = round(beat.since_beat, 1) if beat.since_beat is not None else None
        if beat.given_up or (since is not None and since > self.dead_after):
            event(
                log,
                "worker.heartbeat_late",
                logging.WARNING,
                id=self.info.id,
                since_beat=since,
                dead_after=int(self.dead_after),
                given_up=True if beat.given_up else None,
                lost=len(news),
            )
        if news:
            event(
                log,
                "worker.leases_lost",
                logging.WARNING,
                id=self.info.id,
                ids=",".join(news),
                cut_off=cut_off,
                finishing=finishing,
                since_beat=since,
            )
        self._log_reaped(beat.reaped)

    def _log_reaped(self, reaped: Sequence[Reaped]) -> None:
        for dead in reaped:
            event(
                log,
                "worker.dead",
                logging.WARNING,
                dead=dead.id,
                pid=dead.pid,
                since_beat=round(dead.since_beat, 1),
                reason="process gone",
                by=self.info.id,
            )

    # --- the final dot ---

    async def before_dot(self, held: Held) -> None:
        """Awaited just before the final dot: returns when the lease is this claim's, else
        cancels the attempt (cut off: the server never gets the whole message)."""
        if not held.lost and time.monotonic() - held.confirmed >= self.confirm_window:
            await self._confirm(held)
        if held.lost or held.cut:
            held.cut = held.cut or "lease_lost"
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the cancellation lands here
        held.sent = True

    async def _confirm(self, held: Held) -> None:
        """Beat until the store confirms this lease or says it is lost; if the store stays
        silent for DEAD_AFTER, give up the attempt (another worker may hold it by then)."""
        deadline = time.monotonic() + self.dead_after

        def fresh() -> bool:
            return time.monotonic() - held.confirmed < self.confirm_window

        while not held.lost and not fresh():
            if await self.beat(fresh_enough=fresh):
                continue
            if time.monotonic() >= deadline:
                held.cut = "lease_unconfirmed"
                return
            await asyncio.sleep(min(1.0, self.interval))

    # --- cut off ---

    async def cut_off(self, held: Held) -> None:
        """The attempt was cancelled (stop timeout, lease lost, or not confirmed): hand the
        message back unless another claim holds it already, and say so."""
        item = held.item
        released = None
        if not held.lost:
            released = await self._release(held)
            if released and held.cut == "stop_timeout":
                self.released.append(item.id)
        event(
            log,
            "delivery.interrupted",
            logging.WARNING,
            id=item.id,
            attempt=item.attempt,
            reason=held.cut or "cancelled",
            sent=int(held.maybe_sent),
            released=None if released is None else int(released),
        )

    async def _release(self, held: Held) -> bool:
        try:
            await asyncio.shield(
                asyncio.to_thread(
                    self.outbox.release,
                    self.info.id,
                    held.claim,
                    started=True,
                    sent=held.maybe_sent,
                )
            )
        except Exception:  # StoreUnavailable: released after the next beat that works
            self._unreleased[held.item.id] = (held.item.token, held.maybe_sent)
            return False
        return True

    async def release_leftovers(self) -> None:
        """Hand back what a cut-off attempt could not (the store was down then)."""
        for key, (token, sent) in list(self._unreleased.items()):
            with contextlib.suppress(StoreUnavailable):
                await asyncio.to_thread(
                    self.outbox.release, self.info.id, {key: token}, started=True, sent=sent
                )
                del self._unreleased[key]
