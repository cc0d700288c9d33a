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
import sys
import threading
from pathlib import Path

from tests.peers.captcha import SiteverifyStub
from tests.peers.dns import DNSZoneServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("zone_file", type=Path)
    parser.add_argument("--dns-port53", metavar="HOST")
    args = parser.parse_args()
    zone = DNSZoneServer(args.zone_file.read_text()).start()
    # The bench sends many tokens; the stub's request log is kept small.
    stub = SiteverifyStub(hostname="localhost").start()
    # Postfix's stub resolver only asks port 53: the same zone there, on its own address.
    extra = (
        [DNSZoneServer(args.zone_file.read_text(), host=args.dns_port53, port=53).start()]
        if args.dns_port53
        else []
    )
    # The query log grows with every lookup; nothing here reads it.
    for server in (zone, *extra):
        server.queries = _Discard()
    stub.requests = _Discard()
    print(json.dumps({"dns": zone.address, "siteverify": stub.url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    for server in extra:
        server.stop()
    stub.stop()
    zone.stop()


class _Discard(list):  # type: ignore[type-arg]
    """A list that forgets what is appended: the peers' logs would grow for the whole run."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    main()
