"""A federated round survives kill -9 of the server and a restart of Redis in its middle.

A FedAdam session (float64, the digits MLP, 4 clients, `min_clients` = `expected_clients`
= 4, the mean aggregator) on a private redis-server that keeps its data (append-only
file, fsync always) and one `optserve serve` of this test. Three rounds are played in
full, by a driver loop sending each client's update (`submit_update`; the clients train
the MLP locally in NumPy on the round's params). In round 3, after 2 of the 4 updates
were accepted, the server process gets SIGKILL, Redis gets SIGKILL and is started again
on the same data, and a new server process takes over. Then:

* `GET .../round` answers the same round, deadline, clients (`c0`, `c1`), counters and
  params (bit for bit), and the session document is unchanged;
* the stored state (read from Redis with the store's own reader) is byte for byte what
  it was before the kill: the FedAdam moments `exp_avg`, `exp_avg_sq` and `step` equal a
  local reference's (the core's `aggregate` and `fedadam`, fed the same updates) to
  1e-12, and the two pending updates equal the deltas sent;
* `c1`'s update sent again is answered with its first answer (`Idempotent-Replayed`), and
  so is `c0`'s update of round 2 (a closed round); the round still holds 2 updates; a
  different body from `c1` for round 3 is refused (422);
* the other two updates close the round; the global params equal the reference's to
  1e-12 (and differ from what a FedAdam restarted from a fresh state would give by many
  orders of magnitude more), and so do they after two more rounds; the history lists
  each round once with its four clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients import OptimizerClient, UpdateResult, ValidationError
from service.core.state import OptState
from service.store.redis_store import RedisStore
from tests.e2e.conftest import need_redis_server
from tests.e2e.federated_support import (
    Client,
    LocalConfig,
    Reference,
    flat,
    iid_split,
    local_update,
    round_entries,
)
from tests.e2e.support import LiveServer, session_doc, start_server
from tests.e2e.training_support import rel_err
from tests.support.digits import LAYOUT, init_params
from tests.support.redis_server import PrivateRedis, free_port

SEED = 11
CLIENTS = 4
FEDADAM = {"name": "fedadam", "lr": 10**-1.5, "betas": [0.9, 0.99], "tau": 1e-3}
#: rounds close on their fourth update (the deadline is far: only counts close them here)
FEDERATED = {
    "min_clients": CLIENTS,
    "expected_clients": CLIENTS,
    "round_timeout": 600,
    "aggregator": {"name": "mean"},
}
LOCAL = LocalConfig(lr=0.1, epochs=1, batch=32, seed=SEED)
ROUNDS_BEFORE = 3
#: updates accepted in the round when the server is killed (< min_clients)
KILL_AFTER = 2
ROUNDS_AFTER = 2
TOL = 1e-12


class Driver:
    """The clients of the session, sending their updates one after the other, and the
    local reference fed the same updates in the same order."""

    def __init__(self, clients: list[Client], initial: np.ndarray) -> None:
        self.clients = clients
        self.ref = Reference(FEDADAM, FEDERATED, initial)
        #: the keyword arguments of each update sent, by (round, client id)
        self.sent: dict[tuple[int, str], dict[str, Any]] = {}
        #: the first answer to each
        self.answers: dict[tuple[int, str], UpdateResult] = {}

    def updates(self, round_number: int, params: np.ndarray) -> None:
        """Train every client on the round's params; keep what each will send."""
        for c in self.clients:
            new, loss = local_update(c, params, round_number, LOCAL)
            self.sent[(round_number, c.id)] = {
                "delta": LAYOUT.unflatten(new - params),
                "num_examples": len(c.indices),
                "metrics": {"loss": loss},
            }

    def send(
        self, api: OptimizerClient, sid: str, round_number: int, client: Client
    ) -> UpdateResult:
        answer = api.submit_update(
            sid, round_number, client.id, **self.sent[(round_number, client.id)]
        )
        self.answers[(round_number, client.id)] = answer
        assert (answer.round, answer.accepted, answer.replayed) == (round_number, True, False)
        return answer

    def close_reference(self, round_number: int) -> np.ndarray:
        keys = [(round_number, c.id) for c in self.clients]
        deltas = [flat(self.sent[k]["delta"]) for k in keys]
        return self.ref.close_round(deltas, [self.sent[k]["num_examples"] for k in keys])

    def full_round(self, api: OptimizerClient, sid: str, round_number: int) -> float:
        """Every client's update (the last closes the round); the global params' relative
        difference to the reference's afterwards."""
        info = api.get_round(sid)
        assert (info.round, info.received) == (round_number, 0), info
        assert rel_err(flat(info.params), self.ref.params) <= TOL
        self.updates(round_number, flat(info.params))
        for i, c in enumerate(self.clients):
            answer = self.send(api, sid, round_number, c)
            assert (answer.received, answer.closed) == (i + 1, i == CLIENTS - 1), answer
        assert answer.next_round == round_number + 1
        want = self.close_reference(round_number)
        return rel_err(flat(api.get_round(sid).params), want)


def stored_state(redis: PrivateRedis, sid: str) -> tuple[bytes, OptState]:
    """The session's state blob as Redis holds it (the store's own reader), decoded."""

    async def read() -> bytes:
        store = RedisStore(redis.url)
        try:
            got = await store.read(sid)
        finally:
            await store.close()
        assert got is not None, f"session {sid} is not in Redis"
        return bytes(got[1].state)

    blob = asyncio.run(read())
    return blob, OptState.from_bytes(blob)


def test_a_round_survives_kill_9_of_the_server_and_a_redis_restart(tmp_path: Path) -> None:
    need_redis_server()
    redis = PrivateRedis(free_port(), data_dir=tmp_path / "redis")
    redis.start()
    server: LiveServer | None = None
    try:
        server = start_server("federated-restart-1", tmp_path, workers=1, redis=redis)
        parts = iid_split(CLIENTS, seed=SEED)
        clients = [Client(k, parts[k]) for k in range(CLIENTS)]
        initial = init_params(SEED)
        driver = Driver(clients, initial)
        errors: list[float] = []
        r = ROUNDS_BEFORE
        with OptimizerClient(server.base_url) as api, server.client() as http:
            sid = api.create_session(
                LAYOUT.unflatten(initial), FEDADAM, dtype="float64", federated=FEDERATED
            ).id
            for rnd in range(ROUNDS_BEFORE):
                errors.append(driver.full_round(api, sid, rnd))
            # round 3: KILL_AFTER of the updates, then the kill
            info = api.get_round(sid)
            assert info.round == r
            round_params = flat(info.params)
            driver.updates(r, round_params)
            for i, c in enumerate(clients[:KILL_AFTER]):
                answer = driver.send(api, sid, r, c)
                assert (answer.received, answer.closed) == (i + 1, False), answer
            before = api.get_round(sid)
            before_doc = session_doc(http, sid)
        assert before.clients == [c.id for c in clients[:KILL_AFTER]]
        before_blob, _ = stored_state(redis, sid)

        os.kill(server.proc.pid, signal.SIGKILL)
        assert server.proc.wait(timeout=10) == -signal.SIGKILL
        server.stop()  # nothing left to stop: takes it off the list of running servers
        old_redis = redis.pid
        redis.stop()  # SIGKILL: every acknowledged write was fsynced to the AOF
        redis.start()
        assert redis.pid != old_redis
        server = start_server("federated-restart-2", tmp_path, workers=1, redis=redis)

        after_blob, after_state = stored_state(redis, sid)
        assert after_blob == before_blob, "the stored state changed across the restart"
        # the state: FedAdam's moments and round count as the reference's, and the two
        # updates the round holds
        opt = {k: v for k, v in after_state.arrays.items() if "." not in k}
        assert sorted(opt) == ["exp_avg", "exp_avg_sq"]
        assert after_state.scalars["step"] == driver.ref.state.scalars["step"] == ROUNDS_BEFORE
        state_errors = {
            k: rel_err(after_state.arrays[k], driver.ref.state.arrays[k]) for k in sorted(opt)
        }
        assert max(state_errors.values()) <= TOL, state_errors
        pending = sorted(k for k in after_state.arrays if k.startswith("fed.u."))
        assert pending == [f"fed.u.{i}" for i in range(KILL_AFTER)]
        for i, c in enumerate(clients[:KILL_AFTER]):
            want = flat(driver.sent[(r, c.id)]["delta"])
            np.testing.assert_array_equal(after_state.arrays[f"fed.u.{i}"], want)

        with OptimizerClient(server.base_url) as api, server.client() as http:
            after = api.get_round(sid)
            fields = ("round", "deadline", "opened_at", "received", "clients", "step", "version")
            assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
            assert after.lr == before.lr == FEDADAM["lr"]
            np.testing.assert_array_equal(flat(after.params), round_params)
            assert session_doc(http, sid) == before_doc, "the session changed across the restart"

            # an accepted update sent again: the first answer, nothing counted twice
            again = api.submit_update(sid, r, clients[1].id, **driver.sent[(r, clients[1].id)])
            first = driver.answers[(r, clients[1].id)]
            assert again.replayed
            assert (again.round, again.received, again.closed) == (r, KILL_AFTER, False)
            assert (again.round, again.received, again.closed) == (
                first.round,
                first.received,
                first.closed,
            )
            old = api.submit_update(
                sid, r - 1, clients[0].id, **driver.sent[(r - 1, clients[0].id)]
            )
            assert old.replayed
            assert (old.round, old.received, old.closed) == (r - 1, 1, False)
            changed = dict(driver.sent[(r, clients[1].id)], num_examples=1)
            with pytest.raises(ValidationError):
                api.submit_update(sid, r, clients[1].id, **changed)
            assert api.get_round(sid).received == KILL_AFTER

            # the rest of the round, then more rounds on the restored FedAdam state
            for i, c in enumerate(clients[KILL_AFTER:], start=KILL_AFTER):
                answer = driver.send(api, sid, r, c)
                assert (answer.received, answer.closed) == (i + 1, i == CLIENTS - 1), answer
            fresh = Reference(FEDADAM, FEDERATED, round_params)  # a state lost at the restart
            keys = [(r, c.id) for c in clients]
            lost = fresh.close_round(
                [flat(driver.sent[k]["delta"]) for k in keys],
                [driver.sent[k]["num_examples"] for k in keys],
            )
            want = driver.close_reference(r)
            closed = flat(api.get_round(sid).params)
            errors.append(rel_err(closed, want))
            lost_gap = rel_err(lost, want)
            for rnd in range(r + 1, r + 1 + ROUNDS_AFTER):
                errors.append(driver.full_round(api, sid, rnd))
            entries = round_entries(http, sid)
            doc = session_doc(http, sid)
    finally:
        if server is not None:
            server.stop()
        redis.stop()

    total = ROUNDS_BEFORE + 1 + ROUNDS_AFTER
    assert [e["round"] for e in entries] == list(range(total))
    for e in entries:
        assert e["clients"] == [c.id for c in clients], e
        assert e["num_examples"] == sum(len(c.indices) for c in clients), e
    assert (doc["round"], doc["step"]) == (total, total)
    print(
        f"\nFedAdam restart mid-round: killed (SIGKILL) the server and Redis in round {r} "
        f"after {KILL_AFTER} of {CLIENTS} updates; after the restart: round {after.round}, "
        f"clients {after.clients}, deadline unchanged, stored state byte-identical "
        f"({len(after_blob)} B)"
        f"\nserver state vs local reference: "
        + ", ".join(f"{k} {v:.2g}" for k, v in state_errors.items())
        + f"; replays: c1 round {r} received={again.received}, c0 round {r - 1} "
        f"received={old.received}"
        f"\nglobal params vs reference, rounds 0..{total - 1}: "
        + " ".join(f"{e:.2g}" for e in errors)
        + f" (a FedAdam state lost at the restart would be {lost_gap:.2g} off)"
    )
    assert max(errors) <= TOL, errors
    assert lost_gap > 1e-3, lost_gap
