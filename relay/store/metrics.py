"""The queue and the workers as Prometheus sees them, read from the store at every scrape
(custom collectors), so any node, web or worker, reports the same numbers: messages by
status, how many are due, the oldest pending message's age (`QueueCollector`); the workers
by state and each one's last heartbeat (`WorkersCollector`, from relay.store.workers)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from relay.errors import StoreError
from relay.store.log import MessageLog
from relay.store.schema import STATUSES
from relay.store.workers import Registry


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "up": GaugeMetricFamily("formrelay_store_up", "1 when the outbox store answered"),
        "messages": GaugeMetricFamily(
            "formrelay_queue_messages", "Messages in the outbox by status", labels=["status"]
        ),
        "due": GaugeMetricFamily(
            "formrelay_queue_due_messages", "Messages whose next attempt is due now"
        ),
        "oldest": GaugeMetricFamily(
            "formrelay_queue_oldest_age_seconds",
            "Age of the oldest message not yet delivered or failed (0: none)",
        ),
    }


class QueueCollector:
    def __init__(self, log: MessageLog) -> None:
        self.log = log

    def describe(self) -> Iterator[Any]:
        """The families without values: registering never touches the store."""
        yield from _families().values()

    def collect(self) -> Iterator[Any]:
        found = _families()
        try:
            stats = self.log.queue_stats()
        except StoreError:
            found["up"].add_metric([], 0)
            yield found["up"]
            return
        found["up"].add_metric([], 1)
        for status in STATUSES:
            found["messages"].add_metric([status], stats.counts.get(status, 0))
        found["due"].add_metric([], stats.due)
        found["oldest"].add_metric([], stats.oldest_age)
        yield from found.values()


WORKER_STATES = ("live", "dead", "stopped")
WORKERS_SEEN = timedelta(days=1)  # a worker gone longer than this is no longer reported


def _worker_families() -> dict[str, GaugeMetricFamily]:
    return {
        "workers": GaugeMetricFamily(
            "formrelay_workers",
            "Workers seen in the last day, by state (live: beat within RELAY_WORKER_DEAD_AFTER)",
            labels=["state"],
        ),
        "age": GaugeMetricFamily(
            "formrelay_worker_last_beat_age_seconds",
            "Seconds since each registered worker's last heartbeat",
            labels=["worker"],
        ),
    }


class WorkersCollector:
    def __init__(self, registry: Registry, dead_after: float) -> None:
        self.registry = registry
        self.dead_after = dead_after

    def describe(self) -> Iterator[Any]:
        yield from _worker_families().values()

    def collect(self) -> Iterator[Any]:
        try:
            rows = self.registry.list_workers(since=WORKERS_SEEN)
        except StoreError:
            return  # formrelay_store_up, from the queue's collector, says why
        now = self.registry.db.clock()
        found = _worker_families()
        states: list[str] = [row.state(now, self.dead_after) for row in rows]
        for state in WORKER_STATES:
            found["workers"].add_metric([state], states.count(state))
        for row, state in zip(rows, states, strict=True):
            if state != "stopped":
                found["age"].add_metric([row.id], round(row.since_beat(now), 1))
        yield from found.values()


def store_collectors(log: MessageLog, registry: Registry, dead_after: float) -> list[Any]:
    """Everything /metrics reads from the store."""
    return [QueueCollector(log), WorkersCollector(registry, dead_after)]
