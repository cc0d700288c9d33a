"""The `relay` command: a thin operator's layer over the modules that own each concern.

Configuration is loaded once per command through `load_settings()`; a bad configuration exits
2 with every problem listed by variable name.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from relay import logs
from relay.config import Settings, load_settings
from relay.errors import ConfigError


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

# --- deliverability: doctor, dns-records, dkim ---------------------------------------------

# --- demo ----------------------------------------------------------------------------------
