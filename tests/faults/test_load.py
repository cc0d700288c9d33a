"""Load: 1,000 submissions from 32 concurrent clients against gunicorn, while the MX greylists
every message once. All are delivered exactly once, the log holds exactly two attempts per
message, and the worker's memory stays flat after a warm-up (a leak check, not a benchmark).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.store.outbox import Outbox
from tests.faults.conftest import FaultHandler
from tests.faults.corpus import VALID
from tests.faults.harness import (
    Proc,
    Visitor,
    free_port,
    http_ready,
    message_id_of,
    wait_status,
    wait_until,
)
from tests.peers.smtp import SMTPPeer

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TOTAL = 1000
WARM_UP = 150
CLIENTS = 32
# Growth allowed between the warm-up and the end; a leak of a message body (about 2 kB) or
# an SMTP connection per delivery would exceed it well before 850 more messages.
RSS_GROWTH_LIMIT_KB = 48 * 1024


def submit_all(base: str, numbers: range, busy: Counter[str], web: Proc) -> list[str]:
    """Submit concurrently; a 503 (store busy) is retried as embed.js lets the visitor do.
    Any other refusal fails with the warnings gunicorn logged, which name the cause."""
    local = threading.local()
    visitors: list[Visitor] = []
    lock = threading.Lock()

    def one(n: int) -> str:
        if not hasattr(local, "visitor"):
            local.visitor = Visitor(base_url=base)
            with lock:
                visitors.append(local.visitor)
        for _ in range(5):
            reply = local.visitor.post({**VALID, "subject": f"load {n}"}, timeout=60)
            if reply.status != 503:
                break
            assert "retry-after" in reply.headers
            with lock:
                busy["503"] += 1
            time.sleep(0.5)
        if reply.status != 202:
            warnings = [line for line in web.output().splitlines() if "WARNING" in line]
            raise AssertionError((n, reply.status, reply.body, warnings[-20:]))
        assert reply.id is not None
        return reply.id

    try:
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            return list(pool.map(one, numbers))
    finally:
        for visitor in visitors:
            visitor.close()


def test_thousand_submissions_with_greylisting(
    outbox: Outbox,
    start_gunicorn: Callable[..., Proc],
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    mx_handler: FaultHandler,
    mx_server: SMTPPeer,
) -> None:
    mx_handler.greylist_each_message = True
    env = {**relay_env, "RELAY_WORKER_CONCURRENCY": "20", "RELAY_LOG_LEVEL": "INFO"}
    port = free_port()
    web = start_gunicorn(env, port, workers=2, threads=8)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ready(f"{base}/healthz"), timeout=30, what="gunicorn")
    worker = start_worker(env)

    busy: Counter[str] = Counter()
    warm_ids = submit_all(base, range(WARM_UP), busy, web)
    wait_status(outbox, warm_ids, ("delivered",), timeout=240, proc=worker)
    rss_warm = worker.rss_kb()

    ids = warm_ids + submit_all(base, range(WARM_UP, TOTAL), busy, web)
    rows = wait_status(outbox, ids, ("delivered",), timeout=300, proc=worker)
    rss_end = worker.rss_kb()

    assert len(set(ids)) == TOTAL
    # A 503 stored nothing: the outbox holds exactly the 202s.
    assert sum(outbox.counts().values()) == TOTAL, busy
    received = [message_id_of(r.data) for r in mx_server.messages]
    assert len(received) == TOTAL
    assert len(set(received)) == TOTAL, "a message was delivered twice"
    assert set(received) == {row.message_id for row in rows.values()}
    assert mx_handler.greylisted == TOTAL

    with outbox.engine.connect() as conn:
        per_message = Counter(
            (outbox_id, outcome, code)
            for outbox_id, outcome, code in conn.exec_driver_sql(
                "SELECT outbox_id, outcome, code FROM attempts"
            )
        )
    assert len(per_message) == 2 * TOTAL
    assert set(per_message.values()) == {1}
    assert {(outcome, code) for _, outcome, code in per_message} == {
        ("temporary", 451),
        ("delivered", 250),
    }
    assert {row.attempts for row in rows.values()} == {2}
    log = worker.output()
    assert log.count("delivery.deferred ") == TOTAL
    assert log.count("delivery.delivered ") == TOTAL

    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_KB, (rss_warm, rss_end)
