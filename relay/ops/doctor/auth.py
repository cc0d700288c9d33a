"""What proves a message is ours: SPF, DKIM and DMARC, and the alignment DMARC demands.

SPF is evaluated by pyspf and the DKIM keys are tested by signing a probe with our signer and
verifying it with dkimpy; both are blocking and run in a worker thread, querying through the
given resolver (`relay.ops.doctor.lookup.SyncDNS`). Receiver checklist rows 3 and 4.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import dkim
import dkim.util
import spf
from cryptography.hazmat.primitives import serialization

from relay.mail.mx import Resolver
from relay.ops import dnsrecords
from relay.ops.doctor.domains import aligned
from relay.ops.doctor.lookup import (
    SyncDNS,
    find_dmarc,
    parse_tags,
    spf_lookups,
    txt_records,
)
from relay.ops.doctor.verdict import Check, Finding, combine, lookup_failed
from relay.settings import Settings, domain_of

# --- SPF ------------------------------------------------------------------------------------


def evaluate_spf(sync_dns: SyncDNS, *, ip: str, sender: str, helo: str) -> tuple[str, str]:
    """pyspf's RFC 7208 check_host() for `ip` sending as `sender`: (result, explanation).
    Blocking: run it in a thread."""
    with spf_lookups(sync_dns.spf_lookup):
        result, _code, explanation = spf.query(i=ip, s=sender, h=helo, querytime=20).check()
    return str(result), str(explanation)


async def check_spf(
    settings: Settings, resolver: Resolver, ip: str | None, sync_dns: SyncDNS
) -> Check:
    """Receiver checklist row 3: exactly one SPF record, and it passes the sending IP."""
    domain = domain_of(settings.envelope_sender)
    texts, result = await txt_records(resolver, domain)
    records = [t for t in texts if dnsrecords.is_spf(t)]
    wanted = dnsrecords.spf_record(domain, ip, records)
    details: dict[str, Any] = {"domain": domain, "records": records, "publish": wanted.value}
    if result.temporary:
        return lookup_failed("spf", f"TXT at {domain}", result, details)
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
    return _spf_verdict(
        record, domain, ip, verdict=verdict, explanation=explanation, wanted=wanted, details=details
    )


def _spf_verdict(
    record: str,
    domain: str,
    ip: str,
    *,
    verdict: str,
    explanation: str,
    wanted: dnsrecords.Record,
    details: dict[str, Any],
) -> Check:
    """The check for pyspf's `verdict` on the one SPF `record` at `domain`."""
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
class DKIMKey:
    """One of our signing keys, and the RELAY_ variable it came from (named in the fixes)."""

    selector: str
    pem: bytes
    source: str


def dkim_keys(settings: Settings) -> list[DKIMKey]:
    source = (
        "RELAY_DKIM_PRIVATE_KEY_FILE"
        if settings.dkim_private_key_file
        else "RELAY_DKIM_PRIVATE_KEY"
    )
    keys = [DKIMKey(settings.dkim_selector, settings.dkim_key_pem, source)]
    if settings.dkim_ed25519_selector and settings.dkim_ed25519_key_pem:
        keys.append(
            DKIMKey(
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
    """The probe signed the way the worker signs (relay.mail.signing.Signer)."""
    from relay.mail.signing import Signer  # noqa: PLC0415 - keeps the doctor importable alone

    return Signer.from_settings(settings).sign(probe_message(settings))


def _signature_index(signed: bytes, selector: str) -> int | None:
    headers, _ = dkim.rfc822_parse(signed)
    signatures = [v for k, v in headers if k.lower() == b"dkim-signature"]
    for index, value in enumerate(signatures):
        if dkim.util.parse_tag_value(value).get(b"s", b"").decode() == selector:
            return index
    return None


def verify_probe(signed: bytes, selector: str, sync_dns: SyncDNS) -> tuple[bool, str]:
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
    key: DKIMKey,
    *,
    sync_dns: SyncDNS,
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
        return lookup_failed(name, owner, result, details)
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
    replace = f"replace the TXT record at {owner} with:\n{wanted.zone_line()}"
    wrong = _wrong_key(owner, key, texts[0], tags, parse_tags(wanted.value), replace=replace)
    if wrong is not None:
        return Check(name, "FAIL", wrong[0], wrong[1], details)
    findings: list[Finding] = []
    if "y" in tags.get("t", "").split(":"):
        findings.append(
            Finding(
                "WARN",
                f"{owner} has t=y (testing): receivers may ignore failures",
                f"when signatures verify, {replace}",
            )
        )
    findings += await _probe_findings(
        key.selector, sync_dns, signed, sign_error, replace=replace, details=details
    )
    return combine(
        name,
        findings,
        f"{owner} publishes the public half of {key.source}; a probe signature verifies",
        details,
    )


def _wrong_key(
    owner: str,
    key: DKIMKey,
    text: str,
    tags: dict[str, str],
    ours: dict[str, str],
    *,
    replace: str,
) -> tuple[str, str] | None:
    """(summary, fix) when the one record at `owner` is not our key's public half."""
    if tags.get("v", "DKIM1") != "DKIM1" or "p" not in tags:
        return f"{owner} is not a DKIM key record: {text!r}", replace
    if not tags["p"]:
        return f"the key at {owner} is revoked (empty p=)", replace
    if tags.get("k", "rsa").lower() != ours["k"]:
        published = tags.get("k", "rsa")
        return f"{owner} publishes a k={published} key; {key.source} is k={ours['k']}", replace
    if not _same_key(tags["p"], ours["p"]):
        return (
            f"the key published at {owner} (p={_abbrev(tags['p'])}) is not the public half of "
            f"{key.source} (p={_abbrev(ours['p'])}): every signature will fail",
            f"{replace}\n(or point {key.source} at the private key that was published)",
        )
    return None


async def _probe_findings(
    selector: str,
    sync_dns: SyncDNS,
    signed: bytes | None,
    sign_error: str,
    *,
    replace: str,
    details: dict[str, Any],
) -> list[Finding]:
    """The key matches; does a signature our signer made verify against it?"""
    if signed is None:
        details["probe"] = sign_error
        return [
            Finding(
                "WARN",
                f"the key matches but no probe was signed: {sign_error}",
                "fix the signer (see `relay send`), then run the doctor again",
            )
        ]
    ok, why = await asyncio.to_thread(verify_probe, signed, selector, sync_dns)
    details["probe"] = "verified" if ok else why
    if ok:
        return []
    return [Finding("FAIL", f"a probe signed with s={selector} does not verify: {why}", replace)]


# --- DMARC and alignment --------------------------------------------------------------------


async def check_dmarc(settings: Settings, resolver: Resolver) -> tuple[Check, dict[str, str]]:
    domain = settings.from_domain
    wanted = dnsrecords.dmarc_record(domain)
    where, records, result = await find_dmarc(resolver, domain)
    details: dict[str, Any] = {"name": where, "records": records, "publish": wanted.value}
    if result.temporary:
        return lookup_failed("dmarc", where, result, details), {}
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
        return _monitoring_only(domain, where, records[0], tags, details), tags
    return Check("dmarc", "PASS", f"{found}: policy {policy}", "", details), tags


def _monitoring_only(
    domain: str, where: str, record: str, tags: dict[str, str], details: dict[str, Any]
) -> Check:
    """p=none: the WARN, and the tightened record to publish once the reports show passes."""
    rua = tags.get("rua")
    tightened = re.sub(r"\bp\s*=\s*none\b", "p=quarantine", record, flags=re.I)
    if not rua:
        tightened = f"{tightened.rstrip().rstrip(';')}; rua=mailto:dmarc-reports@{domain}"
    tight = dnsrecords.Record(dnsrecords.fqdn(where), "TXT", tightened, "")
    return Check(
        "dmarc",
        "WARN",
        f"{record!r} at {where}: policy none only monitors; spoofed mail in your name is still "
        "delivered",
        (
            f"read the aggregate reports ({rua}); "
            if rua
            else f"add rua=mailto:dmarc-reports@{domain} to receive reports; "
        )
        + f"once they show your mail passing, publish:\n{tight.zone_line()}\n"
        "and later p=reject",
        details,
    )


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
    findings: list[Finding] = []
    if not dkim_ok:
        findings.append(
            Finding(
                "FAIL" if not spf_ok else "WARN",
                f"DKIM d={dkim_domain} is not aligned ({_mode(strict_dkim)}) with From "
                f"{from_domain}",
                f"set RELAY_DKIM_DOMAIN={from_domain} (or unset it) and publish the key there",
            )
        )
    if not spf_ok:
        findings.append(
            Finding(
                "FAIL" if not dkim_ok else "WARN",
                f"the envelope sender's domain {envelope} is not aligned ({_mode(strict_spf)}) "
                f"with From {from_domain}",
                f"set RELAY_ENVELOPE_FROM to an address in {from_domain} (or unset it)",
            )
        )
    return combine(
        "alignment",
        findings,
        f"From {from_domain}, DKIM d={dkim_domain} and envelope {envelope} align",
        details,
    )
