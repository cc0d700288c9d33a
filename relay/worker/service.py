"""`relay worker` as a process: the worker, its alerts and metrics, the signals, and the
delivery of alert mail by commands that run when no worker does.

The first SIGTERM/SIGINT stops gracefully (`Worker.stop`: no more claims, the attempts in
flight get RELAY_WORKER_STOP_TIMEOUT, what is left is handed back due now, the idle SMTP
sessions are QUIT, the worker deregisters); a second one exits at once (`force_exit`), and
the heartbeat then rescues the leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from relay.alerts import Dispatcher, Rule, default_rules
from relay.logs import event
from relay.mail.mx import make_resolver
from relay.metrics import Metrics, MetricsServer, exposition, metrics_app
from relay.settings import Settings
from relay.store.metrics import store_collectors
from relay.store.outbox import Outbox
from relay.worker.delivery import Worker, default_worker_id

log = logging.getLogger("relay.worker")

Rules = Callable[[Any], Sequence[Rule]]


Startup = Callable[[Any], Awaitable[None]]


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
