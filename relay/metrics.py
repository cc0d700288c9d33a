"""Prometheus metrics with the official prometheus_client: what each process counts, and the
text format that /metrics answers.

Every app and every worker builds its own `Metrics` (its own registry: nothing at import
time, tests never share counters). Under gunicorn, PROMETHEUS_MULTIPROC_DIR puts each
process's values in files there and the exposition reads them all (prometheus_client's
multiprocess mode; deploy/gunicorn.conf.py marks an exited worker's files dead). The queue
is not counted by anyone: it is read from the store at scrape time (relay.store.metrics), so
every node reports the same truth.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Accept → delivered: a greylisting retry takes minutes, a receiver that defers us hours.
LATENCY_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 5 * 86400)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def reply_class(code: int | None) -> str:
    """ "2xx", "4xx", "5xx", or "none" when no server replied (DNS, connection, local)."""
    return f"{code // 100}xx" if code and 200 <= code < 600 else "none"


class Metrics:
    """The counters of one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submissions = Counter(
            "formrelay_submissions",
            "Form submissions by result (accepted, held, refused), reason and form id",
            ["result", "reason", "form"],
            registry=r,
        )
        self.attempts = Counter(
            "formrelay_delivery_attempts",
            "Delivery attempts by outcome (delivered, temporary, permanent) and reply class",
            ["outcome", "reply_class"],
            registry=r,
        )
        self.latency = Histogram(
            "formrelay_delivery_latency_seconds",
            "From accepting a message to its delivery",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.heartbeats = Counter(
            "formrelay_worker_heartbeats", "Heartbeats of this worker's loop", registry=r
        )
        self.last_heartbeat = Gauge(
            "formrelay_worker_last_heartbeat_timestamp_seconds",
            "When a worker's loop last beat (Unix time)",
            registry=r,
            multiprocess_mode="max",
        )
        self.alert_sends = Counter(
            "formrelay_alert_sends",
            "Alert sends by channel and result (sent, retry, failed)",
            ["channel", "result"],
            registry=r,
        )

    def submission(self, result: str, reason: str, form: str) -> None:
        """One submission to `form` (an id: "default" or one of RELAY_FORMS_FILE's; unknown
        ids are the 404 page and never counted, so the configured forms bound the series)."""
        self.submissions.labels(result, reason, form).inc()

    def heartbeat(self) -> None:
        self.heartbeats.inc()
        self.last_heartbeat.set_to_current_time()


class _Together:
    """Several collectors as one, for generate_latest."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Any]:
        for collector in self.collectors:
            yield from collector.collect()


def exposition(metrics: Metrics, extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """(body, content type) of the text format: this process's metrics, or in multiprocess
    mode every process's, then `extra` (the store's queue gauges), computed now."""
    path = multiprocess_dir()
    own: Any = (
        MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        if path
        else metrics.registry
    )
    body = generate_latest(_Together([own, *extra]))
    return body, CONTENT_TYPE_LATEST


def authorized(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


# --- the worker's own endpoint ----------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def metrics_app(render: Callable[[], tuple[bytes, str]], token: str) -> Any:
    """A WSGI app answering GET /metrics with `render()` to the bearer of `token`."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") != "GET":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if not authorized(environ.get("HTTP_AUTHORIZATION"), token):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"unauthorized\n"]
        body, content_type = render()
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    return app


class MetricsServer:
    """`RELAY_WORKER_METRICS_ADDRESS`: /metrics on a thread of its own; `close()` stops it."""

    def __init__(self, host: str, port: int, app: Any) -> None:
        self.server = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
        self.port = int(self.server.server_port)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
