"""DNS for the doctor: every query through the resolver we are given (RELAY_DNS_NAMESERVERS).

`lookup` turns a query's outcome into a `Lookup` (records, or why there are none). pyspf and
dkimpy are synchronous, so they run in a worker thread and hand their queries back to the
event loop through `SyncDNS`: dkimpy through its `dnsfunc` argument, pyspf, which has no
such argument, through its module-level `spf.DNSLookup`, swapped for a dispatcher only while
an evaluation is inside `spf_lookups` and restored when the last one leaves.

What `relay dns-records` asks too lives here (the DMARC record in force, its tags, the
sending IP found by routing towards the support MX), so relay.ops.dnsrecords needs no check.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf

from relay.mail.mx import Resolver, resolve_addresses, resolve_mx
from relay.ops.doctor.domains import organisational_domain
from relay.settings import Settings, domain_of


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


class SyncDNS:
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


# --- the pyspf hook -------------------------------------------------------------------------

SPFLookup = Callable[[str, str], list[tuple[tuple[str, str], Any]]]

_spf_lookup: contextvars.ContextVar[SPFLookup | None] = contextvars.ContextVar(
    "relay_spf_lookup", default=None
)


class _SPFSeam:
    """Who is inside `spf_lookups`, and pyspf's own DNSLookup to put back after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.original: Callable[..., Any] | None = None


_seam = _SPFSeam()


def _spf_dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> Any:
    """pyspf's DNSLookup while the seam is in: the current context's lookup, else pyspf's
    own (another caller of pyspf in this process, outside `spf_lookups`)."""
    lookup_fn = _spf_lookup.get()
    if lookup_fn is not None:
        return lookup_fn(name, qtype)
    assert _seam.original is not None
    return _seam.original(name, qtype, strict, timeout)


@contextmanager
def spf_lookups(lookup_fn: SPFLookup) -> Iterator[None]:
    """pyspf's queries made in this context, inside the block, go to `lookup_fn`.

    The dispatcher is installed in `spf.DNSLookup` while at least one caller is inside (each
    sees its own `lookup_fn`, through a context variable) and pyspf's own lookup is put back
    when the last one leaves, so pyspf is patched only while the doctor evaluates SPF.
    """
    with _seam.lock:
        if _seam.users == 0 and spf.DNSLookup is not _spf_dispatch:
            _seam.original = spf.DNSLookup
            spf.DNSLookup = _spf_dispatch
        _seam.users += 1
    token = _spf_lookup.set(lookup_fn)
    try:
        yield
    finally:
        _spf_lookup.reset(token)
        with _seam.lock:
            _seam.users -= 1
            if _seam.users == 0 and spf.DNSLookup is _spf_dispatch:
                spf.DNSLookup = _seam.original


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM/DMARC tag list ("v=DMARC1; p=none") as a dict; keys lower-cased, p= unspaced."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            key = key.strip().lower()
            tags.setdefault(key, re.sub(r"\s+", "", value) if key == "p" else value.strip())
    return tags


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
