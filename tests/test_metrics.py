"""The worker's /metrics (RELAY_WORKER_METRICS_ADDRESS), scraped over HTTP and parsed with
prometheus_client's own parser: attempts, latency, heartbeats and the queue gauges, checked
against the store after a known sequence of deliveries by a real worker to a loopback MX."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics
from relay.sandbox.dns import DNSZoneServer
from relay.settings import Settings
from relay.store.outbox import Outbox
from relay.store.schema import STATUSES, attempts
from relay.worker.delivery import Worker
from relay.worker.service import serve_metrics
from tests.peers.smtp import SMTPPeer
from tests.store.test_outbox import FakeClock, built

TOKEN = "metrics-token-0123456789"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def worker_settings(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, mx_server: SMTPPeer
) -> Settings:
    return make_settings(
        RELAY_DNS_NAMESERVERS=world_dns.address,
        RELAY_SMTP_PORT=str(mx_server.port),
        RELAY_RETRY_INITIAL="60",
        RELAY_RETRY_MAX="600",
        RELAY_METRICS_TOKEN=TOKEN,
        RELAY_WORKER_METRICS_ADDRESS="127.0.0.1:0",
        RELAY_WORKER_CONCURRENCY="1",  # one at a time: the MX's replies go in order
    )


@pytest.fixture
def store(database_url: str) -> Iterator[tuple[Outbox, FakeClock]]:
    clock = FakeClock()
    outbox = Outbox(database_url, clock=clock)
    yield outbox, clock
    outbox.dispose()


async def test_worker_metrics_after_a_known_sequence(
    store: tuple[Outbox, FakeClock], worker_settings: Settings, mx_server: SMTPPeer
) -> None:
    outbox, clock = store
    mx_server.handler.rcpt.extend(["451 4.7.1 Try again later", "250 ok", "550 5.1.1 No such user"])
    ids = [outbox.enqueue(built(worker_settings, n)) for n in range(4)]
    worker = Worker(outbox, worker_settings, poll_interval=0.05, metrics=Metrics())
    await worker.run(once=True)  # 451, 250, 550, 250: one deferred, two delivered, one failed
    clock.advance(600)  # the deferred one is due; its retry is delivered 10 minutes late
    await worker.run(once=True)
    server = serve_metrics(worker_settings, worker)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).status_code == 401
            response = await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert (await client.get(url.replace("/metrics", "/"))).status_code == 404
    finally:
        server.close()
    assert response.status_code == 200
    found = samples(response.text)
    with outbox.tx() as conn:
        by_outcome = dict(
            conn.execute(
                sa.select(attempts.c.outcome, sa.func.count()).group_by(attempts.c.outcome)
            ).all()
        )
    assert by_outcome == {"delivered": 3, "temporary": 1, "permanent": 1}
    attempts_total = "formrelay_delivery_attempts_total"
    assert value(found, attempts_total, outcome="delivered", reply_class="2xx") == 3
    assert value(found, attempts_total, outcome="temporary", reply_class="4xx") == 1
    assert value(found, attempts_total, outcome="permanent", reply_class="5xx") == 1
    assert value(found, "formrelay_delivery_latency_seconds_count") == 3
    # Two delivered at once, the retried one after 600 s (the fake clock's time).
    assert value(found, "formrelay_delivery_latency_seconds_bucket", le="1.0") == 2
    assert value(found, "formrelay_delivery_latency_seconds_bucket", le="300.0") == 2
    assert value(found, "formrelay_delivery_latency_seconds_bucket", le="900.0") == 3
    assert value(found, "formrelay_delivery_latency_seconds_sum") == pytest.approx(600)
    stats = outbox.queue_stats()
    assert stats.counts == {"delivered": 3, "failed": 1}
    for status in STATUSES:
        expected = stats.counts.get(status, 0)
        assert value(found, "formrelay_queue_messages", status=status) == expected
    assert value(found, "formrelay_queue_oldest_age_seconds") == 0
    assert value(found, "formrelay_worker_heartbeats_total") >= 1
    assert value(found, "formrelay_worker_last_heartbeat_timestamp_seconds") > 0
    assert {outbox.get(i).status for i in ids} == {"delivered", "failed"}
