"""SMTP faults end to end: form -> outbox -> `relay worker` process -> a misbehaving MX.

For each fault: the message's final status in the outbox, and the attempt log (outcome, code,
enhanced status, MX) both in the outbox and in the worker's log lines. The store does not
change what SMTP does, so these run on SQLite only; the store-sensitive faults (process kills,
a lost database connection) run on both stores in their own modules.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX_IP, SUPPORT_DOMAIN
from relay.store.outbox import Outbox
from tests.faults.conftest import FaultHandler, FaultPeer
from tests.faults.corpus import VALID
from tests.faults.harness import Proc, Visitor, copies, run_relay, wait_status
from tests.peers.smtp import HANG, SMTPPeer

pytestmark = [
    pytest.mark.faults,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

MX1 = f"mx1.{SUPPORT_DOMAIN}"
MX2 = f"mx2.{SUPPORT_DOMAIN}"


def deliver(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    env: dict[str, str],
    *,
    timeout: float = 40.0,
) -> tuple[str, Any, Proc]:
    """Submit one valid form, run a worker until the message is delivered or failed."""
    reply = visitor.post(VALID)
    assert reply.status == 202, reply
    assert reply.id is not None
    worker = start_worker(env)
    rows = wait_status(outbox, [reply.id], timeout=timeout, proc=worker)
    return reply.id, rows[reply.id], worker


def attempts(outbox: Outbox, outbox_id: str) -> list[Any]:
    return list(outbox.show(outbox_id).attempts)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("greeting", "421 4.3.2 Service shutting down"),
        ("mail", "421 4.3.2 Closing transmission channel"),
        ("data", "421 4.3.0 Try again later"),
        ("rcpt", "452 4.3.1 Insufficient system storage"),
        ("rcpt", "450 4.2.0 Mailbox busy"),
    ],
)
def test_temporary_reply_is_deferred_then_delivered(
    stage: str,
    reply: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    getattr(mx_handler, stage).append(reply)
    code, enhanced = int(reply[:3]), reply.split()[1]
    outbox_id, row, worker = deliver(visitor, outbox, start_worker, relay_env)

    assert row.status == "delivered"
    log = attempts(outbox, outbox_id)
    assert [(a.outcome, a.code, a.enhanced_status, a.mx_host) for a in log] == [
        ("temporary", code, enhanced, MX1),
        ("delivered", 250, log[1].enhanced_status, MX1),
    ]
    # The handler's "data" queue answers the final "."; the relay calls that stage "dot".
    assert log[0].hosts[0].stage == {"data": "dot"}.get(stage, stage)
    assert f"delivery.deferred id={outbox_id}" in worker.output()
    assert f"code={code} status={enhanced} mx={MX1}" in worker.output()
    assert len(mx_server.messages) == 1


def test_greylisting_for_seconds_is_retried_until_delivered(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    mx_handler.greylist_seconds = 2.5
    outbox_id, row, _ = deliver(visitor, outbox, start_worker, relay_env)

    assert row.status == "delivered"
    log = attempts(outbox, outbox_id)
    assert len(log) >= 2
    assert {(a.outcome, a.code, a.enhanced_status) for a in log[:-1]} == {
        ("temporary", 451, "4.7.1")
    }
    assert log[-1].outcome == "delivered"
    # Every attempt after the first waited for the persisted next_attempt_at.
    for before, after in itertools.pairwise(log):
        assert after.started_at > before.finished_at
    assert len(mx_server.messages) == 1


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("rcpt", "550 5.1.1 No such user here"),
        ("data", "554 5.6.0 Message content rejected"),
        ("mail", "553 5.7.1 Sender address rejected"),
    ],
)
def test_permanent_reply_fails_after_one_attempt(
    stage: str,
    reply: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    getattr(mx_handler, stage).append(reply)
    code, enhanced = int(reply[:3]), reply.split()[1]
    outbox_id, row, worker = deliver(visitor, outbox, start_worker, relay_env)

    assert row.status == "failed"
    assert str(code) in (row.failure_reason or "")
    log = attempts(outbox, outbox_id)
    assert [(a.outcome, a.code, a.enhanced_status, a.mx_host) for a in log] == [
        ("permanent", code, enhanced, MX1)
    ]
    assert f"delivery.failed id={outbox_id}" in worker.output()
    assert mx_server.messages == []


def test_5xx_greeting_on_mx1_is_delivered_by_mx2(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    fault_dns: DNSZoneServer,
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
    mx2_server: SMTPPeer,
    workdir: Path,
) -> None:
    fault_dns.remove(SUPPORT_DOMAIN, "MX")
    fault_dns.add(f"{SUPPORT_DOMAIN}. 300 IN MX 10 {MX1}.\n{SUPPORT_DOMAIN}. 300 IN MX 20 {MX2}.\n")
    mx_handler.greeting.append("554 5.3.2 No SMTP service here")
    outbox_id, row, _ = deliver(visitor, outbox, start_worker, relay_env)

    assert row.status == "delivered"
    (attempt,) = attempts(outbox, outbox_id)
    assert [(h.mx_host, h.code, h.stage) for h in attempt.hosts] == [
        (MX1, 554, "greeting"),
        (MX2, 250, attempt.hosts[1].stage),
    ]
    assert attempt.mx_host == MX2
    assert mx_server.messages == []
    assert len(mx2_server.messages) == 1
    # The operator sees the same story: both hosts in `relay show`, the MX in `relay log`.
    shown = run_relay(["show", outbox_id], relay_env, workdir)
    assert shown.returncode == 0, shown.stderr
    assert "554" in shown.stdout
    assert MX1 in shown.stdout
    assert MX2 in shown.stdout
    listed = run_relay(["log", "--json"], relay_env, workdir)
    assert listed.returncode == 0, listed.stderr
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert (entry["id"], entry["status"], entry["last_mx"]) == (outbox_id, "delivered", MX2)


@pytest.mark.parametrize("stage", ["greeting", "mail", "rcpt"])
def test_silent_server_times_out_within_the_configured_bound(
    stage: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    """The server stops answering (no greeting, or no reply to a command): RELAY_SMTP_TIMEOUT
    bounds the wait (RFC 5321 §4.5.3.2 says 5 minutes; the operator can shorten it)."""
    getattr(mx_handler, stage).append(HANG)
    env = {**relay_env, "RELAY_SMTP_TIMEOUT": "2"}
    outbox_id, row, _ = deliver(visitor, outbox, start_worker, env)

    assert row.status == "delivered"
    log = attempts(outbox, outbox_id)
    first = log[0]
    assert (first.outcome, first.code, first.mx_host) == ("temporary", None, MX1)
    host = first.hosts[0]
    assert host.stage == stage
    assert "time" in host.text.lower()
    # Bounded by the setting, not by the server: a generous ceiling, not a timing benchmark.
    assert 1.5 <= host.duration < 15
    assert log[-1].outcome == "delivered"
    assert copies(mx_server, row.message_id) == 1


def test_silence_after_the_final_dot_is_deferred_and_flagged(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    """No reply to the final "." within RELAY_SMTP_DATA_TIMEOUT (RFC: 10 minutes): the
    server may hold the message, so the retry is flagged as a possible duplicate."""
    mx_handler.data.append(HANG)
    env = {**relay_env, "RELAY_SMTP_DATA_TIMEOUT": "2"}
    outbox_id, row, _ = deliver(visitor, outbox, start_worker, env)

    assert row.status == "delivered"
    first, last = attempts(outbox, outbox_id)
    assert (first.outcome, first.possible_duplicate) == ("temporary", True)
    assert 1.5 <= first.hosts[-1].duration < 15
    assert last.outcome == "delivered"
    assert row.possible_duplicate is True
    assert len(mx_server.messages) == 1


def test_connection_reset_mid_data_loses_nothing(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    mx_handler.mid_data.append("DROP")
    outbox_id, row, _ = deliver(visitor, outbox, start_worker, relay_env)

    assert row.status == "delivered"
    log = attempts(outbox, outbox_id)
    hosts = [h for a in log for h in a.hosts]
    # The whole (small) message was already in the socket when the server cut the line, so
    # the relay sees the loss at the final "." and, rightly, cannot rule out a duplicate.
    assert log[0].outcome in ("temporary", "delivered")
    assert hosts[0].stage in ("data", "dot")
    assert "lost" in hosts[0].text or "reset" in hosts[0].text.lower()
    assert hosts[-1].code == 250
    assert len(mx_server.messages) == 1
    assert copies(mx_server, row.message_id) == 1


@pytest.mark.parametrize("policy", ["may", "encrypt"])
def test_starttls_handshake_failure(
    policy: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    tls_context_pair: tuple[Any, Path],
) -> None:
    """STARTTLS offered, handshake broken: `may` falls back to plain text at once,
    `encrypt` defers until TLS works again."""
    handler = FaultHandler()
    handler.starttls_broken = True
    with FaultPeer(handler, host=MX_IP, tls_context=tls_context_pair[0], hostname=MX1) as tls_peer:
        env = {**relay_env, "RELAY_SMTP_PORT": str(tls_peer.port), "RELAY_SMTP_TLS": policy}
        reply = visitor.post(VALID)
        assert reply.status == 202
        assert reply.id is not None
        worker = start_worker(env)
        if policy == "may":
            row = wait_status(outbox, [reply.id], timeout=40, proc=worker)[reply.id]
            assert row.status == "delivered"
            (attempt,) = attempts(outbox, reply.id)
            assert attempt.hosts[0].stage == "starttls"
            assert attempt.hosts[-1].code == 250
            assert attempt.hosts[-1].tls is None
            (received,) = handler.messages
            assert received.tls is None
            return
        wait_status(outbox, [reply.id], ("deferred",), timeout=30, proc=worker)
        first = attempts(outbox, reply.id)[0]
        assert (first.outcome, first.mx_host) == ("temporary", MX1)
        assert all(h.stage == "starttls" for h in first.hosts)
        assert handler.messages == []
        handler.starttls_broken = False
        row = wait_status(outbox, [reply.id], timeout=40, proc=worker)[reply.id]
        assert row.status == "delivered"
        (received,) = handler.messages
        assert received.tls is not None
        assert attempts(outbox, reply.id)[-1].hosts[-1].tls == received.tls
