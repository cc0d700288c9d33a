"""The sending IP and what a receiver checks of it first: its PTR and our HELO name.

The IP is given (`--ip`) or found as the source address the kernel picks towards the support
domain's MX, or the smarthost; receiver checklist rows 1 (PTR) and 2 (HELO) follow.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from relay.errors import DNSError
from relay.mail.mx import Resolver
from relay.ops import dnsrecords
from relay.ops.doctor.domains import aligned, organisational_domain
from relay.ops.doctor.lookup import Lookup, addresses_of, detect_sending_ip, lookup
from relay.ops.doctor.verdict import Check, Finding, Status, combine, lookup_failed
from relay.settings import Settings, domain_of, is_fqdn

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


# --- the sending IP -------------------------------------------------------------------------


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


# --- PTR ------------------------------------------------------------------------------------


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
        return lookup_failed("ptr", f"the PTR of {ip}", result, details)
    names = sorted(r.target.to_text(omit_final_dot=True).lower() for r in result.records)
    details["names"] = names
    if not names:
        return Check(
            "ptr", "FAIL", f"{ip} has no PTR record ({wanted.name} {result.missing})", ask, details
        )
    findings: list[Finding] = []
    if len(names) > 1:
        findings.append(
            Finding("WARN", f"{ip} has {len(names)} PTR records ({', '.join(names)})", ask)
        )
    name = names[0]
    findings += await _forward_confirmation(settings, resolver, ip, name, ask=ask, details=details)
    findings += _ptr_name_findings(settings, ip, name, helo, ask=ask, details=details)
    return combine(
        "ptr", findings, f"{ip} -> {name}, forward-confirmed, in {settings.from_domain}", details
    )


async def _forward_confirmation(
    settings: Settings,
    resolver: Resolver,
    ip: str,
    name: str,
    *,
    ask: str,
    details: dict[str, Any],
) -> list[Finding]:
    """The PTR's name must resolve back to `ip` (FCrDNS), or receivers distrust the PTR."""
    forward, forward_lookup = await addresses_of(resolver, name)
    details["forward"] = forward
    confirmed = ip in {str(ipaddress.ip_address(a)) for a in forward}
    details["forward_confirmed"] = confirmed
    if confirmed:
        return []
    how = ", ".join(forward) if forward else forward_lookup.missing
    in_ours = organisational_domain(name) in _own_domains(settings)
    return [
        Finding(
            "WARN" if forward_lookup.temporary else "FAIL",
            f"PTR {ip} -> {name} is not forward-confirmed: {name} resolves to {how}, not {ip}",
            f"publish:\n{dnsrecords.address_record(name, ip).zone_line()}" if in_ours else ask,
        )
    ]


def _ptr_name_findings(
    settings: Settings, ip: str, name: str, helo: str, *, ask: str, details: dict[str, Any]
) -> list[Finding]:
    """The PTR's name itself: not a provider's generic one, in our domain, our HELO name."""
    findings: list[Finding] = []
    generic = generic_ptr_reasons(name, ip)
    details["generic"] = generic
    if generic:
        findings.append(
            Finding(
                "FAIL",
                f"PTR {name} looks like a provider's generic name ({'; '.join(generic)})",
                ask,
            )
        )
    if organisational_domain(name) not in _own_domains(settings):
        findings.append(
            Finding("WARN", f"PTR {name} is not in your domain ({settings.from_domain})", ask)
        )
    elif name != helo and not generic:
        findings.append(
            Finding(
                "WARN",
                f"PTR {name} differs from the HELO name {helo}",
                f"set RELAY_HELO_HOSTNAME={name}, or {ask}",
            )
        )
    return findings


# --- HELO -----------------------------------------------------------------------------------


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
    found, result = await addresses_of(resolver, helo)
    details["addresses"] = found
    findings = _helo_address_findings(helo, ip, found, result)
    if not aligned(helo, settings.from_domain):
        findings.append(
            Finding(
                "WARN",
                f"HELO name {helo} is not in the From domain {settings.from_domain}",
                f"set RELAY_HELO_HOSTNAME to a name in {settings.from_domain} "
                f"(e.g. {suggestion}) with an A record for the sending IP and a matching PTR",
            )
        )
    if ip is None and found and not findings:
        findings.append(
            Finding(
                "WARN",
                f"{helo} resolves ({', '.join(found)}); not compared with the sending IP (unknown)",
                "pass --ip",
            )
        )
    return combine("helo", findings, f"{helo} resolves to {ip}, in {settings.from_domain}", details)


def _helo_address_findings(
    helo: str, ip: str | None, found: list[str], result: Lookup
) -> list[Finding]:
    """The HELO name must resolve, and to the sending IP when we know it."""
    if not found:
        status: Status = "WARN" if result.temporary else "FAIL"
        fix = (
            f"publish:\n{dnsrecords.address_record(helo, ip).zone_line()}"
            if ip
            else f"publish an A record for {helo}"
        )
        return [Finding(status, f"HELO name {helo} does not resolve ({result.missing})", fix)]
    if ip is not None and ip not in {str(ipaddress.ip_address(a)) for a in found}:
        return [
            Finding(
                "FAIL",
                f"HELO name {helo} resolves to {', '.join(found)}, not the sending IP {ip}",
                f"replace its address record with:\n"
                f"{dnsrecords.address_record(helo, ip).zone_line()}",
            )
        ]
    return []
