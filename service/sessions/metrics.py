"""The sessions layer's Prometheus metrics (exposed at `/metrics` with the HTTP ones:
`service.api.metrics` lists them all): step latency by outcome, store round trips by
operation, version conflicts, idempotent replays."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

STEP_SECONDS = Histogram(
    "optserve_step_duration_seconds",
    "Optimizer step latency (load, compute, commit), by outcome.",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STORE_ROUND_TRIPS = Counter(
    "optserve_store_round_trips_total",
    "Calls made to the state store, by operation.",
    ["op"],
)
VERSION_CONFLICTS = Counter(
    "optserve_version_conflicts_total",
    "Step commits refused because the session's version had changed (then retried).",
)
IDEMPOTENT_REPLAYS = Counter(
    "optserve_idempotent_replays_total",
    "Responses replayed for a repeated Idempotency-Key.",
)
