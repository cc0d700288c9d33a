"""The outbox from the command line: worker, log, show, retry, release, purge, queue-check,
workers, db upgrade."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from datetime import timedelta
from typing import Any

import click

from relay.errors import StoreError
from relay.ops.cli.common import (
    duration,
    fail,
    get_settings,
    outbox_for,
)
from relay.store import views
from relay.store.schema import STATUSES


@click.command()
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.pass_context
def worker(ctx: click.Context, once: bool) -> None:
    """Deliver queued mail (SIGTERM/SIGINT: finish what is in flight, then exit)."""
    from relay.alerts import DkimRule  # noqa: PLC0415 - asyncio and SMTP only here
    from relay.ops.doctor import dkim_checks, startup_checks  # noqa: PLC0415
    from relay.worker.service import run_worker  # noqa: PLC0415

    settings = get_settings(ctx)

    def rules(resolver: Any) -> list[Any]:
        return [DkimRule(functools.partial(dkim_checks, settings, resolver=resolver))]

    try:
        run_worker(
            settings,
            once=once,
            startup=functools.partial(startup_checks, settings),
            rules=rules,
        )
    except StoreError as exc:
        fail(f"relay worker: {exc}")


@click.command("log")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--form", "form_id", help="Only this form's messages (default: the one at /form).")
@click.option("--since", callback=duration, help="Only messages newer than this (2h, 3d).")
@click.option("--limit", type=click.IntRange(1, 100000), default=None, help="At most (default 50).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header (default: every message).")
@click.pass_context
def log_command(
    ctx: click.Context,
    *,
    status: str | None,
    form_id: str | None,
    since: Any,
    limit: int | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Messages, newest first: id, age, status, attempts, last reply, next try."""
    from itertools import islice  # noqa: PLC0415

    from relay.store.browse import LogFilter, walk  # noqa: PLC0415

    if as_json and as_csv:
        fail("relay log: --json or --csv, not both", code=2)
    store = outbox_for(ctx)
    if as_csv:
        try:
            rows_out = walk(store.browse, LogFilter(status=status, since=since, form=form_id))
            for line in views.csv_lines(islice(rows_out, limit)):
                click.echo(line, nl=False)
        except StoreError as exc:
            fail(f"relay log: {exc}")
        return
    try:
        rows = store.list_messages(status=status, since=since, limit=limit or 50, form=form_id)
    except StoreError as exc:
        fail(f"relay log: {exc}")
    now = store.clock()
    if as_json:
        for row in rows:
            click.echo(json.dumps(views.log_record(row, now)))
        return
    width = None if not sys.stdout.isatty() else max(20, shutil.get_terminal_size().columns - 70)
    click.echo(views.log_table(rows, now, reply_width=width))


@click.command()
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """A message's headers and every attempt with every host tried."""
    store = outbox_for(ctx)
    try:
        detail = store.show(message_id)
    except StoreError as exc:
        fail(f"relay show: {exc}")
    if as_json:
        click.echo(json.dumps(views.detail_record(detail), indent=2))
    else:
        click.echo(views.detail_text(detail, store.clock()))


@click.command()
@click.argument("message_id", metavar="ID", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed message.")
@click.pass_context
def retry(ctx: click.Context, message_id: str | None, all_failed: bool) -> None:
    """Make a failed or deferred message (or every failed one) due now."""
    if bool(message_id) == all_failed:
        fail("relay retry: give an ID or --failed (not both)", code=2)
    store = outbox_for(ctx)
    try:
        if all_failed:
            click.echo(f"{store.retry_failed()} failed message(s) due now")
        elif store.retry(str(message_id)):
            click.echo(f"{message_id} due now")
        else:
            row = store.get(str(message_id))
            if row.purged_at is not None:
                fail(f"relay retry: {message_id} cannot be sent again: its body was purged")
            fail(f"relay retry: {message_id} is {row.status}; only failed or deferred mail retries")
    except StoreError as exc:
        fail(f"relay retry: {exc}")


@click.command("release")
@click.argument("message_id", metavar="ID")
@click.pass_context
def release_command(ctx: click.Context, message_id: str) -> None:
    """Send a message a hold rule kept for review (it is queued for delivery now)."""
    store = outbox_for(ctx)
    try:
        if not store.release_held(message_id):
            fail(f"relay release: {message_id} is {store.get(message_id).status}, not held")
    except StoreError as exc:
        fail(f"relay release: {exc}")
    click.echo(f"{message_id} released: queued for delivery")


@click.command()
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="Days.")
@click.pass_context
def purge(ctx: click.Context, days: float) -> None:
    """Drop the bodies of delivered and failed messages older than DAYS; keep the log."""
    try:
        count = outbox_for(ctx).purge(timedelta(days=days))
    except StoreError as exc:
        fail(f"relay purge: {exc}")
    click.echo(f"purged the bodies of {count} message(s) older than {days:g} days")


@click.command("queue-check")
@click.option("--max-age", type=click.IntRange(min=1), required=True, help="Seconds.")
@click.option(
    "--failed-within",
    callback=duration,
    help="Count only failures this recent (1d); default: every failed message.",
)
@click.pass_context
def queue_check(ctx: click.Context, max_age: int, failed_within: Any) -> None:
    """Exit 1 if a message failed, waited longer than --max-age seconds, or mail is due while
    no worker has sent a heartbeat within RELAY_WORKER_DEAD_AFTER (for cron)."""
    dead_after = timedelta(seconds=get_settings(ctx).worker_dead_after)
    try:
        health = outbox_for(ctx).queue_check(
            timedelta(seconds=max_age), failed_within=failed_within, dead_after=dead_after
        )
    except StoreError as exc:
        fail(f"relay queue-check: {exc}")
    if not health.ok:
        fail(health.reason)
    click.echo(health.reason)


@click.command("workers")
@click.option(
    "--since",
    callback=duration,
    default="1d",
    show_default=True,
    help="Also the workers that stopped or died this recently.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def workers_command(ctx: click.Context, since: Any, as_json: bool) -> None:
    """Delivery workers, latest heartbeat first: live, dead (silent for longer than
    RELAY_WORKER_DEAD_AFTER) or stopped, with the messages each holds."""
    dead_after = float(get_settings(ctx).worker_dead_after)
    store = outbox_for(ctx)
    try:
        rows = store.workers.list_workers(since=since)
    except StoreError as exc:
        fail(f"relay workers: {exc}")
    now = store.clock()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.as_dict(now, dead_after)))
        return
    if not rows:
        click.echo("no worker has run within that time")
        return
    click.echo(views.workers_table(rows, now, dead_after))


@click.group()
def db() -> None:
    """The outbox database schema."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Create or migrate the outbox schema to the latest version."""
    store = outbox_for(ctx)
    try:
        store.upgrade()
        revision = store.current_revision()
    except StoreError as exc:
        fail(f"relay db upgrade: {exc}")
    click.echo(f"outbox schema at revision {revision}")
