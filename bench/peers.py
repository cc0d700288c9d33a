"""The test world's peers in a process of their own: `python -m bench.peers ZONE_FILE`.

The DNS server's zone and answers and the siteverify stand-in's verdicts come from
relay.sandbox, as the tests' do; run in the benchmark's own process they would share its GIL
with the load they are meant to serve. This process prints one JSON line with their addresses,
then serves until its stdin closes or it gets SIGTERM.

They share the 2 cores with the server under test, so here they are served by one asyncio
loop instead of the test peers' thread per datagram and per connection (which cost about
1.6 ms of CPU per accepted submission, more than half of it starting threads and parsing
headers with http.server). Siteverify speaks HTTP/1.1 with keep-alive, as hCaptcha does; every
token is still posted over HTTP and judged by `SiteverifyStub.verdict` (fresh `pass-*` tokens
pass once). DNS answers over UDP and TCP on one port with `DNSZoneServer.answer`. Only the
fast token kinds are meant for the bench: a `slow-*` token would hold up the loop.

`--dns-port53 HOST` also answers for the zone on HOST:53 (UDP and TCP): the glibc resolver
that Postfix uses has no way to name a port, so its private resolv.conf points there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import struct
import sys
import threading
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import Any

from relay.sandbox.captcha import SiteverifyStub
from relay.sandbox.dns import DNSZoneServer

HOST = "127.0.0.1"


class _DNSDatagrams(asyncio.DatagramProtocol):
    def __init__(self, zone: DNSZoneServer) -> None:
        self.zone = zone
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(Exception):  # garbage in: no answer, as the test server does
            reply = self.zone.answer(data)
            if reply is not None and self.transport is not None:
                self.transport.sendto(reply, addr)


async def _dns_stream(
    zone: DNSZoneServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """DNS over TCP: two-byte length, message; several per connection."""
    with contextlib.suppress(Exception):
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = zone.answer(await reader.readexactly(length))
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    writer.close()


async def _siteverify(
    stub: SiteverifyStub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """POST /siteverify (form-encoded) over HTTP/1.1, as many requests as the client sends."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, _target, version = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length") or 0))
            if method == "POST":
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                status, payload = stub.verdict(form)
            else:
                status, payload = 405, "method not allowed"
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
            writer.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            if close:
                break
    writer.close()


async def _serve(
    zone: DNSZoneServer, stub: SiteverifyStub, ready: asyncio.Future[dict[str, str]]
) -> None:
    loop = asyncio.get_running_loop()
    web = await asyncio.start_server(lambda r, w: _siteverify(stub, r, w), HOST, 0)
    web_port = web.sockets[0].getsockname()[1]
    # UDP and TCP on the same port, as a resolver expects when it falls back to TCP.
    for _ in range(20):
        udp, _protocol = await loop.create_datagram_endpoint(
            lambda: _DNSDatagrams(zone), local_addr=(HOST, 0)
        )
        port = udp.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(lambda r, w: _dns_stream(zone, r, w), HOST, port)
            break
        except OSError:
            udp.close()
    else:
        raise RuntimeError("no free port for DNS over UDP and TCP")
    ready.set_result(
        {"dns": f"{HOST}:{port}", "siteverify": f"http://{HOST}:{web_port}/siteverify"}
    )
    async with web, tcp:
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("zone_file", type=Path)
    parser.add_argument("--dns-port53", metavar="HOST")
    args = parser.parse_args()
    # The test peers' state and answers, without their sockets (not started).
    zone = DNSZoneServer(args.zone_file.read_text())
    stub = SiteverifyStub(hostname="localhost")
    # Postfix's stub resolver only asks port 53: the same zone there, on its own address.
    extra = (
        [DNSZoneServer(args.zone_file.read_text(), host=args.dns_port53, port=53).start()]
        if args.dns_port53
        else []
    )
    # The query and request logs grow with every lookup; nothing here reads them.
    for server in (zone, *extra):
        server.queries = _Discard()
    stub.requests = _Discard()
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[dict[str, str]] = loop.create_future()
    threading.Thread(
        target=loop.run_until_complete, args=(_serve(zone, stub, ready),), daemon=True
    ).start()
    addresses = asyncio.run_coroutine_threadsafe(_wait(ready), loop).result(timeout=30)
    print(json.dumps(addresses), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    for server in extra:
        server.stop()


async def _wait(ready: asyncio.Future[dict[str, str]]) -> dict[str, str]:
    return await ready


class _Discard(list):  # type: ignore[type-arg]
    """A list that forgets what is appended: the peers' logs would grow for the whole run."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    main()
