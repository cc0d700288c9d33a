"""Deliverability checks: what a receiver will think of our mail, asked of DNS before it does.

`run_checks(settings, resolver=..., ip=...)` returns one `Check` per concern (PTR, HELO, SPF,
each DKIM selector, DMARC, alignment, the support address, hCaptcha keys, the database), each
PASS, WARN or FAIL with the fix spelled out: when a record is wrong the fix quotes the record
to publish instead, built by `relay.dnsrecords` so `relay dns-records` and the doctor agree.

Every lookup goes through the resolver we are given (RELAY_DNS_NAMESERVERS), including those
made by pyspf and dkimpy, which are synchronous: they run in a worker thread and their lookups
are handed back to the event loop through `_SyncDNS` (pyspf via the `spf.DNSLookup` seam
installed by `_install_spf_seam`, dkimpy via its `dnsfunc` argument).

The worker runs the checks once at start and logs every non-PASS (`log_checks`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import ipaddress
import logging
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Literal

import dkim
import dkim.util
import dns.exception
import dns.resolver
import spf
from cryptography.hazmat.primitives import serialization

from relay.config import (
    HCAPTCHA_TEST_SECRET,
    HCAPTCHA_TEST_SITEKEY,
    Settings,
    domain_of,
    is_fqdn,
)
from relay.errors import DNSError, StoreUnavailable
from relay.logs import event
from relay.mail.mx import Resolver, resolve_addresses, resolve_mx
from relay.ops import dnsrecords

Status = Literal["PASS", "WARN", "FAIL"]
_RANK: dict[Status, int] = {"PASS": 0, "WARN": 1, "FAIL": 2}

# Helpdesks' own inbound domains (receiver checklist row 7: send to an address of your own
# domain that forwards to the helpdesk, not to the helpdesk's native address). A support
# address in one of these domains, or a subdomain of one, gets a WARN.
HELPDESK_NATIVE_DOMAINS: dict[str, str] = {
    "zendesk.com": "Zendesk",
    "freshdesk.com": "Freshdesk",
    "freshservice.com": "Freshservice",
    "helpscoutapp.com": "Help Scout",
    "desk.com": "Desk.com",
    "zohodesk.com": "Zoho Desk",
    "zohodesk.eu": "Zoho Desk",
    "zohodesk.in": "Zoho Desk",
    "zohodesk.com.au": "Zoho Desk",
    "kayako.com": "Kayako",
    "gorgias.io": "Gorgias",
    "intercom-mail.com": "Intercom",
    "happyfox.com": "HappyFox",
    "groovehq.com": "Groove",
}

# Words that mark a reverse name as a provider's generic, per-address name (receiver
# checklist row 1): residential access, dynamic pools, anonymous customer hosts.
GENERIC_PTR_WORDS = frozenset(
    {
        "adsl",
        "bb",
        "broadband",
        "cable",
        "client",
        "clients",
        "cpe",
        "cust",
        "customer",
        "dhcp",
        "dial",
        "dialup",
        "dip",
        "dsl",
        "dyn",
        "dynamic",
        "dynip",
        "fiber",
        "fibre",
        "ftth",
        "home",
        "ip",
        "mobile",
        "nat",
        "pool",
        "ppp",
        "pppoe",
        "res",
        "resident",
        "residential",
        "sdsl",
        "static",
        "unassigned",
        "user",
        "vdsl",
        "wireless",
        "xdsl",
    }
)

# Second-level labels under which ccTLDs register names (example.co.uk): enough to find the
# organisational domain without shipping the public-suffix list.
_SECOND_LEVEL = frozenset(
    {"ac", "co", "com", "edu", "go", "gob", "gov", "ltd", "mil", "ne", "net", "nom", "or", "org"}
)


@dataclass(frozen=True)
class Check:
    """One verdict: `fix` says what to change (empty on PASS); `details` is for --json."""

    name: str
    status: Status
    summary: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Finding:
    status: Status
    text: str
    fix: str = ""


def _combine(name: str, findings: Sequence[_Finding], ok: str, details: dict[str, Any]) -> Check:
    """One Check from several findings: the worst status, every problem, every distinct fix."""
    problems = [f for f in findings if f.status != "PASS"]
    if not problems:
        return Check(name, "PASS", ok, "", details)
    status = max((f.status for f in problems), key=_RANK.__getitem__)
    fixes: list[str] = []
    for f in problems:
        if f.fix and f.fix not in fixes:
            fixes.append(f.fix)
    return Check(name, status, "; ".join(f.text for f in problems), "\n".join(fixes), details)


def _lookup_failed(name: str, what: str, result: Lookup, details: dict[str, Any]) -> Check:
    return Check(
        name,
        "WARN",
        f"could not look up {what}: {result.missing}",
        "check RELAY_DNS_NAMESERVERS (and the domain's nameservers), then run the doctor again",
        details,
    )


def worst(checks: Iterable[Check]) -> Status:
    return max((c.status for c in checks), key=_RANK.__getitem__, default="PASS")


def log_checks(logger: logging.Logger, checks: Iterable[Check]) -> None:
    """One warning per non-PASS check, as the worker does at start."""
    for check in checks:
        if check.status != "PASS":
            event(
                logger,
                "doctor.check",
                logging.WARNING,
                check=check.name,
                status=check.status,
                summary=check.summary,
                fix=check.fix or None,
            )


# --- domain names ---------------------------------------------------------------------------


def organisational_domain(name: str) -> str:
    """The registered domain of `name` (mail.example.co.uk -> example.co.uk), by heuristic."""
    labels = name.rstrip(".").lower().split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(a: str, b: str, *, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 §3.1): strict is equality, relaxed the same
    organisational domain."""
    a, b = a.rstrip(".").lower(), b.rstrip(".").lower()
    if strict:
        return a == b
    return organisational_domain(a) == organisational_domain(b)


def generic_ptr_reasons(name: str, ip: str) -> list[str]:
    """Why `name` looks like a provider's generic reverse name for `ip` ([] when it does not).

    Only the labels left of the organisational domain are read, so a provider whose own name
    happens to contain "pool" or "cable" is not flagged for that alone.
    """
    name = name.rstrip(".").lower()
    org = organisational_domain(name)
    host = name[: -len(org)].rstrip(".") if name != org else ""
    reasons: list[str] = []
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        octets = str(address).split(".")
        groups = re.findall(r"\d+", host)
        found = 0
        for octet in set(octets):
            found += min(octets.count(octet), groups.count(octet))
        if found >= 3 or address.packed.hex() in host:
            reasons.append("contains the IP address's digits")
    else:
        groups = re.findall(r"[0-9a-f]+", host)
        hextets = [h.lstrip("0") or "0" for h in address.exploded.split(":")[4:]]
        if sum(1 for h in hextets if h != "0" and h in groups) >= 2:
            reasons.append("contains the IP address's digits")
    words = sorted({w for w in re.split(r"[^a-z]+", host) if w in GENERIC_PTR_WORDS})
    if words:
        reasons.append("contains " + ", ".join(repr(w) for w in words))
    return reasons


def helpdesk_of(domain: str) -> str | None:
    """The helpdesk whose native inbound domain `domain` is, if any."""
    domain = domain.rstrip(".").lower()
    for suffix, product in HELPDESK_NATIVE_DOMAINS.items():
        if domain == suffix or domain.endswith("." + suffix):
            return product
    return None


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM/DMARC tag list ("v=DMARC1; p=none") as a dict; keys lower-cased, p= unspaced."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            key = key.strip().lower()
            tags.setdefault(key, re.sub(r"\s+", "", value) if key == "p" else value.strip())
    return tags


# --- DNS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """One query's outcome: records, or why there are none (`temporary` when it may pass)."""

    records: tuple[Any, ...] = ()
    missing: str = ""  # "NXDOMAIN", "no records", or the temporary failure
    temporary: bool = False

    @property
    def nxdomain(self) -> bool:
        return self.missing == "NXDOMAIN"


async def lookup(resolver: Resolver, name: str, rtype: str) -> Lookup:
    try:
        answer = await resolver.resolve(name.rstrip(".") + ".", rtype, search=False)
    except dns.resolver.NXDOMAIN:
        return Lookup(missing="NXDOMAIN")
    except dns.resolver.NoAnswer:
        return Lookup(missing="no records")
    except dns.resolver.NoNameservers:
        return Lookup(missing="no nameserver answered (SERVFAIL)", temporary=True)
    except dns.exception.Timeout:
        return Lookup(missing="timed out", temporary=True)
    except dns.exception.DNSException as exc:
        return Lookup(missing=f"{type(exc).__name__}: {exc}", temporary=True)
    return Lookup(tuple(answer))


def txt_text(rdata: Any) -> str:
    """A TXT record's strings joined, as receivers read SPF, DKIM and DMARC."""
    return b"".join(rdata.strings).decode("utf-8", "replace")


async def txt_records(resolver: Resolver, name: str) -> tuple[list[str], Lookup]:
    result = await lookup(resolver, name, "TXT")
    return [txt_text(r) for r in result.records], result


async def addresses_of(resolver: Resolver, name: str) -> tuple[list[str], Lookup]:
    """A and AAAA of `name`; the Lookup says why there are none."""
    v4, v6 = await asyncio.gather(lookup(resolver, name, "A"), lookup(resolver, name, "AAAA"))
    found = [r.address for r in (*v4.records, *v6.records)]
    if found:
        return found, Lookup()
    if v4.temporary or v6.temporary:
        return [], v4 if v4.temporary else v6
    return [], v4 if v4.nxdomain else v6


class _SyncDNS:
    """Lets synchronous code in a worker thread query through the async resolver."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop, timeout: float):
        self.resolver = resolver
        self.loop = loop
        self.timeout = timeout

    def query(self, name: str, rtype: str) -> Lookup:
        try:
            future = asyncio.run_coroutine_threadsafe(lookup(self.resolver, name, rtype), self.loop)
            return future.result(self.timeout)
        except TimeoutError:
            return Lookup(missing="timed out", temporary=True)
        except RuntimeError as exc:  # the loop closed under us (the worker is stopping)
            return Lookup(missing=str(exc), temporary=True)

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup contract: [((name, type), value)], TempError when in doubt."""
        result = self.query(name, qtype)
        if result.temporary:
            raise spf.TempError(f"DNS {result.missing}")
        values: list[tuple[tuple[str, str], Any]] = []
        for rdata in result.records:
            if qtype in ("A", "AAAA"):
                values.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                values.append(
                    ((name, qtype), (rdata.preference, rdata.exchange.to_text(omit_final_dot=True)))
                )
            elif qtype == "PTR":
                values.append(((name, qtype), rdata.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                values.append(((name, qtype), rdata.strings))
        return values

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's dnsfunc contract: the first TXT record's strings joined, or None."""
        text = name.decode("ascii") if isinstance(name, bytes) else name
        result = self.query(text, "TXT")
        if result.temporary:
            raise dkim.DnsTimeoutError(f"{text}: {result.missing}")
        if not result.records:
            return None
        return b"".join(result.records[0].strings)


_spf_lookup: contextvars.ContextVar[Callable[[str, str], Any] | None] = contextvars.ContextVar(
    "relay_spf_lookup", default=None
)
_spf_original: Callable[..., Any] | None = None


def _spf_dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> Any:
    lookup_fn = _spf_lookup.get()
    if lookup_fn is not None:
        return lookup_fn(name, qtype)
    assert _spf_original is not None
    return _spf_original(name, qtype, strict, timeout)


def _install_spf_seam() -> None:
    """Route pyspf's lookups through the function in `_spf_lookup` for the current context;
    other callers of pyspf (none in this process, normally) keep its own lookup."""
    global _spf_original  # noqa: PLW0603 - one module-level seam, installed once
    if spf.DNSLookup is not _spf_dispatch:
        _spf_original = spf.DNSLookup
        spf.DNSLookup = _spf_dispatch


def evaluate_spf(sync_dns: _SyncDNS, *, ip: str, sender: str, helo: str) -> tuple[str, str]:
    """pyspf's RFC 7208 check_host() for `ip` sending as `sender`: (result, explanation).
    Blocking: run it in a thread."""
    _install_spf_seam()
    token = _spf_lookup.set(sync_dns.spf_lookup)
    try:
        result, _code, explanation = spf.query(i=ip, s=sender, h=helo, querytime=20).check()
    finally:
        _spf_lookup.reset(token)
    return str(result), str(explanation)


# --- the sending IP -------------------------------------------------------------------------


def source_address(ip: str, port: int) -> str:
    """The local address the kernel picks to reach ip:port (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((ip, port))
        return str(sock.getsockname()[0])


async def detect_sending_ip(settings: Settings, resolver: Resolver) -> tuple[str, str]:
    """(ip, how it was found): the source address towards the support domain's first MX, or
    the smarthost. Raises DNSError or OSError when there is no route to find."""
    smarthost = settings.smarthost_address
    if smarthost is not None:
        host, port = smarthost
        try:
            targets: Sequence[str] = [str(ipaddress.ip_address(host))]
        except ValueError:
            targets = await resolve_addresses(host, resolver)
        via = f"smarthost {host}"
    else:
        hosts = await resolve_mx(domain_of(settings.support_address), resolver)
        targets = [a for h in hosts for a in h.addresses]
        port = 25
        via = f"MX {hosts[0].name}"
    error: OSError | None = None
    for target in targets:
        try:
            return source_address(target, port), f"source address towards {via} ({target})"
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


async def check_sending_ip(
    settings: Settings, resolver: Resolver, ip: str | None
) -> tuple[Check, str | None]:
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            return Check(
                "sending-ip",
                "FAIL",
                f"{ip!r} is not an IP address",
                "pass --ip with an IPv4 or IPv6 address",
            ), None
        return Check("sending-ip", "PASS", f"{ip} (given with --ip)", "", {"ip": ip}), ip
    try:
        found, how = await detect_sending_ip(settings, resolver)
    except (DNSError, OSError) as exc:
        return Check(
            "sending-ip",
            "FAIL",
            f"cannot tell the sending IP: {exc}",
            "pass --ip with the public address this host sends mail from",
        ), None
    details = {"ip": found, "how": how}
    address = ipaddress.ip_address(found)
    if settings.smarthost:
        return Check(
            "sending-ip",
            "WARN",
            f"mail leaves through the smarthost {settings.smarthost}: receivers see its "
            f"address, not ours ({found}); the checks below are for {found}",
            "ask the smarthost's operator for its outbound IP addresses and run "
            "`relay doctor --ip <that address>`; its PTR and your SPF must cover them",
            details,
        ), found
    if address.is_private or address.is_loopback or address.is_link_local:
        return Check(
            "sending-ip",
            "WARN",
            f"{found} ({how}) is not a public address: behind NAT, receivers see another one",
            "run `relay doctor --ip <public address>` with the address receivers see",
            details,
        ), found
    return Check("sending-ip", "PASS", f"{found} ({how})", "", details), found


# --- PTR and HELO ---------------------------------------------------------------------------


def _own_domains(settings: Settings) -> set[str]:
    return {
        organisational_domain(d)
        for d in (settings.from_domain, domain_of(settings.envelope_sender))
    }


async def check_ptr(settings: Settings, resolver: Resolver, ip: str | None) -> Check:
    """Receiver checklist row 1: a PTR in our domain, forward-confirmed, not generic."""
    helo = settings.helo_hostname.rstrip(".").lower()
    if ip is None:
        return Check("ptr", "WARN", "not checked: no sending IP", "pass --ip")
    wanted = dnsrecords.ptr_record(ip, helo)
    ask = (
        f"ask your hosting provider to set the reverse DNS of {ip} to {helo}:\n{wanted.zone_line()}"
    )
    result = await lookup(resolver, wanted.name, "PTR")
    details: dict[str, Any] = {"ip": ip, "reverse": wanted.name}
    if result.temporary:
        return _lookup_failed("ptr", f"the PTR of {ip}", result, details)
    names = sorted(r.target.to_text(omit_final_dot=True).lower() for r in result.records)
    details["names"] = names
    if not names:
        return Check(
            "ptr", "FAIL", f"{ip} has no PTR record ({wanted.name} {result.missing})", ask, details
        )
    findings: list[_Finding] = []
    if len(names) > 1:
        findings.append(
            _Finding("WARN", f"{ip} has {len(names)} PTR records ({', '.join(names)})", ask)
        )
    name = names[0]
    forward, forward_lookup = await addresses_of(resolver, name)
    details["forward"] = forward
    confirmed = ip in {str(ipaddress.ip_address(a)) for a in forward}
    details["forward_confirmed"] = confirmed
    if not confirmed:
        how = ", ".join(forward) if forward else forward_lookup.missing
        in_ours = organisational_domain(name) in _own_domains(settings)
        findings.append(
            _Finding(
                "WARN" if forward_lookup.temporary else "FAIL",
                f"PTR {ip} -> {name} is not forward-confirmed: {name} resolves to {how}, not {ip}",
                (
                    f"publish:\n{dnsrecords.address_record(name, ip).zone_line()}"
                    if in_ours
                    else ask
                ),
            )
        )
    generic = generic_ptr_reasons(name, ip)
    details["generic"] = generic
    if generic:
        findings.append(
            _Finding(
                "FAIL",
                f"PTR {name} looks like a provider's generic name ({'; '.join(generic)})",
                ask,
            )
        )
    if organisational_domain(name) not in _own_domains(settings):
        findings.append(
            _Finding("WARN", f"PTR {name} is not in your domain ({settings.from_domain})", ask)
        )
    elif name != helo and not generic:
        findings.append(
            _Finding(
                "WARN",
                f"PTR {name} differs from the HELO name {helo}",
                f"set RELAY_HELO_HOSTNAME={name}, or {ask}",
            )
        )
    return _combine(
        "ptr", findings, f"{ip} -> {name}, forward-confirmed, in {settings.from_domain}", details
    )


async def check_helo(settings: Settings, resolver: Resolver, ip: str | None) -> Check:
    """Receiver checklist row 2: an FQDN of our domain that resolves to the sending IP."""
    helo = settings.helo_hostname.rstrip(".").lower()
    details: dict[str, Any] = {"helo": helo}
    suggestion = f"mail.{settings.from_domain}"
    if not is_fqdn(helo):
        return Check(
            "helo",
            "FAIL",
            f"RELAY_HELO_HOSTNAME {helo!r} is not a fully qualified host name",
            f"set RELAY_HELO_HOSTNAME to a name like {suggestion} and publish its A record",
            details,
        )
    findings: list[_Finding] = []
    found, result = await addresses_of(resolver, helo)
    details["addresses"] = found
    normalised = {str(ipaddress.ip_address(a)) for a in found}
    if not found:
        status: Status = "WARN" if result.temporary else "FAIL"
        fix = (
            f"publish:\n{dnsrecords.address_record(helo, ip).zone_line()}"
            if ip
            else f"publish an A record for {helo}"
        )
        findings.append(
            _Finding(status, f"HELO name {helo} does not resolve ({result.missing})", fix)
        )
    elif ip is not None and ip not in normalised:
        findings.append(
            _Finding(
                "FAIL",
                f"HELO name {helo} resolves to {', '.join(found)}, not the sending IP {ip}",
                f"replace its address record with:\n"
                f"{dnsrecords.address_record(helo, ip).zone_line()}",
            )
        )
    if not aligned(helo, settings.from_domain):
        findings.append(
            _Finding(
                "WARN",
                f"HELO name {helo} is not in the From domain {settings.from_domain}",
                f"set RELAY_HELO_HOSTNAME to a name in {settings.from_domain} "
                f"(e.g. {suggestion}) with an A record for the sending IP and a matching PTR",
            )
        )
    if ip is None and found and not findings:
        findings.append(
            _Finding(
                "WARN",
                f"{helo} resolves ({', '.join(found)}); not compared with the sending IP (unknown)",
                "pass --ip",
            )
        )
    return _combine(
        "helo", findings, f"{helo} resolves to {ip}, in {settings.from_domain}", details
    )


# --- SPF ------------------------------------------------------------------------------------


async def check_spf(
    settings: Settings, resolver: Resolver, ip: str | None, sync_dns: _SyncDNS
) -> Check:
    """Receiver checklist row 3: exactly one SPF record, and it passes the sending IP."""
    domain = domain_of(settings.envelope_sender)
    texts, result = await txt_records(resolver, domain)
    records = [t for t in texts if dnsrecords.is_spf(t)]
    wanted = dnsrecords.spf_record(domain, ip, records)
    details: dict[str, Any] = {"domain": domain, "records": records, "publish": wanted.value}
    if result.temporary:
        return _lookup_failed("spf", f"TXT at {domain}", result, details)
    if not records:
        return Check(
            "spf",
            "FAIL",
            f"no SPF record at {domain} (the envelope sender's domain)",
            f"publish:\n{wanted.zone_line()}",
            details,
        )
    if len(records) > 1:
        listed = ", ".join(repr(r) for r in records)
        return Check(
            "spf",
            "FAIL",
            f"{len(records)} SPF records at {domain} ({listed}): receivers treat that as a "
            "permanent error (RFC 7208 §4.5)",
            f"delete them and publish one that merges them:\n{wanted.zone_line()}",
            details,
        )
    record = records[0]
    if ip is None:
        return Check(
            "spf",
            "WARN",
            f"SPF at {domain}: {record!r}; not evaluated: no sending IP",
            "pass --ip",
            details,
        )
    verdict, explanation = await asyncio.to_thread(
        evaluate_spf,
        sync_dns,
        ip=ip,
        sender=settings.envelope_sender,
        helo=settings.helo_hostname,
    )
    details.update(result=verdict, explanation=explanation)
    if verdict == "pass":
        return Check("spf", "PASS", f"{record!r} at {domain} gives pass for {ip}", "", details)
    if verdict == "temperror":
        return Check(
            "spf",
            "WARN",
            f"SPF evaluation of {record!r} hit a temporary error: {explanation}",
            "run the doctor again; if it persists check the domains the record includes",
            details,
        )
    why = f" ({explanation})" if explanation else ""
    return Check(
        "spf",
        "FAIL",
        f"{record!r} at {domain} gives {verdict} for {ip}{why}",
        f"replace it with:\n{wanted.zone_line()}",
        details,
    )


# --- DKIM -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    selector: str
    pem: bytes
    source: str


def _keys(settings: Settings) -> list[_Key]:
    source = (
        "RELAY_DKIM_PRIVATE_KEY_FILE"
        if settings.dkim_private_key_file
        else "RELAY_DKIM_PRIVATE_KEY"
    )
    keys = [_Key(settings.dkim_selector, settings.dkim_key_pem, source)]
    if settings.dkim_ed25519_selector and settings.dkim_ed25519_key_pem:
        keys.append(
            _Key(
                settings.dkim_ed25519_selector,
                settings.dkim_ed25519_key_pem,
                "RELAY_DKIM_ED25519_KEY_FILE",
            )
        )
    return keys


def probe_message(settings: Settings, now: datetime | None = None) -> bytes:
    """A message like ours, never sent: signed and verified to test the published keys."""
    now = now or datetime.now(UTC)
    lines = [
        f"From: {settings.from_address}",
        f"To: {settings.support_address}",
        "Subject: relay doctor DKIM probe",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <doctor-{uuid.uuid4().hex}@{settings.from_domain}>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "relay doctor signs this message to check the published DKIM keys.",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def sign_probe(settings: Settings) -> bytes:
    """The probe signed the way the worker signs (relay.signing.Signer)."""
    from relay.mail.signing import Signer  # noqa: PLC0415 - keeps the doctor importable alone

    return Signer.from_settings(settings).sign(probe_message(settings))


def _signature_index(signed: bytes, selector: str) -> int | None:
    headers, _ = dkim.rfc822_parse(signed)
    signatures = [v for k, v in headers if k.lower() == b"dkim-signature"]
    for index, value in enumerate(signatures):
        if dkim.util.parse_tag_value(value).get(b"s", b"").decode() == selector:
            return index
    return None


def verify_probe(signed: bytes, selector: str, sync_dns: _SyncDNS) -> tuple[bool, str]:
    """dkimpy's verdict on the probe's signature by `selector`, and its reason when it fails.
    Blocking: run it in a thread."""
    index = _signature_index(signed, selector)
    if index is None:
        return False, f"the signer produced no signature with s={selector}"
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    collector = logging.Logger("relay.doctor.dkim", logging.ERROR)
    collector.addHandler(_Collect())
    try:
        ok = bool(dkim.DKIM(signed, logger=collector).verify(idx=index, dnsfunc=sync_dns.dkim_txt))
    except dkim.DKIMException as exc:
        return False, str(exc)
    return ok, "; ".join(messages) or ("" if ok else "the signature does not verify")


def _public_key_der(b64: str) -> bytes | None:
    """The published p= as comparable DER, or None when it is not base64."""
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None


def _same_key(published: str, ours: str) -> bool:
    if published == ours:
        return True
    a, b = _public_key_der(published), _public_key_der(ours)
    if a is None or b is None:
        return False
    try:
        key_a = serialization.load_der_public_key(a)
        key_b = serialization.load_der_public_key(b)
    except (ValueError, TypeError):
        return False
    return bool(
        key_a.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == key_b.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _abbrev(p: str) -> str:
    return p if len(p) <= 24 else f"{p[:12]}…{p[-8:]}"


async def check_dkim(
    settings: Settings,
    resolver: Resolver,
    key: _Key,
    *,
    sync_dns: _SyncDNS,
    signed: bytes | None,
    sign_error: str,
) -> Check:
    """Receiver checklist row 4: the published key is the public half of ours, and a
    signature made by our signer verifies against it."""
    name = f"dkim:{key.selector}"
    wanted = dnsrecords.dkim_record(
        key.selector, settings.signing_domain, key.pem, source=key.source
    )
    owner = wanted.name.rstrip(".")
    publish = f"publish:\n{wanted.zone_line()}"
    texts, result = await txt_records(resolver, owner)
    details: dict[str, Any] = {"name": owner, "records": texts, "publish": wanted.value}
    if result.temporary:
        return _lookup_failed(name, owner, result, details)
    if not texts:
        return Check(name, "FAIL", f"no DKIM key at {owner} ({result.missing})", publish, details)
    if len(texts) > 1:
        return Check(
            name,
            "FAIL",
            f"{len(texts)} TXT records at {owner}: receivers may use either",
            f"keep one:\n{wanted.zone_line()}",
            details,
        )
    tags = parse_tags(texts[0])
    ours = parse_tags(wanted.value)
    replace = f"replace the TXT record at {owner} with:\n{wanted.zone_line()}"
    if tags.get("v", "DKIM1") != "DKIM1" or "p" not in tags:
        return Check(
            name, "FAIL", f"{owner} is not a DKIM key record: {texts[0]!r}", replace, details
        )
    if not tags["p"]:
        return Check(name, "FAIL", f"the key at {owner} is revoked (empty p=)", replace, details)
    if tags.get("k", "rsa").lower() != ours["k"]:
        return Check(
            name,
            "FAIL",
            f"{owner} publishes a k={tags.get('k', 'rsa')} key; {key.source} is k={ours['k']}",
            replace,
            details,
        )
    if not _same_key(tags["p"], ours["p"]):
        return Check(
            name,
            "FAIL",
            f"the key published at {owner} (p={_abbrev(tags['p'])}) is not the public half of "
            f"{key.source} (p={_abbrev(ours['p'])}): every signature will fail",
            f"{replace}\n(or point {key.source} at the private key that was published)",
            details,
        )
    findings: list[_Finding] = []
    if "y" in tags.get("t", "").split(":"):
        findings.append(
            _Finding(
                "WARN",
                f"{owner} has t=y (testing): receivers may ignore failures",
                f"when signatures verify, {replace}",
            )
        )
    if signed is None:
        details["probe"] = sign_error
        findings.append(
            _Finding(
                "WARN",
                f"the key matches but no probe was signed: {sign_error}",
                "fix the signer (see `relay send`), then run the doctor again",
            )
        )
    else:
        ok, why = await asyncio.to_thread(verify_probe, signed, key.selector, sync_dns)
        details["probe"] = "verified" if ok else why
        if not ok:
            findings.append(
                _Finding(
                    "FAIL", f"a probe signed with s={key.selector} does not verify: {why}", replace
                )
            )
    return _combine(
        name,
        findings,
        f"{owner} publishes the public half of {key.source}; a probe signature verifies",
        details,
    )


# --- DMARC and alignment --------------------------------------------------------------------


async def find_dmarc(resolver: Resolver, domain: str) -> tuple[str, list[str], Lookup]:
    """(where it was found, DMARC records there, the lookup): the From domain's own record,
    else the organisational domain's (RFC 7489 §6.6.3)."""
    where = f"_dmarc.{domain}"
    texts, result = await txt_records(resolver, where)
    records = [t for t in texts if t.lower().replace(" ", "").startswith("v=dmarc1")]
    org = organisational_domain(domain)
    if not records and not result.temporary and org != domain:
        org_where = f"_dmarc.{org}"
        org_texts, org_result = await txt_records(resolver, org_where)
        org_records = [t for t in org_texts if t.lower().replace(" ", "").startswith("v=dmarc1")]
        if org_records or org_result.temporary:
            return org_where, org_records, org_result
    return where, records, result


async def check_dmarc(settings: Settings, resolver: Resolver) -> tuple[Check, dict[str, str]]:
    domain = settings.from_domain
    wanted = dnsrecords.dmarc_record(domain)
    where, records, result = await find_dmarc(resolver, domain)
    details: dict[str, Any] = {"name": where, "records": records, "publish": wanted.value}
    if result.temporary:
        return _lookup_failed("dmarc", where, result, details), {}
    if not records:
        return Check(
            "dmarc",
            "FAIL",
            f"no DMARC record at _dmarc.{domain}",
            f"publish:\n{wanted.zone_line()}\n(p=none only collects reports; tighten to "
            "p=quarantine, then p=reject, once they show your mail passing)",
            details,
        ), {}
    if len(records) > 1:
        return Check(
            "dmarc",
            "FAIL",
            f"{len(records)} DMARC records at {where}: receivers ignore both",
            f"keep one:\n{wanted.zone_line()}",
            details,
        ), {}
    tags = parse_tags(records[0])
    policy = tags.get("sp" if where != f"_dmarc.{domain}" else "p", tags.get("p", "")).lower()
    details["policy"] = policy
    found = f"{records[0]!r} at {where}"
    if policy not in ("none", "quarantine", "reject"):
        return Check(
            "dmarc",
            "FAIL",
            f"{found} has no valid policy (p=)",
            f"replace it with:\n{wanted.zone_line()}",
            details,
        ), tags
    if policy == "none":
        rua = tags.get("rua")
        tightened = re.sub(r"\bp\s*=\s*none\b", "p=quarantine", records[0], flags=re.I)
        if not rua:
            tightened = f"{tightened.rstrip().rstrip(';')}; rua=mailto:dmarc-reports@{domain}"
        tight = dnsrecords.Record(dnsrecords.fqdn(where), "TXT", tightened, "")
        return Check(
            "dmarc",
            "WARN",
            f"{found}: policy none only monitors; spoofed mail in your name is still delivered",
            (
                f"read the aggregate reports ({rua}); "
                if rua
                else f"add rua=mailto:dmarc-reports@{domain} to receive reports; "
            )
            + f"once they show your mail passing, publish:\n{tight.zone_line()}\n"
            "and later p=reject",
            details,
        ), tags
    return Check("dmarc", "PASS", f"{found}: policy {policy}", "", details), tags


def _mode(strict: bool) -> str:
    return "strict" if strict else "relaxed"


def check_alignment(settings: Settings, dmarc_tags: dict[str, str]) -> Check:
    """DMARC passes when SPF or DKIM passes for a domain aligned with From (RFC 7489 §3.1)."""
    from_domain = settings.from_domain
    dkim_domain = settings.signing_domain
    envelope = domain_of(settings.envelope_sender)
    strict_dkim = dmarc_tags.get("adkim", "r").lower() == "s"
    strict_spf = dmarc_tags.get("aspf", "r").lower() == "s"
    dkim_ok = aligned(dkim_domain, from_domain, strict=strict_dkim)
    spf_ok = aligned(envelope, from_domain, strict=strict_spf)
    details = {
        "from": from_domain,
        "dkim_d": dkim_domain,
        "envelope": envelope,
        "dkim_aligned": dkim_ok,
        "spf_aligned": spf_ok,
    }
    findings: list[_Finding] = []
    if not dkim_ok:
        findings.append(
            _Finding(
                "FAIL" if not spf_ok else "WARN",
                f"DKIM d={dkim_domain} is not aligned ({_mode(strict_dkim)}) with From "
                f"{from_domain}",
                f"set RELAY_DKIM_DOMAIN={from_domain} (or unset it) and publish the key there",
            )
        )
    if not spf_ok:
        findings.append(
            _Finding(
                "FAIL" if not dkim_ok else "WARN",
                f"the envelope sender's domain {envelope} is not aligned ({_mode(strict_spf)}) "
                f"with From {from_domain}",
                f"set RELAY_ENVELOPE_FROM to an address in {from_domain} (or unset it)",
            )
        )
    return _combine(
        "alignment",
        findings,
        f"From {from_domain}, DKIM d={dkim_domain} and envelope {envelope} align",
        details,
    )


# --- the support address --------------------------------------------------------------------


async def check_support_mx(settings: Settings, resolver: Resolver) -> Check:
    """The support address's domain must accept mail: usable MX (or A), no null MX."""
    domain = domain_of(settings.support_address)
    details: dict[str, Any] = {"domain": domain}
    fix = (
        f"set RELAY_SUPPORT_ADDRESS to an address that receives mail, or have {domain}'s "
        "owner publish MX records for it"
    )
    result = await lookup(resolver, domain, "MX")
    if result.temporary:
        return _lookup_failed("support-mx", f"MX of {domain}", result, details)
    if result.nxdomain:
        return Check("support-mx", "FAIL", f"{domain} does not exist (NXDOMAIN)", fix, details)
    mx = sorted(
        (r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in result.records
    )
    details["mx"] = [f"{p} {n or '.'}" for p, n in mx]
    real = [n for _, n in mx if n not in ("", ".")]
    if mx and not real:
        return Check(
            "support-mx",
            "FAIL",
            f"{domain} publishes a null MX (RFC 7505): it accepts no mail, every message to "
            f"{settings.support_address} would bounce",
            fix,
            details,
        )
    if not mx:
        found, found_lookup = await addresses_of(resolver, domain)
        if found:
            return Check(
                "support-mx",
                "PASS",
                f"{domain} has no MX; mail goes to its address record ({', '.join(found)})",
                "",
                details,
            )
        return Check(
            "support-mx",
            "WARN" if found_lookup.temporary else "FAIL",
            f"{domain} has neither MX nor A/AAAA records",
            fix,
            details,
        )
    looked = await asyncio.gather(*(addresses_of(resolver, n) for n in real))
    usable = [f"{n} ({', '.join(a)})" for n, (a, _) in zip(real, looked, strict=True) if a]
    details["usable"] = usable
    if not usable:
        return Check(
            "support-mx",
            "FAIL",
            f"no MX host of {domain} has an address ({', '.join(real)})",
            fix,
            details,
        )
    findings: list[_Finding] = []
    if mx and len(real) < len(mx):
        findings.append(_Finding("WARN", f"{domain} mixes a null MX with real ones", fix))
    return _combine(
        "support-mx", findings, f"{domain} accepts mail: MX {', '.join(usable)}", details
    )


def check_support_helpdesk(settings: Settings) -> Check:
    """Receiver checklist row 7: send to your own address that forwards to the helpdesk."""
    address = settings.support_address
    product = helpdesk_of(domain_of(address))
    details: dict[str, Any] = {"address": address, "helpdesk": product}
    if product is None:
        return Check(
            "support-helpdesk",
            "PASS",
            f"{address} is not a helpdesk's native address",
            "",
            details,
        )
    return Check(
        "support-helpdesk",
        "WARN",
        f"{address} is {product}'s native address: {product} advises sending to an address "
        "of your own domain that forwards to it (fewer duplicates, no risk of the native "
        "address being suspended)",
        f"create e.g. support@{settings.from_domain} forwarding to {address}, add it to "
        f"{product} as a support address, and set RELAY_SUPPORT_ADDRESS=support@"
        f"{settings.from_domain}",
        details,
    )


# --- local configuration --------------------------------------------------------------------


def check_hcaptcha(settings: Settings) -> Check:
    """Receiver checklist row 5: a real CAPTCHA, not the published always-pass test keys."""
    secret = settings.hcaptcha_secret.get_secret_value() if settings.hcaptcha_secret else None
    test_keys = [
        var
        for var, is_test in (
            ("RELAY_HCAPTCHA_SITEKEY", settings.hcaptcha_sitekey == HCAPTCHA_TEST_SITEKEY),
            ("RELAY_HCAPTCHA_SECRET", secret == HCAPTCHA_TEST_SECRET),
        )
        if is_test
    ]
    fix = (
        "create a site at dashboard.hcaptcha.com and set RELAY_HCAPTCHA_SITEKEY and "
        "RELAY_HCAPTCHA_SECRET to its keys"
    )
    status: Status = "WARN" if settings.is_development else "FAIL"
    if not settings.hcaptcha_sitekey or secret is None:
        return Check("hcaptcha", status, "no hCaptcha keys: the form is not protected", fix)
    if test_keys:
        where = f" (allowed only because RELAY_ENV={settings.env})" if status == "WARN" else ""
        return Check(
            "hcaptcha",
            status,
            f"{' and '.join(test_keys)} hold hCaptcha's published test keys, which accept "
            f"every token{where}",
            fix,
            {"test_keys": test_keys},
        )
    return Check("hcaptcha", "PASS", "hCaptcha keys set (not the published test keys)")


def check_database(settings: Settings) -> Check:
    """The outbox store answers and its schema is at the newest migration. Blocking.

    Auto-migration is off: the doctor reports, `relay db upgrade` changes.
    """
    from relay.store.outbox import Outbox  # noqa: PLC0415 - SQLAlchemy only when checked

    safe_url = _safe_url(settings.sqlalchemy_url)
    details: dict[str, Any] = {"url": safe_url}
    sqlite_file = _sqlite_file(settings.sqlalchemy_url)
    if sqlite_file is not None and not sqlite_file.exists():
        return Check(
            "database",
            "FAIL",
            f"the outbox store {sqlite_file} does not exist yet",
            "run `relay db upgrade` (the worker also creates it when it starts)",
            details,
        )
    outbox = Outbox(settings.sqlalchemy_url, auto_migrate=False)
    try:
        current = outbox.current_revision()
        head = outbox.head_revision()
        details.update(revision=current, head=head)
        if current != head:
            state = "has no schema" if current is None else f"is at revision {current}"
            return Check(
                "database",
                "FAIL",
                f"the outbox store {safe_url} {state}; the newest is {head}",
                "run `relay db upgrade`",
                details,
            )
        outbox.ping()
    except StoreUnavailable as exc:
        return Check(
            "database",
            "FAIL",
            f"the outbox store {safe_url} is unreachable: {exc}",
            "check RELAY_DATABASE_URL and that the database server is running",
            details,
        )
    finally:
        outbox.dispose()
    return Check("database", "PASS", f"{safe_url} reachable, schema at {head}", "", details)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; checking must not create it."""
    from sqlalchemy import make_url  # noqa: PLC0415

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


def _safe_url(url: str) -> str:
    from sqlalchemy import make_url  # noqa: PLC0415

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is not echoed: it may hold a password
        return "(unparsable RELAY_DATABASE_URL)"


# --- all of them ----------------------------------------------------------------------------


async def run_checks(
    settings: Settings,
    *,
    resolver: Resolver,
    ip: str | None = None,
    database: bool = True,
) -> list[Check]:
    """Every check, in a stable order. `ip` None: detected (see `detect_sending_ip`).
    `database=False` leaves the store check out (a caller that has just migrated it)."""
    loop = asyncio.get_running_loop()
    sync_dns = _SyncDNS(resolver, loop, timeout=settings.dns_timeout * 3 + 5)
    sending, ip = await check_sending_ip(settings, resolver, ip)

    signed: bytes | None = None
    sign_error = ""
    try:
        signed = await asyncio.to_thread(sign_probe, settings)
    except Exception as exc:  # any signer failure is reported, not raised
        sign_error = f"{type(exc).__name__}: {exc}"

    async def no_check() -> Check | None:
        return None

    core, (dmarc_check, dmarc_tags), support, store = await asyncio.gather(
        asyncio.gather(
            check_ptr(settings, resolver, ip),
            check_helo(settings, resolver, ip),
            check_spf(settings, resolver, ip, sync_dns),
            *(
                check_dkim(
                    settings, resolver, key, sync_dns=sync_dns, signed=signed, sign_error=sign_error
                )
                for key in _keys(settings)
            ),
        ),
        check_dmarc(settings, resolver),
        check_support_mx(settings, resolver),
        asyncio.to_thread(check_database, settings) if database else no_check(),
    )
    checks = [
        sending,
        *core,
        dmarc_check,
        check_alignment(settings, dmarc_tags),
        support,
        check_support_helpdesk(settings),
        check_hcaptcha(settings),
    ]
    if store is not None:
        checks.append(store)
    return checks


async def startup_checks(settings: Settings, resolver: Any) -> None:
    """The checks a long-running worker logs at start (every non-PASS, on relay.worker's
    log): delivery does not wait for them (relay.worker.run_worker runs them beside it)."""
    checks = await run_checks(settings, resolver=resolver, database=False)
    log_checks(logging.getLogger("relay.worker"), checks)
