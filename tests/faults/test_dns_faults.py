"""DNS faults end to end: the support domain's MX lookup fails in each way DNS can fail, and
the outbox ends deferred (the answer may change) or failed (nothing will change).

The MX is looked up again at every attempt, so healing DNS between attempts delivers the
message. SQLite only: the store plays no part in these decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import SUPPORT_DOMAIN
from relay.store.outbox import Outbox
from tests.faults.corpus import VALID
from tests.faults.harness import Proc, Visitor, wait_status
from tests.peers.smtp import SMTPPeer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

MX1 = f"mx1.{SUPPORT_DOMAIN}"
MX2 = f"mx2.{SUPPORT_DOMAIN}"


def submit(visitor: Visitor, count: int = 1) -> list[str]:
    ids = []
    for n in range(count):
        reply = visitor.post({**VALID, "subject": f"dns fault {n}"})
        assert reply.status == 202, reply
        assert reply.id is not None
        ids.append(reply.id)
    return ids


@pytest.mark.parametrize("how", ["servfail", "timeout"])
def test_temporary_dns_failure_defers_then_delivers(
    how: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    fault_dns: DNSZoneServer,
    mx_server: SMTPPeer,
) -> None:
    (outbox_id,) = submit(visitor)
    fault_dns.fail([SUPPORT_DOMAIN], how)
    worker = start_worker({**relay_env, "RELAY_DNS_TIMEOUT": "1"})
    wait_status(outbox, [outbox_id], ("deferred",), timeout=30, proc=worker)
    first = outbox.show(outbox_id).attempts[0]
    assert (first.outcome, first.code, first.hosts) == ("temporary", None, ())
    assert SUPPORT_DOMAIN in (first.text or "")
    assert mx_server.messages == []

    fault_dns.heal()
    row = wait_status(outbox, [outbox_id], timeout=30, proc=worker)[outbox_id]
    assert row.status == "delivered"
    assert outbox.show(outbox_id).attempts[-1].mx_host == MX1
    assert len(mx_server.messages) == 1
    assert "delivery.deferred" in worker.output()


@pytest.mark.parametrize(
    ("domain", "zone", "expected"),
    [
        ("nowhere.test", "", "failed"),  # NXDOMAIN
        ("nullmx.test", "", "failed"),  # RFC 7505 null MX, already in the world zone
        ("ghostmx.test", "ghostmx.test. 300 IN MX 10 ghost.ghostmx.test.\n", "failed"),
        (
            "noaddr.test",
            "noaddr.test. 300 IN MX 10 host.noaddr.test.\n"
            'host.noaddr.test. 300 IN TXT "no address here"\n',
            "deferred",
        ),
    ],
    ids=["nxdomain", "null-mx", "mx-to-nxdomain-name", "mx-to-name-without-address"],
)
def test_support_domain_that_cannot_receive(
    domain: str,
    zone: str,
    expected: str,
    make_app: Callable[..., Any],
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    fault_dns: DNSZoneServer,
) -> None:
    if zone:
        fault_dns.add(zone)
    env = {**relay_env, "RELAY_SUPPORT_ADDRESS": f"help@{domain}"}
    visitor = Visitor(client=make_app(env, outbox=outbox).test_client())
    (outbox_id,) = submit(visitor)
    worker = start_worker(env)
    row = wait_status(outbox, [outbox_id], (expected,), timeout=30, proc=worker)[outbox_id]
    first = outbox.show(outbox_id).attempts[0]
    assert first.outcome == ("permanent" if expected == "failed" else "temporary")
    assert domain in (first.text or "")
    if expected == "failed":
        assert domain in (row.failure_reason or "")
        assert len(outbox.show(outbox_id).attempts) == 1


def test_equal_preferences_spread_across_attempts(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    fault_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    mx2_server: SMTPPeer,
) -> None:
    """Two MX hosts of equal preference: each attempt looks the MX up again and shuffles the
    tie (RFC 5321 §5.1), so over 16 messages both hosts receive mail (the chance that one
    gets all of them is 2 in 65,536)."""
    fault_dns.remove(SUPPORT_DOMAIN, "MX")
    fault_dns.add(f"{SUPPORT_DOMAIN}. 300 IN MX 10 {MX1}.\n{SUPPORT_DOMAIN}. 300 IN MX 10 {MX2}.\n")
    ids = submit(visitor, 16)
    worker = start_worker(relay_env)
    rows = wait_status(outbox, ids, timeout=60, proc=worker)
    assert {r.status for r in rows.values()} == {"delivered"}
    assert len(mx_server.messages) + len(mx2_server.messages) == 16
    assert mx_server.messages
    assert mx2_server.messages
    assert fault_dns.queried(SUPPORT_DOMAIN, "MX") >= 16
    used = {outbox.show(i).attempts[-1].mx_host for i in ids}
    assert used == {MX1, MX2}
