"""Where mail for a domain goes: MX resolution at every delivery attempt (RFC 5321 §5.1).

Nothing is cached: the resolvers built here have no cache, and `resolve_mx` asks again each
time it is called, so a changed MX is honoured at the next attempt and no relay is ever
hard-coded (receiver checklist item 9).

Decisions, in order:

- NXDOMAIN for the domain, a null MX (RFC 7505: the only MX is "0 ."), or no MX and no
  A/AAAA (RFC 5321 §5.1 implicit MX found nothing) are permanent: `DNSPermanentError`.
- SERVFAIL, timeouts, no nameserver answering: temporary, `DNSTemporaryError`.
- MX hosts are ordered by preference; hosts of equal preference are shuffled with the
  injected RNG, so load spreads as RFC 5321 §5.1 asks and tests can seed it.
- An MX whose name has no address is skipped. When no MX has an address, the attempt is
  permanent only if *every* MX name is NXDOMAIN (nothing there to fix); a name that exists
  without an address, or whose lookup failed, may be fixed by the receiver, so that is
  temporary and the outbox retries until its give-up age.
- Addresses of one MX host are tried IPv4 first, then IPv6: the receiver checklist asks for
  a PTR on every sending address, which IPv6 deployments miss most often.

Queries on make_resolver's resolvers take relay.mail.dnswire's lean path where it mirrors the
installed dnspython exactly (the same answers, at less CPU per delivery), and dnspython's own
`Resolver.resolve` otherwise; `PlainResolver` always takes dnspython's.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from relay.errors import DNSPermanentError, DNSTemporaryError
from relay.mail import dnswire
from relay.settings import Settings

Resolver = dns.asyncresolver.Resolver


class PlainResolver(Resolver):
    """An async resolver whose every query goes to dnspython's own `Resolver.resolve`, since
    dnswire's lean path takes only dnspython's Resolver itself: the plain path, which the tests
    run beside the lean one (make_resolver(..., lean=False))."""


# Per-server try inside one lookup; the whole lookup is bounded by settings.dns_timeout.
_PER_SERVER_TIMEOUT = 2.0


@dataclass(frozen=True)
class MXHost:
    name: str
    preference: int
    addresses: tuple[str, ...]


class _Lookup(Enum):
    """How one lookup ended when it gave no records."""

    NXDOMAIN = "NXDOMAIN"
    NODATA = "no records"
    TEMPORARY = "temporary failure"


def make_resolver(settings: Settings, *, lean: bool = True) -> Resolver:
    """An async resolver for RELAY_DNS_NAMESERVERS, or the system's when that is empty; a
    PlainResolver when not `lean`.

    Raises dns.resolver.NoResolverConfiguration when the system has no resolver configured.
    """
    kind = Resolver if lean else PlainResolver
    if settings.dns_nameservers:
        resolver = kind(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in settings.dns_nameservers
        ]
    else:
        resolver = kind(configure=True)
    resolver.cache = None
    resolver.lifetime = settings.dns_timeout
    resolver.timeout = min(_PER_SERVER_TIMEOUT, settings.dns_timeout)
    return resolver


def absolute_name(domain: str) -> dns.name.Name:
    """The domain as an absolute DNS name; DNSPermanentError when it cannot be one."""
    text = domain.strip().rstrip(".")
    if not text:
        raise DNSPermanentError(domain, "empty domain name")
    try:
        return dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise DNSPermanentError(domain, f"not a valid domain name ({exc})") from exc


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Sort (preference, name) pairs by preference, shuffling each group of equal preference."""
    groups: dict[int, list[str]] = {}
    for preference, name in records:
        groups.setdefault(preference, []).append(name)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(groups):
        names = sorted(set(groups[preference]))
        rng.shuffle(names)
        ordered.extend((preference, name) for name in names)
    return ordered


async def _ask(
    resolver: Resolver, name: dns.name.Name, rdtype: str
) -> tuple[list[str], _Lookup | None, str]:
    """Run one query: (records as text, None, "") or ([], how it failed, why)."""
    try:
        texts = await _texts(resolver, name, rdtype)
    except dns.exception.DNSException as exc:
        return [], *_failure(exc, rdtype)
    return (texts, None, "") if texts else ([], *_no_records(rdtype))


async def _texts(resolver: Resolver, name: dns.name.Name, rdtype: str) -> list[str]:
    """The records of one query as text, [] for none: by dnswire's lean path where it answers
    exactly as dnspython would, by dnspython's `Resolver.resolve` otherwise."""
    if dnswire.applies(resolver):
        return await dnswire.resolve_texts(resolver, name, rdtype)
    answer = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    return [rdata.to_text() for rdata in answer]


def _failure(exc: dns.exception.DNSException, rdtype: str) -> tuple[_Lookup, str]:
    """How a query failed, and why in words for the log."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return _Lookup.NXDOMAIN, f"{rdtype}: NXDOMAIN"
    if isinstance(exc, dns.resolver.NoNameservers):
        return _Lookup.TEMPORARY, f"{rdtype}: no nameserver answered (SERVFAIL?): {exc}"
    if isinstance(exc, dns.exception.Timeout):
        return _Lookup.TEMPORARY, f"{rdtype}: timed out"
    return _Lookup.TEMPORARY, f"{rdtype}: {type(exc).__name__}: {exc}"


def _no_records(rdtype: str) -> tuple[_Lookup, str]:
    return _Lookup.NODATA, f"{rdtype}: no records"


async def _ask_mx(
    resolver: Resolver, name: dns.name.Name
) -> tuple[list[tuple[int, str]], _Lookup | None, str]:
    texts, how, why = await _ask(resolver, name, "MX")
    records: list[tuple[int, str]] = []
    for text in texts:
        preference, _, exchange = text.partition(" ")
        records.append((int(preference), exchange.rstrip(".").lower()))
    return records, how, why


async def _addresses(
    resolver: Resolver, name: dns.name.Name
) -> tuple[tuple[str, ...], _Lookup | None, str]:
    """A then AAAA records of a name, looked up together.

    The failure is NXDOMAIN only when the name does not exist; TEMPORARY when either lookup
    failed for a reason that may pass; NODATA otherwise.
    """
    (v4, how4, why4), (v6, how6, why6) = await asyncio.gather(
        _ask(resolver, name, "A"), _ask(resolver, name, "AAAA")
    )
    addresses = (*v4, *v6)
    if addresses:
        return addresses, None, ""
    hows = {how4, how6}
    if _Lookup.TEMPORARY in hows:
        return (), _Lookup.TEMPORARY, "; ".join(w for w in (why4, why6) if w)
    if _Lookup.NXDOMAIN in hows:
        return (), _Lookup.NXDOMAIN, "NXDOMAIN"
    return (), _Lookup.NODATA, "no A or AAAA records"


async def resolve_addresses(host: str, resolver: Resolver) -> tuple[str, ...]:
    """A/AAAA of one host name (a smarthost); raises DNSTemporaryError/DNSPermanentError."""
    addresses, how, why = await _addresses(resolver, absolute_name(host))
    if addresses:
        return addresses
    if how is _Lookup.TEMPORARY:
        raise DNSTemporaryError(host, why)
    raise DNSPermanentError(host, why)


def _is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    return all(name in ("", ".") for _, name in records)


async def resolve_mx(
    domain: str, resolver: Resolver, *, rng: random.Random | None = None
) -> list[MXHost]:
    """The hosts to try for `domain`, in order, each with its addresses (never empty).

    Raises DNSTemporaryError or DNSPermanentError as described in the module docstring.
    """
    name = absolute_name(domain)
    mx_records, how, why = await _ask_mx(resolver, name)
    if how is _Lookup.NXDOMAIN:
        raise DNSPermanentError(domain, "the domain does not exist (NXDOMAIN)")
    if how is _Lookup.TEMPORARY:
        raise DNSTemporaryError(domain, f"MX lookup failed: {why}")
    if how is _Lookup.NODATA:
        addresses, how, why = await _addresses(resolver, name)
        if addresses:
            return [MXHost(name.to_text(omit_final_dot=True), 0, addresses)]
        if how is _Lookup.TEMPORARY:
            raise DNSTemporaryError(domain, f"implicit MX lookup failed: {why}")
        raise DNSPermanentError(domain, "no MX and no A/AAAA records")
    if _is_null_mx(mx_records):
        raise DNSPermanentError(domain, "null MX (RFC 7505): the domain accepts no mail")

    # A null MX among real ones is a misconfiguration; the real ones are still usable.
    ordered = order_mx(
        [(p, n) for p, n in mx_records if n not in ("", ".")], rng or random.SystemRandom()
    )
    looked_up = await asyncio.gather(
        *(_addresses(resolver, absolute_name(mx_name)) for _, mx_name in ordered)
    )
    hosts = [
        MXHost(mx_name, preference, addresses)
        for (preference, mx_name), (addresses, _, _) in zip(ordered, looked_up, strict=True)
        if addresses
    ]
    if hosts:
        return hosts
    reasons = "; ".join(
        f"{mx_name}: {why}" for (_, mx_name), (_, _, why) in zip(ordered, looked_up, strict=True)
    )
    if all(how is _Lookup.NXDOMAIN for _, how, _ in looked_up):
        raise DNSPermanentError(domain, f"no MX host exists: {reasons}")
    raise DNSTemporaryError(domain, f"no MX host has an address: {reasons}")


async def domain_accepts_mail(domain: str, resolver: Resolver) -> bool | None:
    """Whether a visitor's domain can receive replies, for the web form.

    True: a non-null MX, or A/AAAA (implicit MX). False: NXDOMAIN, null MX, or neither MX nor
    address. None: the answer is unknown (SERVFAIL, timeout); the form does not reject then.
    """
    try:
        name = absolute_name(domain)
    except DNSPermanentError:
        return False
    records, how, _ = await _ask_mx(resolver, name)
    if how is _Lookup.NXDOMAIN:
        return False
    if how is _Lookup.TEMPORARY:
        return None
    if how is None:
        return not _is_null_mx(records)
    addresses, how, _ = await _addresses(resolver, name)
    if addresses:
        return True
    return None if how is _Lookup.TEMPORARY else False


# --- the web form's check, blocking ------------------------------------------------------------

# BaseResolver's public configuration, all that its reset() sets but nameservers (set last,
# through its checking setter).
_CONFIGURATION = (
    "domain",
    "nameserver_ports",
    "port",
    "search",
    "use_search_by_default",
    "timeout",
    "lifetime",
    "keyring",
    "keyname",
    "keyalgorithm",
    "edns",
    "ednsflags",
    "ednsoptions",
    "payload",
    "cache",
    "flags",
    "retry_servfail",
    "rotate",
    "ndots",
)


def blocking_resolver(resolver: dns.resolver.BaseResolver) -> dns.resolver.Resolver:
    """A blocking resolver configured as `resolver` (nameservers and their ports, timeouts,
    cache, search, EDNS, TSIG...), which may be make_resolver's async one; a blocking one is
    returned as is. Only that public configuration is copied (lists and dicts as copies, the
    cache shared), never dnspython's private state."""
    if isinstance(resolver, dns.resolver.Resolver):
        return resolver
    blocking = dns.resolver.Resolver(configure=False)
    for name in _CONFIGURATION:
        value = getattr(resolver, name)
        setattr(blocking, name, copy.copy(value) if isinstance(value, list | dict) else value)
    blocking.nameservers = list(resolver.nameservers)
    return blocking


def _ask_blocking(
    resolver: dns.resolver.Resolver, name: dns.name.Name, rdtype: str
) -> tuple[list[str], _Lookup | None, str]:
    """_ask for a blocking resolver (same outcomes, on dnswire's lean path alike)."""
    try:
        if dnswire.applies_blocking(resolver):
            texts = dnswire.resolve_texts_blocking(resolver, name, rdtype)
        else:
            answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
            texts = [rdata.to_text() for rdata in answer]
    except dns.exception.DNSException as exc:
        return [], *_failure(exc, rdtype)
    return (texts, None, "") if texts else ([], *_no_records(rdtype))


def domain_accepts_mail_blocking(domain: str, resolver: dns.resolver.Resolver) -> bool | None:
    """domain_accepts_mail for a sync caller (the Flask view), without an event loop per call:
    asyncio.run() cost about twice the CPU of the query itself. The same answers; A and AAAA
    are asked one after the other, and only when there is no MX record."""
    try:
        name = absolute_name(domain)
    except DNSPermanentError:
        return False
    texts, how, _ = _ask_blocking(resolver, name, "MX")
    if how is _Lookup.NXDOMAIN:
        return False
    if how is _Lookup.TEMPORARY:
        return None
    if how is None:
        return not _is_null_mx([(0, text.partition(" ")[2].rstrip(".")) for text in texts])
    hows = set()
    for rdtype in ("A", "AAAA"):
        addresses, how, _ = _ask_blocking(resolver, name, rdtype)
        if addresses:
            return True
        hows.add(how)
    return None if _Lookup.TEMPORARY in hows else False
