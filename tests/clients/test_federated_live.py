"""Federated sessions (docs/federated.md) through the clients against real servers
(`optserve serve` on the in-process store, and two workers on Redis): two
`FederatedWorker`s (one binary, one JSON) run three rounds of FedAvg with the mean
aggregator; an update sent again is replayed, one for a closed round refused."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from clients import FederatedWorker, OptimizerClient, RoundClosedError, RoundReport
from tests.support.live_server import LiveServer

FEDERATED = {
    "min_clients": 2,
    "expected_clients": 2,
    "round_timeout": 30,
    "aggregator": {"name": "mean"},
}
INITIAL = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
#: how long a worker may take for its rounds before the test gives up on it
WORKER_TIMEOUT = 60.0


@pytest.fixture(params=["memory", "redis-2-workers"])
def server(request: pytest.FixtureRequest) -> LiveServer:
    name = "redis_server" if request.param == "redis-2-workers" else "memory_server"
    live: LiveServer = request.getfixturevalue(name)
    assert live.proc.poll() is None, live.log_tail()
    return live


def create(client: OptimizerClient) -> str:
    session = client.create_session(INITIAL, {"name": "fedavg", "lr": 1.0}, federated=FEDERATED)
    assert session.federated is not None
    assert session.federated["min_clients"] == 2
    assert session.round == 0
    return session.id


def test_two_workers_run_three_rounds_of_fedavg(server: LiveServer) -> None:
    with OptimizerClient(server.base_url) as admin:
        sid = create(admin)
        results: dict[str, list[RoundReport]] = {}
        errors: list[BaseException] = []
        seen: dict[str, list[int]] = {"a": [], "b": []}

        def work(name: str, step: float, n: int, binary: bool) -> None:
            def train(params: dict[str, np.ndarray], round: int) -> Any:
                seen[name].append(round)
                return {k: v + step for k, v in params.items()}, n, {"loss": step}

            try:
                with OptimizerClient(server.base_url, binary=binary) as client:
                    worker = FederatedWorker(client, sid, name, train, poll_interval=0.05)
                    results[name] = worker.run(3)
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=("a", 1.0, 1, True), daemon=True),
            threading.Thread(target=work, args=("b", 3.0, 3, False), daemon=True),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WORKER_TIMEOUT)
        if errors:
            raise errors[0]
        assert not any(t.is_alive() for t in threads), "a worker is still waiting"
        for name in "ab":
            reports = results[name]
            assert [r.round for r in reports] == [0, 1, 2]
            assert all(r.submitted and not r.late for r in reports)
            assert seen[name] == [0, 1, 2]
        for a, b in zip(results["a"], results["b"], strict=True):
            assert a.update is not None
            assert b.update is not None
            assert a.update.closed != b.update.closed  # the second update closed the round
        info = admin.get_round(sid)
        assert (info.round, info.step, info.received, info.clients) == (3, 3, 0, [])
        # each round: the mean of +1.0 (1 example) and +3.0 (3 examples) = +2.5
        for name, value in info.params.items():
            np.testing.assert_allclose(value, np.full(INITIAL[name].shape, 7.5))
        rounds = [e for e in admin.history(sid) if e.kind == "round"]
        assert len(rounds) == 3
        admin.delete_session(sid)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_an_update_is_replayed_and_a_closed_round_refused(server: LiveServer, binary: bool) -> None:
    delta = {n: np.full(a.shape, 0.5, dtype=np.float32) for n, a in INITIAL.items()}
    with OptimizerClient(server.base_url, binary=binary) as client:
        sid = create(client)
        first = client.submit_update(sid, 0, "c1", delta=delta, num_examples=2)
        again = client.submit_update(sid, 0, "c1", delta=delta, num_examples=2)
        assert (first.round, first.received, first.closed, first.replayed) == (0, 1, False, False)
        assert again.replayed
        assert (again.round, again.received, again.closed) == (0, 1, False)
        closing = client.submit_update(
            sid, 0, "c2", delta=delta, num_examples=1, metrics={"loss": 1.0}
        )
        assert (closing.closed, closing.next_round) == (True, 1)
        with pytest.raises(RoundClosedError) as info:
            client.submit_update(sid, 0, "c3", delta=delta, num_examples=1)
        assert info.value.current_round == 1
        assert client.get_session(sid).round == 1
        client.delete_session(sid)
