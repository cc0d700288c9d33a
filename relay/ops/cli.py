"""The `relay` command: a thin operator's layer over the modules that own each concern.

Configuration is loaded once per command through `load_settings()`; a bad configuration exits
2 with every problem listed by variable name.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from relay import logs
from relay.config import Settings, load_settings
from relay.errors import ConfigError, StoreError
from relay.store import views
from relay.store.outbox import Outbox
from relay.store.schema import STATUSES


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


def _host_line(host: Any) -> str:
    """One host tried: 'mx1.example.test [192.0.2.1]:25 TLSv1.3 rcpt 451 4.7.1 text (0.012s)'."""
    reply = " ".join(
        str(part) for part in (host.code, host.enhanced_status, host.text) if part not in (None, "")
    )
    return (
        f"  {host.mx_host} [{host.ip}]:{host.port} {host.tls or 'plain'} "
        f"{host.stage}: {reply} ({host.duration:.3f}s)"
    )


def _send_now(settings: Settings, built: Any, resolver: Any) -> int:
    """Sign and deliver one message through the worker's code path; 0 when delivered."""
    import asyncio  # noqa: PLC0415 - asyncio, DNS and SMTP only for this command

    from relay.mail.send import sign_and_deliver  # noqa: PLC0415
    from relay.mail.signing import Signer  # noqa: PLC0415
    from relay.mail.smtp import deliver  # noqa: PLC0415

    result = asyncio.run(
        sign_and_deliver(
            built.raw,
            recipient=built.recipient,
            envelope_from=built.envelope_from,
            sign=Signer.from_settings(settings).sign,
            deliver=deliver,
            settings=settings,
            resolver=resolver,
        )
    )
    if result.local:  # the key could not sign: no server was asked
        fail(f"relay send: {result.error}")
    click.echo(f"message {built.message_id} to {built.recipient}")
    for host in result.hosts:
        click.echo(_host_line(host))
    click.echo(f"{result.outcome}: {result.summary}")
    if result.possible_duplicate:
        click.echo(
            "warning: a connection was lost after the message was sent; "
            "the server may have accepted it",
            err=True,
        )
    return 0 if result.outcome == "delivered" else 1


@main.command()
@click.option("--name", required=True, help="Sender's name, as a visitor would type it.")
@click.option("--email", required=True, help="Sender's address (goes in Reply-To).")
@click.option("--subject", required=True)
@click.option("--message", required=True, help='Message text; "-" reads standard input.')
@click.option("--now", is_flag=True, help="Deliver right away, printing every host tried.")
@click.pass_context
def send(
    ctx: click.Context, *, name: str, email: str, subject: str, message: str, now: bool
) -> None:
    """Send one message as the form would: checked as the form checks it, then queued, or
    with --now delivered at once.

    Exit status with --now: 0 delivered, 1 not delivered (temporary or permanent).
    """
    from relay.errors import RelayError  # noqa: PLC0415
    from relay.web.accept import Refused, accept, prepare  # noqa: PLC0415
    from relay.web.forms import blocking_resolver  # noqa: PLC0415

    settings = get_settings(ctx)
    if message == "-":
        message = sys.stdin.read()
    data = {"name": name, "email": email, "subject": subject, "message": message}
    resolver = _resolver(settings)
    pipeline: dict[str, Any] = {
        "settings": settings,
        "resolver": blocking_resolver(resolver),
        "metadata": {"Sent by": "relay send"},
    }
    try:
        if now:
            sys.exit(_send_now(settings, prepare(data, **pipeline), resolver))
        store = Outbox.from_settings(settings)
        try:
            accepted = accept(data, outbox=store, log_metadata={"source": "relay send"}, **pipeline)
        finally:
            store.dispose()
    except Refused as exc:
        fail("relay send: " + "; ".join(exc.lines()))
    except RelayError as exc:  # the store cannot commit, the key cannot sign
        fail(f"relay send: {'' if now else 'not queued: '}{exc}")
    if accepted.held_by:
        click.echo(
            f"held {accepted.id} {accepted.message_id} for review ({accepted.held_by}); "
            f"`relay release {accepted.id}` sends it"
        )
        return
    click.echo(f"queued {accepted.id} {accepted.message_id}; `relay worker` delivers it")


# --- outbox: worker, log, show, retry, purge, queue-check, workers, db ---------------------


def _outbox(ctx: click.Context) -> Outbox:
    """The store for this command; closed when the command ends."""
    store = Outbox.from_settings(get_settings(ctx))
    ctx.call_on_close(store.dispose)
    return store


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return views.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
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


@main.command("log")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--form", "form_id", help="Only this form's messages (default: the one at /form).")
@click.option("--since", callback=_duration, help="Only messages newer than this (2h, 3d).")
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
    store = _outbox(ctx)
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
        click.echo(json.dumps(views.detail_record(detail), indent=2))
    else:
        click.echo(views.detail_text(detail, store.clock()))


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
            row = store.get(str(message_id))
            if row.purged_at is not None:
                fail(f"relay retry: {message_id} cannot be sent again: its body was purged")
            fail(f"relay retry: {message_id} is {row.status}; only failed or deferred mail retries")
    except StoreError as exc:
        fail(f"relay retry: {exc}")


@main.command("release")
@click.argument("message_id", metavar="ID")
@click.pass_context
def release_command(ctx: click.Context, message_id: str) -> None:
    """Send a message a hold rule kept for review (it is queued for delivery now)."""
    store = _outbox(ctx)
    try:
        if not store.release_held(message_id):
            fail(f"relay release: {message_id} is {store.get(message_id).status}, not held")
    except StoreError as exc:
        fail(f"relay release: {exc}")
    click.echo(f"{message_id} released: queued for delivery")


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
@click.option(
    "--failed-within",
    callback=_duration,
    help="Count only failures this recent (1d); default: every failed message.",
)
@click.pass_context
def queue_check(ctx: click.Context, max_age: int, failed_within: Any) -> None:
    """Exit 1 if a message failed, waited longer than --max-age seconds, or mail is due while
    no worker has sent a heartbeat within RELAY_WORKER_DEAD_AFTER (for cron)."""
    dead_after = timedelta(seconds=get_settings(ctx).worker_dead_after)
    try:
        health = _outbox(ctx).queue_check(
            timedelta(seconds=max_age), failed_within=failed_within, dead_after=dead_after
        )
    except StoreError as exc:
        fail(f"relay queue-check: {exc}")
    if not health.ok:
        fail(health.reason)
    click.echo(health.reason)


@main.command("workers")
@click.option(
    "--since",
    callback=_duration,
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
    store = _outbox(ctx)
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

_STATUS_COLOURS = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}


def _ip_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    import ipaddress  # noqa: PLC0415

    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 or IPv6 address") from None


def _resolver(settings: Settings) -> Any:
    import dns.resolver  # noqa: PLC0415

    from relay.mail.mx import make_resolver  # noqa: PLC0415

    try:
        return make_resolver(settings)
    except dns.resolver.NoResolverConfiguration:
        fail("no DNS resolver configured: set RELAY_DNS_NAMESERVERS (e.g. 1.1.1.1,9.9.9.9)")


@main.command("doctor")
@click.option("--ip", callback=_ip_option, help="The sending IP (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per check.")
@click.pass_context
def doctor_command(ctx: click.Context, ip: str | None, as_json: bool) -> None:
    """Check PTR, HELO, SPF, DKIM, DMARC, the support address and the store.

    Prints PASS / WARN / FAIL with the fix for each; exits 1 when anything FAILs.
    """
    import asyncio  # noqa: PLC0415

    from relay.ops.doctor import run_checks, worst  # noqa: PLC0415

    settings = get_settings(ctx)
    checks = asyncio.run(run_checks(settings, resolver=_resolver(settings), ip=ip))
    if as_json:
        for check in checks:
            click.echo(json.dumps(check.as_dict(), default=str))
    else:
        width = max(len(c.name) for c in checks)
        pad = " " * (4 + 2 + width + 2)
        for check in checks:
            status = click.style(check.status, fg=_STATUS_COLOURS[check.status], bold=True)
            click.echo(f"{status}  {check.name:<{width}}  {check.summary}")
            for n, line in enumerate(check.fix.splitlines()):
                click.echo(f"{pad}{'fix: ' if n == 0 else '     '}{line}")
        counts = {s: sum(1 for c in checks if c.status == s) for s in _STATUS_COLOURS}
        click.echo(f"\ndoctor: {counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail")
    sys.exit(1 if worst(checks) == "FAIL" else 0)


@main.command("dns-records")
@click.option("--ip", callback=_ip_option, help="The sending IP (default: detected).")
@click.pass_context
def dns_records(ctx: click.Context, ip: str | None) -> None:
    """Print every DNS record to publish, in zone-file form, each with its reason."""
    import asyncio  # noqa: PLC0415

    from relay.ops.dnsrecords import format_zone, records_to_publish  # noqa: PLC0415

    settings = get_settings(ctx)
    records, notes = asyncio.run(records_to_publish(settings, resolver=_resolver(settings), ip=ip))
    click.echo(
        f"; formrelay: From {settings.from_domain}, envelope "
        f"{settings.envelope_sender.rpartition('@')[2]}, DKIM d={settings.signing_domain}, "
        f"HELO {settings.helo_hostname}"
    )
    for note in notes:
        click.echo(f"; {note}")
    click.echo("; check with `relay doctor` once published (DNS changes may take an hour)\n")
    click.echo(format_zone(records), nl=False)


@main.group()
def dkim() -> None:
    """DKIM keys."""


@dkim.command("keygen")
@click.option("--selector", required=True, help="The selector, e.g. s2026 (a DNS label).")
@click.option(
    "--type", "key_type", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True
)
@click.option("--bits", type=int, default=None, help="RSA key size (default 2048, at least 2048).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the private key (default ./dkim-SELECTOR.pem); never overwritten.",
)
@click.option("--domain", help="The signing domain (default: RELAY_DKIM_DOMAIN or From's).")
def dkim_keygen(
    selector: str, key_type: str, bits: int | None, out: Path | None, domain: str | None
) -> None:
    """Create a DKIM private key (mode 0600) and print the DNS record and settings for it.

    Needs no configuration: run it before the first deployment.
    """
    import os  # noqa: PLC0415

    from dotenv import dotenv_values  # noqa: PLC0415

    from relay.ops import keygen  # noqa: PLC0415
    from relay.ops.dnsrecords import dkim_record  # noqa: PLC0415

    kind: keygen.KeyType = "ed25519" if key_type == "ed25519" else "rsa"
    problem = keygen.check_selector(selector) or keygen.check_bits(kind, bits)
    if problem:
        fail(f"error: {problem}", code=2)
    domain_var: str | None = None
    if domain:
        domain = domain.strip().rstrip(".").lower()
        domain_var = f"RELAY_DKIM_DOMAIN={domain}"
    else:
        environ = {
            **{k: v for k, v in dotenv_values(".env").items() if v is not None},
            **os.environ,
        }
        domain, source = keygen.domain_from_environment(environ)
        if source == "RELAY_DKIM_DOMAIN":
            domain_var = f"RELAY_DKIM_DOMAIN={domain}"
    path = (out or Path(f"dkim-{selector}.pem")).absolute()
    pem = keygen.generate_private_key(kind, bits or keygen.MIN_RSA_BITS)
    try:
        keygen.write_private_key(path, pem)
    except FileExistsError:
        fail(f"error: {path} exists; refusing to overwrite a key (choose another --out)")
    except OSError as exc:
        fail(f"error: cannot write {path}: {exc.strerror or exc}")
    click.echo(f"Wrote the {kind} private key to {path} (mode 0600). Keep it secret.\n")
    record = dkim_record(selector, domain or "example.invalid", pem, source=str(path))
    if domain:
        click.echo(f"Publish this TXT record at {record.name.rstrip('.')}:\n")
        click.echo(record.render())
    else:
        click.echo(
            f"Publish this TXT record at {selector}._domainkey.<your domain> (no domain known: "
            "pass --domain or set RELAY_FROM_ADDRESS to get the full name):\n"
        )
        click.echo(f"{selector}._domainkey.<your-domain>. {record.ttl} IN TXT {record.rdata}")
    click.echo(
        "\n(The value is split into strings of at most 255 characters, as DNS requires; "
        "receivers join them. In a web form that takes one string, paste the joined value.)"
    )
    click.echo("\nThen set:\n")
    for line in keygen.settings_lines(kind, selector, path, domain_var):
        click.echo(f"  {line}")
    if kind == "ed25519":
        click.echo("\n(Ed25519 signs in addition to the RSA key, which stays required.)")
    click.echo("\nWhen the record is published, check it with `relay doctor`.")


# --- alerts --------------------------------------------------------------------------------


@main.group()
def alerts() -> None:
    """Alerts: a failed message, a queue that waits, a DKIM key that changed, a failed unit."""


def _dispatcher(ctx: click.Context) -> Any:
    """The alerts of a command that runs without a worker: alert mail it queues is
    delivered by the command itself when no worker runs (the alert may be that none does)."""
    from relay.alerts import Dispatcher, default_rules  # noqa: PLC0415
    from relay.worker.service import deliver_alert_mail  # noqa: PLC0415

    settings = get_settings(ctx)
    store = _outbox(ctx)
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


# --- forms ---------------------------------------------------------------------------------


@main.group("forms")
def forms_group() -> None:
    """The forms: the default one at /form and RELAY_FORMS_FILE's at /f/<id>."""


@forms_group.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def forms_check(path: Path | None) -> None:
    """Check the forms file (RELAY_FORMS_FILE, or PATH before deploying it) with the rest of
    the configuration; print each form's URL and embed snippet. Exit 2 listing every problem."""
    from relay.ops.forms import check  # noqa: PLC0415

    code, lines = check(path)
    for line in lines:
        click.echo(line, err=code != 0)
    sys.exit(code)


# --- admin ---------------------------------------------------------------------------------


@main.group()
def admin() -> None:
    """The operator's console."""


@admin.command("hash-password")
def hash_password() -> None:
    """Print an argon2 hash of a password for RELAY_ADMIN_USERS (user:hash).

    On a terminal the password is asked for twice, hidden; from a pipe the first line is read.
    Needs no configuration.
    """
    from argon2 import PasswordHasher  # noqa: PLC0415

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        fail("relay admin hash-password: use at least 12 characters", code=2)
    click.echo(PasswordHasher().hash(password))


# --- demo ----------------------------------------------------------------------------------


@main.command()
@click.option("--smoke", is_flag=True, help="Headless: one submission end to end, then exit.")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("instance") / "demo",
    show_default=True,
    help="Where the throwaway key, the outbox and the Maildir go.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True)
def demo(smoke: bool, folder: Path, timeout: float) -> None:
    """A sandbox on 127.0.0.1: DNS, a greylisting support mailbox, the form and the worker.

    Needs no RELAY_ variable and refuses to run when RELAY_ENV says anything but demo.
    """
    from relay.ops.demo import run  # noqa: PLC0415 - the sandbox only when asked for

    sys.exit(run(folder, smoke=smoke, timeout=timeout))
