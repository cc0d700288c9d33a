"""Deliverability from the command line: doctor, dns-records, dkim keygen."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from relay.ops.cli.common import (
    fail,
    get_settings,
    ip_option,
    resolver_for,
)

_STATUS_COLOURS = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}


@click.command("doctor")
@click.option("--ip", callback=ip_option, help="The sending IP (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per check.")
@click.pass_context
def doctor_command(ctx: click.Context, ip: str | None, as_json: bool) -> None:
    """Check PTR, HELO, SPF, DKIM, DMARC, the support address and the store.

    Prints PASS / WARN / FAIL with the fix for each; exits 1 when anything FAILs.
    """
    import asyncio  # noqa: PLC0415

    from relay.ops.doctor import run_checks, worst  # noqa: PLC0415

    settings = get_settings(ctx)
    checks = asyncio.run(run_checks(settings, resolver=resolver_for(settings), ip=ip))
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


@click.command("dns-records")
@click.option("--ip", callback=ip_option, help="The sending IP (default: detected).")
@click.pass_context
def dns_records(ctx: click.Context, ip: str | None) -> None:
    """Print every DNS record to publish, in zone-file form, each with its reason."""
    import asyncio  # noqa: PLC0415

    from relay.ops.dnsrecords import format_zone, records_to_publish  # noqa: PLC0415

    settings = get_settings(ctx)
    records, notes = asyncio.run(
        records_to_publish(settings, resolver=resolver_for(settings), ip=ip)
    )
    click.echo(
        f"; formrelay: From {settings.from_domain}, envelope "
        f"{settings.envelope_sender.rpartition('@')[2]}, DKIM d={settings.signing_domain}, "
        f"HELO {settings.helo_hostname}"
    )
    for note in notes:
        click.echo(f"; {note}")
    click.echo("; check with `relay doctor` once published (DNS changes may take an hour)\n")
    click.echo(format_zone(records), nl=False)


@click.group()
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
