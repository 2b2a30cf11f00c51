"""Prometheus metrics of the server, and the `/metrics` exposition.

Metrics (all prefixed `optserve_`):

* `http_requests_total{method, route, status}`: every answered request; `route` is the
  path template (`/v1/sessions/{session_id}/step`), `unmatched` for unknown paths.
* `http_request_duration_seconds{method, route}`: latency of every request.
* `step_duration_seconds{outcome}`: a step from its first store read to its answer
  (`applied`, `skipped`, `replayed`, `refused`).
* `store_round_trips_total{op}`: calls the sessions layer made to the state store, by
  operation.
* `version_conflicts_total`: step commits refused because the version had moved on
  (each one is retried, up to `max_commit_retries`).
* `idempotent_replays_total`: responses replayed for a repeated `Idempotency-Key`.
* `sessions`: sessions in the store (refreshed when `/metrics` is scraped).

The step, store, conflict and replay metrics are the sessions layer's
(`service.sessions.metrics`); the rest are HTTP's.

Several worker processes (`optserve serve --workers N`): each uvicorn worker is its own
process with its own counters, and a scrape reaches one of them. Set the environment
variable `PROMETHEUS_MULTIPROC_DIR` to an empty, writable directory before starting the
server (and empty it at each start): prometheus_client then keeps every process's
values in files there, and `/metrics` answers the sum over all workers (the sessions
gauge: the most recent value of a live worker). Without it, each process reports its
own numbers.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.sessions.metrics import (  # noqa: F401  (re-exported: one list of metrics)
    IDEMPOTENT_REPLAYS,
    STEP_SECONDS,
    STORE_ROUND_TRIPS,
    VERSION_CONFLICTS,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "optserve_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "optserve_http_request_duration_seconds",
    "HTTP request latency, by method and route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SESSIONS = Gauge(
    "optserve_sessions",
    "Sessions in the state store (refreshed on scrape).",
    multiprocess_mode="livemostrecent",
)


def multiprocess() -> bool:
    """Whether prometheus_client runs in multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""
    return bool(os.environ.get(MULTIPROC_ENV))


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Forget a stopped worker's live gauges (multiprocess mode only)."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            REQUESTS.labels(method, template, str(status)).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - start)
