"""A sync session whose other workers never push, on the shared 2-worker server on Redis
(each request on a fresh connection, so that either uvicorn process may take it): the
worker that did push gets its step once the accumulation's `timeout` passed, whether it
waits in its push (`wait`) or in a read of the next version (`min_version`), and the
session goes on (docs/training.md, `consistency.timeout`).
"""

from __future__ import annotations

import time

import numpy as np

from tests.e2e.support import LiveServer, session_doc
from tests.e2e.training_support import create_session, get_params, push, step_answer

TIMEOUT = 1.0
W = {"w": np.array([1.0, -2.0, 3.0]), "b": np.array([0.5])}
G = {"w": np.array([0.5, 0.25, -1.0]), "b": np.array([2.0])}
LR = 0.1


def _after(params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: params[k] - LR * grads[k] for k in params}


def test_a_lone_worker_gets_its_step_at_the_deadline(redis_server: LiveServer) -> None:
    with redis_server.client(headers={"Connection": "close"}) as c:
        doc = create_session(
            c,
            W,
            optimizer={"name": "sgd", "lr": LR},
            dtype="float64",
            consistency={"mode": "sync", "accumulate": 4, "timeout": TIMEOUT},
        )
        sid = doc["id"]
        assert doc["consistency"]["timeout"] == TIMEOUT
        assert doc["consistency"]["on_timeout"] == "flush"

        # 1. the push waits for its step; nobody else pushes: the wait itself flushes
        start = time.monotonic()
        r = push(c, sid, G, loss=0.25, base_version=0, wait=20.0)
        elapsed = time.monotonic() - start
        tensors, metadata = step_answer(r)
        assert TIMEOUT - 0.1 <= elapsed < 15.0, elapsed
        assert (metadata["version"], metadata["step"], metadata["skipped"]) == ("1", "1", "false")
        want = _after(W, G)
        for name in W:
            np.testing.assert_allclose(tensors[name], want[name], rtol=1e-15)

        # 2. a push that does not wait; the worker reads the next version instead (on
        # either process): that read flushes
        r = push(c, sid, G, base_version=1)
        assert r.status_code == 202, r.text
        pending = session_doc(c, sid)["pending"]
        assert pending["count"] == 1
        assert pending["deadline"] == pending["started_at"] + TIMEOUT
        tensors, version = get_params(c, sid, min_version=2)
        assert version == 2
        want = _after(want, G)
        for name in W:
            np.testing.assert_allclose(tensors[name], want[name], rtol=1e-15)

        history = c.get(f"/v1/sessions/{sid}/history").json()["entries"]
        steps = [e for e in history if e["kind"] == "step"]
        assert [(e["version"], e["flushed"], e["contributors"]) for e in steps] == [
            (2, True, 1),
            (1, True, 1),
        ]
        assert steps[1]["loss"] == 0.25
        doc = session_doc(c, sid)
        assert (doc["version"], doc["step"], doc["pending"]["count"]) == (2, 2, 0)
