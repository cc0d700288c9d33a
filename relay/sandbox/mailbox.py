"""The demo's support mailbox: an MX on loopback that behaves like a careful receiver.

It greylists each new (client, sender, recipient) once with `451 4.7.1`, as many receivers
do, so the relay's retry shows; it then checks DKIM (dkimpy) and SPF (pyspf) against the
sandbox DNS, records the results in an Authentication-Results header (RFC 8601) and stores
the message in a Maildir. Only the support domain is accepted: the mailbox is no relay.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf
from aiosmtpd.smtp import SMTP, Envelope, Session
from dkim.util import parse_tag_value

from relay.logs import event
from relay.sandbox.smtpserver import ThreadedSMTPServer
from relay.settings import domain_of

log = logging.getLogger("relay.sandbox.mailbox")


@dataclass(frozen=True)
class DKIMResult:
    result: str  # "pass", "fail" or "none"
    domain: str
    selector: str
    algorithm: str


@dataclass(frozen=True)
class Delivered:
    """One accepted message with what the receiver concluded about it."""

    key: str  # the Maildir key
    peer: str
    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    subject: str
    from_header: str
    reply_to: str
    dkim: tuple[DKIMResult, ...]
    spf: str
    spf_explanation: str
    greylisted_for: float | None  # seconds since the deferral, when there was one

    @property
    def dkim_pass(self) -> bool:
        return any(r.result == "pass" for r in self.dkim)


class _SPFQuery(spf.query):  # type: ignore[misc]
    """pyspf's evaluator with its DNS lookups sent to our resolver instead of the system's."""

    def __init__(self, *, resolver: dns.resolver.Resolver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolver = resolver

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        if qtype == "SPF":  # RFC 7208 retired type 99
            return []
        try:
            answer = self._resolver.resolve(str(name).rstrip("."), qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            if not ignore_void:
                self.void_lookups += 1
                if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                    raise spf.PermError("Void lookup limit exceeded") from None
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        values: list[Any] = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                values.append(rdata.address)
            elif qtype == "MX":
                values.append((rdata.preference, rdata.exchange))
            elif qtype == "PTR":
                values.append(rdata.target.to_text(True))
            elif qtype == "TXT":
                values.append(rdata.strings)
        return values


def check_spf(
    ip: str, mail_from: str, helo: str, resolver: dns.resolver.Resolver
) -> tuple[str, str]:
    """(result, explanation) of RFC 7208 check_host() for the connection, via our resolver."""
    query = _SPFQuery(resolver=resolver, i=ip, s=mail_from, h=helo, timeout=5, querytime=10)
    result, _code, explanation = query.check()
    return str(result), str(explanation)


def check_dkim(data: bytes, resolver: dns.resolver.Resolver) -> tuple[DKIMResult, ...]:
    """Verify every DKIM-Signature in the message, looking keys up with our resolver."""

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        for rdata in answer:
            return b"".join(rdata.strings)
        return None

    verifier = dkim.DKIM(data, timeout=5)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results: list[DKIMResult] = []
    for index, value in enumerate(signatures):
        tags = parse_tag_value(value)
        try:
            ok = bool(verifier.verify(idx=index, dnsfunc=txt))
        except dkim.DKIMException:
            ok = False
        results.append(
            DKIMResult(
                result="pass" if ok else "fail",
                domain=tags.get(b"d", b"").decode(errors="replace"),
                selector=tags.get(b"s", b"").decode(errors="replace"),
                algorithm=tags.get(b"a", b"").decode(errors="replace"),
            )
        )
    return tuple(results)


class _Handler:
    def __init__(self, box: SupportMailbox) -> None:
        self.box = box

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if domain_of(address) != self.box.domain:
            return "550 5.7.1 Relaying denied: this mailbox only accepts mail for its domain"
        peer = str(session.peer[0]) if session.peer else ""
        key = (peer, str(envelope.mail_from).lower(), address.lower())
        if self.box.greylist_seconds is not None:
            now = time.monotonic()
            with self.box.lock:
                first = self.box.first_seen.setdefault(key, now)
            if first == now or now - first < self.box.greylist_seconds:
                event(log, "mailbox.greylisted", peer=peer, sender=envelope.mail_from, rcpt=address)
                self.box.notify_greylisted(peer, str(envelope.mail_from), address)
                return "451 4.7.1 Greylisted: please try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        peer = str(session.peer[0]) if session.peer else ""
        helo = session.host_name or ""
        mail_from = str(envelope.mail_from)
        # DNS lookups block: keep them off the SMTP event loop.
        delivered = await asyncio.to_thread(
            self.box.accept, data, peer, helo, mail_from, tuple(envelope.rcpt_tos)
        )
        return f"250 2.0.0 Stored as {delivered.key}"


class SupportMailbox(ThreadedSMTPServer):
    """The support domain's MX: aiosmtpd in its own thread, a Maildir on disk."""

    thread_name = "support-mailbox"

    def __init__(
        self,
        maildir: Path,
        *,
        domain: str,
        resolver: dns.resolver.Resolver,
        host: str = "127.0.0.1",
        hostname: str = "mx.support.test",
        greylist_seconds: float | None = 1.0,
        on_greylisted: Callable[[str, str, str], None] | None = None,
        on_delivered: Callable[[Delivered], None] | None = None,
    ) -> None:
        super().__init__(host=host)
        self.maildir_path = maildir
        self.maildir = mailbox.Maildir(str(maildir), create=True)
        self.domain = domain.lower()
        self.resolver = resolver
        self.hostname = hostname
        self.greylist_seconds = greylist_seconds
        self.on_greylisted = on_greylisted
        self.on_delivered = on_delivered
        self.first_seen: dict[tuple[str, str, str], float] = {}
        self.delivered: list[Delivered] = []
        self.greylisted = 0
        self.lock = threading.Lock()

    def notify_greylisted(self, peer: str, sender: str, rcpt: str) -> None:
        with self.lock:
            self.greylisted += 1
        if self.on_greylisted is not None:
            self.on_greylisted(peer, sender, rcpt)

    def accept(
        self, data: bytes, peer: str, helo: str, mail_from: str, recipients: tuple[str, ...]
    ) -> Delivered:
        """Verify, stamp Authentication-Results, store; runs in a worker thread."""
        dkim_results = check_dkim(data, self.resolver)
        spf_result, spf_explanation = check_spf(peer, mail_from, helo, self.resolver)
        parts = [
            f"dkim={r.result} header.d={r.domain} header.s={r.selector} header.a={r.algorithm}"
            for r in dkim_results
        ] or ["dkim=none"]
        parts.append(f"spf={spf_result} smtp.mailfrom={mail_from} smtp.helo={helo}")
        stamp = f"Authentication-Results: {self.hostname};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"
        stored = stamp.encode() + data
        headers = message_from_bytes(data, policy=policy.compat32)
        with self.lock:
            key = self.maildir.add(mailbox.MaildirMessage(stored))
            first = min(
                (
                    t
                    for (p, s, _r), t in self.first_seen.items()
                    if p == peer and s == mail_from.lower()
                ),
                default=None,
            )
        delivered = Delivered(
            key=key,
            peer=peer,
            helo=helo,
            mail_from=mail_from,
            recipients=recipients,
            message_id=str(headers.get("Message-ID", "")),
            subject=str(headers.get("Subject", "")),
            from_header=str(headers.get("From", "")),
            reply_to=str(headers.get("Reply-To", "")),
            dkim=dkim_results,
            spf=spf_result,
            spf_explanation=spf_explanation,
            greylisted_for=None if first is None else time.monotonic() - first,
        )
        event(
            log,
            "mailbox.stored",
            key=key,
            message_id=delivered.message_id,
            dkim=",".join(r.result for r in dkim_results) or "none",
            spf=spf_result,
        )
        with self.lock:
            self.delivered.append(delivered)
        if self.on_delivered is not None:
            self.on_delivered(delivered)
        return delivered

    def _factory(self) -> SMTP:
        return SMTP(
            _Handler(self),
            hostname=self.hostname,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=10 * 1024 * 1024,
            timeout=60,
        )
