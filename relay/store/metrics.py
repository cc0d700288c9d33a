"""The queue as Prometheus sees it, read from the store at every scrape (a custom
collector), so any node, web or worker, reports the same numbers: messages by status, how
many are due, the oldest pending message's age and the alerts waiting to go out.

The workers' heartbeats, once the store keeps them, join as a collector of their own beside
this one (relay.metrics.exposition takes any number)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from relay.errors import StoreError
from relay.store.log import MessageLog
from relay.store.schema import STATUSES


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
