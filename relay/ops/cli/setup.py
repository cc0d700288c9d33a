"""What an operator runs while setting up: forms check, admin hash-password, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from relay.ops.cli.common import (
    fail,
)


@click.group("forms")
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


@click.group()
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


@click.command()
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
