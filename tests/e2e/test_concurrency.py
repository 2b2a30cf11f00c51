"""Concurrent steps on one session through two uvicorn workers on Redis: every step is
applied exactly once (no lost update, no doubled one)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psutil

from tests.e2e.support import LiveServer, assert_close, read_params, session_doc

THREADS = 8
STEPS = 200
LR = 0.01
SEED = 20240611


def _grads(thread: int, i: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The gradient of request `i` of `thread`: distinct for every request."""
    rng = np.random.default_rng([SEED, thread, i])
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def test_concurrent_sgd_steps_all_apply_once(redis_server: LiveServer) -> None:
    rng = np.random.default_rng(SEED)
    initial = {"w": rng.standard_normal((8, 8)), "b": rng.standard_normal(8)}
    shapes = {name: value.shape for name, value in initial.items()}
    with redis_server.client() as c:
        r = c.post(
            "/v1/sessions",
            json={
                "optimizer": {"name": "sgd", "lr": LR, "momentum": 0.0},
                "params": {k: v.tolist() for k, v in initial.items()},
                "dtype": "float64",
            },
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

    workers = [psutil.Process(pid) for pid in redis_server.worker_pids()]
    assert len(workers) == 2
    cpu_before = [sum(w.cpu_times()[:2]) for w in workers]
    versions: list[list[int]] = [[] for _ in range(THREADS)]
    conflicts = [0] * THREADS
    errors: list[BaseException] = []
    deadline = time.monotonic() + 120

    def run(t: int) -> None:
        try:
            with redis_server.client() as client:
                for i in range(STEPS):
                    g = _grads(t, i, shapes)
                    body: dict[str, Any] = {
                        "grads": {k: v.tolist() for k, v in g.items()},
                        "return": "none",
                    }
                    # a new connection now and then, so that both workers take steps
                    headers = {"Connection": "close"} if i % 10 == 9 else {}
                    while True:
                        assert time.monotonic() < deadline, "out of time"
                        r = client.post(f"/v1/sessions/{sid}/step", json=body, headers=headers)
                        if r.status_code == 200:
                            versions[t].append(r.json()["version"])
                            break
                        # a race the server could not resolve: nothing applied, retry
                        assert r.status_code == 409, r.text
                        assert r.json()["type"].endswith("version-conflict"), r.text
                        conflicts[t] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=150)
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    if errors:
        raise errors[0]

    total = THREADS * STEPS
    every = sorted(v for vs in versions for v in vs)
    assert every == list(range(1, total + 1)), "versions repeated or skipped"
    with redis_server.client() as c:
        doc = session_doc(c, sid)
        assert (doc["step"], doc["version"], doc["skipped"]) == (total, total, 0)
        got, meta = read_params(c, sid)
    assert meta == {"step": str(total), "version": str(total)}
    summed = {
        name: np.sum([_grads(t, i, shapes)[name] for t in range(THREADS) for i in range(STEPS)], 0)
        for name in shapes
    }
    want = {name: initial[name] - LR * summed[name] for name in shapes}
    assert_close(got, want, rtol=1e-9)
    # a lost or a doubled gradient would be off by LR * |g| ~ 1e-2, far over the tolerance
    cpu_after = [sum(w.cpu_times()[:2]) for w in workers]
    busy = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    assert all(b > 0.05 for b in busy), f"a worker took no steps: cpu seconds {busy}"
