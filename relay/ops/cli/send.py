"""`relay send`: one message through the accept pipeline, queued or (--now) delivered."""

from __future__ import annotations

import sys
from typing import Any

import click

from relay.ops.cli.common import (
    fail,
    get_settings,
    resolver_for,
)
from relay.settings import Settings
from relay.store.outbox import Outbox


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


@click.command()
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
    resolver = resolver_for(settings)
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
