"""`relay doctor` against a real DNS server on loopback: a correct world, then each way to
break it, each with the verdict and the fix (naming the record to publish) it must give."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import spf
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.mail.mx import Resolver, make_resolver
from relay.ops import dnsrecords
from relay.ops.cli import main
from relay.ops.doctor import (
    Check,
    aligned,
    generic_ptr_reasons,
    helpdesk_of,
    log_checks,
    organisational_domain,
    run_checks,
)
from relay.ops.doctor.auth import evaluate_spf
from relay.ops.doctor.lookup import SyncDNS
from relay.sandbox.dns import DNSZoneServer, ptr_name, txt_record
from relay.sandbox.world import FROM_DOMAIN, SENDING_IP, SUPPORT_DOMAIN, public_key_b64
from relay.settings import HCAPTCHA_TEST_SECRET, HCAPTCHA_TEST_SITEKEY, Settings
from relay.store.outbox import Outbox

ORDER = [
    "sending-ip",
    "ptr",
    "helo",
    "spf",
    "dkim:s1",
    "dkim:e1",
    "dmarc",
    "alignment",
    "support-mx",
    "support-helpdesk",
    "hcaptcha",
    "database",
]


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def other_rsa_pem() -> bytes:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture
def env(
    base_env: dict[str, str], world_dns: DNSZoneServer, ed25519_key_file: Path
) -> dict[str, str]:
    """A complete environment for the correct world, with both DKIM keys."""
    return {
        **base_env,
        "RELAY_DNS_NAMESERVERS": world_dns.address,
        "RELAY_DKIM_ED25519_SELECTOR": "e1",
        "RELAY_DKIM_ED25519_KEY_FILE": str(ed25519_key_file),
    }


@pytest.fixture
def doctor_settings(
    make_settings: Callable[..., Settings], env: dict[str, str]
) -> Callable[..., Settings]:
    """make(**overrides) -> Settings for the world, with the outbox store migrated."""

    def make(**overrides: str) -> Settings:
        settings = make_settings(**{**env, **overrides})
        store = Outbox(settings.sqlalchemy_url)
        store.upgrade()
        store.dispose()
        return settings

    return make


async def checks_by_name(settings: Settings, ip: str | None = SENDING_IP) -> dict[str, Check]:
    checks = await run_checks(settings, resolver=make_resolver(settings), ip=ip)
    return {c.name: c for c in checks}


# --- the correct world ----------------------------------------------------------------------


async def test_the_correct_world_passes_every_check(
    doctor_settings: Callable[..., Settings],
) -> None:
    checks = await run_checks(
        doctor_settings(), resolver=make_resolver(doctor_settings()), ip=SENDING_IP
    )
    assert [c.name for c in checks] == ORDER
    assert {c.name: (c.status, c.fix) for c in checks} == dict.fromkeys(ORDER, ("PASS", ""))
    by_name = {c.name: c for c in checks}
    assert by_name["spf"].details["result"] == "pass"
    assert by_name["dkim:s1"].details["probe"] == "verified"
    assert by_name["dkim:e1"].details["probe"] == "verified"
    assert "mail.relay.test" in by_name["ptr"].summary


async def test_the_sending_ip_is_detected_from_the_route_to_the_support_mx(
    doctor_settings: Callable[..., Settings],
) -> None:
    checks = await checks_by_name(doctor_settings(), ip=None)
    sending = checks["sending-ip"]
    assert sending.details["ip"] == SENDING_IP
    assert f"mx1.{SUPPORT_DOMAIN}" in sending.details["how"]
    # Loopback is never what a receiver sees: a warning that says how to give the real one.
    assert sending.status == "WARN"
    assert "--ip" in sending.fix
    assert checks["ptr"].status == "PASS"
    assert checks["spf"].status == "PASS"


async def test_sending_ip_cannot_be_detected_without_a_route(
    doctor_settings: Callable[..., Settings],
) -> None:
    settings = doctor_settings(RELAY_SUPPORT_ADDRESS="help@missing.test")
    checks = await checks_by_name(settings, ip=None)
    assert checks["sending-ip"].status == "FAIL"
    assert "missing.test" in checks["sending-ip"].summary
    assert "--ip" in checks["sending-ip"].fix
    assert checks["ptr"].status == "WARN"
    assert "no sending IP" in checks["ptr"].summary


async def test_with_a_smarthost_the_detected_ip_is_only_a_hint(
    doctor_settings: Callable[..., Settings],
) -> None:
    settings = doctor_settings(RELAY_SMARTHOST="127.0.0.5:2525")
    sending = (await checks_by_name(settings, ip=None))["sending-ip"]
    assert sending.status == "WARN"
    assert "smarthost 127.0.0.5" in sending.details["how"]
    assert "receivers see its address" in sending.summary
    assert "outbound IP" in sending.fix


async def test_spf_lookups_go_through_the_configured_resolver(
    doctor_settings: Callable[..., Settings], world_dns: DNSZoneServer
) -> None:
    """pyspf follows include: through our DNS server, not the system resolver."""
    world_dns.remove(f"{FROM_DOMAIN}.", "TXT")
    world_dns.add(txt_record(f"{FROM_DOMAIN}.", "v=spf1 include:_spf.mailer.test -all"))
    world_dns.add(txt_record("_spf.mailer.test.", "v=spf1 ip4:127.0.0.0/8 -all"))
    checks = await checks_by_name(doctor_settings())
    assert checks["spf"].status == "PASS"
    assert world_dns.queried("_spf.mailer.test", "TXT") >= 1


# --- each way to break it -------------------------------------------------------------------


@dataclass
class Broken:
    """A change to the correct world and what the doctor must say about it."""

    zone: Callable[[DNSZoneServer, bytes], None] = lambda _dns, _pem: None
    overrides: dict[str, str] = field(default_factory=dict)
    check: str = ""
    status: str = "FAIL"
    summary: tuple[str, ...] = ()
    fix: tuple[str, ...] = ()


def _replace(name: str, rtype: str, *lines: str) -> Callable[[DNSZoneServer, bytes], None]:
    def change(dns: DNSZoneServer, _pem: bytes) -> None:
        dns.remove(name, rtype)
        for line in lines:
            dns.add(line)

    return change


def _other_dkim(selector: str, pem_kind: str) -> Callable[[DNSZoneServer, bytes], None]:
    def change(dns: DNSZoneServer, other_pem: bytes) -> None:
        pem = other_pem if pem_kind == "rsa" else _pem(ed25519.Ed25519PrivateKey.generate())
        name = f"{selector}._domainkey.{FROM_DOMAIN}."
        dns.remove(name, "TXT")
        dns.add(txt_record(name, f"v=DKIM1; k={pem_kind}; p={public_key_b64(pem)}"))

    return change


PTR = ptr_name(SENDING_IP)
PTR_LINE = f"{PTR} 3600 IN PTR mail.{FROM_DOMAIN}."

BROKEN: dict[str, Broken] = {
    "no PTR": Broken(
        zone=_replace(PTR, "PTR"),
        check="ptr",
        summary=(f"{SENDING_IP} has no PTR record", "NXDOMAIN"),
        fix=("hosting provider", PTR_LINE),
    ),
    "generic PTR": Broken(
        zone=_replace(
            PTR,
            "PTR",
            f"{PTR} 300 IN PTR 1-0-0-127.dsl.pool.example.test.",
            "1-0-0-127.dsl.pool.example.test. 300 IN A 127.0.0.1",
        ),
        check="ptr",
        summary=("generic", "digits", "'dsl'", "'pool'", "not in your domain"),
        fix=(PTR_LINE,),
    ),
    "PTR not forward-confirmed": Broken(
        zone=_replace(
            PTR,
            "PTR",
            f"{PTR} 300 IN PTR relay-host.{FROM_DOMAIN}.",
            f"relay-host.{FROM_DOMAIN}. 300 IN A 127.0.0.7",
        ),
        check="ptr",
        summary=("not forward-confirmed", "127.0.0.7"),
        fix=(f"relay-host.{FROM_DOMAIN}. 3600 IN A 127.0.0.1",),
    ),
    "HELO does not resolve": Broken(
        overrides={"RELAY_HELO_HOSTNAME": f"outbound.{FROM_DOMAIN}"},
        check="helo",
        summary=(f"outbound.{FROM_DOMAIN} does not resolve",),
        fix=(f"outbound.{FROM_DOMAIN}. 3600 IN A 127.0.0.1",),
    ),
    "HELO resolves elsewhere": Broken(
        zone=_replace(f"mail.{FROM_DOMAIN}.", "A", f"mail.{FROM_DOMAIN}. 300 IN A 127.0.0.8"),
        check="helo",
        summary=("resolves to 127.0.0.8, not the sending IP 127.0.0.1",),
        fix=(f"mail.{FROM_DOMAIN}. 3600 IN A 127.0.0.1",),
    ),
    "HELO in another domain": Broken(
        overrides={"RELAY_HELO_HOSTNAME": "mx1.support.test"},
        check="helo",
        status="FAIL",  # it also resolves to the MX's address, not ours
        summary=("not in the From domain relay.test", "not the sending IP"),
        fix=("RELAY_HELO_HOSTNAME",),
    ),
    "two SPF records": Broken(
        zone=lambda dns, _pem: dns.add(txt_record(f"{FROM_DOMAIN}.", "v=spf1 a mx ~all")),
        check="spf",
        summary=("2 SPF records", "'v=spf1 ip4:127.0.0.1 -all'", "'v=spf1 a mx ~all'"),
        fix=(f'{FROM_DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 a mx -all"',),
    ),
    "SPF not covering the IP": Broken(
        zone=_replace(
            f"{FROM_DOMAIN}.", "TXT", txt_record(f"{FROM_DOMAIN}.", "v=spf1 ip4:192.0.2.1 -all")
        ),
        check="spf",
        summary=("'v=spf1 ip4:192.0.2.1 -all'", "gives fail for 127.0.0.1"),
        fix=(f'{FROM_DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 ip4:192.0.2.1 -all"',),
    ),
    "SPF soft-failing the IP": Broken(
        zone=_replace(f"{FROM_DOMAIN}.", "TXT", txt_record(f"{FROM_DOMAIN}.", "v=spf1 ~all")),
        check="spf",
        summary=("gives softfail",),
        fix=(f'{FROM_DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 ~all"',),
    ),
    "SPF that does not parse": Broken(
        zone=_replace(
            f"{FROM_DOMAIN}.",
            "TXT",
            txt_record(f"{FROM_DOMAIN}.", "v=spf1 ip4:127.0.0.1 bogus -all"),
        ),
        check="spf",
        summary=("gives permerror", "bogus"),
        fix=("replace it with",),
    ),
    "no SPF": Broken(
        zone=_replace(f"{FROM_DOMAIN}.", "TXT"),
        check="spf",
        summary=(f"no SPF record at {FROM_DOMAIN}",),
        fix=(f'{FROM_DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 ~all"',),
    ),
    "DKIM key for another private key": Broken(
        zone=_other_dkim("s1", "rsa"),
        check="dkim:s1",
        summary=(
            f"s1._domainkey.{FROM_DOMAIN}",
            "is not the public half of RELAY_DKIM_PRIVATE_KEY_FILE",
        ),
        fix=(f's1._domainkey.{FROM_DOMAIN}. 3600 IN TXT "v=DKIM1; k=rsa; p=',),
    ),
    "Ed25519 key for another private key": Broken(
        zone=_other_dkim("e1", "ed25519"),
        check="dkim:e1",
        summary=("is not the public half of RELAY_DKIM_ED25519_KEY_FILE",),
        fix=(f'e1._domainkey.{FROM_DOMAIN}. 3600 IN TXT "v=DKIM1; k=ed25519; p=',),
    ),
    "no DKIM key": Broken(
        zone=_replace(f"s1._domainkey.{FROM_DOMAIN}.", "TXT"),
        check="dkim:s1",
        summary=(f"no DKIM key at s1._domainkey.{FROM_DOMAIN}",),
        fix=(f"s1._domainkey.{FROM_DOMAIN}. 3600 IN TXT",),
    ),
    "revoked DKIM key": Broken(
        zone=_replace(
            f"s1._domainkey.{FROM_DOMAIN}.",
            "TXT",
            txt_record(f"s1._domainkey.{FROM_DOMAIN}.", "v=DKIM1; k=rsa; p="),
        ),
        check="dkim:s1",
        summary=("revoked",),
        fix=(f"s1._domainkey.{FROM_DOMAIN}. 3600 IN TXT",),
    ),
    "no DMARC": Broken(
        zone=_replace(f"_dmarc.{FROM_DOMAIN}.", "TXT"),
        check="dmarc",
        summary=(f"no DMARC record at _dmarc.{FROM_DOMAIN}",),
        fix=(
            f'_dmarc.{FROM_DOMAIN}. 3600 IN TXT "v=DMARC1; p=none; '
            f'rua=mailto:dmarc-reports@{FROM_DOMAIN}"',
            "p=quarantine",
        ),
    ),
    "DMARC p=none": Broken(
        zone=_replace(
            f"_dmarc.{FROM_DOMAIN}.",
            "TXT",
            txt_record(f"_dmarc.{FROM_DOMAIN}.", f"v=DMARC1; p=none; rua=mailto:d@{FROM_DOMAIN}"),
        ),
        check="dmarc",
        status="WARN",
        summary=("policy none",),
        fix=(
            f"mailto:d@{FROM_DOMAIN}",
            f'_dmarc.{FROM_DOMAIN}. 3600 IN TXT "v=DMARC1; p=quarantine; '
            f'rua=mailto:d@{FROM_DOMAIN}"',
            "p=reject",
        ),
    ),
    "null MX on the support domain": Broken(
        zone=_replace(f"{SUPPORT_DOMAIN}.", "MX", f"{SUPPORT_DOMAIN}. 300 IN MX 0 ."),
        check="support-mx",
        summary=("null MX", f"help@{SUPPORT_DOMAIN}"),
        fix=("RELAY_SUPPORT_ADDRESS",),
    ),
    "support domain without addresses": Broken(
        zone=_replace(f"mx1.{SUPPORT_DOMAIN}.", "A"),
        check="support-mx",
        summary=(f"no MX host of {SUPPORT_DOMAIN} has an address",),
        fix=("RELAY_SUPPORT_ADDRESS",),
    ),
    "native helpdesk address": Broken(
        zone=lambda dns, _pem: dns.add(
            "acme.zendesk.com. 300 IN MX 10 mx.acme.zendesk.com.\n"
            "mx.acme.zendesk.com. 300 IN A 127.0.0.2\n"
        ),
        overrides={"RELAY_SUPPORT_ADDRESS": "help@acme.zendesk.com"},
        check="support-helpdesk",
        status="WARN",
        summary=("help@acme.zendesk.com is Zendesk's native address",),
        fix=(
            f"support@{FROM_DOMAIN}",
            "forwarding to help@acme.zendesk.com",
            "RELAY_SUPPORT_ADDRESS=",
        ),
    ),
    "envelope domain not aligned": Broken(
        zone=lambda dns, _pem: dns.add(txt_record("bounces.test.", "v=spf1 ip4:127.0.0.1 -all")),
        overrides={"RELAY_ENVELOPE_FROM": "bounce@bounces.test"},
        check="alignment",
        status="WARN",
        summary=("bounces.test is not aligned (relaxed) with From relay.test",),
        fix=("RELAY_ENVELOPE_FROM",),
    ),
    "nothing aligned": Broken(
        zone=lambda dns, _pem: dns.add(txt_record("bounces.test.", "v=spf1 ip4:127.0.0.1 -all")),
        overrides={"RELAY_ENVELOPE_FROM": "bounce@bounces.test", "RELAY_DKIM_DOMAIN": "keys.test"},
        check="alignment",
        summary=("DKIM d=keys.test is not aligned", "bounces.test is not aligned"),
        fix=("RELAY_DKIM_DOMAIN=relay.test", "RELAY_ENVELOPE_FROM"),
    ),
    "strict DKIM alignment with a subdomain": Broken(
        zone=_replace(
            f"_dmarc.{FROM_DOMAIN}.",
            "TXT",
            txt_record(f"_dmarc.{FROM_DOMAIN}.", "v=DMARC1; p=reject; adkim=s"),
        ),
        overrides={"RELAY_DKIM_DOMAIN": f"mail.{FROM_DOMAIN}"},
        check="alignment",
        status="WARN",
        summary=(f"DKIM d=mail.{FROM_DOMAIN} is not aligned (strict)",),
        fix=("RELAY_DKIM_DOMAIN=relay.test",),
    ),
    "DNS failure looking up DMARC": Broken(
        zone=lambda dns, _pem: dns.fail([f"_dmarc.{FROM_DOMAIN}"]),
        check="dmarc",
        status="WARN",
        summary=("could not look up", "SERVFAIL"),
        fix=("RELAY_DNS_NAMESERVERS",),
    ),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
async def test_each_broken_record_gets_its_verdict_and_fix(
    case: Broken,
    doctor_settings: Callable[..., Settings],
    world_dns: DNSZoneServer,
    other_rsa_pem: bytes,
) -> None:
    case.zone(world_dns, other_rsa_pem)
    checks = await checks_by_name(doctor_settings(**case.overrides))
    check = checks[case.check]
    assert check.status == case.status, check
    for text in case.summary:
        assert text in check.summary, (text, check)
    for text in case.fix:
        assert text in check.fix, (text, check)


async def test_a_wrong_dkim_key_is_fixed_by_exactly_the_published_record(
    doctor_settings: Callable[..., Settings], world_dns: DNSZoneServer, other_rsa_pem: bytes
) -> None:
    _other_dkim("s1", "rsa")(world_dns, other_rsa_pem)
    settings = doctor_settings()
    check = (await checks_by_name(settings))["dkim:s1"]
    expected = dnsrecords.dkim_record(
        "s1", FROM_DOMAIN, settings.dkim_key_pem, source="RELAY_DKIM_PRIVATE_KEY_FILE"
    )
    assert expected.zone_line() in check.fix
    assert check.details["records"] == [f"v=DKIM1; k=rsa; p={public_key_b64(other_rsa_pem)}"]
    # Publishing the fix makes the check pass.
    world_dns.remove(expected.name, "TXT")
    world_dns.add(expected.zone_line())
    assert (await checks_by_name(settings))["dkim:s1"].status == "PASS"


async def test_hcaptcha_test_keys_fail_outside_development(
    doctor_settings: Callable[..., Settings],
) -> None:
    settings = doctor_settings()
    production = settings.model_copy(
        update={"env": "production", "hcaptcha_sitekey": HCAPTCHA_TEST_SITEKEY}
    )
    check = (await checks_by_name(production))["hcaptcha"]
    assert check.status == "FAIL"
    assert "RELAY_HCAPTCHA_SITEKEY" in check.summary
    assert "dashboard.hcaptcha.com" in check.fix


async def test_hcaptcha_test_keys_only_warn_in_development(
    doctor_settings: Callable[..., Settings],
) -> None:
    settings = doctor_settings(
        RELAY_HCAPTCHA_SITEKEY=HCAPTCHA_TEST_SITEKEY, RELAY_HCAPTCHA_SECRET=HCAPTCHA_TEST_SECRET
    )
    check = (await checks_by_name(settings))["hcaptcha"]
    assert check.status == "WARN"
    assert "RELAY_HCAPTCHA_SITEKEY and RELAY_HCAPTCHA_SECRET" in check.summary
    assert "RELAY_ENV=test" in check.summary


async def test_an_unmigrated_store_fails_and_is_left_untouched(
    make_settings: Callable[..., Settings], env: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(**env, RELAY_DATABASE_URL=f"sqlite:///{tmp_path / 'new.sqlite3'}")
    check = (await checks_by_name(settings))["database"]
    assert check.status == "FAIL"
    assert "does not exist yet" in check.summary
    assert "relay db upgrade" in check.fix
    assert not (tmp_path / "new.sqlite3").exists()


async def test_a_store_without_the_schema_fails(
    make_settings: Callable[..., Settings], env: dict[str, str], postgres_url: str
) -> None:
    settings = make_settings(**env, RELAY_DATABASE_URL=postgres_url)
    check = (await checks_by_name(settings))["database"]
    assert check.status == "FAIL"
    assert "has no schema" in check.summary
    assert "relay db upgrade" in check.fix
    store = Outbox(postgres_url)
    store.upgrade()
    store.dispose()
    check = (await checks_by_name(settings))["database"]
    assert check.status == "PASS", check


async def test_an_unreachable_store_fails_without_showing_the_password(
    make_settings: Callable[..., Settings], env: dict[str, str]
) -> None:
    url = "postgresql+psycopg://relay:s3cret@127.0.0.1:1/relay"
    settings = make_settings(**env, RELAY_DATABASE_URL=url)
    check = (await checks_by_name(settings))["database"]
    assert check.status == "FAIL"
    assert "unreachable" in check.summary
    assert "s3cret" not in json.dumps(check.as_dict(), default=str)


async def test_the_database_check_can_be_left_out(doctor_settings: Callable[..., Settings]) -> None:
    settings = doctor_settings()
    checks = await run_checks(
        settings, resolver=make_resolver(settings), ip=SENDING_IP, database=False
    )
    assert "database" not in {c.name for c in checks}


def test_log_checks_warns_once_per_non_pass(caplog: pytest.LogCaptureFixture) -> None:
    checks = [
        Check("ptr", "PASS", "fine"),
        Check("spf", "FAIL", "no SPF record at relay.test", "publish it"),
        Check("dmarc", "WARN", "policy none"),
    ]
    with caplog.at_level(logging.WARNING, logger="relay.worker"):
        log_checks(logging.getLogger("relay.worker"), checks)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        'doctor.check check=spf status=FAIL summary="no SPF record at relay.test" fix="publish it"',
        'doctor.check check=dmarc status=WARN summary="policy none"',
    ]


# --- pyspf's lookups -------------------------------------------------------------------------


async def test_a_doctor_run_puts_pyspfs_own_lookup_back(
    doctor_settings: Callable[..., Settings],
) -> None:
    original = spf.DNSLookup
    checks = await checks_by_name(doctor_settings())
    # relay.test exists only on the loopback server: pyspf did look up through our resolver.
    assert checks["spf"].details["result"] == "pass", checks["spf"]
    assert spf.DNSLookup is original


class RendezvousDNS(SyncDNS):
    """A SyncDNS whose first SPF lookup waits at `barrier` until the other evaluation is
    inside pyspf too, whose later ones wait for `later` (when given), and which notes what
    pyspf's `DNSLookup` was at each of its lookups."""

    def __init__(
        self, resolver: Resolver, barrier: threading.Barrier, later: threading.Event | None = None
    ) -> None:
        super().__init__(resolver, asyncio.get_running_loop(), timeout=10)
        self.barrier = barrier
        self.later = later
        self.waited = False
        self.seen: list[object] = []

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], object]]:
        if not self.seen:
            self.barrier.wait(timeout=10)
        elif self.later is not None:
            self.waited = self.later.wait(timeout=10)
        self.seen.append(spf.DNSLookup)
        return super().spf_lookup(name, qtype)


async def test_concurrent_spf_evaluations_each_use_their_own_lookup(
    make_settings: Callable[..., Settings], dns_server: DNSZoneServer
) -> None:
    """Two evaluations inside pyspf at once, each against its own DNS server: each gets its
    own server's answers, the one still inside keeps them after the other has left, and
    pyspf's own lookup is back once both have."""
    original = spf.DNSLookup
    dns_server.add(txt_record(f"{FROM_DOMAIN}.", f"v=spf1 ip4:{SENDING_IP} -all"))
    refusing_zone = "\n".join(
        [
            txt_record(f"{FROM_DOMAIN}.", f"v=spf1 include:spf.{FROM_DOMAIN} -all"),
            txt_record(f"spf.{FROM_DOMAIN}.", "v=spf1 -all"),
        ]
    )
    with DNSZoneServer(refusing_zone) as other:
        barrier = threading.Barrier(2)
        first_left = threading.Event()
        allows = RendezvousDNS(
            make_resolver(make_settings(RELAY_DNS_NAMESERVERS=dns_server.address)), barrier
        )
        refuses = RendezvousDNS(
            make_resolver(make_settings(RELAY_DNS_NAMESERVERS=other.address)), barrier, first_left
        )

        async def evaluate(sync_dns: SyncDNS) -> tuple[str, str]:
            return await asyncio.to_thread(
                evaluate_spf,
                sync_dns,
                ip=SENDING_IP,
                sender=f"form@{FROM_DOMAIN}",
                helo=f"mail.{FROM_DOMAIN}",
            )

        async def first() -> tuple[str, str]:
            try:
                return await evaluate(allows)
            finally:
                first_left.set()

        results = await asyncio.gather(first(), evaluate(refuses))
    assert [verdict for verdict, _ in results] == ["pass", "fail"], results
    # The include was looked up after the first evaluation had left pyspf, still through ours.
    assert refuses.waited
    assert len(refuses.seen) == 2
    assert all(seen is not original for seen in [*allows.seen, *refuses.seen])
    assert spf.DNSLookup is original


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ip", "generic"),
    [
        ("mail.relay.test", "127.0.0.1", False),
        ("mx1.relay.test", "203.0.113.5", False),
        ("smtp-out.example.co.uk", "198.51.100.7", False),
        ("1-0-0-127.dsl.pool.example.test", "127.0.0.1", True),
        ("ip-203-0-113-5.eu-west-1.compute.example.net", "203.0.113.5", True),
        ("c-73-22-1-5.hsd1.ca.cable.example.net", "73.22.1.5", True),
        ("static.5.113.0.203.clients.your-server.example", "203.0.113.5", True),
        ("host5.dynamic.isp.example", "203.0.113.5", True),
        ("cb007105.res.example.com", "203.0.113.5", True),
        ("7f000001.example.test", "127.0.0.1", True),
        ("pool.example", "203.0.113.5", False),
    ],
)
def test_generic_ptr_names(name: str, ip: str, generic: bool) -> None:
    assert bool(generic_ptr_reasons(name, ip)) is generic


def test_organisational_domains_and_alignment() -> None:
    assert organisational_domain("mail.relay.test") == "relay.test"
    assert organisational_domain("a.b.example.co.uk") == "example.co.uk"
    assert aligned("bounce.relay.test", "forms.relay.test")
    assert not aligned("bounce.relay.test", "relay.test", strict=True)
    assert not aligned("example.co.uk", "other.co.uk")


@pytest.mark.parametrize(
    ("domain", "product"),
    [
        ("acme.zendesk.com", "Zendesk"),
        ("acme.freshdesk.com", "Freshdesk"),
        ("intercom-mail.com", "Intercom"),
        ("support.acme.example", None),
        ("notzendesk.com", None),
    ],
)
def test_helpdesk_native_domains(domain: str, product: str | None) -> None:
    assert helpdesk_of(domain) == product


# --- the command ----------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    env: dict[str, str],
    doctor_settings: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    doctor_settings()  # migrates the store the CLI will find
    monkeypatch.chdir(tmp_path)  # no stray .env
    return env


def test_cli_passes_on_the_correct_world(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["doctor", "--ip", SENDING_IP], env=cli_env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line.startswith(("PASS", "WARN", "FAIL"))]
    assert [row.split()[1] for row in rows] == ORDER
    # Aligned: every summary starts in the same column.
    width = max(len(n) for n in ORDER)
    assert all(row[6 + width + 2] != " " and row[6 + width + 1] == " " for row in rows)
    assert "\x1b[" not in result.output  # no colour when not on a terminal
    assert lines[-1] == f"doctor: {len(ORDER)} pass, 0 warn, 0 fail"


def test_cli_colours_only_on_a_terminal(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["doctor", "--ip", SENDING_IP], env=cli_env, color=True)
    assert result.exit_code == 0, result.output
    assert "\x1b[32m\x1b[1mPASS" in result.output or "\x1b[1m\x1b[32mPASS" in result.output


def test_cli_on_a_world_broken_in_every_way(
    cli_env: dict[str, str], world_dns: DNSZoneServer, other_rsa_pem: bytes
) -> None:
    world_dns.set_zone(
        "\n".join(
            [
                f"mail.{FROM_DOMAIN}. 300 IN A 127.0.0.8",
                txt_record(f"{FROM_DOMAIN}.", "v=spf1 ip4:192.0.2.1 -all"),
                txt_record(f"{FROM_DOMAIN}.", "v=spf1 mx -all"),
                txt_record(
                    f"s1._domainkey.{FROM_DOMAIN}.",
                    f"v=DKIM1; k=rsa; p={public_key_b64(other_rsa_pem)}",
                ),
                "acme.zendesk.com. 300 IN MX 0 .",
            ]
        )
        + "\n"
    )
    env = {**cli_env, "RELAY_SUPPORT_ADDRESS": "help@acme.zendesk.com"}
    result = CliRunner().invoke(main, ["doctor", "--ip", SENDING_IP, "--json"], env=env)
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in map(json.loads, result.output.splitlines())}
    assert {name: c["status"] for name, c in checks.items()} == {
        "sending-ip": "PASS",
        "ptr": "FAIL",
        "helo": "FAIL",
        "spf": "FAIL",
        "dkim:s1": "FAIL",
        "dkim:e1": "FAIL",
        "dmarc": "FAIL",
        "alignment": "PASS",
        "support-mx": "FAIL",
        "support-helpdesk": "WARN",
        "hcaptcha": "PASS",
        "database": "PASS",
    }
    assert "no PTR record" in checks["ptr"]["summary"]
    assert "2 SPF records" in checks["spf"]["summary"]
    assert '"v=spf1 ip4:127.0.0.1 ip4:192.0.2.1 mx -all"' in checks["spf"]["fix"]
    assert "not the public half" in checks["dkim:s1"]["summary"]
    assert "no DKIM key at e1._domainkey.relay.test" in checks["dkim:e1"]["summary"]
    assert "null MX" in checks["support-mx"]["summary"]
    assert set(checks["spf"]) == {"name", "status", "summary", "fix", "details"}


def test_cli_rejects_a_bad_ip(cli_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["doctor", "--ip", "mail.relay.test"], env=cli_env)
    assert result.exit_code == 2
    assert "not an IPv4 or IPv6 address" in result.output


def test_cli_with_a_bad_configuration_exits_2(
    cli_env: dict[str, str],
) -> None:
    env = {**cli_env, "RELAY_HELO_HOSTNAME": "localhost"}
    result = CliRunner().invoke(main, ["doctor"], env=env)
    assert result.exit_code == 2
    assert "RELAY_HELO_HOSTNAME" in result.output


def test_every_forms_support_address_is_checked(
    cli_env: dict[str, str], world_dns: DNSZoneServer, tmp_path: Path
) -> None:
    """RELAY_FORMS_FILE: each form's address gets its own support-mx and support-helpdesk,
    named by form, the fix naming the form's key."""
    world_dns.add(
        "acme.zendesk.com. 300 IN MX 10 mx.acme.zendesk.com.\n"
        "mx.acme.zendesk.com. 300 IN A 127.0.0.2\n"
    )
    forms = tmp_path / "forms.toml"
    forms.write_text(
        "".join(
            f"[forms.{form_id}]\nsupport_address = '{address}'\n[[forms.{form_id}.fields]]\n"
            "name = 'email'\ntype = 'email'\nrequired = true\nlabel = 'E'\n"
            for form_id, address in (
                ("sales", f"sales@{SUPPORT_DOMAIN}"),
                ("bugs", "bugs@nullmx.test"),
                ("jobs", "jobs@acme.zendesk.com"),
            )
        )
    )
    env = {**cli_env, "RELAY_FORMS_FILE": str(forms)}
    result = CliRunner().invoke(main, ["doctor", "--ip", SENDING_IP, "--json"], env=env)
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in map(json.loads, result.output.splitlines())}
    names = list(checks)
    assert names[names.index("support-helpdesk") + 1 : names.index("hcaptcha")] == [
        "support-mx:sales",
        "support-helpdesk:sales",
        "support-mx:bugs",
        "support-helpdesk:bugs",
        "support-mx:jobs",
        "support-helpdesk:jobs",
    ]
    assert checks["support-mx"]["status"] == checks["support-mx:sales"]["status"] == "PASS"
    assert checks["support-mx:bugs"]["status"] == "FAIL"
    assert "bugs@nullmx.test would bounce" in checks["support-mx:bugs"]["summary"]
    assert "forms.bugs.support_address in RELAY_FORMS_FILE" in checks["support-mx:bugs"]["fix"]
    assert checks["support-helpdesk:jobs"]["status"] == "WARN"
    assert (
        "forms.jobs.support_address in RELAY_FORMS_FILE to"
        in (checks["support-helpdesk:jobs"]["fix"])
    )
