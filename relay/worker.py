"""The delivery worker: claims due messages from the outbox, signs and delivers them.

One asyncio loop runs up to `settings.worker_concurrency` attempts at once. Database calls are
blocking SQLAlchemy calls run in threads (`asyncio.to_thread`), which keeps one code path for
the web (sync Flask) and the worker. Each message is held under a lease that a heartbeat
renews while its attempt runs; a worker that dies leaves leases that expire, and any worker
then claims those messages again.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from relay.alerts import Dispatcher, Rule, default_rules
from relay.config import Settings
from relay.errors import RelayError, StoreUnavailable
from relay.logs import event
from relay.mail import smtp
from relay.mail.attempt import AttemptResult, reply_fields
from relay.mail.mx import make_resolver
from relay.mail.send import DeliverFn, sign_and_deliver
from relay.mail.sessions import SessionCache
from relay.mail.signing import Signer
from relay.metrics import Metrics, MetricsServer, exposition, metrics_app, reply_class
from relay.store.metrics import QueueCollector
from relay.store.notify import Listener
from relay.store.outbox import Outbox
from relay.store.records import Claimed, Finished
from relay.store.retry import Decision, RetryPolicy

log = logging.getLogger("relay.worker")


@dataclass
class _Outcome:
    """An ended attempt waiting for the writer; `done` gets its Decision once committed."""

    finished: Finished
    done: asyncio.Future[Decision]


def default_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Delivers what the outbox holds. `stop()` ends `run()` gracefully."""

    def __init__(
        self,
        outbox: Outbox,
        settings: Settings,
        *,
        deliver: DeliverFn | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        resolver: Any = None,
        worker_id: str | None = None,
        poll_interval: float = 0.5,
        shutdown_grace: float = 30.0,
        heartbeat_interval: float | None = None,
        claim_coalesce: float = 0.015,
        record_window: float = 0.005,
        metrics: Metrics | None = None,
        alerts: Dispatcher | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings)
        self.id = worker_id or default_worker_id()
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.lease = float(settings.worker_lease)
        self.heartbeat_interval = heartbeat_interval or max(1.0, self.lease / 3)
        self.claim_coalesce = claim_coalesce
        self.record_window = record_window
        self._deliver = deliver
        self._sign = sign
        self._resolver = resolver
        self._sessions: SessionCache | None = None  # with the real deliver only
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self.listening: asyncio.Event | None = None
        self.claims = 0  # claim queries made: lets tests know the loop went idle
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self.attempts_made = 0
        self._outcomes: list[_Outcome] = []  # ended attempts waiting for the group commit
        self._outcome_ready: asyncio.Event | None = None
        self._closing: asyncio.Future[None] | None = None  # done: flush and stop the writer
        self.record_commits = 0  # transactions that recorded outcomes (tests: batching)
        self.metrics = metrics or Metrics()
        self.alerts = alerts  # runs beside delivery, never in its way

    # --- the real collaborators, built on first use ---

    def _deliver_fn(self) -> DeliverFn:
        if self._deliver is None:
            self._sessions = SessionCache(max_idle=self.settings.worker_concurrency)
            deliver = functools.partial(smtp.deliver, sessions=self._sessions)
            self._deliver = cast(DeliverFn, deliver)
        return self._deliver

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
        event(log, "worker.started", id=self.id, concurrency=concurrency, lease=int(self.lease))
        heartbeat = asyncio.create_task(self._heartbeat())
        listener = asyncio.create_task(self._listen())
        writer = asyncio.create_task(self._writer())
        alerting = asyncio.create_task(
            self.alerts.run(self._stop) if self.alerts and not once else asyncio.sleep(0)
        )
        failures = 0
        try:
            while not self._stop.is_set():
                free = concurrency - len(self._inflight)
                claimed: list[Claimed] = []
                timeout: float | None = self.poll_interval
                if free > 0:
                    self._wake.clear()  # this claim sees whatever was notified until now
                    try:
                        claimed = await asyncio.to_thread(
                            self.outbox.claim,
                            self.id,
                            free,
                            self.lease,
                            give_up=self.policy.give_up,
                        )
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
                for item in claimed:
                    self._start(item)
                if once and not claimed and not self._inflight:
                    break
                if len(claimed) == free or (once and self._inflight):
                    timeout = None  # every slot is busy (or nothing more is due): wait for one
                # Wake when an attempt ends, on stop, on a NOTIFY (if a slot is free for what
                # it announces), or after a short poll.
                await self._wait_for(timeout, wake=len(self._inflight) < concurrency)
                if failures == 0:
                    await self._coalesce(concurrency)
        finally:
            await self._drain()
            if self._sessions is not None:
                await self._sessions.close()  # QUIT the idle SMTP sessions
            await self._close_writer(writer)
            if once and self.alerts is not None:
                await self._alerts_once()
            for task in (heartbeat, listener, alerting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
        waiters: set[asyncio.Future[Any]] = set(self._inflight.values())
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
            self._inflight
            and concurrency - len(self._inflight) < wanted
            and not self.stopping
            and (remaining := deadline - loop.time()) > 0
        ):
            await self._wait_for(remaining, wake=False)

    def _start(self, item: Claimed) -> None:
        task = asyncio.create_task(self._attempt(item), name=f"deliver-{item.id}")
        self._inflight[item.id] = task
        key = item.id

        def forget(_task: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)

        task.add_done_callback(forget)

    async def _drain(self) -> None:
        """Let attempts in flight finish; past the grace period cut them off and hand them
        back (recorded as interrupted, possible duplicate)."""
        if not self._inflight:
            return
        tasks = list(self._inflight.values())
        _done, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

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
            others_running = len(self._inflight) > len(self._outcomes)
            if self.record_window > 0 and others_running:
                # They may end within the window; a shutdown cuts it short.
                await asyncio.wait([self._closing], timeout=self.record_window)
            self._outcome_ready.clear()
            batch, self._outcomes = self._outcomes, []
            if batch:
                await self._commit(batch)
            elif self._closing.done():
                return

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
        try:
            await asyncio.wait_for(asyncio.shield(writer), timeout=self.shutdown_grace)
        except TimeoutError:  # the store hangs: what is left is redelivered after the lease
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

    async def _heartbeat(self) -> None:
        while True:
            self.metrics.heartbeat()
            await asyncio.sleep(self.heartbeat_interval)
            ids = list(self._inflight)
            if not ids:
                continue
            try:
                await asyncio.to_thread(self.outbox.renew, self.id, ids, self.lease)
            except StoreUnavailable as exc:
                event(log, "worker.heartbeat_failed", logging.WARNING, error=str(exc))

    # --- one attempt ---

    async def _attempt(self, item: Claimed) -> None:
        started = self.outbox.clock()
        self.attempts_made += 1
        try:
            result = await self._sign_and_deliver(item)
        except asyncio.CancelledError:
            await self._release_cut_off(item)
            raise
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

    async def _sign_and_deliver(self, item: Claimed) -> AttemptResult:
        result = await sign_and_deliver(
            item.body,
            recipient=item.recipient,
            envelope_from=item.envelope_from,
            sign=self._sign_fn(),
            deliver=self._deliver_fn(),
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

    async def _release_cut_off(self, item: Claimed) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(
                asyncio.to_thread(self.outbox.release, self.id, [item.id], started=True)
            )
        event(log, "delivery.interrupted", logging.WARNING, id=item.id, attempt=item.attempt)

    async def _record(
        self, item: Claimed, result: AttemptResult, started: datetime
    ) -> Decision | None:
        """Store the attempt through the group commit; if that fails, try twice more on its
        own, then leave it to the lease (the next claim records the attempt as interrupted)."""
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
    """`relay worker`: SIGTERM/SIGINT stop claiming and let what is in flight finish.

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

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
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
    collector = QueueCollector(worker.outbox)
    app = metrics_app(
        lambda: exposition(worker.metrics, [collector]), settings.metrics_token.get_secret_value()
    )
    server = MetricsServer(bind[0], bind[1], app)
    event(log, "worker.metrics", address=f"{bind[0]}:{server.port}")
    return server


async def _guarded(checks: Awaitable[None]) -> None:
    """Start-up checks never stop delivery, whatever they raise."""
    try:
        await asyncio.wait_for(checks, timeout=60)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        event(log, "worker.startup_checks_failed", logging.WARNING, error=repr(exc))
