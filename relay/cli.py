"""The `relay` command: a thin operator's layer over the modules that own each concern.

Configuration is loaded once per command through `load_settings()`; a bad configuration exits
2 with every problem listed by variable name.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import timedelta
from typing import Any, NoReturn

import click

from relay import logs
from relay import outbox as outbox_mod
from relay.config import Settings, load_settings
from relay.errors import ConfigError, StoreError


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def get_settings(ctx: click.Context) -> Settings:
    """Load and cache the settings for this invocation; exit 2 listing every problem."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings()
        except ConfigError as exc:
            fail(str(exc), code=2)
        for warning in obj["settings"].warnings:
            click.echo(f"warning: {warning}", err=True)
        logs.configure(obj["settings"].log_level)
    settings: Settings = obj["settings"]
    return settings


@click.group()
@click.version_option(package_name="formrelay")
def main() -> None:
    """formrelay: a safe web-form-to-support email relay."""


# --- pipeline: send ------------------------------------------------------------------------

# --- outbox: worker, log, show, retry, purge, queue-check, db ------------------------------


def _outbox(ctx: click.Context) -> outbox_mod.Outbox:
    """The store for this command; closed when the command ends."""
    store = outbox_mod.Outbox.from_settings(get_settings(ctx))
    ctx.call_on_close(store.dispose)
    return store


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return outbox_mod.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.pass_context
def worker(ctx: click.Context, once: bool) -> None:
    """Deliver queued mail (SIGTERM/SIGINT: finish what is in flight, then exit)."""
    from relay.worker import run_worker  # noqa: PLC0415 - asyncio and SMTP only here

    settings = get_settings(ctx)
    try:
        run_worker(settings, once=once)
    except StoreError as exc:
        fail(f"relay worker: {exc}")


@main.command("log")
@click.option("--status", type=click.Choice(outbox_mod.STATUSES), help="Only this status.")
@click.option("--since", callback=_duration, help="Only messages newer than this (2h, 3d).")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def log_command(
    ctx: click.Context, status: str | None, since: Any, limit: int, as_json: bool
) -> None:
    """Messages, newest first: id, age, status, attempts, last reply, next try."""
    store = _outbox(ctx)
    try:
        rows = store.list_messages(status=status, since=since, limit=limit)
    except StoreError as exc:
        fail(f"relay log: {exc}")
    now = store.clock()
    if as_json:
        for row in rows:
            click.echo(json.dumps(outbox_mod.log_record(row, now)))
        return
    width = None if not sys.stdout.isatty() else max(20, shutil.get_terminal_size().columns - 70)
    click.echo(outbox_mod.log_table(rows, now, reply_width=width))


@main.command()
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """A message's headers and every attempt with every host tried."""
    store = _outbox(ctx)
    try:
        detail = store.show(message_id)
    except StoreError as exc:
        fail(f"relay show: {exc}")
    if as_json:
        click.echo(json.dumps(outbox_mod.detail_record(detail), indent=2))
    else:
        click.echo(outbox_mod.detail_text(detail, store.clock()))


@main.command()
@click.argument("message_id", metavar="ID", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed message.")
@click.pass_context
def retry(ctx: click.Context, message_id: str | None, all_failed: bool) -> None:
    """Make a failed or deferred message (or every failed one) due now."""
    if bool(message_id) == all_failed:
        fail("relay retry: give an ID or --failed (not both)", code=2)
    store = _outbox(ctx)
    try:
        if all_failed:
            click.echo(f"{store.retry_failed()} failed message(s) due now")
        elif store.retry(str(message_id)):
            click.echo(f"{message_id} due now")
        else:
            status = store.get(str(message_id)).status
            fail(f"relay retry: {message_id} is {status}; only failed or deferred mail is retried")
    except StoreError as exc:
        fail(f"relay retry: {exc}")


@main.command()
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="Days.")
@click.pass_context
def purge(ctx: click.Context, days: float) -> None:
    """Drop the bodies of delivered and failed messages older than DAYS; keep the log."""
    try:
        count = _outbox(ctx).purge(timedelta(days=days))
    except StoreError as exc:
        fail(f"relay purge: {exc}")
    click.echo(f"purged the bodies of {count} message(s) older than {days:g} days")


@main.command("queue-check")
@click.option("--max-age", type=click.IntRange(min=1), required=True, help="Seconds.")
@click.pass_context
def queue_check(ctx: click.Context, max_age: int) -> None:
    """Exit 1 if a message failed or waited longer than --max-age seconds (for cron)."""
    try:
        health = _outbox(ctx).queue_check(timedelta(seconds=max_age))
    except StoreError as exc:
        fail(f"relay queue-check: {exc}")
    if not health.ok:
        fail(health.reason)
    click.echo(health.reason)


@main.group()
def db() -> None:
    """The outbox database schema."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Create or migrate the outbox schema to the latest version."""
    store = _outbox(ctx)
    try:
        store.upgrade()
        revision = store.current_revision()
    except StoreError as exc:
        fail(f"relay db upgrade: {exc}")
    click.echo(f"outbox schema at revision {revision}")


# --- deliverability: doctor, dns-records, dkim ---------------------------------------------

# --- demo ----------------------------------------------------------------------------------
