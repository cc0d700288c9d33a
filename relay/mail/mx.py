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

Queries run dnspython's resolution with a UDP exchange and a reader of plain replies of their
own (`_resolve_lean`): the same answers, at less than half the CPU per delivery.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.ipv4
import dns.ipv6
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.version

from relay.config import Settings
from relay.errors import DNSPermanentError, DNSTemporaryError

Resolver = dns.asyncresolver.Resolver

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


def make_resolver(settings: Settings) -> Resolver:
    """An async resolver for RELAY_DNS_NAMESERVERS, or the system's when that is empty.

    Raises dns.resolver.NoResolverConfiguration when the system has no resolver configured.
    """
    if settings.dns_nameservers:
        resolver = Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in settings.dns_nameservers
        ]
    else:
        resolver = Resolver(configure=True)
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
        if _lean_applies(resolver):
            texts = await _resolve_lean(resolver, name, dns.rdatatype.from_text(rdtype))
            if not texts:
                return [], *_no_records(rdtype)
            return texts, None, ""
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.exception.DNSException as exc:
        return [], *_failure(exc, rdtype)
    return [rdata.to_text() for rdata in answer], None, ""


def _failure(exc: dns.exception.DNSException, rdtype: str) -> tuple[_Lookup, str]:
    """How a query failed, and why in words for the log."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return _Lookup.NXDOMAIN, f"{rdtype}: NXDOMAIN"
    if isinstance(exc, dns.resolver.NoAnswer):
        return _no_records(rdtype)
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


# --- the lean query path -----------------------------------------------------------------------
#
# Resolver.resolve spent most of a query's CPU away from the network: an asyncio datagram
# transport built and closed per query, the query rendered by to_wire, the reply parsed into
# rdata objects and an Answer. _resolve_lean runs the same resolution, dnspython's own
# _Resolution (nameserver order, retries and backoff, SERVFAIL, NXDOMAIN, NoAnswer, TCP after a
# truncated reply, the lifetime), with a bare socket per query, and reads a plain reply straight
# from the wire; every other reply is read by dnspython as before. It follows Resolver.resolve's
# loop and private helpers, so it runs only on the dnspython release it was checked against
# (2.9.x); any other release takes Resolver.resolve. tests/test_mx_lean.py compares the two.

_LEAN_DNSPYTHON = (dns.version.MAJOR, dns.version.MINOR) == (2, 9)

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_PREFERENCE = struct.Struct("!H")
# QR, opcode, TC and rcode of a reply: a response to a QUERY, not truncated, NOERROR.
_REPLY_MASK, _REPLY_PLAIN = 0xFA0F, 0x8000
_OPCODE_MASK = 0x7800
_QUESTION_POINTER = b"\xc0\x0c"  # a compressed name pointing at the question's name
_IN = dns.rdataclass.IN
_A, _AAAA, _MX = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX
_NS, _SOA = dns.rdatatype.NS, dns.rdatatype.SOA
_SOA_NUMBERS = 20  # serial, refresh, retry, expire, minimum

# (address family, sendto address, the address packed) of a nameserver.
_Destination = tuple[int, tuple[str | int, ...], bytes]


def _lean_applies(resolver: Resolver) -> bool:
    """Whether _resolve_lean answers as resolver.resolve would: dnspython's own async resolver
    without a cache, on an asyncio selector loop (the worker's and the tests')."""
    if not _LEAN_DNSPYTHON or type(resolver) is not Resolver or resolver.cache is not None:
        return False
    try:
        return isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)
    except RuntimeError:
        return False


async def _resolve_lean(
    resolver: Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> list[str]:
    """resolver.resolve(name, rdtype, search=False) as the records' texts, [] for NoAnswer.

    Raises what resolve raises otherwise (NXDOMAIN, NoNameservers, LifetimeTimeout...).
    """
    resolution = dns.resolver._Resolution(resolver, name, rdtype, _IN, False, True, False)
    start = time.time()
    while True:
        request, answer = resolution.next_request()
        if answer is not None:
            return [rdata.to_text() for rdata in answer]
        assert request is not None
        done = False
        while not done:
            nameserver, tcp, backoff = resolution.next_nameserver()
            if backoff:
                await asyncio.sleep(backoff)
            request.set_random_id()  # type: ignore[no-untyped-call]
            timeout = resolver._compute_timeout(start, None, resolution.errors)
            try:
                destination = (
                    _udp_destination(nameserver.address, nameserver.port)
                    if not tcp and type(nameserver) is dns.nameserver.Do53Nameserver
                    else None
                )
                if destination is None:
                    response: dns.message.Message | list[str] = await nameserver.async_query(
                        request,
                        timeout=timeout,
                        source=None,
                        source_port=0,
                        max_size=tcp,
                        backend=dns.asyncbackend.get_default_backend(),
                    )
                else:
                    response = await _udp_query(request, destination, timeout)
            except Exception as exc:
                _, done = resolution.query_result(None, exc)
                continue
            if isinstance(response, list):
                return response
            answer, done = resolution.query_result(response, None)
            if answer is not None:
                return [rdata.to_text() for rdata in answer]


@functools.lru_cache(maxsize=64)
def _udp_destination(address: str, port: int) -> _Destination | None:
    """Where to send a nameserver's queries and how to recognise its replies; None sends them
    the way dnspython does (a multicast address, or one it cannot pack)."""
    family = dns.inet.af_for_address(address)
    if dns.inet.is_multicast(address):
        return None
    destination = dns.inet.low_level_address_tuple((address, port), family)
    try:
        return family, destination, dns.inet.inet_pton(family, destination[0])
    except dns.exception.SyntaxError:
        return None


async def _udp_query(
    request: dns.message.QueryMessage, where: _Destination, timeout: float
) -> dns.message.Message | list[str]:
    """Do53Nameserver.async_query over UDP, on a bare non-blocking socket.

    As dnspython does: a new socket (so a new source port) for each query; a datagram from
    another address, with another id or question, or that does not parse is ignored and the
    wait goes on; a truncated reply raises Truncated (the resolution retries over TCP).
    A plain reply comes back as its records' texts ([] when there are none).
    """
    family, destination, packed = where
    wire, plain = _query_wire(request)
    qname = request.question[0].name
    loop = asyncio.get_running_loop()
    begin = time.time()
    reply: asyncio.Future[dns.message.Message | list[str]] = loop.create_future()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)

        def readable() -> None:
            while not reply.done():
                try:
                    data, source = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    reply.set_exception(exc)
                    return
                try:
                    if dns.inet.inet_pton(family, source[0]) != packed:
                        continue
                except dns.exception.SyntaxError:
                    continue
                if source[1:] != destination[1:]:
                    continue
                texts = _read_plain(data, wire, qname) if plain else None
                if texts is not None:
                    reply.set_result(texts)
                    return
                received = time.time()
                try:
                    message = dns.message.from_wire(
                        data,
                        keyring=request.keyring,
                        request_mac=request.mac,
                        raise_on_truncation=True,
                    )
                except dns.message.Truncated as exc:
                    if request.is_response(exc.message()):  # type: ignore[no-untyped-call]
                        reply.set_exception(exc)
                        return
                    continue
                except Exception:  # noqa: S112 - dnspython ignores it too
                    continue
                if request.is_response(message):
                    message.time = received - begin
                    reply.set_result(message)

        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendto(sock, wire, destination)
                loop.add_reader(sock.fileno(), readable)
                return await reply
        except TimeoutError:
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]
        finally:
            loop.remove_reader(sock.fileno())


def _query_wire(request: dns.message.QueryMessage) -> tuple[bytes, bool]:
    """The query as sent, and whether _read_plain may read its reply.

    A plain query (one A, AAAA or MX question of class IN, opcode QUERY, no EDNS, no TSIG,
    nothing else) is packed here, byte for byte what to_wire renders; any other by to_wire.
    """
    if (
        len(request.question) != 1
        or request.answer
        or request.authority
        or request.additional
        or request.edns >= 0
        or request.keyring is not None
        or request.flags & _OPCODE_MASK
    ):
        return request.to_wire(), False
    question = request.question[0]
    if question.rdclass != _IN or question.rdtype not in (_A, _AAAA, _MX):
        return request.to_wire(), False
    qname = question.name.to_wire()
    assert qname is not None
    header = _HEADER.pack(request.id, request.flags, 1, 0, 0, 0)
    return header + qname + struct.pack("!HH", question.rdtype, _IN), True


def _read_plain(data: bytes, query: bytes, qname: dns.name.Name) -> list[str] | None:
    """The records of a plain reply to `query`, [] when it has none; None when dnspython must read
    the reply because it is anything else.

    Plain: the id and question of the query, NOERROR, not truncated; an answer section holding
    only records of the asked name and type; an authority section of NS and SOA records and an
    additional section of A and AAAA records (none with EDNS or TSIG), every record well formed
    by dnspython's rules and nothing after them. Records that dnspython holds equal (the same
    address, the same preference and exchange in any case) are kept once, the first in place.
    """
    end = len(query)
    if len(data) < end or data[:2] != query[:2]:
        return None
    _, flags, questions, answers, authorities, additionals = _HEADER.unpack_from(data)
    if flags & _REPLY_MASK != _REPLY_PLAIN or questions != 1:
        return None
    if data[12 : end - 4].lower() != query[12 : end - 4].lower():
        return None
    if data[end - 4 : end] != query[end - 4 : end]:
        return None
    rdtype = int.from_bytes(query[end - 4 : end - 2], "big")
    texts: list[str] = []
    seen: set[object] = set()
    position = end
    try:
        for _ in range(answers):
            if data[position : position + 2] == _QUESTION_POINTER:
                position += 2
            else:
                owner, used = dns.name.from_wire(data, position)
                if owner != qname:
                    return None
                position += used
            rtype, rclass, _, length = _RR.unpack_from(data, position)
            position += _RR.size
            stop = position + length
            if rtype != rdtype or rclass != _IN or stop > len(data):
                return None
            record = _plain_record(data, position, stop, rtype)
            if record is None:
                return None
            key, text = record
            if key not in seen:
                seen.add(key)
                texts.append(text)
            position = stop
        for count, allowed in ((authorities, (_NS, _SOA)), (additionals, (_A, _AAAA))):
            for _ in range(count):
                _, used = dns.name.from_wire(data, position)
                position += used
                rtype, rclass, _, length = _RR.unpack_from(data, position)
                position += _RR.size
                stop = position + length
                if rtype not in allowed or rclass != _IN or stop > len(data):
                    return None
                if _plain_record(data, position, stop, rtype) is None:
                    return None
                position = stop
    except (dns.exception.DNSException, struct.error):
        return None
    return texts if position == len(data) else None


def _plain_record(data: bytes, start: int, stop: int, rtype: int) -> tuple[object, str] | None:
    """(what makes the record equal to another, its text) of one A, AAAA, MX, NS or SOA record
    whose rdata is data[start:stop]; None when dnspython would reject it. The text is only made
    for the types an answer holds."""
    if rtype == _A:
        if stop - start != 4:
            return None
        address = data[start:stop]
        return address, dns.ipv4.inet_ntoa(address)
    if rtype == _AAAA:
        if stop - start != 16:
            return None
        address = data[start:stop]
        return address, dns.ipv6.inet_ntoa(address)
    if rtype == _MX:
        if stop - start < 3:
            return None
        (preference,) = _PREFERENCE.unpack_from(data, start)
        exchange, used = dns.name.from_wire(data, start + 2)
        if start + 2 + used != stop:
            return None
        return (preference, exchange.canonicalize()), f"{preference} {exchange}"
    if rtype == _NS:
        _, used = dns.name.from_wire(data, start)
        return (None, "") if start + used == stop else None
    if rtype == _SOA:
        _, used = dns.name.from_wire(data, start)
        position = start + used
        _, used = dns.name.from_wire(data, position)
        position += used
        return (None, "") if position + _SOA_NUMBERS == stop else None
    return None


# --- the web form's check, blocking ------------------------------------------------------------


def _ask_blocking(
    resolver: dns.resolver.Resolver, name: dns.name.Name, rdtype: str
) -> tuple[list[str], _Lookup | None, str]:
    """_ask for a blocking resolver (same outcomes)."""
    try:
        answer = resolver.resolve(name, rdtype, search=False)
    except dns.exception.DNSException as exc:
        return [], *_failure(exc, rdtype)
    return [rdata.to_text() for rdata in answer], None, ""


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
