"""Redis stops (SIGTERM, or SIGKILL) in the middle of a run of steps: the server
answers 503 with Retry-After (problem+json; /readyz too) while it is gone, and recovers
by itself when Redis is back on the same port and data directory: the same session,
its version continuing, every step applied once, without restarting optserve."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.support import (
    LiveServer,
    assert_close,
    read_params,
    session_doc,
    start_server,
    store_down,
)
from tests.support.redis_server import PrivateRedis

STEPS = 150
LR = 0.02
SEED = 99
#: acknowledged steps before Redis is stopped
BEFORE_OUTAGE = 20
#: seconds Redis stays down once the client has seen it
OUTAGE = 0.7


@pytest.fixture
def outage_server(persistent_redis: PrivateRedis, tmp_path: Path) -> Iterator[LiveServer]:
    # a request that dies with Redis cannot release its Idempotency-Key claim: keep the
    # claims short, so that the retry of such a step waits seconds, not a minute
    server = start_server(
        "redis-outage",
        tmp_path,
        workers=2,
        redis=persistent_redis,
        env={"OPTSERVE_IDEMPOTENCY_LOCK_TTL": "5"},
    )
    try:
        yield server
    finally:
        server.stop()


def _grads(i: int) -> list[float]:
    return [float(v) for v in np.random.default_rng([SEED, i]).standard_normal(5)]


def _fresh(server: LiveServer) -> httpx.Client:
    """A client that opens a connection per request (so, either worker answers)."""
    return server.client(headers={"Connection": "close"}, timeout=15.0)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_redis_outage_then_recovery(
    outage_server: LiveServer, persistent_redis: PrivateRedis, stop: str
) -> None:
    server, redis = outage_server, persistent_redis
    master = server.proc.pid
    workers = server.worker_pids()
    initial = [1.0, -1.0, 0.5, 0.0, 2.0]
    with _fresh(server) as c:
        r = c.post(
            "/v1/sessions",
            json={
                "optimizer": {"name": "sgd", "lr": LR},
                "params": {"x": initial},
                "dtype": "float64",
            },
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

    events: list[tuple[float, int]] = []  # (time, status) of every step answer
    versions: dict[int, int] = {}
    errors: list[BaseException] = []
    deadline = time.monotonic() + 90

    def run() -> None:
        try:
            with _fresh(server) as client:
                for i in range(STEPS):
                    key = {"Idempotency-Key": f"outage-{i}-{uuid.uuid4()}"}
                    body = {"grads": {"x": _grads(i)}, "return": "none"}
                    while True:
                        assert time.monotonic() < deadline, "out of time"
                        r = client.post(f"/v1/sessions/{sid}/step", json=body, headers=key)
                        events.append((time.monotonic(), r.status_code))
                        if r.status_code == 200:
                            versions[i] = r.json()["version"]
                            break
                        if r.status_code == 503:
                            store_down(r)
                        else:  # a claim left by a step that died with Redis
                            assert r.status_code == 409, r.text
                            assert r.json()["type"].endswith("idempotency-key-in-flight"), r.text
                        time.sleep(0.05)  # (Retry-After says 1 s; a test is impatient)
                    time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait(lambda: len(versions) >= BEFORE_OUTAGE or bool(errors), 30, "steps before the outage")
        assert not errors, errors
        # SIGTERM: Redis closes its clients and exits; SIGKILL: it vanishes mid-command.
        # Either way every write it acknowledged is in its AOF (fsync always).
        redis.stop(graceful=stop == "sigterm")
        t_down = time.monotonic()
        acked_before = len(versions)
        assert acked_before < STEPS, "the run ended before the outage"
        with _fresh(server) as c:
            for _ in range(4):  # fresh connections: both workers say so
                store_down(c.get("/readyz"))
            store_down(c.get(f"/v1/sessions/{sid}"))
            store_down(c.get(f"/v1/sessions/{sid}/params"))
            store_down(
                c.post("/v1/sessions", json={"optimizer": {"name": "sgd"}, "params": {"x": 1.0}})
            )
            assert c.get("/healthz").status_code == 200
        _wait(
            lambda: sum(1 for t, s in events if t > t_down and s == 503) >= 3 or bool(errors),
            10,
            "the client to see the outage",
        )
        time.sleep(OUTAGE)
        redis.start()  # same port, same data directory
        t_up = time.monotonic()
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive(), "the client hangs"
    if errors:
        raise errors[0]

    # recovered by itself: the same processes, every step acknowledged exactly once
    assert server.proc.poll() is None
    assert server.proc.pid == master
    assert server.worker_pids() == workers, "a worker was restarted"
    after = [(t, s) for t, s in events if t > t_up]
    first_ok = next(t for t, s in after if s == 200)
    assert first_ok - t_up < 15, f"recovered only after {first_ok - t_up:.1f} s"
    late = [s for t, s in after if t > first_ok and s != 200]
    assert not late, f"refusals after the server had recovered: {late}"
    assert sorted(versions.values()) == list(range(1, STEPS + 1))
    assert sum(1 for _, s in events if s == 503) >= 3
    with _fresh(server) as c:
        for _ in range(4):
            assert c.get("/readyz").status_code == 200
        doc = session_doc(c, sid)
        assert (doc["step"], doc["version"]) == (STEPS, STEPS)
        got, _ = read_params(c, sid)
    want = np.asarray(initial)
    for i in range(STEPS):
        want = want - LR * np.asarray(_grads(i))
    assert_close(got, {"x": want}, rtol=1e-12)


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
