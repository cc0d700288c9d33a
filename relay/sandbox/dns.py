"""A real authoritative DNS server on loopback, serving zones from zone-file text.

Used by `relay demo` (the sandbox's DNS), by the tests (fixtures `dns_server`, `world_dns`)
and by the benchmark (bench/peers.py serves `DNSZoneServer.answer` on its own loop).

It answers over UDP and TCP on one port, distinguishes NXDOMAIN (the name does not exist)
from NODATA (the name exists, not with that type), and can be told to SERVFAIL or to stay
silent (a timeout) for chosen names. Every query is recorded, so tests can prove an MX lookup
happened at each attempt.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from typing import Any

from dnslib import QTYPE, RCODE, RR, SOA, DNSHeader, DNSRecord


def _norm(name: str) -> str:
    return name.rstrip(".").lower() + "."


class DNSZoneServer:
    def __init__(self, zone_text: str = "", host: str = "127.0.0.1", port: int = 0) -> None:
        """`port` 0 picks a free UDP+TCP pair; a fixed port (53 for a stub resolver that
        cannot be told another) binds exactly that."""
        self.host = host
        self.requested_port = port
        self.records: list[Any] = []
        self.servfail: set[str] = set()
        self.timeout: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        if zone_text:
            self.add(zone_text)

    # --- zone management ---
    def add(self, zone_text: str) -> None:
        with self._lock:
            self.records.extend(RR.fromZone(zone_text))

    def set_zone(self, zone_text: str) -> None:
        with self._lock:
            self.records = list(RR.fromZone(zone_text)) if zone_text.strip() else []

    def remove(self, name: str, rtype: str | None = None) -> None:
        target = _norm(name)
        with self._lock:
            self.records = [
                rr
                for rr in self.records
                if not (
                    _norm(str(rr.rname)) == target and (rtype is None or QTYPE[rr.rtype] == rtype)
                )
            ]

    def fail(self, names: Iterable[str], how: str = "servfail") -> None:
        target = self.servfail if how == "servfail" else self.timeout
        target.update(_norm(n) for n in names)

    def heal(self) -> None:
        self.servfail.clear()
        self.timeout.clear()

    def queried(self, name: str, rtype: str | None = None) -> int:
        target = _norm(name)
        return sum(1 for n, t in self.queries if n == target and (rtype is None or t == rtype))

    # --- answering ---
    def answer(self, data: bytes) -> bytes | None:
        request = DNSRecord.parse(data)
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            if qname in self.timeout:
                return None
            reply = request.reply()
            if qname in self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return bytes(reply.pack())
            exists = False
            for rr in self.records:
                name = _norm(str(rr.rname))
                if name == qname:
                    exists = True
                    if qtype in ("ANY", QTYPE[rr.rtype]) or QTYPE[rr.rtype] == "CNAME":
                        reply.add_answer(rr)
                elif name.endswith("." + qname):
                    exists = True  # an empty non-terminal exists (RFC 8020)
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        if not reply.rr:
            zone = qname.split(".", 1)[1] if "." in qname.rstrip(".") else qname
            reply.add_auth(
                RR(zone, QTYPE.SOA, ttl=60, rdata=SOA("ns." + zone, "hostmaster." + zone))
            )
        reply.header.aa = 1
        return bytes(reply.pack())

    # --- lifecycle ---
    @property
    def port(self) -> int:
        assert self._udp is not None
        return int(self._udp.server_address[1])

    @property
    def address(self) -> str:
        """The value for RELAY_DNS_NAMESERVERS."""
        return f"{self.host}:{self.port}"

    def start(self) -> DNSZoneServer:
        server = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data)
                if reply is None:
                    return
                if len(reply) > 512 and not DNSRecord.parse(data).ar:
                    truncated = DNSRecord.parse(data).reply()
                    truncated.header = DNSHeader(id=truncated.header.id, qr=1, aa=1, tc=1, q=1)
                    reply = truncated.pack()
                sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                try:
                    header = sock.recv(2)
                    if len(header) < 2:
                        return
                    (length,) = struct.unpack("!H", header)
                    data = b""
                    while len(data) < length:
                        chunk = sock.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                    reply = server.answer(data)
                    if reply is not None:
                        sock.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

        # Bind UDP first on an ephemeral port, then TCP on the same number.
        for _ in range(20 if self.requested_port == 0 else 1):
            udp = socketserver.ThreadingUDPServer((self.host, self.requested_port), UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), TCPHandler)
            except OSError:
                udp.server_close()
                if self.requested_port:
                    raise
                continue
            break
        else:  # pragma: no cover - the loopback ran out of ports
            raise RuntimeError("no free port pair for the DNS server")
        udp.daemon_threads = tcp.daemon_threads = True
        self._udp, self._tcp = udp, tcp
        for srv in (udp, tcp):
            threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    def __enter__(self) -> DNSZoneServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def txt_record(name: str, text: str, ttl: int = 300) -> str:
    """A zone line for a TXT record, split into <= 255-byte strings as DNS requires."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    quoted = " ".join('"' + c.replace('"', '\\"') + '"' for c in chunks)
    return f"{name} {ttl} IN TXT {quoted}"


def ptr_name(ip: str) -> str:
    """The reverse-lookup name of an IPv4 or IPv6 address."""
    return ipaddress.ip_address(ip).reverse_pointer + "."
