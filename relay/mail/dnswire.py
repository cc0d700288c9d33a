"""The lean query path: dnspython's `Resolver.resolve` (the async one for the worker, the
blocking one for the web's visitor-domain check), with the UDP exchange and the reading of
plain replies done here, at less CPU.

Why: `Resolver.resolve` spends most of a query's CPU away from the network (an asyncio
datagram transport built and closed per query, `to_wire`, `from_wire` into rdata objects and
an `Answer`). With this path the worker spends 2.43 ms of CPU per message end to end instead
of 3.13 ms, and 4.17 instead of 4.73 ms draining (docs/performance.md, item 9).

What it mirrors, and so what `MIRRORED` lists: `resolve_texts` is the loop of
`dns.asyncresolver.Resolver.resolve`, driving dnspython's private `_Resolution` (nameserver
order, retries and backoff, SERVFAIL, NXDOMAIN, TCP after a truncated reply) and
`BaseResolver._compute_timeout` (the lifetime). For a Do53 nameserver over UDP it replaces
`Do53Nameserver.async_query` → `dns.asyncquery.udp` and the asyncio backend's datagram socket
by a bare non-blocking socket per query, matching replies as `receive_udp` does; a plain
reply (records of the asked name and type, or none) is read here where `from_wire` and
`Answer` would read it, byte for byte to the same texts; any other reply, TCP and every
other kind of nameserver stay with dnspython. `resolve_texts_blocking` is the same for the
blocking `dns.resolver.Resolver.resolve` (`Do53Nameserver.query` → `dns.query.udp`, a blocking
socket with the remaining lifetime as its timeout): the web's visitor-domain check costs
0.30-0.34 ms of CPU instead of 0.66-0.71 (against the bench DNS server).

The guard: since it copies and calls private code, it runs only when the sha256 of the exact
source of everything in `MIRRORED` is one that was read against this module
(`DNSPYTHON_SOURCES`); on any other dnspython `dns.lean_unavailable` is logged once and every
query takes `Resolver.resolve`. mx.py asks `applies(resolver)` (`applies_blocking`: that, and
the resolver being one this path can stand in for) before each query, and calls
`resolve_texts` (`resolve_texts_blocking`) or, when it does not apply, `Resolver.resolve`
itself. tests/mail/test_mx_lean.py compares the two paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import socket
import struct
import time

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

from relay.logs import event

log = logging.getLogger("relay.dnswire")

# (module, qualified name) of every piece of dnspython this module copies or calls privately.
MIRRORED: tuple[tuple[str, str], ...] = (
    # The resolution: resolve_texts is this loop (resolve_texts_blocking the blocking one),
    # around these private helpers.
    ("dns.asyncresolver", "Resolver.resolve"),
    ("dns.resolver", "Resolver.resolve"),
    ("dns.resolver", "_Resolution"),
    ("dns.resolver", "BaseResolver._compute_timeout"),
    ("dns.resolver", "Answer"),
    # The query: what _Resolution builds and to_wire renders, _query_wire packs.
    ("dns.message", "make_query"),
    ("dns.message", "Message.to_wire"),
    # The UDP exchange _udp_query (_udp_query_blocking) replaces.
    ("dns.nameserver", "Do53Nameserver.async_query"),
    ("dns.asyncquery", "udp"),
    ("dns.asyncquery", "send_udp"),
    ("dns.asyncquery", "receive_udp"),
    ("dns.nameserver", "Do53Nameserver.query"),
    ("dns.query", "udp"),
    ("dns.query", "send_udp"),
    ("dns.query", "receive_udp"),
    ("dns.query", "_matches_destination"),
    ("dns.query", "_addresses_equal"),
    ("dns._asyncio_backend", "Backend.make_socket"),
    ("dns._asyncio_backend", "_DatagramProtocol"),
    ("dns._asyncio_backend", "_DatagramSocket"),
    # What a plain reply becomes in dnspython, which _read_plain and _plain_record copy.
    ("dns.message", "from_wire"),
    ("dns.message", "_WireReader"),
    ("dns.message", "Message.is_response"),
    ("dns.message", "Message.find_rrset"),
    ("dns.message", "QueryMessage.resolve_chaining"),
    ("dns.rdataset", "Rdataset.add"),
    ("dns.rdata", "Rdata._cmp"),
    ("dns.rdata", "Rdata.__eq__"),
    ("dns.rdata", "Rdata.__hash__"),
    ("dns.rdtypes.IN.A", "A"),
    ("dns.rdtypes.IN.AAAA", "AAAA"),
    ("dns.rdtypes.mxbase", "MXBase"),
    ("dns.rdtypes.nsbase", "NSBase"),
    ("dns.rdtypes.ANY.SOA", "SOA"),
)

# source_digest() of the dnspython releases this module was read against: 2.9.1 and 2.9.2
# (the same sources). 2.9.0's differ: no Message.set_random_id (which resolve_texts calls), and
# is_response, _WireReader and the MX, NS and SOA readers changed after it.
DNSPYTHON_SOURCES = frozenset({"7a9ba373bb93575a82451fdc4884088c769528c95ed164bceab2305c1773b762"})


def source_digest() -> str | None:
    """sha256 over the installed dnspython's source of everything in MIRRORED, in order;
    None when one of them is missing or its source cannot be read."""
    digest = hashlib.sha256()
    for module_name, qualname in MIRRORED:
        try:
            found: object = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
            source = inspect.getsource(found)  # type: ignore[arg-type]
        except (ImportError, AttributeError, OSError, TypeError):
            return None
        digest.update(f"{module_name}:{qualname}\n{source}\n".encode())
    return digest.hexdigest()


@functools.cache
def sources_match() -> bool:
    """Whether the installed dnspython is code this module was read against; logs
    `dns.lean_unavailable` (once) when it is not."""
    digest = source_digest()
    if digest in DNSPYTHON_SOURCES:
        return True
    event(
        log,
        "dns.lean_unavailable",
        logging.WARNING,
        dnspython=dns.version.version,
        digest=digest or "unreadable",
        fallback="Resolver.resolve",
    )
    return False


def applies(resolver: dns.asyncresolver.Resolver) -> bool:
    """Whether resolve_texts answers for `resolver` exactly as its own resolve() would:
    dnspython's own async resolver (a subclass may override resolve), without a cache, on an
    asyncio selector loop (the worker's and the tests'), on a dnspython that sources_match."""
    if type(resolver) is not dns.asyncresolver.Resolver or resolver.cache is not None:
        return False
    try:
        selector = isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)
    except RuntimeError:
        return False
    return selector and sources_match()


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


async def resolve_texts(
    resolver: dns.asyncresolver.Resolver,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType | str,
) -> list[str]:
    """`resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)` as its records'
    texts ([] for none), raising what that raises (NXDOMAIN, NoNameservers, LifetimeTimeout...).

    Only where applies(resolver); mx.py asks resolver.resolve itself otherwise.
    """
    resolution = dns.resolver._Resolution(resolver, name, rdtype, _IN, False, False, False)
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
                destination = _lean_destination(nameserver, tcp)
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


def applies_blocking(resolver: dns.resolver.Resolver) -> bool:
    """applies() for a blocking resolver (the web's): dnspython's own Resolver, without a
    cache, on a dnspython that sources_match."""
    return type(resolver) is dns.resolver.Resolver and resolver.cache is None and sources_match()


def resolve_texts_blocking(
    resolver: dns.resolver.Resolver,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType | str,
) -> list[str]:
    """resolve_texts for a blocking resolver: the loop of `dns.resolver.Resolver.resolve`, its
    UDP queries by _udp_query_blocking. Only where applies_blocking(resolver)."""
    resolution = dns.resolver._Resolution(resolver, name, rdtype, _IN, False, False, False)
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
                time.sleep(backoff)
            request.set_random_id()  # type: ignore[no-untyped-call]
            timeout = resolver._compute_timeout(start, None, resolution.errors)
            try:
                destination = _lean_destination(nameserver, tcp)
                if destination is None:
                    response: dns.message.Message | list[str] = nameserver.query(
                        request, timeout=timeout, source=None, source_port=0, max_size=tcp
                    )
                else:
                    response = _udp_query_blocking(request, destination, timeout)
            except Exception as exc:
                _, done = resolution.query_result(None, exc)
                continue
            if isinstance(response, list):
                return response
            answer, done = resolution.query_result(response, None)
            if answer is not None:
                return [rdata.to_text() for rdata in answer]


def _lean_destination(nameserver: dns.nameserver.Nameserver, tcp: bool) -> _Destination | None:
    """Where this path sends the query itself: a Do53 nameserver over UDP; None leaves the
    query to dnspython (TCP, DoH, DoT, a multicast address...)."""
    if tcp or type(nameserver) is not dns.nameserver.Do53Nameserver:
        return None
    return _udp_destination(nameserver.address, nameserver.port)


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
    family, destination, _packed = where
    wire, plain = _query_wire(request)
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
                judged = _judge(request, where, wire, plain, begin, data, source)
                if isinstance(judged, BaseException):
                    reply.set_exception(judged)
                elif judged is not None:
                    reply.set_result(judged)

        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendto(sock, wire, destination)
                loop.add_reader(sock.fileno(), readable)
                return await reply
        except TimeoutError:
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]
        finally:
            loop.remove_reader(sock.fileno())


def _udp_query_blocking(
    request: dns.message.QueryMessage, where: _Destination, timeout: float
) -> dns.message.Message | list[str]:
    """Do53Nameserver.query over UDP (dns.query.udp), as _udp_query does for the async one:
    a socket of its own, replies judged alike, dns.exception.Timeout past `timeout`."""
    family, destination, _packed = where
    wire, plain = _query_wire(request)
    begin = time.time()
    deadline = begin + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(max(timeout, 0.0))
        with contextlib.suppress(TimeoutError):
            sock.sendto(wire, destination)
            while (left := deadline - time.time()) > 0:
                sock.settimeout(left)
                data, source = sock.recvfrom(65535)
                judged = _judge(request, where, wire, plain, begin, data, source)
                if isinstance(judged, BaseException):
                    raise judged
                if judged is not None:
                    return judged
    raise dns.exception.Timeout(timeout=timeout)  # type: ignore[no-untyped-call]


def _judge(  # noqa: PLR0917 - one datagram and what it is judged against
    request: dns.message.QueryMessage,
    where: _Destination,
    wire: bytes,
    plain: bool,
    begin: float,
    data: bytes,
    source: tuple[str | int, ...],
) -> dns.message.Message | list[str] | dns.message.Truncated | None:
    """One datagram as receive_udp judges it: None to ignore it and wait on (another address
    or port, another id or question, unparseable), the Truncated to raise, or the reply (a
    plain one as its records' texts)."""
    family, destination, packed = where
    try:
        if dns.inet.inet_pton(family, str(source[0])) != packed:
            return None
    except dns.exception.SyntaxError:
        return None
    if source[1:] != destination[1:]:
        return None
    texts = _read_plain(data, wire, request.question[0].name) if plain else None
    if texts is not None:
        return texts
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
            return exc
        return None
    except Exception:  # dnspython ignores it too
        return None
    if not request.is_response(message):
        return None
    message.time = received - begin
    return message


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
