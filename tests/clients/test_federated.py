"""Federated sessions through the clients (docs/federated.md), against scripted transports
and a fake federation (tests/clients/support.py): what `submit_update` sends (JSON and
binary) and how it is retried, `get_round` read, `create_session(federated=...)`, and
`FederatedWorker`'s loop: rounds that advance, waits that honour the deadline instead
of resubmitting, stragglers, restarts, lost answers, the delta, the progress bar, and
two `AsyncFederatedWorker`s together."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import httpx
import numpy as np
import pytest

from clients import (
    AsyncFederatedWorker,
    AsyncOptimizerClient,
    ConflictError,
    FederatedWorker,
    LocalResult,
    OptimizerClient,
    RetryPolicy,
    RoundClosedError,
    RoundInfo,
    RoundReport,
    UpdateResult,
    ValidationError,
    tensorfile,
)
from clients.errors import error_for_status
from tests.clients.support import (
    PROBLEM,
    FakeFederation,
    FakeSleep,
    Script,
    session_doc,
)

DELTA = {"w": np.array([[0.01, -0.02]], dtype=np.float32), "b": np.array([0.003], dtype=np.float32)}
BINARY = "application/octet-stream"
UPDATES = "/v1/sessions/f1/rounds/3/updates"


def sync_client(script: Script, **kwargs: Any) -> OptimizerClient:
    return OptimizerClient(
        "http://optserve.test", transport=script.sync(), sleep=FakeSleep().sync, **kwargs
    )


def async_client(script: Script, **kwargs: Any) -> AsyncOptimizerClient:
    return AsyncOptimizerClient(
        "http://optserve.test", transport=httpx.MockTransport(script), sleep=FakeSleep(), **kwargs
    )


def problem(status: int, slug: str, **members: Any) -> httpx.Response:
    body = {"type": f"urn:optserve:problem:{slug}", "title": slug, "status": status}
    body |= {"detail": f"{slug} detail", "errors": [], **members}
    return httpx.Response(status, json=body, headers={"Content-Type": PROBLEM})


def update_answer(**overrides: Any) -> httpx.Response:
    body = {"round": 3, "accepted": True, "received": 4, "closed": False, **overrides}
    return httpx.Response(200, json=body)


# --- submit_update -------------------------------------------------------------------------


def test_update_body_in_json() -> None:
    script = Script([update_answer(received=10, closed=True, next_round=4)])
    with sync_client(script, binary=False) as client:
        result = client.submit_update(
            "f1", 3, "c7", delta=DELTA, num_examples=120, metrics={"loss": 0.41, "acc": 1}
        )
    request = script.requests[0]
    assert (request.method, request.url.path) == ("POST", UPDATES)
    assert request.headers["content-type"] == "application/json"
    assert "idempotency-key" not in request.headers  # the server keys on (client, round)
    body = json.loads(request.content)
    assert list(body) == ["client_id", "delta", "num_examples", "metrics"]
    assert (body["client_id"], body["num_examples"]) == ("c7", 120)
    assert body["metrics"] == {"loss": 0.41, "acc": 1.0}
    for name, value in DELTA.items():  # float32 values, written as JSON numbers
        np.testing.assert_array_equal(np.asarray(body["delta"][name], np.float32), value)
    assert result == UpdateResult(round=3, accepted=True, received=10, closed=True, next_round=4)
    script = Script([update_answer()])
    with sync_client(script, binary=False) as client:
        plain = client.submit_update("f1", 3, "c7", weights=DELTA, num_examples=1)
    body = json.loads(script.requests[0].content)
    assert set(body) == {"client_id", "weights", "num_examples"}  # no metrics: not sent
    assert (plain.closed, plain.next_round, plain.replayed) == (False, None, False)


@pytest.mark.asyncio
async def test_update_body_in_binary() -> None:
    script = Script([update_answer()])
    async with async_client(script) as client:
        await client.submit_update(
            "f1", 3, "c7", weights=DELTA, num_examples=120, metrics={"loss": 0.5}
        )
        n = np.int64(2)  # a NumPy integer is an int
        await client.submit_update("f1", 3, "c8", delta=DELTA, num_examples=n)  # type: ignore[arg-type]
    first, second = script.requests
    assert first.headers["content-type"] == BINARY
    tensors, meta = tensorfile.decode(first.content)
    assert meta == {
        "client_id": "c7",
        "num_examples": "120",
        "kind": "weights",
        "metrics": '{"loss":0.5}',
    }
    assert json.loads(meta["metrics"]) == {"loss": 0.5}
    for name, value in DELTA.items():
        np.testing.assert_array_equal(tensors[name], value)
        assert tensors[name].dtype == np.float32
    _, meta = tensorfile.decode(second.content)
    assert meta == {"client_id": "c8", "num_examples": "2", "kind": "delta"}


def test_update_arguments_are_checked_before_sending() -> None:
    script = Script([update_answer()])
    with sync_client(script) as client:
        with pytest.raises(ValueError, match="exactly one of delta and weights"):
            client.submit_update("f1", 3, "c7", num_examples=1)
        with pytest.raises(ValueError, match="exactly one of delta and weights"):
            client.submit_update("f1", 3, "c7", delta=DELTA, weights=DELTA, num_examples=1)
        for n in (0, -3, True, 1.5):
            with pytest.raises(ValueError, match="num_examples"):
                client.submit_update("f1", 3, "c7", delta=DELTA, num_examples=n)  # type: ignore[arg-type]
        for cid in ("", "x" * 129, "a\nb", " ", 7):
            with pytest.raises(ValueError, match="client_id"):
                client.submit_update("f1", 3, cid, delta=DELTA, num_examples=1)  # type: ignore[arg-type]
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="metric 'loss' must be a finite number"):
                client.submit_update(
                    "f1", 3, "c7", delta=DELTA, num_examples=1, metrics={"loss": bad}
                )
        with pytest.raises(ValueError, match="round"):
            client.submit_update("f1", -1, "c7", delta=DELTA, num_examples=1)
    assert script.requests == []


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_an_update_is_retried_with_the_same_bytes(binary: bool) -> None:
    replayed = update_answer(closed=True, next_round=4)
    replayed.headers["Idempotent-Replayed"] = "true"
    script = Script(
        [
            httpx.RemoteProtocolError,  # sent, the answer lost
            httpx.ReadTimeout,
            problem(502, "bad-gateway"),
            problem(503, "unavailable"),
            problem(504, "gateway-timeout"),
            replayed,
        ]
    )
    sleep = FakeSleep()
    with OptimizerClient(
        "http://optserve.test", binary=binary, transport=script.sync(), sleep=sleep.sync
    ) as client:
        result = client.submit_update(
            "f1", 3, "c7", delta=DELTA, num_examples=5, metrics={"loss": 0.25, "acc": 0.5}
        )
    assert len(script.requests) == 6
    assert len({r.content for r in script.requests}) == 1  # identical bodies
    assert {r.url.path for r in script.requests} == {UPDATES}
    assert len(sleep.waits) == 5
    assert result.replayed
    assert (result.closed, result.next_round) == (True, 4)


def test_a_closed_round_is_not_retried() -> None:
    script = Script([problem(409, "round-closed", round=5), update_answer()])
    sleep = FakeSleep()
    with (
        OptimizerClient("http://t", transport=script.sync(), sleep=sleep.sync) as client,
        pytest.raises(RoundClosedError) as info,
    ):
        client.submit_update("f1", 3, "c7", delta=DELTA, num_examples=1)
    assert len(script.requests) == 1
    assert sleep.waits == []
    exc = info.value
    assert isinstance(exc, ConflictError)
    assert exc.current_round == 5
    assert exc.round_closed
    assert not exc.stale
    assert exc.status == 409


@pytest.mark.asyncio
async def test_a_closed_round_is_not_retried_async() -> None:
    script = Script([problem(409, "round-closed", round=2), update_answer()])
    async with async_client(script) as client:
        with pytest.raises(RoundClosedError) as info:
            await client.submit_update("f1", 3, "c7", delta=DELTA, num_examples=1)
    assert info.value.current_round == 2
    assert len(script.requests) == 1


def test_round_closed_error_class_and_a_different_body() -> None:
    body = json.dumps({"type": "urn:optserve:problem:round-closed", "status": 409}).encode()
    error = error_for_status(409, body, {"content-type": PROBLEM})
    assert type(error) is RoundClosedError
    assert error.current_round is None  # the server did not say
    script = Script([problem(422, "validation-error")])
    with sync_client(script) as client, pytest.raises(ValidationError):
        client.submit_update("f1", 3, "c7", delta=DELTA, num_examples=1)
    assert len(script.requests) == 1


# --- get_round -----------------------------------------------------------------------------

ROUND = {
    "round": 3,
    "deadline": 1763740030.5,
    "opened_at": 1763740000.5,
    "received": 2,
    "min_clients": 8,
    "expected_clients": 10,
    "clients": ["c1", "c4"],
    "step": 3,
    "version": 7,
    "lr": 0.01,
}


def check_round(info: RoundInfo, dtype: type[np.floating[Any]]) -> None:
    counts = (info.round, info.received, info.min_clients, info.step, info.version)
    assert counts == (3, 2, 8, 3, 7)
    assert (info.deadline, info.opened_at, info.lr) == (1763740030.5, 1763740000.5, 0.01)
    assert info.clients == ["c1", "c4"]
    assert set(info.params) == {"w", "b"}
    np.testing.assert_array_equal(info.params["w"], DELTA["w"].astype(dtype))
    assert info.params["w"].dtype == dtype
    assert info.params["w"].flags.writeable


def test_get_round_in_json() -> None:
    params = {n: v.tolist() for n, v in DELTA.items()}
    script = Script([httpx.Response(200, json={**ROUND, "params": params})])
    with sync_client(script, binary=False) as client:
        info = client.get_round("f1")
    request = script.requests[0]
    assert (request.method, request.url.path) == ("GET", "/v1/sessions/f1/round")
    assert request.headers["accept"] == "application/json"
    check_round(info, np.float64)
    assert info.expected_clients == 10


@pytest.mark.asyncio
async def test_get_round_in_binary() -> None:
    meta = {k: json.dumps(v) if k == "clients" else str(v) for k, v in ROUND.items()}
    del meta["expected_clients"]  # None: the server leaves it out of the metadata
    answer = httpx.Response(
        200, content=tensorfile.encode(DELTA, meta), headers={"Content-Type": BINARY}
    )
    script = Script([answer])
    async with async_client(script) as client:
        info = await client.get_round("f1")
    assert script.requests[0].headers["accept"] == BINARY
    check_round(info, np.float32)
    assert info.expected_clients is None


# --- create_session(federated=...) and the session document --------------------------------

FEDERATED = {
    "min_clients": 2,
    "expected_clients": 3,
    "round_timeout": 30,
    "aggregator": {"name": "mean"},
}


def federated_doc(**overrides: Any) -> dict[str, Any]:
    fields = {
        "optimizer": {"name": "fedavg", "lr": 1.0},
        "round": 0,
        "federated": {**FEDERATED, "update": "delta"},
    }
    return session_doc("f1", **{**fields, **overrides})


def test_create_a_federated_session_in_json() -> None:
    script = Script([httpx.Response(201, json=federated_doc())])
    with sync_client(script, binary=False) as client:
        session = client.create_session(DELTA, {"name": "fedavg"}, federated=FEDERATED)
    body = json.loads(script.requests[0].content)
    assert body["federated"] == FEDERATED
    assert session.federated == {**FEDERATED, "update": "delta"}
    assert session.round == 0


@pytest.mark.asyncio
async def test_create_a_federated_session_in_binary() -> None:
    script = Script([httpx.Response(201, json=federated_doc(round=4))])
    async with async_client(script) as client:
        session = await client.create_session(
            DELTA,
            {"name": "fedadam"},
            {"name": "exponential", "gamma": 0.98},
            federated=FEDERATED,
        )
        await client.create_session(DELTA, {"name": "sgd"})
    _, meta = tensorfile.decode(script.requests[0].content)
    assert json.loads(meta["federated"]) == FEDERATED  # a JSON string, as `schedule` is
    assert json.loads(meta["schedule"]) == {"name": "exponential", "gamma": 0.98}
    assert session.round == 4
    _, meta = tensorfile.decode(script.requests[1].content)
    assert "federated" not in meta


def test_a_session_without_federation() -> None:
    script = Script([httpx.Response(200, json=session_doc())])
    with sync_client(script) as client:
        session = client.get_session("s1")
    assert (session.federated, session.round) == (None, None)


# --- FederatedWorker against a fake federation ---------------------------------------------

INITIAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


class Trainer:
    """Adds `step` to every param, on `num_examples` examples; records the rounds and
    the global params it was given; `slow` (round -> seconds) advances the fake clock
    while it trains."""

    def __init__(
        self,
        server: FakeFederation,
        *,
        step: float = 1.0,
        num_examples: int = 3,
        slow: dict[int, float] | None = None,
    ) -> None:
        self.server = server
        self.step = step
        self.num_examples = num_examples
        self.slow = slow or {}
        self.rounds: list[int] = []
        self.seen: list[dict[str, np.ndarray]] = []

    def __call__(
        self, params: dict[str, np.ndarray], round: int
    ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        self.rounds.append(round)
        self.seen.append({n: np.array(a) for n, a in params.items()})
        self.server.advance(self.slow.get(round, 0.0))
        new = {n: a + self.step for n, a in params.items()}
        return new, self.num_examples, {"loss": 1.0 / (round + 1)}


def make_worker(
    server: FakeFederation,
    train: Any,
    *,
    binary: bool = True,
    client_id: str = "me",
    **kwargs: Any,
) -> FederatedWorker:
    client = OptimizerClient(
        "http://optserve.test",
        binary=binary,
        transport=server.transport(),
        sleep=server.sleep,
        retry_policy=RetryPolicy(initial_delay=0.0),  # retries without waiting
    )
    worker = FederatedWorker(client, server.SID, client_id, train, **kwargs)
    worker._now = server.clock
    return worker


def worker_posts(server: FakeFederation) -> list[str]:
    return [path for method, path in server.requests if method == "POST"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_worker_takes_part_in_rounds_and_waits_between_them(binary: bool) -> None:
    """Each round closes with the worker's update and a phantom's that comes 1 s after
    the round opened: the worker sends its update, then waits (sleeps, and looks at the
    session document) until the round moves on, and never sends twice to a round."""
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 1.0})
    train = Trainer(server)
    worker = make_worker(server, train, binary=binary, poll_interval=0.5)
    reports = worker.run(3)
    assert [r.round for r in reports] == [0, 1, 2]
    assert all(r.submitted and not r.late for r in reports)
    assert [r.received for r in reports] == [1, 1, 1]
    assert [r.metrics for r in reports] == [{"loss": 1.0}, {"loss": 0.5}, {"loss": 1 / 3}]
    assert all(r.num_examples == 3 and r.seconds >= 0 for r in reports)
    assert train.rounds == [0, 1, 2]
    # the global params of each round: +3/4 per round (the mean of 1.0 on 3 examples
    # and the phantom's 0.0 on 1)
    for r, seen in enumerate(train.seen):
        np.testing.assert_allclose(seen["w"], np.full((2, 3), 0.75 * r))
    np.testing.assert_allclose(server.params["b"], np.full(3, 1.5))
    assert (server.round, [c for _, c, _ in server.closed]) == (2, [["me", "p1"]] * 2)
    # one update per round, each a delta of ones in the session's dtype
    assert worker_posts(server) == [f"/v1/sessions/f1/rounds/{r}/updates" for r in range(3)]
    for update in server.taken:
        assert update.kind == "delta"
        assert update.binary == binary
        np.testing.assert_array_equal(np.asarray(update.tensors["w"]), np.ones((2, 3)))
    assert server.refused == []
    # the waits: two sleeps of poll_interval, each followed by a look at the session
    assert server.waits == [0.5, 0.5, 0.5, 0.5]
    one_round = [
        ("GET", "/v1/sessions/f1/round"),
        ("POST", "/v1/sessions/f1/rounds/0/updates"),
        ("GET", "/v1/sessions/f1/round"),  # already sent: wait
        ("GET", "/v1/sessions/f1"),
        ("GET", "/v1/sessions/f1"),  # round 1 now
    ]
    assert server.requests[:6] == [("GET", "/v1/sessions/f1"), *one_round]


def test_an_update_that_closes_the_round_needs_no_wait() -> None:
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 0.0})
    worker = make_worker(server, Trainer(server))
    reports = worker.run(2)
    assert [(r.round, r.update) for r in reports] == [
        (0, UpdateResult(round=0, accepted=True, received=2, closed=True, next_round=1)),
        (1, UpdateResult(round=1, accepted=True, received=2, closed=True, next_round=2)),
    ]
    assert server.waits == []


def test_the_worker_wakes_at_the_deadline() -> None:
    """Only the deadline closes a round here (no expected_clients): the worker sleeps
    `poll_interval` but wakes just past the deadline, then looks at the round (which
    closes it)."""
    server = FakeFederation(INITIAL, min_clients=2, round_timeout=2.5, phantoms={"p1": 1.0})
    worker = make_worker(server, Trainer(server), poll_interval=1.0)
    reports = worker.run(2)
    assert [r.round for r in reports] == [0, 1]
    assert server.waits == pytest.approx([1.0, 1.0, 0.55])
    assert server.closed[0][2] == pytest.approx(1002.55)  # closed by the worker's look
    assert server.requests[3:] == [
        ("GET", "/v1/sessions/f1/round"),
        ("GET", "/v1/sessions/f1"),
        ("GET", "/v1/sessions/f1"),
        ("GET", "/v1/sessions/f1/round"),  # past the deadline: closed, round 1
        ("POST", "/v1/sessions/f1/rounds/1/updates"),
    ]


def test_past_the_deadline_the_worker_polls_the_round() -> None:
    """The deadline passed with fewer than min_clients updates: the worker reads the
    round every poll_interval (a look at the round is what can close it)."""
    server = FakeFederation(INITIAL, min_clients=2, round_timeout=2.5, phantoms={"p1": 4.0})
    worker = make_worker(server, Trainer(server), poll_interval=1.0)
    reports = worker.run(2)
    assert [r.round for r in reports] == [0, 1]
    assert server.waits == pytest.approx([1.0, 1.0, 0.55, 1.0, 1.0])
    assert server.closed[0][2] == 1004.0  # closed by the phantom's update
    assert server.requests[6:] == [
        ("GET", "/v1/sessions/f1/round"),  # 1002.55: past the deadline, 1 of 2
        ("GET", "/v1/sessions/f1/round"),  # 1003.55
        ("GET", "/v1/sessions/f1/round"),  # 1004.55: closed at 1004
        ("POST", "/v1/sessions/f1/rounds/1/updates"),
    ]


def test_a_straggler_is_late_and_goes_on_with_the_current_round() -> None:
    """Round 1's training takes 5 s: meanwhile the phantoms close rounds 1 and 2 and
    report in round 3. The update for round 1 is refused (409, not retried), reported
    late, and the worker trains on round 3."""
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 1.0, "p2": 2.0})
    train = Trainer(server, slow={1: 5.0})
    worker = make_worker(server, train, progress=False)
    reports = worker.run(3)
    assert [(r.round, r.submitted, r.late) for r in reports] == [
        (0, True, False),
        (1, False, True),
        (3, True, False),
    ]
    late = reports[1]
    assert (late.current_round, late.update, late.received) == (3, None, None)
    assert late.metrics == {"loss": 0.5}
    assert train.rounds == [0, 1, 3]
    assert [u.round for u in server.refused] == [1]
    assert [u.round for u in server.taken] == [0, 3]
    assert worker_posts(server).count("/v1/sessions/f1/rounds/1/updates") == 1
    assert reports[2].update is not None
    assert reports[2].update.closed
    np.testing.assert_allclose(server.params["w"], np.full((2, 3), 1.5))


def test_a_restarted_worker_does_not_send_twice_to_a_round() -> None:
    """The round already holds an update of this client_id (sent before a restart): the
    worker waits for the next round instead of training for this one again."""
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 1.0})
    zeros = {n: np.zeros_like(a) for n, a in INITIAL.items()}
    server._take("me", zeros, 1, b"before the restart", {"round": 0}, server.now)
    train = Trainer(server)
    reports = make_worker(server, train).run(1)
    assert [r.round for r in reports] == [1]
    assert train.rounds == [1]
    assert worker_posts(server) == ["/v1/sessions/f1/rounds/1/updates"]


def test_a_lost_answer_is_replayed() -> None:
    """The update closed round 0 but its answer was lost: the retry sends the same bytes
    and gets the first answer again."""
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 0.0}, drop_answers={1})
    reports = make_worker(server, Trainer(server)).run(1)
    posts = [r for r in server.raw if r.method == "POST"]
    assert len(posts) == 2
    assert posts[0].content == posts[1].content
    assert len(server.taken) == 1
    update = reports[0].update
    assert update is not None
    assert (update.replayed, update.closed, update.next_round) == (True, True, 1)
    assert server.round == 1


def test_an_update_still_in_flight_is_sent_again_until_it_lands() -> None:
    """A server killed mid-update leaves its claim until the lock ttl: the worker keeps
    sending the same bytes (past the client's own retries) and the update lands once."""
    server = FakeFederation(INITIAL, expected_clients=1, in_flight=25)
    reports = make_worker(server, Trainer(server)).run(1)
    posts = [r for r in server.raw if r.method == "POST"]
    assert len(posts) == 26
    assert len({p.content for p in posts}) == 1
    assert len(server.taken) == 1
    assert reports[0].submitted
    assert server.round == 1


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_delta_is_new_minus_global_in_the_session_dtype(binary: bool) -> None:
    rng = np.random.default_rng(3)
    initial = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in INITIAL.items()}
    server = FakeFederation(initial, expected_clients=1)
    new = {n: rng.standard_normal(a.shape) for n, a in initial.items()}  # float64

    def train(params: dict[str, np.ndarray], round: int) -> LocalResult:
        return LocalResult(new, 7)

    reports = make_worker(server, train, binary=binary).run(1)
    assert reports[0].metrics is None
    sent = server.taken[0]
    assert (sent.kind, sent.num_examples, sent.metrics) == ("delta", 7, None)
    for name in initial:
        expected = new[name].astype(np.float32) - initial[name]
        got = np.asarray(sent.tensors[name])
        if binary:
            assert got.dtype == np.float32
        np.testing.assert_array_equal(got.astype(np.float32), expected)


def test_train_may_change_the_params_it_gets_in_place() -> None:
    server = FakeFederation(INITIAL, expected_clients=1)

    def train(params: dict[str, np.ndarray], round: int) -> tuple[dict[str, np.ndarray], int]:
        for value in params.values():
            value += 2.0  # in place: the delta is still taken from the round's params
        return params, 1

    make_worker(server, train).run(2)
    for sent in server.taken:
        np.testing.assert_array_equal(np.asarray(sent.tensors["w"]), np.full((2, 3), 2.0))
    np.testing.assert_array_equal(server.params["b"], np.full(3, 4.0))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_send_weights(binary: bool) -> None:
    server = FakeFederation(INITIAL, expected_clients=1)
    new = {"w": np.full((2, 3), 0.1), "b": np.full(3, 0.2)}

    def train(params: dict[str, np.ndarray], round: int) -> tuple[dict[str, np.ndarray], int]:
        return new, 2

    make_worker(server, train, binary=binary, send="weights").run(1)
    sent = server.taken[0]
    assert sent.kind == "weights"
    for name, value in new.items():
        np.testing.assert_array_equal(
            np.asarray(sent.tensors[name]).astype(np.float32), value.astype(np.float32)
        )
    np.testing.assert_allclose(server.params["b"], np.full(3, 0.2), rtol=1e-6)


def test_what_train_must_return() -> None:
    server = FakeFederation(INITIAL, expected_clients=1)
    cases: list[tuple[Any, type[Exception], str]] = [
        ([INITIAL, 1], TypeError, "must return"),
        ((INITIAL,), TypeError, "must return"),
        ((list(INITIAL.values()), 1), TypeError, "mapping"),
        (({"w": INITIAL["w"]}, 1), ValueError, r"missing \['b'\]"),
        (({**INITIAL, "extra": 1.0}, 1), ValueError, r"unknown \['extra'\]"),
        (({**INITIAL, "b": np.zeros(4)}, 1), ValueError, "shape"),
        ((INITIAL, 0), ValueError, "num_examples"),
        ((INITIAL, 1, {"loss": math.nan}), ValueError, "finite"),
    ]
    for value, error, match in cases:
        worker = make_worker(server, lambda params, round, v=value: v)
        with pytest.raises(error, match=match):
            worker.run(1)
    assert server.taken == []


def test_max_rounds_and_stop_when() -> None:
    server = FakeFederation(INITIAL, expected_clients=1)
    worker = make_worker(server, Trainer(server), max_rounds=2)
    assert [r.round for r in worker.run()] == [0, 1]
    assert [r.round for r in worker.run(1)] == [2]
    assert worker.run(0) == []
    seen: list[RoundReport] = []

    def stop(report: RoundReport) -> bool:
        seen.append(report)
        return report.metrics is not None and report.metrics["loss"] <= 0.2

    worker = make_worker(server, Trainer(server), stop_when=stop)
    reports = worker.run()  # no limit: until stop_when
    assert [r.round for r in reports] == [3, 4]  # loss 1/4, then 1/5
    assert seen == reports


def test_bad_worker_settings() -> None:
    server = FakeFederation(INITIAL)
    train = Trainer(server)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"client_id": ""}, "client_id"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"poll_interval": math.inf}, "poll_interval"),
        ({"send": "grads"}, "send"),
        ({"max_rounds": -1}, "max_rounds"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            make_worker(server, train, **kwargs)
    with pytest.raises(ValueError, match="rounds"):
        make_worker(server, train).run(-1)
    assert server.requests == []


def test_a_session_that_is_not_federated() -> None:
    script = Script([httpx.Response(200, json=session_doc("f1"))])
    client = sync_client(script)
    worker = FederatedWorker(client, "f1", "me", lambda p, r: (p, 1))
    with pytest.raises(ValueError, match="not federated"):
        worker.run(1)
    assert len(script.requests) == 1


def test_the_progress_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    server = FakeFederation(INITIAL, expected_clients=2, phantoms={"p1": 1.0, "p2": 2.0})
    worker = make_worker(server, Trainer(server, slow={1: 5.0}), progress=True)
    worker.run(3)
    err = capsys.readouterr().err
    assert "federated me" in err
    assert "3/3" in err
    assert "round=0 received=1 loss=1" in err
    assert "round=1 late (now 3)" in err
    assert "round=3 received=2 loss=0.25" in err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    server = FakeFederation(INITIAL, expected_clients=1)
    worker = make_worker(server, Trainer(server), progress=True)
    with pytest.raises(ImportError, match=r"FederatedWorker\(progress=True\).*pip install tqdm"):
        worker.run(1)
    assert server.requests == []  # nothing sent
    assert make_worker(server, Trainer(server)).run(1)[0].submitted  # no bar: no tqdm needed


# --- two async workers together ------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_async_workers_share_the_rounds() -> None:
    """Two `AsyncFederatedWorker`s on one event loop (one with a coroutine `train`): each
    round closes with both updates (expected_clients 2), so each waits for the other."""
    server = FakeFederation(INITIAL, min_clients=2, expected_clients=2)
    trained: list[tuple[str, int]] = []

    async def train_a(params: dict[str, np.ndarray], round: int) -> LocalResult:
        trained.append(("a", round))
        await asyncio.sleep(0)
        return LocalResult({n: v + 1.0 for n, v in params.items()}, 1, {"loss": 2.0})

    def train_b(params: dict[str, np.ndarray], round: int) -> LocalResult:
        trained.append(("b", round))
        return LocalResult({n: v + 3.0 for n, v in params.items()}, 3, {"loss": 1.0})

    def worker(name: str, train: Any, binary: bool) -> AsyncFederatedWorker:
        client = AsyncOptimizerClient(
            "http://optserve.test",
            binary=binary,
            transport=server.transport(),
            sleep=server.asleep,
        )
        w = AsyncFederatedWorker(client, server.SID, name, train, poll_interval=0.25)
        w._now = server.clock
        return w

    a, b = worker("a", train_a, True), worker("b", train_b, False)
    reports_a, reports_b = await asyncio.gather(a.run(3), b.run(3))
    await a.client.aclose()
    await b.client.aclose()
    assert [r.round for r in reports_a] == [r.round for r in reports_b] == [0, 1, 2]
    assert all(r.submitted for r in [*reports_a, *reports_b])
    assert sorted(trained) == sorted([(n, r) for n in "ab" for r in range(3)])
    assert [sorted(c) for _, c, _ in server.closed] == [["a", "b"]] * 3
    # each round: (1.0 * 1 + 3.0 * 3) / 4 = 2.5
    np.testing.assert_allclose(server.params["w"], np.full((2, 3), 7.5))
    assert server.refused == []
    assert len(server.taken) == 6
