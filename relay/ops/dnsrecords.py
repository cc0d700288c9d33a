"""The DNS records an operator publishes so that receivers trust our mail, as zone-file text.

Pure functions: settings and a sending IP in, records out. `relay dns-records` prints them,
`relay dkim keygen` prints the DKIM one, and `relay doctor` quotes them as the fix when what is
published is wrong, so the three always agree. `records_to_publish`, `relay dns-records`' own,
alone asks DNS: for the sending IP and for the SPF and DMARC records already published.

Order follows the setup guide (docs/dns-setup.md): PTR and HELO first (they take longest,
the PTR is set by the hosting provider), then SPF, DKIM and DMARC.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.errors import DNSError
from relay.mail.signing import dkim_txt_record, split_txt
from relay.settings import Settings, domain_of

if TYPE_CHECKING:
    from relay.mail.mx import Resolver

DEFAULT_TTL = 3600

_SPF_START = re.compile(r"^v=spf1(\s|$)", re.IGNORECASE)
_SPF_ALL = re.compile(r"^[+?~-]?all$", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One resource record with the reason to publish it (rendered as a `;` comment)."""

    name: str  # absolute, with the trailing dot
    rtype: str  # "TXT", "A", "AAAA", "PTR"
    value: str  # the whole TXT text, or the rdata of other types
    reason: str
    ttl: int = DEFAULT_TTL

    @property
    def rdata(self) -> str:
        if self.rtype == "TXT":
            return " ".join(quote_txt(chunk) for chunk in split_txt(self.value))
        return self.value

    def zone_line(self) -> str:
        return f"{self.name} {self.ttl} IN {self.rtype} {self.rdata}"

    def render(self) -> str:
        return f"; {self.reason}\n{self.zone_line()}"


def fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


def quote_txt(chunk: str) -> str:
    return '"' + chunk.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- DKIM -----------------------------------------------------------------------------------


def dkim_name(selector: str, domain: str) -> str:
    return fqdn(f"{selector}._domainkey.{domain}")


def dkim_record(selector: str, domain: str, private_pem: bytes, *, source: str) -> Record:
    value = dkim_txt_record(private_pem)
    kind = "Ed25519" if "k=ed25519" in value else "RSA"
    return Record(
        dkim_name(selector, domain),
        "TXT",
        value,
        f"DKIM: public half of {source} ({kind}); receivers verify our d={domain} s={selector} "
        "signatures with it",
    )


# --- SPF ------------------------------------------------------------------------------------


def is_spf(text: str) -> bool:
    return bool(_SPF_START.match(text))


def ip_mechanism(ip: str) -> str:
    return f"ip{ipaddress.ip_address(ip).version}:{ipaddress.ip_address(ip)}"


def spf_value(ip: str | None, existing: Sequence[str] = ()) -> str:
    """One SPF record that authorises `ip`, keeping every term of the records already there.

    Several existing records (a permerror for receivers, RFC 7208 §4.5) are merged into one;
    the first `all` found stays last, and a `redirect=` is dropped when an `all` exists,
    since `all` overrides it (RFC 7208 §6.1). A new record ends in `~all`: tighten it to
    `-all` once every server that sends as this domain is listed.
    """
    mechanism = ip_mechanism(ip) if ip else None
    terms: list[str] = []
    final: str | None = None
    redirect: str | None = None
    for record in existing:
        for term in record.split()[1:]:
            if _SPF_ALL.match(term):
                final = final or term
            elif term.lower().startswith("redirect="):
                redirect = redirect or term
            elif term.lower() != (mechanism or "").lower() and term not in terms:
                terms.append(term)
    if not existing:
        final = "~all"
    head = [mechanism] if mechanism else []
    tail = [final] if final else ([redirect] if redirect else [])
    return " ".join(["v=spf1", *head, *terms, *tail])


def spf_record(domain: str, ip: str | None, existing: Sequence[str] = ()) -> Record:
    merged = " (merged with the record already there)" if existing else ""
    who = ip or "the sending IP"
    return Record(
        fqdn(domain),
        "TXT",
        spf_value(ip, existing),
        f"SPF: authorises {who} to send as {domain} (the envelope sender's domain){merged}; "
        "publish exactly one v=spf1 record per name",
    )


# --- DMARC ----------------------------------------------------------------------------------


def dmarc_value(domain: str, policy: str = "none") -> str:
    return f"v=DMARC1; p={policy}; rua=mailto:dmarc-reports@{domain}"


def dmarc_record(domain: str) -> Record:
    return Record(
        fqdn(f"_dmarc.{domain}"),
        "TXT",
        dmarc_value(domain),
        f"DMARC: tells receivers to check that SPF/DKIM align with From: {domain}; start with "
        f"p=none and read the reports sent to dmarc-reports@{domain} (create that mailbox), "
        "then tighten to p=quarantine and p=reject",
    )


# --- HELO and PTR ---------------------------------------------------------------------------


def address_record(helo: str, ip: str) -> Record:
    rtype = "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
    return Record(
        fqdn(helo),
        rtype,
        str(ipaddress.ip_address(ip)),
        f"HELO: {helo.rstrip('.')} is the name we send in EHLO; it must resolve to the "
        "sending IP (RFC 5321 §2.3.5)",
    )


def ptr_record(ip: str, helo: str) -> Record:
    return Record(
        ipaddress.ip_address(ip).reverse_pointer + ".",
        "PTR",
        fqdn(helo),
        f"PTR: reverse DNS of {ip}; not in your zone: ask your hosting provider to set it "
        f"to {helo.rstrip('.')} (a PTR in your own domain, matching HELO and its A record)",
    )


# --- everything -----------------------------------------------------------------------------


def records_for(
    settings: Settings, ip: str | None, *, existing_spf: Sequence[str] = ()
) -> list[Record]:
    """Every record to publish for `settings` sending from `ip` (None: records needing it
    are left out)."""
    records: list[Record] = []
    if ip:
        records.append(ptr_record(ip, settings.helo_hostname))
        records.append(address_record(settings.helo_hostname, ip))
        records.append(spf_record(domain_of(settings.envelope_sender), ip, existing_spf))
    if settings.dkim_key_pem:
        records.append(
            dkim_record(
                settings.dkim_selector,
                settings.signing_domain,
                settings.dkim_key_pem,
                source=_key_source(settings),
            )
        )
    if settings.dkim_ed25519_selector and settings.dkim_ed25519_key_pem:
        records.append(
            dkim_record(
                settings.dkim_ed25519_selector,
                settings.signing_domain,
                settings.dkim_ed25519_key_pem,
                source="RELAY_DKIM_ED25519_KEY_FILE",
            )
        )
    records.append(dmarc_record(settings.from_domain))
    return records


def _key_source(settings: Settings) -> str:
    if settings.dkim_private_key_file:
        return "RELAY_DKIM_PRIVATE_KEY_FILE"
    return "RELAY_DKIM_PRIVATE_KEY"


def format_zone(records: Sequence[Record]) -> str:
    return "\n\n".join(record.render() for record in records) + "\n"


# --- what to publish, given what is published -----------------------------------------------


async def records_to_publish(
    settings: Settings, *, resolver: Resolver, ip: str | None = None
) -> tuple[list[Record], list[str]]:
    """The records for `relay dns-records`, and notes on how they were made.

    The sending IP is detected when not given; an SPF record already published is merged
    into the one to publish, since a second SPF record would break both.
    """
    # The doctor quotes this module's records in its fixes: imported here, not at the top,
    # so that importing either module does not need the other half-imported.
    from relay.ops.doctor.lookup import (  # noqa: PLC0415
        detect_sending_ip,
        find_dmarc,
        parse_tags,
        txt_records,
    )

    notes: list[str] = []
    if ip is None:
        try:
            ip, how = await detect_sending_ip(settings, resolver)
        except (DNSError, OSError) as exc:
            notes.append(f"sending IP unknown ({exc}): pass --ip to get PTR, A and SPF records")
        else:
            notes.append(f"sending IP {ip}: {how}; run this on the relay host, or pass --ip")
    else:
        ip = str(ipaddress.ip_address(ip))
        notes.append(f"sending IP {ip} (given with --ip)")
    if settings.smarthost:
        notes.append(
            f"mail leaves through the smarthost {settings.smarthost}: the PTR, A and SPF "
            "records must name its outbound addresses, not this host's"
        )
    existing: list[str] = []
    if ip is not None:
        domain = domain_of(settings.envelope_sender)
        texts, result = await txt_records(resolver, domain)
        existing = [t for t in texts if is_spf(t)]
        if result.temporary:
            notes.append(
                f"could not read the SPF record at {domain} ({result.missing}): if one "
                "exists, add the ip4/ip6 term below to it instead of publishing a second one"
            )
        elif existing:
            notes.append(f"the SPF record below merges what {domain} publishes now")
    records = records_for(settings, ip, existing_spf=existing)
    where, dmarc, dmarc_lookup = await find_dmarc(resolver, settings.from_domain)
    if len(dmarc) == 1 and where == f"_dmarc.{settings.from_domain}":
        policy = parse_tags(dmarc[0]).get("p", "?")
        records[-1] = Record(
            fqdn(where),
            "TXT",
            dmarc[0],
            f"DMARC: already published (p={policy}); keep it, it is shown here for completeness",
        )
    elif dmarc or dmarc_lookup.temporary:
        notes.append(f"check the DMARC record at {where} before replacing it with the one below")
    return records, notes
