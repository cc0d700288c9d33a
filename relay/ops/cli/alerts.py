"""`relay alerts`: test, check, unit-failed."""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from relay.errors import StoreError
from relay.ops.cli.common import (
    fail,
    get_settings,
    outbox_for,
)


@click.group()
def alerts() -> None:
    """Alerts: a failed message, a queue that waits, a DKIM key that changed, a failed unit."""


def _dispatcher(ctx: click.Context) -> Any:
    """The alerts of a command that runs without a worker: alert mail it queues is
    delivered by the command itself when no worker runs (the alert may be that none does)."""
    from relay.alerts import Dispatcher, default_rules  # noqa: PLC0415
    from relay.worker.service import deliver_alert_mail  # noqa: PLC0415

    settings = get_settings(ctx)
    store = outbox_for(ctx)
    deliver_now = functools.partial(deliver_alert_mail, store, settings)
    return Dispatcher(store, settings, rules=default_rules(settings), deliver_now=deliver_now)


@alerts.command("test")
@click.pass_context
def alerts_test(ctx: click.Context) -> None:
    """Send a test alert on every channel now; exit 1 unless every one took it."""
    import asyncio  # noqa: PLC0415

    dispatcher = _dispatcher(ctx)
    if not dispatcher.channels:
        fail("relay alerts test: no channel: set RELAY_ALERT_WEBHOOK_URL or RELAY_ALERT_EMAIL", 2)
    try:
        lines = asyncio.run(dispatcher.test())
    except StoreError as exc:
        fail(f"relay alerts test: {exc}")
    for line in lines:
        click.echo(line)
    if len(lines) != len(dispatcher.channels) or any("NOT sent" in line for line in lines):
        sys.exit(1)


@alerts.command("check")
@click.option("--every", type=click.FloatRange(min=5), help="Keep checking, every N seconds.")
@click.pass_context
def alerts_check(ctx: click.Context, every: float | None) -> None:
    """Evaluate the alert rules, group what they found and send what is due (the timer's
    job; the workers do the same while they run). Exit 1 if the store cannot be read."""
    import asyncio  # noqa: PLC0415

    dispatcher = _dispatcher(ctx)

    async def forever() -> None:
        while True:
            await dispatcher.tick()
            await asyncio.sleep(every or 60)

    try:
        asyncio.run(forever() if every else dispatcher.tick(all_rules=True))
    except StoreError as exc:
        fail(f"relay alerts check: {exc}")
    except KeyboardInterrupt:
        return


@alerts.command("unit-failed")
@click.argument("unit")
@click.pass_context
def alerts_unit_failed(ctx: click.Context, unit: str) -> None:
    """Alert that UNIT failed (systemd's OnFailure=formrelay-alert@%n.service). When the
    store is down, the webhook is called directly, since that may be why UNIT failed."""
    import asyncio  # noqa: PLC0415

    from relay.alerts import UNIT_FAILED, Webhook  # noqa: PLC0415
    from relay.store.alerts import AlertRow, NewEvent  # noqa: PLC0415

    settings = get_settings(ctx)
    text = f"{unit[:100]} failed; see `journalctl -u {unit[:100]}`"
    dispatcher = _dispatcher(ctx)
    try:
        alert_id = dispatcher.store.alerts.create(
            NewEvent(UNIT_FAILED, text, subject=unit[:64]), list(dispatcher.channels)
        )
        lines = asyncio.run(dispatcher.send_due(alert_id=alert_id))
    except StoreError as exc:
        if not settings.alert_webhook_url:
            fail(f"relay alerts unit-failed: {exc}")
        now = dispatcher.store.clock()
        row = AlertRow(
            0, UNIT_FAILED, 1, f"{text} (the store is unavailable: {exc})", {}, now, now, now
        )
        lines = asyncio.run(dispatcher.send_direct(Webhook(settings), row))
    for line in lines:
        click.echo(line)
