"""Process faults: SIGKILL a real `relay worker` at three points of an attempt, and SIGKILL
gunicorn (master and workers) while submissions are in flight. On SQLite and PostgreSQL.

Promises: every message ends delivered; none is lost; a second copy reaches the MX only when
the kill came after the server took the whole message, and that message is flagged as a
possible duplicate in the outbox and in `relay show`. Every submission answered 202 is in
the outbox.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import SUPPORT_DOMAIN
from relay.store.outbox import Outbox
from tests.faults.conftest import FaultHandler
from tests.faults.corpus import VALID
from tests.faults.harness import (
    Proc,
    Visitor,
    copies,
    free_port,
    http_ready,
    message_id_of,
    run_relay,
    wait_status,
    wait_until,
)
from tests.peers.smtp import SMTPPeer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# Long protocol timeouts, so a parked worker stays parked until we kill it; the 10 s lease
# (the minimum) makes the message due again soon after the kill.
PARKED = {
    "RELAY_DNS_TIMEOUT": "120",
    "RELAY_SMTP_TIMEOUT": "120",
    "RELAY_SMTP_DATA_TIMEOUT": "120",
    "RELAY_WORKER_LEASE": "10",
}


@pytest.mark.parametrize(
    ("database_url", "where"),
    [
        ("sqlite", "before-connect"),
        ("sqlite", "mid-data"),
        ("sqlite", "after-dot"),
        # One kill on PostgreSQL: the reclaim of an expired lease (SKIP LOCKED) is the
        # store-specific part, and it is the same for the three kill points.
        ("postgres", "after-dot"),
    ],
    indirect=["database_url"],
)
def test_worker_killed_mid_attempt_loses_nothing(
    where: str,
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    fault_dns: DNSZoneServer,
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
    workdir: Path,
) -> None:
    env = {**relay_env, **PARKED}
    reply = visitor.post(VALID)
    assert reply.status == 202
    assert reply.id is not None
    outbox_id = reply.id
    message_id = outbox.get(outbox_id).message_id

    if where == "before-connect":
        fault_dns.fail([SUPPORT_DOMAIN], "timeout")  # the MX lookup hangs after the claim
    elif where == "mid-data":
        mx_handler.hang_mid_data = 1
    else:
        mx_handler.accept_then_hang = 1

    first = start_worker(env, name="worker-1")
    if where == "before-connect":
        wait_until(lambda: fault_dns.queried(SUPPORT_DOMAIN, "MX") > 0, what="the MX lookup")
    else:
        wait_until(mx_handler.parked.is_set, what=f"the worker parked at {where}")
    wait_until(lambda: outbox.get(outbox_id).status == "sending", what="the claim")
    first.kill(signal.SIGKILL)
    assert not first.alive()
    fault_dns.heal()

    second = start_worker(env, name="worker-2")
    row = wait_status(outbox, [outbox_id], timeout=45, proc=second)[outbox_id]

    assert row.status == "delivered"
    detail = outbox.show(outbox_id)
    outcomes = [(a.outcome, a.possible_duplicate) for a in detail.attempts]
    assert outcomes == [("interrupted", True), ("delivered", False)]
    assert row.possible_duplicate is True  # the relay cannot tell where the kill landed
    if where == "after-dot":
        assert copies(mx_server, message_id) == 2  # the one duplicate, flagged above
    else:
        assert copies(mx_server, message_id) == 1
    shown = run_relay(["show", outbox_id], env, workdir)
    assert shown.returncode == 0, shown.stderr
    assert "interrupted" in shown.stdout
    assert "duplicate" in shown.stdout.lower()


def test_gunicorn_killed_mid_request_acknowledges_only_what_it_stored(
    outbox: Outbox,
    start_gunicorn: Callable[..., Proc],
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_server: SMTPPeer,
) -> None:
    total, kill_after = 160, 25
    port = free_port()
    server = start_gunicorn(relay_env, port, workers=2, threads=4)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ready(f"{base}/healthz"), timeout=30, what="gunicorn")

    acked: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def submit(n: int) -> None:
        visitor = Visitor(base_url=base)
        try:
            reply = visitor.post({**VALID, "subject": f"kill test {n}"}, timeout=10)
        except Exception as exc:  # the server died under us: that is the point
            with lock:
                failures.append(type(exc).__name__)
            return
        finally:
            visitor.close()
        with lock:
            if reply.status == 202 and reply.id:
                acked.append(reply.id)
                if len(acked) >= kill_after:
                    enough.set()
            else:
                failures.append(str(reply.status))

    with ThreadPoolExecutor(max_workers=16) as pool:
        for n in range(total):
            pool.submit(submit, n)
        assert enough.wait(60), f"only {len(acked)} accepted: {failures[:5]}"
        server.kill_group(signal.SIGKILL)

    assert not server.alive()
    assert failures, "every request finished before the kill: it did not land mid-flight"
    stored = {row.id: row for row in outbox.list_messages(limit=100_000)}
    missing = set(acked) - set(stored)
    assert not missing, f"answered 202 but not in the outbox: {missing}"
    for row in stored.values():
        assert row.status == "queued"
        assert row.size > 0
    if outbox.dialect == "sqlite":
        with outbox.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    # What was stored (acknowledged or not) is delivered once the worker runs.
    worker = start_worker(relay_env)
    rows = wait_status(outbox, list(stored), timeout=60, proc=worker)
    assert {r.status for r in rows.values()} == {"delivered"}
    delivered_ids = {message_id_of(r.data) for r in mx_server.messages}
    assert {stored[i].message_id for i in acked} <= delivered_ids
