"""The lean query path (relay/mail/dnswire.py) against real DNS peers on loopback.

dnswire runs dnspython's resolution (`_Resolution`) with its own UDP exchange and a reader for
plain replies. Each case here makes the same lookup twice, through the lean path and through
dnspython's `Resolver.resolve` (mx.PlainResolver, the seam that takes the plain path), against
the same scripted replies, and asserts the same outcome down to the error's reason, as well as
the outcome itself. The replies cover what the reader takes (plain answers, no records) and what
it must leave to dnspython (CNAMEs, NXDOMAIN, SERVFAIL, truncation, EDNS, malformed datagrams
and datagrams from elsewhere, which both must ignore). The guard is tested at the end: the
installed dnspython must hash to a digest dnswire was read against, and any other takes the
plain path.
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.version
import pytest
from packaging.version import Version

from relay.errors import DNSError
from relay.mail import dnswire, mx
from relay.mail.mx import (
    MXHost,
    PlainResolver,
    Resolver,
    domain_accepts_mail,
    resolve_addresses,
    resolve_mx,
)
from relay.sandbox.dns import DNSZoneServer

# A reply and the socket it leaves from: "main" (the one the query went to), "other-port" (the
# same address, another port) or "other-address" (the same port on 127.0.0.2).
Datagram = tuple[bytes, str]
Script = Callable[[dns.message.Message, bool], list[Datagram]]

BOGUS = "127.6.6.6"  # what a datagram that must be ignored carries


class ScriptedDNS:
    """A DNS peer whose replies a test scripts per query name, over UDP and TCP on one port.

    A name without a script gets the default script's replies, or NXDOMAIN. Every query is
    logged with its transport and source port.
    """

    def __init__(self, scripts: dict[str, Script], default: Script | None = None) -> None:
        self.scripts = scripts
        self.default = default
        self.queries: list[tuple[str, str, str, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedDNS:
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tcp.bind(("127.0.0.1", port))
                other.bind(("127.0.0.2", port))
            except OSError:
                for sock in (udp, tcp, other):
                    sock.close()
                continue
            break
        else:  # pragma: no cover - the loopback ran out of ports
            raise RuntimeError("no free port for the scripted DNS peer")
        tcp.listen()
        self.port = port
        self.udp, self.tcp = udp, tcp
        self.senders = {"main": udp, "other-address": other}
        other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other_port.bind(("127.0.0.1", 0))
        self.senders["other-port"] = other_port
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)
        for sock in (self.tcp, *self.senders.values()):
            sock.close()

    def queried(self, name: str, rdtype: str, transport: str | None = None) -> int:
        return sum(
            1
            for n, t, how, _ in self.queries
            if n == name and t == rdtype and transport in (None, how)
        )

    def _answer(self, data: bytes, port: int, tcp: bool) -> list[Datagram]:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append(
            (name, dns.rdatatype.to_text(question.rdtype), "tcp" if tcp else "udp", port)
        )
        script = self.scripts.get(name, self.default)
        if script is None:
            return [(reply(query, rcode=dns.rcode.NXDOMAIN), "main")]
        return script(query, tcp)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.udp, selectors.EVENT_READ, "udp")
            selector.register(self.tcp, selectors.EVENT_READ, "tcp")
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.data == "udp":
                        data, client = self.udp.recvfrom(65535)
                        for wire, via in self._answer(data, client[1], tcp=False):
                            self.senders[via].sendto(wire, client)
                    else:
                        self._serve_tcp()

    def _serve_tcp(self) -> None:
        conn, client = self.tcp.accept()
        with conn:
            conn.settimeout(2)
            (length,) = struct.unpack("!H", _read(conn, 2))
            for wire, via in self._answer(_read(conn, length), client[1], tcp=True):
                if via == "main":
                    conn.sendall(struct.pack("!H", len(wire)) + wire)


def _read(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("short read")
        data += chunk
    return data


# --- replies ---------------------------------------------------------------------------------


def reply(
    query: dns.message.Message,
    *answer: str,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    authority: tuple[str, ...] = (),
    additional: tuple[str, ...] = (),
    edns: bool = False,
) -> bytes:
    """A response rendered by dnspython; records are "name ttl TYPE rdata" lines, each its own
    RRset so that duplicates reach the wire."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if edns:
        response.use_edns(0)
    for section, lines in (
        (response.answer, answer),
        (response.authority, authority),
        (response.additional, additional),
    ):
        for line in lines:
            owner, ttl, rtype, rdata = line.split(maxsplit=3)
            rrset = response.find_rrset(
                section,
                dns.name.from_text(owner),
                dns.rdataclass.IN,
                dns.rdatatype.from_text(rtype),
                create=True,
                force_unique=True,
            )
            rrset.add(dns.rdata.from_text("IN", rtype, rdata), int(ttl))
    return response.to_wire()


def record(owner: bytes, rtype: int, rdata: bytes, ttl: int = 300) -> bytes:
    """One resource record in wire form; QNAME as owner points at the question's name."""
    return owner + struct.pack("!HHIH", rtype, dns.rdataclass.IN, ttl, len(rdata)) + rdata


QNAME = b"\xc0\x0c"


def raw_reply(
    query: dns.message.Message,
    answers: list[bytes],
    *,
    ident: int | None = None,
    flags: int = 0x8180,
    question: bytes | None = None,
    authority: list[bytes] | None = None,
    tail: bytes = b"",
) -> bytes:
    """A response packed by hand, for what dnspython would not render."""
    authority = authority or []
    header = struct.pack(
        "!HHHHHH",
        query.id if ident is None else ident,
        flags,
        1,
        len(answers),
        len(authority),
        0,
    )
    body = question if question is not None else query.to_wire()[12:]
    return header + body + b"".join(answers) + b"".join(authority) + tail


def a(address: str) -> bytes:
    return socket.inet_aton(address)


def by_type(**replies: Callable[[dns.message.Message], list[Datagram]]) -> Script:
    """A script answering each query type its own way; other types get no records."""

    def script(query: dns.message.Message, tcp: bool) -> list[Datagram]:
        rdtype = dns.rdatatype.to_text(query.question[0].rdtype)
        make = replies.get(rdtype)
        return make(query) if make else [(reply(query), "main")]

    return script


def main(*answer: str, **kwargs: Any) -> Callable[[dns.message.Message], list[Datagram]]:
    return lambda query: [(reply(query, *answer, **kwargs), "main")]


def first(
    bogus: Callable[[dns.message.Message], Datagram], *answer: str
) -> Callable[[dns.message.Message], list[Datagram]]:
    """A datagram both paths must ignore, then the real reply."""
    return lambda query: [bogus(query), (reply(query, *answer), "main")]


def truncated(query: dns.message.Message, tcp: bool) -> list[Datagram]:
    """Truncated over UDP (with a record, which must not be used); the whole answer over TCP."""
    if not tcp:
        response = dns.message.from_wire(reply(query, f"truncated.lean.test. 300 A {BOGUS}"))
        response.flags |= dns.flags.TC
        return [(response.to_wire(), "main")]
    return [(reply(query, "truncated.lean.test. 300 A 127.0.0.41"), "main")]


def servfail(query: dns.message.Message, tcp: bool) -> list[Datagram]:
    return [(reply(query, rcode=dns.rcode.SERVFAIL), "main")]


SOA = "lean.test. 300 SOA ns.lean.test. hostmaster.lean.test. 1 3600 600 86400 60"
OK = "127.0.0.31"


def ok_after(name: str, bogus: Callable[[dns.message.Message], Datagram]) -> Script:
    """A datagram both paths must ignore, then an A record of OK for `name`."""
    return by_type(A=first(bogus, f"{name}. 300 A {OK}"))


SCRIPTS: dict[str, Script] = {
    "plain.lean.test": by_type(
        A=main(
            "plain.lean.test. 300 A 127.0.0.21",
            "plain.lean.test. 300 A 127.0.0.22",
            "PLAIN.lean.test. 60 A 127.0.0.21",
        ),
        AAAA=main(
            "plain.lean.test. 300 AAAA 2001:db8::1",
            "plain.lean.test. 300 AAAA ::ffff:127.0.0.1",
            "plain.lean.test. 300 AAAA 2001:db8:0:0:1:0:0:1",
        ),
    ),
    "uncompressed.lean.test": by_type(
        A=lambda q: [
            (
                raw_reply(
                    q,
                    [
                        record(
                            dns.name.from_text("UNCOMPRESSED.Lean.Test.").to_wire(),
                            1,
                            a("127.0.0.23"),
                        ),
                        record(QNAME, 1, a("127.0.0.24"), ttl=0xFFFFFFFF),
                    ],
                ),
                "main",
            )
        ]
    ),
    "case.lean.test": by_type(
        A=lambda q: [
            (
                raw_reply(
                    q,
                    [record(QNAME, 1, a("127.0.0.25"))],
                    question=dns.name.from_text("CaSe.LEAN.test.").to_wire()
                    + struct.pack("!HH", 1, 1),
                ),
                "main",
            )
        ]
    ),
    "nodata.lean.test": by_type(A=main(authority=(SOA,)), AAAA=main()),
    "nxdomain.lean.test": lambda q, tcp: [
        (reply(q, rcode=dns.rcode.NXDOMAIN, authority=(SOA,)), "main")
    ],
    "servfail.lean.test": servfail,
    "refused.lean.test": lambda q, tcp: [(reply(q, rcode=dns.rcode.REFUSED), "main")],
    "cname.lean.test": by_type(
        A=main(
            "cname.lean.test. 300 CNAME target.lean.test.",
            "target.lean.test. 300 A 127.0.0.26",
        ),
        AAAA=main("cname.lean.test. 300 CNAME target.lean.test."),
    ),
    "other-owner.lean.test": by_type(A=main("elsewhere.lean.test. 300 A 127.0.0.27")),
    "other-type.lean.test": by_type(A=main('other-type.lean.test. 300 TXT "not an address"')),
    "glue.lean.test": by_type(
        A=main(
            "glue.lean.test. 300 A 127.0.0.28",
            authority=("lean.test. 300 NS ns.lean.test.",),
            additional=("ns.lean.test. 300 A 127.0.0.53", "ns.lean.test. 300 AAAA ::53"),
        )
    ),
    "edns.lean.test": by_type(A=main("edns.lean.test. 300 A 127.0.0.29", edns=True)),
    "txt-additional.lean.test": by_type(
        A=main(
            "txt-additional.lean.test. 300 A 127.0.0.30",
            additional=('ns.lean.test. 300 TXT "extra"',),
        )
    ),
    "silent.lean.test": lambda q, tcp: [],
    "referral.lean.test": by_type(A=main(authority=("lean.test. 300 NS ns.lean.test.",))),
    "truncated.lean.test": truncated,
    "trailing-junk.lean.test": ok_after(
        "trailing-junk.lean.test",
        lambda q: (reply(q, f"trailing-junk.lean.test. 300 A {BOGUS}") + b"\x00", "main"),
    ),
    "long-rdata.lean.test": ok_after(
        "long-rdata.lean.test",
        lambda q: (raw_reply(q, [record(QNAME, 1, a(BOGUS) + b"\x00")]), "main"),
    ),
    "forward-pointer.lean.test": ok_after(
        "forward-pointer.lean.test",
        lambda q: (raw_reply(q, [record(b"\xc0\xff", 1, a(BOGUS))]), "main"),
    ),
    "short-record.lean.test": ok_after(
        "short-record.lean.test",
        lambda q: (raw_reply(q, [record(QNAME, 1, a(BOGUS))[:-2]]), "main"),
    ),
    "other-id.lean.test": ok_after(
        "other-id.lean.test",
        lambda q: (
            raw_reply(q, [record(QNAME, 1, a(BOGUS))], ident=(q.id + 1) % 65536),
            "main",
        ),
    ),
    "other-question.lean.test": ok_after(
        "other-question.lean.test",
        lambda q: (
            raw_reply(
                q,
                [record(QNAME, 1, a(BOGUS))],
                question=dns.name.from_text("other.lean.test.").to_wire()
                + struct.pack("!HH", 1, 1),
            ),
            "main",
        ),
    ),
    "not-a-response.lean.test": ok_after(
        "not-a-response.lean.test",
        lambda q: (raw_reply(q, [record(QNAME, 1, a(BOGUS))], flags=0x0100), "main"),
    ),
    "other-port.lean.test": ok_after(
        "other-port.lean.test",
        lambda q: (reply(q, f"other-port.lean.test. 300 A {BOGUS}"), "other-port"),
    ),
    "other-address.lean.test": ok_after(
        "other-address.lean.test",
        lambda q: (reply(q, f"other-address.lean.test. 300 A {BOGUS}"), "other-address"),
    ),
    # MX: the exchanges' addresses come from the scripts above and below.
    "mx.lean.test": by_type(
        MX=main(
            "mx.lean.test. 300 MX 10 MX1.Lean.Test.",
            "mx.lean.test. 300 MX 10 mx1.lean.test.",
            "mx.lean.test. 300 MX 20 plain.lean.test.",
            additional=("mx1.lean.test. 300 A 127.0.0.51",),
        )
    ),
    "mx1.lean.test": by_type(A=main("mx1.lean.test. 300 A 127.0.0.51")),
    "mx-cname.lean.test": by_type(MX=main("mx-cname.lean.test. 300 MX 10 cname.lean.test.")),
    "mx-null.lean.test": by_type(MX=main("mx-null.lean.test. 300 MX 0 .")),
    "mx-escaped.lean.test": by_type(MX=main(r"mx-escaped.lean.test. 300 MX 5 we\.ird.lean.test.")),
    r"we\.ird.lean.test": by_type(A=main(r"we\.ird.lean.test. 300 A 127.0.0.52")),
    "mx-nodata.lean.test": by_type(
        MX=main(authority=(SOA,)), A=main("mx-nodata.lean.test. 300 A 127.0.0.54")
    ),
    "mx-dangling.lean.test": by_type(
        MX=main(
            "mx-dangling.lean.test. 300 MX 10 gone.lean.test.",
            "mx-dangling.lean.test. 300 MX 20 nodata.lean.test.",
        )
    ),
}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def scripted() -> Iterator[ScriptedDNS]:
    with ScriptedDNS(SCRIPTS) as server:
        yield server


def resolvers(*servers: str, lifetime: float = 2.0, timeout: float = 2.0) -> tuple[Any, Any]:
    """(a resolver on the lean path, one on dnspython's) for the same nameservers."""
    pair = []
    for cls in (Resolver, PlainResolver):
        resolver = cls(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, int(port))
            for host, port in (s.rsplit(":", 1) for s in servers)
        ]
        resolver.cache = None
        resolver.lifetime = lifetime
        resolver.timeout = timeout
        pair.append(resolver)
    return pair[0], pair[1]


def one_of(path: str, *servers: str, **times: float) -> Resolver:
    """The resolver of `path` ("lean" or "plain") from resolvers()."""
    lean, plain = resolvers(*servers, **times)
    return lean if path == "lean" else plain


PATHS = pytest.mark.parametrize("path", ["lean", "plain"])


async def outcome(call: Awaitable[Any]) -> tuple[str, Any]:
    try:
        return "ok", await call
    except DNSError as exc:
        return type(exc).__name__, exc.reason


async def both(
    lookup: Callable[[Any], Awaitable[Any]], lean: Resolver, reference: Resolver
) -> tuple[str, Any]:
    """The lookup's outcome with the lean path, asserted equal to dnspython's."""
    mine = await outcome(lookup(lean))
    theirs = await outcome(lookup(reference))
    assert mine == theirs
    return mine


# --- the cases -------------------------------------------------------------------------------

PLAIN = ("127.0.0.21", "127.0.0.22", "2001:db8::1", "::ffff:127.0.0.1", "2001:db8::1:0:0:1")

ADDRESS_CASES = [
    ("plain", "ok", PLAIN),
    ("uncompressed", "ok", ("127.0.0.23", "127.0.0.24")),
    ("case", "ok", ("127.0.0.25",)),
    ("nodata", "DNSPermanentError", "no A or AAAA records"),
    ("nxdomain", "DNSPermanentError", "NXDOMAIN"),
    ("servfail", "DNSTemporaryError", "answered SERVFAIL"),
    ("refused", "DNSTemporaryError", "answered REFUSED"),
    ("cname", "ok", ("127.0.0.26",)),
    ("other-owner", "DNSPermanentError", "no A or AAAA records"),
    ("other-type", "DNSPermanentError", "no A or AAAA records"),
    ("glue", "ok", ("127.0.0.28",)),
    ("edns", "ok", ("127.0.0.29",)),
    ("txt-additional", "ok", ("127.0.0.30",)),
    ("referral", "DNSPermanentError", "no A or AAAA records"),
    ("truncated", "ok", ("127.0.0.41",)),
    *(
        (bogus, "ok", (OK,))
        for bogus in (
            "trailing-junk",
            "long-rdata",
            "forward-pointer",
            "short-record",
            "other-id",
            "other-question",
            "not-a-response",
            "other-port",
            "other-address",
        )
    ),
]


@pytest.mark.parametrize(("case", "kind", "expected"), ADDRESS_CASES)
async def test_addresses_as_dnspython_finds_them(
    scripted: ScriptedDNS, case: str, kind: str, expected: Any
) -> None:
    lean, reference = resolvers(scripted.address)
    name = f"{case}.lean.test"
    got_kind, got = await both(lambda r: resolve_addresses(name, r), lean, reference)
    assert got_kind == kind
    if kind == "ok":
        assert got == expected
    else:
        assert expected in got
    assert BOGUS not in str(got)


@PATHS
async def test_truncated_reply_is_asked_again_over_tcp(scripted: ScriptedDNS, path: str) -> None:
    resolver = one_of(path, scripted.address)
    assert await resolve_addresses("truncated.lean.test", resolver) == ("127.0.0.41",)
    assert scripted.queried("truncated.lean.test", "A", "udp") == 1
    assert scripted.queried("truncated.lean.test", "A", "tcp") == 1


MX_CASES = [
    (
        "mx",
        "ok",
        [MXHost("mx1.lean.test", 10, ("127.0.0.51",)), MXHost("plain.lean.test", 20, PLAIN)],
    ),
    ("mx-cname", "ok", [MXHost("cname.lean.test", 10, ("127.0.0.26",))]),
    ("mx-null", "DNSPermanentError", "null MX"),
    ("mx-escaped", "ok", [MXHost(r"we\.ird.lean.test", 5, ("127.0.0.52",))]),
    ("mx-nodata", "ok", [MXHost("mx-nodata.lean.test", 0, ("127.0.0.54",))]),
    ("mx-dangling", "DNSTemporaryError", "no MX host has an address"),
    ("nxdomain", "DNSPermanentError", "does not exist"),
    ("servfail", "DNSTemporaryError", "MX lookup failed"),
]


@pytest.mark.parametrize(("case", "kind", "expected"), MX_CASES)
async def test_mx_hosts_as_dnspython_finds_them(
    scripted: ScriptedDNS, case: str, kind: str, expected: Any
) -> None:
    lean, reference = resolvers(scripted.address)
    name = f"{case}.lean.test"
    got_kind, got = await both(lambda r: resolve_mx(name, r, rng=random.Random(7)), lean, reference)
    assert got_kind == kind
    if kind == "ok":
        assert got == expected
    else:
        assert expected in got


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("mx", True),
        ("mx-null", False),
        ("nxdomain", False),
        ("servfail", None),
        ("mx-nodata", True),
        ("nodata", False),
    ],
)
async def test_domain_accepts_mail_as_with_dnspython(
    scripted: ScriptedDNS, case: str, expected: bool | None
) -> None:
    lean, reference = resolvers(scripted.address)
    name = f"{case}.lean.test"
    assert await both(lambda r: domain_accepts_mail(name, r), lean, reference) == (
        "ok",
        expected,
    )


async def test_no_reply_times_out_alike(scripted: ScriptedDNS) -> None:
    lean, reference = resolvers(scripted.address, lifetime=0.3, timeout=0.3)
    kind, reason = await both(lambda r: resolve_addresses("silent.lean.test", r), lean, reference)
    assert kind == "DNSTemporaryError"
    assert "timed out" in reason


async def test_next_nameserver_after_servfail(scripted: ScriptedDNS) -> None:
    with ScriptedDNS({}, default=servfail) as failing:
        lean, reference = resolvers(failing.address, scripted.address)
        assert await both(lambda r: resolve_addresses("plain.lean.test", r), lean, reference) == (
            "ok",
            PLAIN,
        )
        assert failing.queried("plain.lean.test", "A") == 2  # once per path
    assert scripted.queried("plain.lean.test", "A") == 2


async def test_next_nameserver_after_a_silent_one(scripted: ScriptedDNS) -> None:
    with ScriptedDNS({}, default=lambda q, tcp: []) as silent:
        lean, reference = resolvers(silent.address, scripted.address, timeout=0.2)
        assert await both(lambda r: resolve_addresses("plain.lean.test", r), lean, reference) == (
            "ok",
            PLAIN,
        )
        assert silent.queried("plain.lean.test", "A") == 2


async def test_every_nameserver_failing_is_reported_alike(scripted: ScriptedDNS) -> None:
    with ScriptedDNS({}, default=servfail) as one, ScriptedDNS({}, default=servfail) as two:
        lean, reference = resolvers(one.address, two.address)
        kind, reason = await both(lambda r: resolve_mx("plain.lean.test", r), lean, reference)
    assert kind == "DNSTemporaryError"
    assert f"Do53:127.0.0.1@{one.port} answered SERVFAIL" in reason
    assert f"Do53:127.0.0.1@{two.port} answered SERVFAIL" in reason


@PATHS
async def test_each_query_leaves_from_a_socket_of_its_own(scripted: ScriptedDNS, path: str) -> None:
    """A new socket, so a new source port, per query, as dnspython does: a reply cannot be
    forged by guessing the id alone."""
    resolver = one_of(path, scripted.address)
    for _ in range(4):
        assert await resolve_addresses("plain.lean.test", resolver) == PLAIN
    ports = [port for *_, port in scripted.queries]
    assert len(ports) == 8
    assert len(set(ports)) >= len(ports) - 1  # the kernel may hand a port out again


@PATHS
async def test_long_answer_from_the_zone_server_comes_over_tcp(
    make_settings: Callable[..., Any], world_dns: DNSZoneServer, path: str
) -> None:
    addresses = tuple(f"127.0.1.{i}" for i in range(1, 41))
    world_dns.add("\n".join(f"many.test. 300 IN A {ip}" for ip in addresses))
    settings = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address)
    resolver = mx.make_resolver(settings, lean=path == "lean")
    assert dnswire.applies(resolver) is (path == "lean")
    assert await resolve_addresses("many.test", resolver) == addresses
    assert world_dns.queried("many.test", "A") == 2  # truncated over UDP, then TCP


# --- the pieces ------------------------------------------------------------------------------


async def test_the_lean_path_applies_to_make_resolvers_resolvers(
    make_settings: Callable[..., Any], world_dns: DNSZoneServer
) -> None:
    """The cases above run the lean path, not dnspython's twice."""
    settings = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address)
    resolver = mx.make_resolver(settings)
    lean, reference = resolvers(world_dns.address)
    assert dnswire.applies(resolver)
    assert dnswire.applies(lean)
    assert not dnswire.applies(reference)
    assert not dnswire.applies(mx.make_resolver(settings, lean=False))
    resolver.cache = dns.resolver.Cache()
    assert not dnswire.applies(resolver)


def test_the_lean_path_needs_a_running_loop(
    make_settings: Callable[..., Any], world_dns: DNSZoneServer
) -> None:
    resolver = mx.make_resolver(make_settings(RELAY_DNS_NAMESERVERS=world_dns.address))
    assert not dnswire.applies(resolver)


@pytest.mark.parametrize("name", ["support.test", "MiXeD.Case.test", "x" * 63 + ".test", "."])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "MX"])
def test_query_wire_is_what_dnspython_renders(name: str, rdtype: str) -> None:
    query = dns.message.make_query(name, rdtype)
    assert dnswire._query_wire(query) == (query.to_wire(), True)


@pytest.mark.parametrize(
    "query",
    [
        dns.message.make_query("support.test", "A", use_edns=0),
        dns.message.make_query("support.test", "TXT"),
        dns.message.make_query("support.test", "A", rdclass="CH"),
    ],
    ids=["edns", "txt", "chaos"],
)
def test_other_queries_are_rendered_by_dnspython(query: dns.message.QueryMessage) -> None:
    assert dnswire._query_wire(query) == (query.to_wire(), False)


def test_plain_reader_takes_plain_replies_and_leaves_the_rest() -> None:
    query = dns.message.make_query("plain.lean.test", "A")
    wire, plain = dnswire._query_wire(query)
    assert plain
    qname = query.question[0].name

    def read(data: bytes) -> list[str] | None:
        return dnswire._read_plain(data, wire, qname)

    rr = "plain.lean.test. 300 A "
    assert read(reply(query, rr + "127.0.0.2", rr + "127.0.0.3", rr + "127.0.0.2")) == [
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert read(reply(query, authority=(SOA,))) == []
    assert read(reply(query, "plain.lean.test. 300 CNAME x.lean.test.")) is None
    assert read(reply(query, rcode=dns.rcode.NXDOMAIN)) is None
    assert read(reply(query, rr + "127.0.0.2", edns=True)) is None
    assert read(reply(query, rr + "127.0.0.2") + b"\x00") is None
    truncated = dns.message.from_wire(reply(query, rr + "127.0.0.2"))
    truncated.flags |= dns.flags.TC
    assert read(truncated.to_wire()) is None


# --- resolve_texts is Resolver.resolve ------------------------------------------------------


async def texts_or_error(call: Awaitable[Any]) -> tuple[str, Any]:
    """("ok", the records as text) or (the exception's type, its text; a timeout's text holds
    the time it took, so not that)."""
    try:
        result = await call
    except dns.exception.DNSException as exc:
        timed_out = isinstance(exc, dns.exception.Timeout)
        return type(exc).__name__, "" if timed_out else str(exc)
    texts = result if isinstance(result, list) else [rdata.to_text() for rdata in result]
    return "ok", texts


@pytest.mark.parametrize("rdtype", ["A", "AAAA", "MX"])
@pytest.mark.parametrize("name", sorted(n for n in SCRIPTS if n != "silent.lean.test"))
async def test_resolve_texts_is_resolve(scripted: ScriptedDNS, name: str, rdtype: str) -> None:
    """Every scripted reply, for every type mx.py asks: the lean path's texts or exception are
    those of the call it stands for."""
    lean, plain = resolvers(scripted.address)
    assert dnswire.applies(lean)
    qname = dns.name.from_text(name)
    mine = await texts_or_error(dnswire.resolve_texts(lean, qname, rdtype))
    theirs = await texts_or_error(
        plain.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    )
    assert mine == theirs
    assert BOGUS not in str(mine)


async def test_resolve_texts_times_out_as_resolve(scripted: ScriptedDNS) -> None:
    lean, plain = resolvers(scripted.address, lifetime=0.3, timeout=0.3)
    qname = dns.name.from_text("silent.lean.test")
    mine = await texts_or_error(dnswire.resolve_texts(lean, qname, "A"))
    assert mine == await texts_or_error(plain.resolve(qname, "A", search=False))
    assert mine == ("LifetimeTimeout", "")


# --- the guard: the exact dnspython it mirrors ----------------------------------------------


def test_the_installed_dnspython_is_the_code_dnswire_mirrors() -> None:
    """If this fails, dnspython changed (or moved) code that relay/mail/dnswire.py copies or
    calls privately, and every query now takes the slower Resolver.resolve (so every test here
    that expects the lean path fails too; the plain path is still right).

    Re-read each source in dnswire.MIRRORED in the installed dnspython beside dnswire (the loop
    in resolve_texts, _udp_query, _query_wire, _read_plain, _plain_record) and adapt dnswire
    where it no longer matches; then add the digest in the message below to
    dnswire.DNSPYTHON_SOURCES and run this file and tests/mail/test_mx.py, which then compare
    the lean path with dnspython's on every case. Past 2.9, move the pin in pyproject.toml.
    """
    assert Version("2.6") <= Version(version("dnspython")) < Version("2.10")
    digest = dnswire.source_digest()
    assert digest in dnswire.DNSPYTHON_SOURCES, (
        f"dnspython {dns.version.version} hashes to {digest}: re-read it (see this docstring)"
    )
    dnswire.sources_match.cache_clear()
    assert dnswire.sources_match() is True


@pytest.fixture
def do53_queries(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names asked through dnspython's Do53Nameserver.async_query (the plain path over UDP,
    both paths over TCP). The guard's verdict is taken first: the spy is a source it hashes."""
    dnswire.sources_match.cache_clear()
    assert dnswire.sources_match()
    asked: list[str] = []
    original = dns.nameserver.Do53Nameserver.async_query

    async def spy(self: Any, request: dns.message.QueryMessage, *args: Any, **kwargs: Any) -> Any:
        asked.append(request.question[0].name.to_text())
        return await original(self, request, *args, **kwargs)

    monkeypatch.setattr(dns.nameserver.Do53Nameserver, "async_query", spy)
    yield asked
    monkeypatch.undo()
    dnswire.sources_match.cache_clear()


async def test_the_lean_path_leaves_plain_replies_to_no_dnspython_query(
    scripted: ScriptedDNS, do53_queries: list[str]
) -> None:
    """The control for the test below: the spy sees nothing of the lean path over UDP."""
    lean, _ = resolvers(scripted.address)
    assert await resolve_addresses("plain.lean.test", lean) == PLAIN
    assert do53_queries == []


async def test_other_dnspython_sources_take_the_plain_path_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch,
    scripted: ScriptedDNS,
    do53_queries: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(dnswire, "DNSPYTHON_SOURCES", frozenset({"0" * 64}))
    dnswire.sources_match.cache_clear()
    lean, _ = resolvers(scripted.address)
    with caplog.at_level(logging.WARNING, logger="relay.dnswire"):
        assert not dnswire.applies(lean)
        for _ in range(2):
            assert await resolve_addresses("plain.lean.test", lean) == PLAIN
            assert [h.name for h in await resolve_mx("mx.lean.test", lean)] == [
                "mx1.lean.test",
                "plain.lean.test",
            ]
    # A and AAAA, for resolve_addresses and as an MX host, twice
    assert do53_queries.count("plain.lean.test.") == 2 * (2 + 2)
    assert do53_queries.count("mx.lean.test.") == 2
    unavailable = [
        r.getMessage() for r in caplog.records if "dns.lean_unavailable" in r.getMessage()
    ]
    assert len(unavailable) == 1
    assert f"dnspython={dns.version.version}" in unavailable[0]


def test_a_mirrored_source_gone_takes_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release without one of the mirrored pieces has no digest at all."""
    monkeypatch.setattr(dnswire, "MIRRORED", (*dnswire.MIRRORED, ("dns.resolver", "Gone")))
    dnswire.sources_match.cache_clear()
    try:
        assert dnswire.source_digest() is None
        assert dnswire.sources_match() is False
    finally:
        dnswire.sources_match.cache_clear()


# --- the blocking twin (the web's visitor-domain check) --------------------------------------


class PlainBlocking(dns.resolver.Resolver):
    """dnspython's blocking resolver under another type: applies_blocking() refuses it."""


def blocking_pair(*servers: str, lifetime: float = 2.0) -> tuple[Any, Any]:
    """(a blocking resolver on the lean path, one on dnspython's) for the same nameservers."""
    pair = []
    for cls in (dns.resolver.Resolver, PlainBlocking):
        resolver = cls(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, int(port))
            for host, port in (s.rsplit(":", 1) for s in servers)
        ]
        resolver.cache = None
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        pair.append(resolver)
    assert dnswire.applies_blocking(pair[0])
    assert not dnswire.applies_blocking(pair[1])
    return pair[0], pair[1]


def blocking_outcome(resolver: Any, name: str, rdtype: str) -> tuple[str, Any]:
    qname = dns.name.from_text(name)
    try:
        if dnswire.applies_blocking(resolver):
            return "ok", dnswire.resolve_texts_blocking(resolver, qname, rdtype)
        answer = resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        return "ok", [rdata.to_text() for rdata in answer]
    except dns.exception.DNSException as exc:
        return type(exc).__name__, None


BLOCKING_CASES = sorted(
    {(case, "A") for case, _, _ in ADDRESS_CASES}
    | {(case, "AAAA") for case, _, _ in ADDRESS_CASES}
    | {(case, "MX") for case, _, _ in MX_CASES}
)


@pytest.mark.parametrize(("case", "rdtype"), BLOCKING_CASES)
def test_blocking_queries_as_dnspython_answers_them(
    scripted: ScriptedDNS, case: str, rdtype: str
) -> None:
    lean, reference = blocking_pair(scripted.address)
    name = f"{case}.lean.test"
    mine = blocking_outcome(lean, name, rdtype)
    assert mine == blocking_outcome(reference, name, rdtype)
    assert BOGUS not in str(mine)


def test_blocking_plain_answers_are_read_here(scripted: ScriptedDNS) -> None:
    lean, _ = blocking_pair(scripted.address)
    assert blocking_outcome(lean, "plain.lean.test", "A") == ("ok", ["127.0.0.21", "127.0.0.22"])
    assert blocking_outcome(lean, "nxdomain.lean.test", "MX") == ("NXDOMAIN", None)


def test_blocking_truncated_reply_is_asked_again_over_tcp(scripted: ScriptedDNS) -> None:
    lean, _ = blocking_pair(scripted.address)
    assert blocking_outcome(lean, "truncated.lean.test", "A") == ("ok", ["127.0.0.41"])
    assert scripted.queried("truncated.lean.test", "A", "udp") == 1
    assert scripted.queried("truncated.lean.test", "A", "tcp") == 1


def test_blocking_silence_times_out_alike(scripted: ScriptedDNS) -> None:
    lean, reference = blocking_pair(scripted.address, lifetime=0.3)
    assert blocking_outcome(lean, "silent.lean.test", "A") == ("LifetimeTimeout", None)
    assert blocking_outcome(reference, "silent.lean.test", "A") == ("LifetimeTimeout", None)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("mx", True),
        ("mx-null", False),
        ("nxdomain", False),
        ("servfail", None),
        ("mx-nodata", True),
        ("nodata", False),
    ],
)
def test_domain_accepts_mail_blocking_as_with_dnspython(
    scripted: ScriptedDNS, case: str, expected: bool | None
) -> None:
    lean, reference = blocking_pair(scripted.address)
    name = f"{case}.lean.test"
    assert mx.domain_accepts_mail_blocking(name, lean) is expected
    assert mx.domain_accepts_mail_blocking(name, reference) is expected


def test_the_webs_resolver_takes_the_blocking_lean_path(
    make_settings: Callable[..., Any], world_dns: DNSZoneServer
) -> None:
    settings = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address)
    web = mx.blocking_resolver(mx.make_resolver(settings))
    assert dnswire.applies_blocking(web)
    web.cache = dns.resolver.Cache()
    assert not dnswire.applies_blocking(web)
