"""The test world's peers in a process of their own: `python -m bench.peers ZONE_FILE`.

The DNS server and the siteverify stand-in come from tests/peers; run in the benchmark's own
process they would share its GIL with the load they are meant to serve. This process prints
one JSON line with their addresses, then serves until its stdin closes or it gets SIGTERM.

`--dns-port53 HOST` also answers for the zone on HOST:53 (UDP and TCP): the glibc resolver
that Postfix uses has no way to name a port, so its private resolv.conf points there.
"""

from __future__ import annotations

import argparse
import json
import signal
import socketserver
import struct
import sys
import threading
from pathlib import Path

from tests.peers.captcha import SiteverifyStub
from tests.peers.dns import DNSZoneServer


def serve_port53(zone: DNSZoneServer, host: str) -> list[socketserver.BaseServer]:
    class UDPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply = zone.answer(data)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    class TCPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            sock.settimeout(5)
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
            reply = zone.answer(data)
            if reply is not None:
                sock.sendall(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    servers: list[socketserver.BaseServer] = [
        socketserver.ThreadingUDPServer((host, 53), UDPHandler),
        socketserver.ThreadingTCPServer((host, 53), TCPHandler),
    ]
    for server in servers:
        server.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("zone_file", type=Path)
    parser.add_argument("--dns-port53", metavar="HOST")
    args = parser.parse_args()
    zone = DNSZoneServer(args.zone_file.read_text()).start()
    # The bench sends many tokens; the stub's request log is kept small.
    stub = SiteverifyStub(hostname="localhost").start()
    extra = serve_port53(zone, args.dns_port53) if args.dns_port53 else []
    # The query log grows with every lookup; nothing here reads it.
    zone.queries = _Discard()
    stub.requests = _Discard()
    print(json.dumps({"dns": zone.address, "siteverify": stub.url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    for server in extra:
        server.shutdown()
    stub.stop()
    zone.stop()


class _Discard(list):  # type: ignore[type-arg]
    """A list that forgets what is appended: the peers' logs would grow for the whole run."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    main()
