"""Durability: redis-server with `appendonly yes` and `appendfsync always` is killed with
SIGKILL in the middle of a stream of steps, and started again on the same directory;
no step that the API acknowledged is lost, and none is applied twice.

`optserve serve --workers 2 --redis-url ...` on a private redis-server that keeps an
append-only file (fsynced before every reply). A float64 SGD session (no momentum) is
fed steps by client threads, each with its own Idempotency-Key; every 200 is recorded
(key, gradient, version): an *acknowledged* step. Redis is killed mid-stream; requests
then fail (503 store-unavailable, or an Idempotency-Key claim left in flight: 409):
their outcome is *unknown* (a commit may have reached the AOF just before the kill while
its reply did not). With the clients paused, Redis is started again on the same port and
directory and the session's version is read: it must cover every step acknowledged so
far. The optserve processes are the same all along (no restart needed). The clients go
on for a while, then every unknown step is sent again with its same key: a replay (it
had been applied) or a first application now, so that in the end every step's version
is known. Then:

- every acknowledged key replays its first answer (same version): its commit survived;
- the versions of all steps are exactly 1..n, n = the session's `step` and `version`;
- the params are bit for bit the core's serial replay of the gradients in version order,
  and equal `initial - lr * sum(gradients)` to 1e-12 (a lost or doubled step would be
  off by about lr * |g| / |x| ~ 1e-2).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis as redis_py

from tests.api.support import core_run
from tests.e2e.support import (
    BINARY,
    LiveServer,
    assert_close,
    encode,
    read_params,
    session_doc,
    start_server,
    store_down,
)
from tests.support.redis_server import PrivateRedis

THREADS = 4
LR = 0.01
SGD = {"name": "sgd", "lr": LR, "momentum": 0.0}
SHAPES = {"w": (12, 10), "b": (10,)}
SEED = 31337
#: acknowledged steps before Redis is killed, and after it is back
BEFORE_KILL = 80
AFTER_RESTART = 80
#: failed requests the clients must have seen before Redis comes back
FAILURES_SEEN = 3 * THREADS
#: claims of requests that died with Redis expire after this (seconds)
LOCK_TTL = 3


@dataclass(frozen=True)
class Step:
    thread: int
    index: int
    key: str

    def grads(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([SEED, self.thread, self.index])
        return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}

    def body(self) -> bytes:
        return encode(self.grads(), {"return": "none"})


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no HTTP answer (connection error)
    at: float
    detail: str


@pytest.fixture
def durable_server(persistent_redis: PrivateRedis, tmp_path: Path) -> Iterator[LiveServer]:
    # a request that dies with Redis leaves its Idempotency-Key claim behind (the
    # release fails too): keep claims short so that its retry waits seconds, not a minute
    server = start_server(
        "durability",
        tmp_path,
        workers=2,
        redis=persistent_redis,
        env={"OPTSERVE_IDEMPOTENCY_LOCK_TTL": str(LOCK_TTL)},
    )
    try:
        yield server
    finally:
        server.stop()


def _post(client: httpx.Client, sid: str, step: Step) -> httpx.Response:
    return client.post(
        f"/v1/sessions/{sid}/step",
        content=step.body(),
        headers={"Content-Type": BINARY, "Idempotency-Key": step.key},
    )


def _check_failure(r: httpx.Response) -> None:
    """A refusal while Redis is down or just back: 503 store-unavailable, or 409 for a
    key whose claim a request that died with Redis left behind."""
    if r.status_code == 503:
        store_down(r)
    else:
        assert r.status_code == 409, r.text
        assert r.json()["type"].endswith("idempotency-key-in-flight"), r.text


def _config(redis: PrivateRedis, name: str) -> str:
    client = redis_py.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        return str(client.config_get(name)[name])
    finally:
        client.close()


def test_sigkill_of_redis_loses_no_acknowledged_step(
    durable_server: LiveServer, persistent_redis: PrivateRedis
) -> None:
    server, redis = durable_server, persistent_redis
    t0 = time.monotonic()
    assert (_config(redis, "appendonly"), _config(redis, "appendfsync")) == ("yes", "always")
    master, workers = server.proc.pid, server.worker_pids()
    rng = np.random.default_rng(SEED)
    initial = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    with server.client() as c:
        r = c.post(
            "/v1/sessions",
            json={
                "optimizer": SGD,
                "params": {k: v.tolist() for k, v in initial.items()},
                "dtype": "float64",
            },
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

    lock = threading.Lock()
    steps: list[Step] = []
    acked: dict[str, int] = {}  # key -> version of its 200
    acked_at: dict[str, float] = {}
    unknown: list[Step] = []  # answered otherwise: applied or not, nobody knows yet
    failures: list[Outcome] = []
    go = threading.Event()  # cleared: the clients pause before their next request
    go.set()
    stop = threading.Event()
    in_flight = [0]
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def run(t: int) -> None:
        try:
            # a connection per request: both workers take steps
            with server.client(headers={"Connection": "close"}, timeout=20.0) as client:
                i = 0
                while not stop.is_set():
                    assert time.monotonic() < deadline, "out of time"
                    if not go.wait(timeout=0.05):
                        continue
                    step = Step(t, i, f"dur-{t}-{i}-{uuid.uuid4()}")
                    i += 1
                    with lock:
                        steps.append(step)
                        in_flight[0] += 1
                    try:
                        try:
                            r = _post(client, sid, step)
                        except httpx.TransportError as exc:
                            failure = Outcome(None, time.monotonic(), repr(exc))
                        else:
                            if r.status_code == 200:
                                with lock:
                                    acked[step.key] = r.json()["version"]
                                    acked_at[step.key] = time.monotonic()
                                continue
                            _check_failure(r)
                            failure = Outcome(r.status_code, time.monotonic(), r.json()["type"])
                        with lock:
                            unknown.append(step)
                            failures.append(failure)
                    finally:
                        with lock:
                            in_flight[0] -= 1
                    time.sleep(0.02)  # after a failure: do not spin
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    try:
        _wait(lambda: len(acked) >= BEFORE_KILL, errors, 30, "steps before the kill")
        redis.stop()  # SIGKILL: no shutdown, no final fsync; whatever is in flight is cut
        t_kill = time.monotonic()
        with lock:
            acked_before_kill = dict(acked)
        _wait(
            lambda: sum(f.at > t_kill for f in failures) >= FAILURES_SEEN,
            errors,
            10,
            "the clients to see the outage",
        )
        go.clear()  # pause the clients, let every request in flight end
        _wait(lambda: in_flight[0] == 0, errors, 25, "requests in flight to end")
        with server.client() as c:
            store_down(c.get(f"/v1/sessions/{sid}"))
            assert c.get("/healthz").status_code == 200
        outage_failures = len(failures)

        redis.start()  # same port, same directory: the AOF is read again
        t_up = time.monotonic()
        assert (_config(redis, "appendonly"), _config(redis, "appendfsync")) == ("yes", "always")
        # every step acknowledged so far came back, and no more than were attempted
        with server.client() as c:
            doc = _retry_doc(c, sid)
        with lock:
            acked_by_restart = dict(acked)
            attempted = len(steps)
        v_restart = doc["version"]
        assert doc["step"] == v_restart
        assert max(acked_by_restart.values()) <= v_restart <= attempted, (
            f"after the restart the session is at version {v_restart}; "
            f"{len(acked_by_restart)} steps were acknowledged (highest version "
            f"{max(acked_by_restart.values())}), {attempted} attempted"
        )
        go.set()
        _wait(
            lambda: len(acked) >= len(acked_by_restart) + AFTER_RESTART,
            errors,
            30,
            "steps after the restart",
        )
    finally:
        stop.set()
        go.set()
        for th in threads:
            th.join(timeout=30)
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    if errors:
        raise errors[0]

    # the same optserve processes throughout: it reconnected by itself
    assert server.proc.poll() is None
    assert server.proc.pid == master
    assert server.worker_pids() == workers, "a worker was restarted"
    first_ok = min(t for k, t in acked_at.items() if k not in acked_by_restart)
    recovery = first_ok - t_up
    assert recovery < 10, f"the first step after the restart came {recovery:.1f} s later"
    assert len(acked) + len(unknown) == len(steps)

    # resolve the unknown: each again with its own key, until it answers 200
    versions = dict(acked)
    replayed = claims_waited = 0
    t_resolve = time.monotonic()
    with server.client(timeout=20.0) as client:
        for step in unknown:
            while True:
                assert time.monotonic() < deadline + 30, f"{step.key} never answered"
                r = _post(client, sid, step)
                if r.status_code == 200:
                    break
                _check_failure(r)  # a claim left by the kill, until it expires
                claims_waited += 1
                time.sleep(0.1)
            versions[step.key] = r.json()["version"]
            replayed += r.headers.get("idempotent-replayed") == "true"
        t_resolve = time.monotonic() - t_resolve
        # every acknowledged step is still there: its key replays the version it had
        for key, version in acked.items():
            step = next(s for s in steps if s.key == key)
            r = _post(client, sid, step)
            assert r.status_code == 200, r.text
            assert r.headers["idempotent-replayed"] == "true", key
            assert r.json()["version"] == version, (key, version, r.json())
        doc = session_doc(client, sid)
        got, meta = read_params(client, sid)

    n = len(steps)
    assert sorted(versions.values()) == list(range(1, n + 1)), "versions repeated or skipped"
    assert (doc["step"], doc["version"], doc["skipped"]) == (n, n, 0)
    assert meta == {"step": str(n), "version": str(n)}
    # those acknowledged before the restart are among the versions the AOF brought back
    assert all(versions[k] <= v_restart for k in acked_by_restart)
    by_version = sorted(steps, key=lambda s: versions[s.key])
    grads = [s.grads() for s in by_version]
    serial, _ = core_run(SGD, initial, grads, "float64")
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], serial[-1][name], err_msg=name)
    want = {name: initial[name] - LR * np.sum([g[name] for g in grads], 0) for name in SHAPES}
    assert_close(got, want, rtol=1e-12)

    statuses: dict[str, int] = {}
    for f in failures:
        label = "connection error" if f.status is None else f"{f.status} {f.detail.split(':')[-1]}"
        statuses[label] = statuses.get(label, 0) + 1
    print(
        f"\ndurability: {len(steps)} steps; {len(acked)} acknowledged "
        f"({len(acked_before_kill)} before the kill, {len(acked_by_restart)} by the "
        f"restart); {len(unknown)} failed ({outage_failures} during the outage; {statuses}); "
        f"{replayed} of those replayed on retry (had been applied), "
        f"{len(unknown) - replayed} applied by the retry ({t_resolve:.1f} s, "
        f"{claims_waited} answers 409 in-flight on the way); version after the restart "
        f"{v_restart}; first step {recovery:.2f} s after Redis was back; "
        f"{time.monotonic() - t0:.1f} s"
    )


def _retry_doc(client: httpx.Client, sid: str) -> dict[str, Any]:
    """The session document, asked until the server has reconnected."""
    deadline = time.monotonic() + 15
    while True:
        r = client.get(f"/v1/sessions/{sid}")
        if r.status_code == 200:
            doc: dict[str, Any] = r.json()
            return doc
        store_down(r)
        assert time.monotonic() < deadline, "no reconnection to Redis"
        time.sleep(0.05)


def _wait(
    condition: Callable[[], bool], errors: list[BaseException], seconds: float, what: str
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if errors:
            raise errors[0]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
