"""`relay dns-records`: every record the operator publishes, with its reason, and records
that, once published, satisfy `relay doctor`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from dnslib import QTYPE, RR

from relay.mail.mx import make_resolver
from relay.ops import dnsrecords
from relay.ops.cli import main
from relay.ops.doctor import run_checks
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import FROM_DOMAIN, SENDING_IP, SUPPORT_DOMAIN
from relay.settings import Settings
from relay.store.outbox import Outbox

SUPPORT_ONLY = (
    f"{SUPPORT_DOMAIN}. 300 IN MX 10 mx1.{SUPPORT_DOMAIN}.\n"
    f"mx1.{SUPPORT_DOMAIN}. 300 IN A 127.0.0.2\n"
)


# --- SPF merging ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "existing", "expected"),
    [
        ("192.0.2.10", [], "v=spf1 ip4:192.0.2.10 ~all"),
        ("2001:db8::25", [], "v=spf1 ip6:2001:db8::25 ~all"),
        ("192.0.2.10", ["v=spf1 mx -all"], "v=spf1 ip4:192.0.2.10 mx -all"),
        (
            "192.0.2.10",
            ["v=spf1 include:_spf.mailer.test ~all", "v=spf1 a mx -all"],
            "v=spf1 ip4:192.0.2.10 include:_spf.mailer.test a mx ~all",
        ),
        (
            "192.0.2.10",
            ["v=spf1 mx ip4:192.0.2.10 -all"],
            "v=spf1 ip4:192.0.2.10 mx -all",
        ),
        (
            "192.0.2.10",
            ["v=spf1 redirect=_spf.mailer.test"],
            "v=spf1 ip4:192.0.2.10 redirect=_spf.mailer.test",
        ),
        (
            "192.0.2.10",
            ["v=spf1 a redirect=_spf.mailer.test -all"],
            "v=spf1 ip4:192.0.2.10 a -all",
        ),
    ],
)
def test_spf_value(ip: str, existing: list[str], expected: str) -> None:
    assert dnsrecords.spf_value(ip, existing) == expected


def test_long_txt_values_are_split_into_255_character_strings() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 700
    record = dnsrecords.Record("s1._domainkey.relay.test.", "TXT", value, "why")
    parsed = RR.fromZone(record.render() + "\n")
    assert len(parsed) == 1
    strings = [s.decode() for s in parsed[0].rdata.data]
    assert [len(s) for s in strings] == [255, 255, 208]
    assert "".join(strings) == value


def test_records_for_the_world(
    make_settings: Callable[..., Settings], ed25519_key_file: Path
) -> None:
    settings = make_settings(
        RELAY_DKIM_ED25519_SELECTOR="e1", RELAY_DKIM_ED25519_KEY_FILE=str(ed25519_key_file)
    )
    records = dnsrecords.records_for(settings, SENDING_IP)
    assert [(r.name, r.rtype) for r in records] == [
        ("1.0.0.127.in-addr.arpa.", "PTR"),
        (f"mail.{FROM_DOMAIN}.", "A"),
        (f"{FROM_DOMAIN}.", "TXT"),
        (f"s1._domainkey.{FROM_DOMAIN}.", "TXT"),
        (f"e1._domainkey.{FROM_DOMAIN}.", "TXT"),
        (f"_dmarc.{FROM_DOMAIN}.", "TXT"),
    ]
    assert all(r.reason and r.render().startswith("; ") for r in records)
    assert records[-1].value == f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{FROM_DOMAIN}"
    # Without a sending IP only the records that do not need one.
    assert [r.rtype for r in dnsrecords.records_for(settings, None)] == ["TXT", "TXT", "TXT"]


def test_spf_goes_to_the_envelope_domain_and_dkim_to_the_signing_domain(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        RELAY_ENVELOPE_FROM="bounce@bounces.relay.test", RELAY_DKIM_DOMAIN="relay.test"
    )
    names = {r.name for r in dnsrecords.records_for(settings, "2001:db8::25")}
    assert "bounces.relay.test." in names
    assert f"mail.{FROM_DOMAIN}." in names
    aaaa = next(r for r in dnsrecords.records_for(settings, "2001:db8::25") if r.rtype == "AAAA")
    assert aaaa.value == "2001:db8::25"


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    base_env: dict[str, str],
    dns_server: DNSZoneServer,
    ed25519_key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """An operator who has configured the relay but published nothing yet."""
    dns_server.add(SUPPORT_ONLY)
    monkeypatch.chdir(tmp_path)
    return {
        **base_env,
        "RELAY_DNS_NAMESERVERS": dns_server.address,
        "RELAY_DKIM_ED25519_SELECTOR": "e1",
        "RELAY_DKIM_ED25519_KEY_FILE": str(ed25519_key_file),
    }


def zone_records(output: str) -> list[RR]:
    return list(RR.fromZone(output))


def test_published_records_satisfy_the_doctor(
    cli_env: dict[str, str],
    dns_server: DNSZoneServer,
    make_settings: Callable[..., Settings],
) -> None:
    result = CliRunner().invoke(main, ["dns-records", "--ip", SENDING_IP], env=cli_env)
    assert result.exit_code == 0, result.output
    records = zone_records(result.output)
    assert sorted(QTYPE[r.rtype] for r in records) == ["A", "PTR", "TXT", "TXT", "TXT", "TXT"]
    comments = [line for line in result.output.splitlines() if line.startswith("; ")]
    assert (
        sum(c.startswith(("; PTR:", "; HELO:", "; SPF:", "; DKIM:", "; DMARC:")) for c in comments)
        == 6
    )

    # Publish the output as it is: every DNS check passes, DMARC p=none warns to tighten.
    dns_server.add(result.output)
    settings = make_settings(**cli_env)
    store = Outbox(settings.sqlalchemy_url)
    store.upgrade()
    store.dispose()
    checks = asyncio.run(run_checks(settings, resolver=make_resolver(settings), ip=SENDING_IP))
    statuses = {c.name: c.status for c in checks}
    assert statuses.pop("dmarc") == "WARN"
    assert set(statuses.values()) == {"PASS"}, checks


def test_existing_spf_is_merged_and_existing_dmarc_kept(
    cli_env: dict[str, str], dns_server: DNSZoneServer
) -> None:
    dns_server.add(
        f'{FROM_DOMAIN}. 300 IN TXT "v=spf1 include:_spf.mailer.test -all"\n'
        f'_dmarc.{FROM_DOMAIN}. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:d@{FROM_DOMAIN}"\n'
    )
    result = CliRunner().invoke(main, ["dns-records", "--ip", "192.0.2.10"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert (
        f'{FROM_DOMAIN}. 3600 IN TXT "v=spf1 ip4:192.0.2.10 include:_spf.mailer.test -all"'
        in result.output
    )
    assert f'"v=DMARC1; p=reject; rua=mailto:d@{FROM_DOMAIN}"' in result.output
    assert "p=none" not in result.output
    assert "10.2.0.192.in-addr.arpa. 3600 IN PTR mail.relay.test." in result.output


def test_sending_ip_is_detected_when_not_given(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["dns-records"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert f"; sending IP {SENDING_IP}: source address towards MX mx1.{SUPPORT_DOMAIN}" in (
        result.output
    )
    assert f'"v=spf1 ip4:{SENDING_IP} ~all"' in result.output


def test_without_a_sending_ip_the_other_records_are_still_printed(
    cli_env: dict[str, str], dns_server: DNSZoneServer
) -> None:
    dns_server.set_zone("")  # the support domain no longer resolves: no route to detect
    result = CliRunner().invoke(main, ["dns-records"], env=cli_env)
    assert result.exit_code == 0, result.output
    assert "; sending IP unknown" in result.output
    assert "--ip" in result.output
    assert [QTYPE[r.rtype] for r in zone_records(result.output)] == ["TXT", "TXT", "TXT"]


def test_rejects_a_bad_ip(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["dns-records", "--ip", "999.1.1.1"], env=cli_env)
    assert result.exit_code == 2
    assert "not an IPv4 or IPv6 address" in result.output
