"""The delivery worker: claims due messages from the outbox, signs and delivers them.

One asyncio loop runs up to `settings.worker_concurrency` attempts at once. Database calls are
blocking SQLAlchemy calls run in threads (`asyncio.to_thread`), which keeps one code path for
the web (sync Flask) and the worker. The worker registers in the store and holds each message
under a lease that its heartbeat renews (relay.leases); a worker that stops beating for
RELAY_WORKER_DEAD_AFTER has its messages claimed again by another, and one that resumes
after such a pause learns at its next beat what it lost.

Stopping (SIGTERM/SIGINT): no more claims, the attempts in flight get
RELAY_WORKER_STOP_TIMEOUT to finish, what is left is handed back due now (so another worker
takes it at once), the idle SMTP sessions are QUIT and the worker deregisters. A second
signal exits at once; the heartbeat then rescues the leases.

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
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from relay.alerts import Dispatcher, Rule, default_rules
from relay.config import Settings
from relay.errors import RelayError, StoreUnavailable
from relay.leases import Held, Leases, process_alive, worker_info
from relay.logs import event
from relay.mail import smtp
from relay.mail.attempt import AttemptResult, reply_fields
from relay.mail.mx import make_resolver
from relay.mail.send import DeliverFn, GatedDeliverFn, sign_and_deliver
from relay.mail.sessions import SessionCache
from relay.mail.signing import Signer
from relay.metrics import Metrics, MetricsServer, exposition, metrics_app, reply_class
from relay.store.metrics import store_collectors
from relay.store.notify import Listener
from relay.store.outbox import Outbox
from relay.store.records import Claimed, Finished
from relay.store.retry import Decision, RetryPolicy

log = logging.getLogger("relay.worker")

WRITER_CLOSE_TIMEOUT = 10.0  # seconds a stop waits for the last outcomes to be committed


@dataclass
class _Outcome:
    """An ended attempt waiting for the writer; `done` gets its Decision once committed."""

    finished: Finished
    done: asyncio.Future[Decision]


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
        self.record_window = record_window
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
        self._outcomes: list[_Outcome] = []  # ended attempts waiting for the group commit
        self._outcome_ready: asyncio.Event | None = None
        self._closing: asyncio.Future[None] | None = None  # done: flush and stop the writer
        self.record_commits = 0  # transactions that recorded outcomes (tests: batching)
        self.alerts = alerts  # runs beside delivery, never in its way
        self.purpose = purpose  # claim only messages of this purpose (deliver_alert_mail)

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
        self._outcome_ready = asyncio.Event()
        self._closing = asyncio.get_running_loop().create_future()
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
        writer = asyncio.create_task(self._writer())
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
        await self._close_writer(writer)
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

    async def _writer(self) -> None:
        """The group commit: records every attempt that ended within `record_window` of
        the first one, plus those that end while that commit runs, in one transaction.

        An attempt's task waits for its outcome's commit and keeps its slot and its lease
        (the heartbeat renews it) until then, so a crash before the commit loses nothing:
        the lease expires and the message is claimed again as a possible duplicate."""
        assert self._outcome_ready is not None
        assert self._closing is not None
        while True:
            await self._outcome_ready.wait()
            others_running = len(self.leases) > len(self._outcomes)
            if self.record_window > 0 and others_running:
                # They may end within the window; a shutdown cuts it short.
                await asyncio.wait([self._closing], timeout=self.record_window)
            self._outcome_ready.clear()
            batch, self._outcomes = self._outcomes, []
            if batch:
                await self._commit(batch)
            if self._closing.done() and not self._outcomes:
                return  # the stop's wake-up may have been spent on the batch just committed

    async def _commit(self, batch: list[_Outcome]) -> None:
        try:
            decisions = await asyncio.to_thread(
                self.outbox.record_attempts,
                [outcome.finished for outcome in batch],
                owner=self.id,
                policy=self.policy,
            )
        except Exception as exc:  # StoreUnavailable: each attempt retries on its own
            for outcome in batch:
                if not outcome.done.done():
                    outcome.done.set_exception(exc)
            return
        self.record_commits += 1
        for outcome, decision in zip(batch, decisions, strict=True):
            if not outcome.done.done():
                outcome.done.set_result(decision)

    async def _close_writer(self, writer: asyncio.Task[None]) -> None:
        """Commit the outcomes still waiting (also those of attempts cut off while they
        waited for the commit), then stop the writer."""
        assert self._outcome_ready is not None
        assert self._closing is not None
        self._closing.set_result(None)
        self._outcome_ready.set()
        try:  # within the 15 s that TimeoutStopSec allows beyond the stop timeout
            await asyncio.wait_for(asyncio.shield(writer), timeout=WRITER_CLOSE_TIMEOUT)
        except TimeoutError:  # the store hangs: what is left is reclaimed by another worker
            event(log, "worker.record_timeout", logging.ERROR, pending=len(self._outcomes))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        for outcome in self._outcomes:
            outcome.done.cancel()
        self._outcomes = []

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
        decision = await self._record(item, result, started)
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

    async def _record(
        self, item: Claimed, result: AttemptResult, started: datetime
    ) -> Decision | None:
        """Store the attempt through the group commit; if that fails, try twice more on its
        own, then give up: the message stays leased to this worker, which no longer holds it,
        and the heartbeat hands it back after DEAD_AFTER (relay.leases, strays)."""
        finished = Finished(item, result, started, self.outbox.clock())
        for tries in range(3):
            try:
                if tries == 0:
                    return await self._group_commit(finished)
                return await asyncio.to_thread(
                    self.outbox.record_attempt,
                    item,
                    result,
                    owner=self.id,
                    policy=self.policy,
                    started_at=started,
                    finished_at=finished.finished_at,
                )
            except StoreUnavailable as exc:
                event(
                    log,
                    "delivery.record_failed",
                    logging.ERROR,
                    id=item.id,
                    outcome=result.outcome,
                    error=str(exc),
                    tries=tries + 1,
                )
                await asyncio.sleep(1.0 + tries)
        return None

    async def _group_commit(self, finished: Finished) -> Decision:
        assert self._outcome_ready is not None
        done: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._outcomes.append(_Outcome(finished, done))
        self._outcome_ready.set()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.cancelled():  # cut off while waiting: the writer still commits it
                done.add_done_callback(lambda fut: self._logged(finished, fut))
            raise

    def _logged(self, finished: Finished, fut: asyncio.Future[Decision]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result().applied:
            self._log_outcome(finished.claimed, finished.result, fut.result())

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


Startup = Callable[[Any], Awaitable[None]]
Rules = Callable[[Any], Sequence[Rule]]


def run_worker(
    settings: Settings,
    *,
    once: bool = False,
    outbox: Outbox | None = None,
    startup: Startup | None = None,
    rules: Rules | None = None,
) -> None:
    """`relay worker`: the first SIGTERM/SIGINT stops gracefully (Worker.stop), a second one
    exits at once (`force_exit`).

    `startup(resolver)` runs in the background while delivery starts (the CLI passes the
    doctor's checks, logged); `--once` (cron, tests) skips it, so a run every minute neither
    repeats them nor waits for their DNS lookups. `rules(resolver)` are alert rules beside
    `relay.alerts.default_rules` (the CLI passes the daily DKIM check)."""
    store = outbox or Outbox.from_settings(settings)
    resolver = make_resolver(settings)
    metrics = Metrics()
    extra = list(rules(resolver)) if rules is not None else []
    dispatcher = Dispatcher(
        store, settings, rules=[*default_rules(settings), *extra], metrics=metrics
    )
    worker = Worker(store, settings, resolver=resolver, metrics=metrics, alerts=dispatcher)
    server = serve_metrics(settings, worker)

    def on_signal(sig: signal.Signals) -> None:
        if worker.stopping:
            force_exit(worker, sig)
        worker.stop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        checks = asyncio.create_task(
            _guarded(startup(resolver)) if startup is not None and not once else asyncio.sleep(0)
        )
        try:
            await worker.run(once=once)
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    finally:
        if server is not None:
            server.close()
        store.dispose()


def serve_metrics(settings: Settings, worker: Worker) -> MetricsServer | None:
    """RELAY_WORKER_METRICS_ADDRESS: the worker's metrics and the store's queue, over HTTP
    to the bearer of RELAY_METRICS_TOKEN (config requires both together)."""
    bind = settings.worker_metrics_bind
    if bind is None or settings.metrics_token is None:
        return None
    collectors = store_collectors(worker.outbox, worker.outbox.workers, worker.dead_after)
    app = metrics_app(
        lambda: exposition(worker.metrics, collectors), settings.metrics_token.get_secret_value()
    )
    server = MetricsServer(bind[0], bind[1], app)
    event(log, "worker.metrics", address=f"{bind[0]}:{server.port}")
    return server


def force_exit(worker: Worker, sig: signal.Signals) -> None:
    """The second signal: leave now, as a kill would. Nothing is released or deregistered;
    the heartbeat stops, so other workers reclaim the leases after RELAY_WORKER_DEAD_AFTER (at
    once when a worker starts again on this host)."""
    event(
        log,
        "worker.stop_forced",
        logging.WARNING,
        id=worker.id,
        signal=sig.name,
        in_flight=len(worker.leases),
    )
    for handler in logging.getLogger("relay").handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(128 + int(sig))


async def deliver_alert_mail(outbox: Outbox, settings: Settings) -> bool:
    """Deliver the alert mail that is due, here and now, when no worker is running (the
    alert may well be that none is): a worker that claims only `purpose=alert` messages,
    registered for the few seconds it takes. False when a live worker will do it."""
    dead_after = timedelta(seconds=settings.worker_dead_after)
    latest = await asyncio.to_thread(outbox.workers.latest_beat)
    if latest is not None and outbox.clock() - latest.beat_at <= dead_after:
        return False
    worker = Worker(outbox, settings, purpose="alert", worker_id=f"alerts-{default_worker_id()}")
    await worker.run(once=True)
    return True


async def _guarded(checks: Awaitable[None]) -> None:
    """Start-up checks never stop delivery, whatever they raise."""
    try:
        await asyncio.wait_for(checks, timeout=60)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        event(log, "worker.startup_checks_failed", logging.WARNING, error=repr(exc))
