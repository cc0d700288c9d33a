"""`relay send`: one message as any form (--form ID, default: the one at /form) through the
web's accept pipeline, queued or (--now) delivered."""

from __future__ import annotations

import sys
from typing import Any

import click
from werkzeug.datastructures import MultiDict

from relay.formdefs import DEFAULT_ID, FormDef
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


# The named options, each the field of that name: the default form's four, the one of
# that name on another form (--email: whichever field is its Reply-To).
NAMED = ("name", "email", "subject", "message")


def parse_field(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, str]]:
    """`--field NAME=VALUE`, each once or (a checkbox group) once per choice ticked."""
    pairs = []
    for item in values:
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE")
        pairs.append((name.strip(), value))
    return pairs


def choose_form(settings: Settings, form_id: str) -> FormDef:
    """The form of that id (the default one or RELAY_FORMS_FILE's); a usage error naming the
    known ids otherwise."""
    form = settings.form(form_id)
    if form is None:
        known = ", ".join([DEFAULT_ID, *settings.forms])
        raise click.BadParameter(
            f"no form {form_id!r}; the forms are: {known}", param_hint="'--form'"
        )
    return form


def form_data(
    form: FormDef, named: dict[str, str | None], fields: list[tuple[str, str]]
) -> MultiDict[str, str]:
    """What the form would post: the named options and each --field, by field name.

    Only names the form has, each once (a checkbox group once per choice), never a file
    (the command cannot attach one): anything else is a usage error, before the pipeline."""
    data: MultiDict[str, str] = MultiDict()
    for option, value in named.items():
        if value is None:
            continue
        name = form.email_field if option == "email" else option
        if form.field(name) is None:
            raise click.BadParameter(
                f"form {form.id!r} has no field {name!r} (its fields: {names_of(form)})",
                param_hint=f"'--{option}'",
            )
        data.add(name, value)
    for name, value in fields:
        spec = form.field(name)
        if spec is None:
            raise click.BadParameter(
                f"form {form.id!r} has no field {name!r} (its fields: {names_of(form)})",
                param_hint="'--field'",
            )
        if name in data and not (spec.type == "checkbox" and spec.choices):
            raise click.BadParameter(
                f"{name!r} is given twice (only a checkbox group takes one value per choice)",
                param_hint="'--field'",
            )
        data.add(name, value)
    for spec in form.file_fields:
        if spec.name in data:
            raise click.BadParameter(
                f"{spec.name!r} is a file field: relay send cannot attach files; "
                "send this form from its web page",
                param_hint="'--field'",
            )
        if spec.required:
            raise click.BadParameter(
                f"form {form.id!r} requires a file in {spec.name!r}, which relay send cannot "
                "attach; send this form from its web page",
                param_hint="'--form'",
            )
    return data


def names_of(form: FormDef) -> str:
    return ", ".join(
        f"{spec.name} (file)" if spec.type == "file" else spec.name for spec in form.fields
    )


@click.command()
@click.option(
    "--form",
    "form_id",
    default=DEFAULT_ID,
    show_default=True,
    metavar="ID",
    help="The form to send as: an id of RELAY_FORMS_FILE, or default (the one at /form).",
)
@click.option("--name", help="Sender's name, as a visitor would type it.")
@click.option("--email", help="Sender's address (goes in Reply-To).")
@click.option("--subject", help="The subject (the four: required for the default form).")
@click.option("--message", help='Message text; "-" reads standard input.')
@click.option(
    "--field",
    "fields",
    multiple=True,
    metavar="NAME=VALUE",
    callback=parse_field,
    help="A field of the form, by its name; repeat for each (a checkbox group: per choice).",
)
@click.option("--now", is_flag=True, help="Deliver right away, printing every host tried.")
@click.pass_context
def send(
    ctx: click.Context,
    *,
    form_id: str,
    name: str | None,
    email: str | None,
    subject: str | None,
    message: str | None,
    fields: list[tuple[str, str]],
    now: bool,
) -> None:
    """Send one message as the form would: checked as the form checks it, then queued, or
    with --now delivered at once.

    The default form needs --name, --email, --subject and --message. Another form (--form
    ID) takes its fields with --field NAME=VALUE; --email is its Reply-To field, --name,
    --subject and --message the fields of those names. Files cannot be attached.

    Exit status: 2 for a usage error (an unknown form or field); 1 when the form refuses the
    values (one "field: message" per line) or the store cannot take it; with --now, 0
    delivered, 1 not delivered (temporary or permanent).
    """
    from relay.errors import RelayError  # noqa: PLC0415
    from relay.web.accept import Refused, accept, prepare  # noqa: PLC0415
    from relay.web.forms import blocking_resolver  # noqa: PLC0415

    named = {"name": name, "email": email, "subject": subject, "message": message}
    if form_id == DEFAULT_ID:  # its four options are required, as they always were
        for option in NAMED:
            if named[option] is None:
                param = next(p for p in ctx.command.params if p.name == option)
                raise click.MissingParameter(ctx=ctx, param=param)
    settings = get_settings(ctx)
    form = choose_form(settings, form_id)
    if message == "-":
        named["message"] = sys.stdin.read()
    data = form_data(form, named, fields)
    resolver = resolver_for(settings)
    pipeline: dict[str, Any] = {
        "settings": settings,
        "resolver": blocking_resolver(resolver),
        "metadata": {"Sent by": "relay send"},
        "form": form,
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
        fail("\n".join(f"relay send: {line}" for line in exc.lines()))
    except RelayError as exc:  # the store cannot commit, the key cannot sign
        fail(f"relay send: {'' if now else 'not queued: '}{exc}")
    which = "" if form.is_default else f" (form {form.id}, to {form.support_address})"
    if accepted.held_by:
        click.echo(
            f"held {accepted.id} {accepted.message_id}{which} for review ({accepted.held_by}); "
            f"`relay release {accepted.id}` sends it"
        )
        return
    click.echo(f"queued {accepted.id} {accepted.message_id}{which}; `relay worker` delivers it")
