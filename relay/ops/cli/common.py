"""What every command shares: the settings (loaded once, every problem listed), the store,
the resolver, and the option parsers."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from relay import logs
from relay.config import load_settings
from relay.errors import ConfigError
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.store.views import parse_duration


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


def outbox_for(ctx: click.Context) -> Outbox:
    """The store for this command; closed when the command ends."""
    store = Outbox.from_settings(get_settings(ctx))
    ctx.call_on_close(store.dispose)
    return store


def duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def ip_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    import ipaddress  # noqa: PLC0415

    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 or IPv6 address") from None


def resolver_for(settings: Settings) -> Any:
    """The resolver of RELAY_DNS_NAMESERVERS (or the system's); exit 1 when there is none."""
    import dns.resolver  # noqa: PLC0415

    from relay.mail.mx import make_resolver  # noqa: PLC0415

    try:
        return make_resolver(settings)
    except dns.resolver.NoResolverConfiguration:
        fail("no DNS resolver configured: set RELAY_DNS_NAMESERVERS (e.g. 1.1.1.1,9.9.9.9)")
