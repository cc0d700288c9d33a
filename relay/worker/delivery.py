"""The delivery worker: claims due messages from the outbox, signs and delivers them.

One asyncio loop runs up to `settings.worker_concurrency` attempts at once. Database calls are
blocking SQLAlchemy calls run in threads (`asyncio.to_thread`), which keeps one code path for
the web (sync Flask) and the worker. The worker registers in the store and holds each message
under a lease that its heartbeat renews (relay.worker.leases); a worker that stops beating for
RELAY_WORKER_DEAD_AFTER has its messages claimed again by another, and one that resumes
after such a pause learns at its next beat what it lost.

Outcomes are committed in groups (relay.worker.outcomes). `stop()` ends the loop gracefully:
no more claims, the attempts in flight get RELAY_WORKER_STOP_TIMEOUT to finish, what is left
is handed back due now (so another worker takes it at once), the idle SMTP sessions are QUIT
and the worker deregisters (relay.worker.service wires it to SIGTERM/SIGINT).

The message is signed at every attempt, so a key rotation applies to queued mail; the
Message-ID never changes between attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from relay.alerts import Dispatcher
from relay.errors import RelayError, StoreUnavailable
from relay.logs import event
from relay.mail import smtp
from relay.mail.attempt import AttemptResult, reply_fields
from relay.mail.mx import make_resolver
from relay.mail.send import DeliverFn, GatedDeliverFn, sign_and_deliver
from relay.mail.sessions import SessionCache
from relay.mail.signing import Signer
from relay.metrics import Metrics, reply_class
from relay.settings import Settings
from relay.store.notify import Listener
from relay.store.outbox import Outbox
from relay.store.records import Claimed, Finished
from relay.store.retry import Decision, RetryPolicy
from relay.worker.leases import Held, Leases, process_alive, worker_info
from relay.worker.outcomes import OutcomeWriter

log = logging.getLogger("relay.worker")


def default_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Delivers what the outbox holds. `stop()` ends `run()` gracefully.

    `deliver` replaces the SMTP delivery (tests script it; such a delivery is never asked
    before its final dot, so a cut-off attempt counts as possibly sent); `gated_deliver` is
    one that awaits `before_dot` as relay.mail.smtp.deliver does."""

    def __init__(
        self,
        outbox: Outbox,
        settings: Settings,
        *,
        deliver: DeliverFn | None = None,
        gated_deliver: GatedDeliverFn | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        resolver: Any = None,
        worker_id: str | None = None,
        poll_interval: float = 0.5,
        shutdown_grace: float | None = None,
        heartbeat_interval: float | None = None,
        claim_coalesce: float = 0.015,
        record_window: float = 0.005,
        metrics: Metrics | None = None,
        alerts: Dispatcher | None = None,
        alive: Callable[[int], bool] | None = process_alive,
        purpose: str | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings)
        self.id = worker_id or default_worker_id()
        self.poll_interval = poll_interval
        self.shutdown_grace = (
            float(settings.worker_stop_timeout) if shutdown_grace is None else shutdown_grace
        )
        self.lease = float(settings.worker_lease)
        self.dead_after = float(settings.worker_dead_after)
        self.heartbeat_interval = heartbeat_interval or max(
            1.0, min(self.dead_after, self.lease) / 3
        )
        self.claim_coalesce = claim_coalesce
        self.metrics = metrics or Metrics()
        self.leases = Leases(
            outbox,
            worker_info(self.id, settings.worker_concurrency),
            lease=self.lease,
            dead_after=self.dead_after,
            interval=self.heartbeat_interval,
            alive=alive,
            on_beat=self.metrics.heartbeat,
        )
        self._deliver = deliver
        self._gated = gated_deliver
        self._sign = sign
        self._resolver = resolver
        self._sessions: SessionCache | None = None  # with the real deliver only
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self.listening: asyncio.Event | None = None
        self.claims = 0  # claim queries made: lets tests know the loop went idle
        self.attempts_made = 0
        self.record_window = record_window
        self._writer: OutcomeWriter | None = None  # made by run(), in its loop
        self.alerts = alerts  # runs beside delivery, never in its way
        self.purpose = purpose  # claim only messages of this purpose (deliver_alert_mail)

    @property
    def record_commits(self) -> int:
        """Transactions that recorded outcomes (tests: batching)."""
        return self._writer.commits if self._writer is not None else 0

    # --- the real collaborators, built on first use ---

    def _deliver_for(self, held: Held) -> DeliverFn:
        """The delivery of one attempt: the injected one, or SMTP asking `before_dot`."""
        if self._deliver is not None:
            return self._deliver
        if self._gated is None:
            self._sessions = SessionCache(max_idle=self.settings.worker_concurrency)
            real = functools.partial(smtp.deliver, sessions=self._sessions)
            self._gated = cast(GatedDeliverFn, real)
        before_dot = functools.partial(self.leases.before_dot, held)
        return cast(DeliverFn, functools.partial(self._gated, before_dot=before_dot))

    def _sign_fn(self) -> Callable[[bytes], bytes]:
        if self._sign is None:
            self._sign = Signer.from_settings(self.settings).sign
        return self._sign

    def _resolver_obj(self) -> Any:
        if self._resolver is None:
            self._resolver = make_resolver(self.settings)
        return self._resolver

    # --- control ---

    def stop(self) -> None:
        """Stop claiming; what is in flight finishes (bounded by `shutdown_grace`)."""
        if self._stop is not None:
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def run(self, *, once: bool = False) -> None:
        """Claim and deliver until stopped; with `once`, until nothing is due any more."""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._writer = OutcomeWriter(
            self.outbox,
            self.id,
            self.policy,
            window=self.record_window,
            in_flight=lambda: len(self.leases),
        )
        self.listening = asyncio.Event()
        concurrency = self.settings.worker_concurrency
        event(
            log,
            "worker.started",
            id=self.id,
            concurrency=concurrency,
            lease=int(self.lease),
            dead_after=int(self.dead_after),
        )
        heartbeat = asyncio.create_task(self.leases.run())
        listener = asyncio.create_task(self._listen())
        writer = asyncio.create_task(self._writer.run())
        alerting = asyncio.create_task(
            self.alerts.run(self._stop) if self.alerts and not once else asyncio.sleep(0)
        )
        failures = 0
        try:
            while not self._stop.is_set():
                free = concurrency - len(self.leases)
                claimed: list[Held] = []
                timeout: float | None = self.poll_interval
                if free > 0 or not self.leases.registered:
                    self._wake.clear()  # this claim sees whatever was notified until now
                    try:
                        claimed = await self._claim(free)
                        failures = 0
                    except StoreUnavailable as exc:
                        if once:
                            raise
                        failures += 1
                        timeout = min(30.0, self.poll_interval * 2**failures)
                        event(
                            log,
                            "worker.store_unavailable",
                            logging.WARNING,
                            error=str(exc),
                            retry_in=round(timeout, 1),
                        )
                self.claims += 1
                for held in claimed:
                    self._start(held)
                if once and not claimed and not self.leases.held:
                    break
                if len(claimed) == free or (once and self.leases.held):
                    timeout = None  # every slot is busy (or nothing more is due): wait for one
                # Wake when an attempt ends, on stop, on a NOTIFY (if a slot is free for what
                # it announces), or after a short poll.
                await self._wait_for(timeout, wake=len(self.leases) < concurrency)
                if failures == 0:
                    await self._coalesce(concurrency)
        finally:
            await self._shut_down(writer, heartbeat, listener, alerting, once=once)

    async def _claim(self, free: int) -> list[Held]:
        """Register first (a lease always belongs to a registered worker), then claim."""
        if not self.leases.registered:
            await self.leases.register()
        if free <= 0:
            return []
        started = time.monotonic()
        self.leases.claiming += 1
        try:
            items = await asyncio.to_thread(
                self.outbox.claim,
                self.id,
                free,
                self.lease,
                give_up=self.policy.give_up,
                dead_after=self.dead_after,
                purpose=self.purpose,
            )
        finally:
            self.leases.claiming -= 1
        gated = self._deliver is None
        return [self.leases.hold(item, confirmed=started, gated=gated) for item in items]

    async def _shut_down(self, *tasks: asyncio.Task[None], once: bool) -> None:
        """Finish or hand back what is in flight, commit what ended, QUIT the idle sessions,
        (with `once`, send the alerts due) then stop beating and deregister (in that order: a
        beat would register again)."""
        writer, heartbeat, listener, alerting = tasks
        if self.stopping:
            event(
                log,
                "worker.stopping",
                id=self.id,
                in_flight=len(self.leases),
                timeout=round(self.shutdown_grace, 1),
            )
        await self._drain()
        if self._sessions is not None:
            await self._sessions.close()  # QUIT the idle SMTP sessions
        assert self._writer is not None
        await self._writer.close(writer)
        await self.leases.release_leftovers()
        if once and self.alerts is not None:
            await self._alerts_once()
        for task in (heartbeat, listener, alerting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.leases.deregister()
        event(log, "worker.stopped", id=self.id, attempts=self.attempts_made)

    async def _alerts_once(self) -> None:
        """`--once`: one round of alerts after the deliveries (its failures only logged)."""
        assert self.alerts is not None
        try:
            await self.alerts.tick(all_rules=True)
        except Exception as exc:
            event(log, "alert.tick_failed", logging.WARNING, error=repr(exc))

    async def _wait_for(self, timeout: float | None, *, wake: bool) -> None:
        """Until an attempt ends, stop() is called, (with `wake`) a NOTIFY, or the timeout."""
        assert self._stop is not None
        assert self._wake is not None
        waiters: set[asyncio.Future[Any]] = set(self.leases.tasks())
        signals = [asyncio.ensure_future(self._stop.wait())]
        if wake:
            signals.append(asyncio.ensure_future(self._wake.wait()))
        waiters.update(signals)
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in signals:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter

    async def _coalesce(self, concurrency: int) -> None:
        """Let freed slots add up before the next claim, so one claim transaction takes
        several messages: claim at once when half the slots are free or nothing is in
        flight (a slot never idles while there is work and nothing else to wait for),
        otherwise after at most `claim_coalesce` seconds."""
        wanted = (concurrency + 1) // 2
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.claim_coalesce
        while (
            self.leases.held
            and concurrency - len(self.leases) < wanted
            and not self.stopping
            and (remaining := deadline - loop.time()) > 0
        ):
            await self._wait_for(remaining, wake=False)

    def _start(self, held: Held) -> None:
        task = asyncio.create_task(self._attempt(held), name=f"deliver-{held.item.id}")
        held.task = task

        def forget(_task: asyncio.Task[None]) -> None:
            self.leases.forget(held)

        task.add_done_callback(forget)

    async def _drain(self) -> None:
        """Let attempts in flight finish; past the grace period cut them off and hand them
        back due now (recorded as interrupted; a possible duplicate only if the final dot
        may have been sent)."""
        tasks = self.leases.tasks()
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for held in list(self.leases.held.values()):
            if held.task in pending:
                held.cut = held.cut or "stop_timeout"
                held.task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        released = self.leases.released
        if released:
            event(
                log,
                "worker.released",
                id=self.id,
                count=len(released),
                ids=",".join(released),
                reason="stop_timeout",
            )

    async def _listen(self) -> None:
        """PostgreSQL: wake the claim loop as soon as mail is queued (enqueue and retry NOTIFY
        at commit). Purely a shortcut: the short poll stays, so a lost listener loses nothing."""
        assert self.listening is not None
        async for _notified in Listener(self.outbox.url, listening=self.listening):
            if self._wake is not None:
                self._wake.set()

    # --- one attempt ---

    async def _attempt(self, held: Held) -> None:
        item = held.item
        started = self.outbox.clock()
        self.attempts_made += 1
        try:
            result = await self._sign_and_deliver(held)
        except asyncio.CancelledError:
            await self.leases.cut_off(held)
            raise
        held.delivering = False
        assert self._writer is not None
        finished = Finished(item, result, started, self.outbox.clock())

        def late(decision: Decision) -> None:  # cut off while waiting, committed after all
            if decision.applied:
                self._log_outcome(item, result, decision)

        decision = await self._writer.record(finished, late=late)
        self._count(item, result, decision)
        if decision is not None and decision.applied:
            self._log_outcome(item, result, decision)

    def _count(self, item: Claimed, result: AttemptResult, decision: Decision | None) -> None:
        """Every attempt by outcome and reply class; a recorded delivery's latency."""
        self.metrics.attempts.labels(result.outcome, reply_class(reply_fields(result).code)).inc()
        if decision is not None and decision.applied and decision.status == "delivered":
            latency = (self.outbox.clock() - item.created_at).total_seconds()
            self.metrics.latency.observe(max(0.0, latency))

    async def _sign_and_deliver(self, held: Held) -> AttemptResult:
        item = held.item
        result = await sign_and_deliver(
            item.body,
            recipient=item.recipient,
            envelope_from=item.envelope_from,
            sign=self._sign_fn(),
            deliver=self._deliver_for(held),
            settings=self.settings,
            resolver=self._resolver_obj(),
        )
        if result.local:
            if isinstance(result.error, RelayError):
                event(
                    log, "delivery.local_error", logging.ERROR, id=item.id, error=str(result.error)
                )
            else:  # a bug: its traceback goes to the log
                log.error("delivery.crashed id=%s", item.id, exc_info=result.error)
        return result

    def _log_outcome(self, item: Claimed, result: AttemptResult, decision: Decision) -> None:
        reply = reply_fields(result)
        fields: dict[str, Any] = {
            "id": item.id,
            "message_id": item.message_id,
            "attempt": item.attempt,
            "code": reply.code,
            "status": reply.enhanced_status,
            "mx": reply.mx_host,
        }
        if decision.status == "delivered":
            event(
                log,
                "delivery.delivered",
                **fields,
                possible_duplicate=result.possible_duplicate or None,
            )
        elif decision.status == "deferred":
            assert decision.next_attempt_at is not None
            event(
                log,
                "delivery.deferred",
                logging.WARNING,
                **fields,
                next_attempt=decision.next_attempt_at.isoformat(timespec="seconds"),
                text=reply.text,
                possible_duplicate=result.possible_duplicate or None,
            )
        else:
            event(
                log,
                "delivery.failed",
                logging.ERROR,
                **fields,
                reason=decision.reason,
                possible_duplicate=result.possible_duplicate or None,
            )
