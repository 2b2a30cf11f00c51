"""Retries: what is retried and how long the client waits (scripted transports and an
injected sleep), one Idempotency-Key across all retries of a step, and steps applied
exactly once through a proxy that loses requests and answers at random."""

from __future__ import annotations

import email.utils
import time
import uuid

import httpx
import numpy as np
import pytest

from clients import (
    AsyncOptimizerClient,
    ConflictError,
    ConnectionError,
    InternalServerError,
    NotFoundError,
    OptimizerClient,
    OptserveError,
    RetryPolicy,
    ServiceUnavailableError,
    TimeoutError,
)
from clients.retries import parse_retry_after
from tests.api.support import core_run
from tests.clients.support import (
    FakeSleep,
    FaultProxy,
    Script,
    problem_response,
    session_doc,
    step_json,
)
from tests.support.live_server import LiveServer

GRADS = {"x": np.array([0.1, 0.2, 0.3])}


def sync_client(script: Script, sleep: FakeSleep, **kwargs: object) -> OptimizerClient:
    return OptimizerClient(
        "http://optserve.test", transport=script.sync(), sleep=sleep.sync, **kwargs
    )


def async_client(script: Script, sleep: FakeSleep, **kwargs: object) -> AsyncOptimizerClient:
    return AsyncOptimizerClient(
        "http://optserve.test", transport=httpx.MockTransport(script), sleep=sleep, **kwargs
    )


# --- Retry-After ---------------------------------------------------------------------------


def test_retry_after_seconds_is_honoured() -> None:
    script = Script([problem_response(503, headers={"Retry-After": "1"}), step_json()])
    sleep = FakeSleep()
    with sync_client(script, sleep) as client:
        result = client.step("s1", GRADS)
    assert result.version == 1
    assert sleep.waits == [1.0]  # what the server asked: no jitter, no backoff
    assert len(script.requests) == 2


@pytest.mark.asyncio
async def test_retry_after_seconds_is_honoured_async() -> None:
    script = Script(
        [
            problem_response(429, headers={"Retry-After": "1"}),
            problem_response(503, headers={"Retry-After": "2"}),
            step_json(),
        ]
    )
    sleep = FakeSleep()
    async with async_client(script, sleep) as client:
        result = await client.step("s1", GRADS)
    assert result.version == 1
    assert sleep.waits == [1.0, 2.0]


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    for bad in (None, "", "soon", "inf", "nan"):
        assert parse_retry_after(bad, now=now) is None
    # through the client: a date 3 s ahead is a wait of at most 3 s (the header's
    # resolution is one second)
    ahead = email.utils.formatdate(time.time() + 3, usegmt=True)
    script = Script([problem_response(503, headers={"Retry-After": ahead}), step_json()])
    sleep = FakeSleep()
    with sync_client(script, sleep) as client:
        client.step("s1", GRADS)
    assert len(sleep.waits) == 1
    assert 1.0 < sleep.waits[0] <= 3.0


def test_retry_after_beyond_the_total_budget_gives_up() -> None:
    script = Script([problem_response(503, headers={"Retry-After": "120"}), step_json()])
    sleep = FakeSleep()
    with sync_client(script, sleep) as client, pytest.raises(ServiceUnavailableError) as info:
        client.step("s1", GRADS)
    assert sleep.waits == []
    assert len(script.requests) == 1
    assert info.value.headers["retry-after"] == "120"
    policy = RetryPolicy(max_retries=10, max_total_delay=2.5)
    script = Script([problem_response(503, headers={"Retry-After": "1"})])
    sleep = FakeSleep()
    with (
        sync_client(script, sleep, retry_policy=policy) as client,
        pytest.raises(ServiceUnavailableError),
    ):
        client.step("s1", GRADS)
    assert sleep.waits == [1.0, 1.0]  # a third second would exceed the 2.5 s budget


# --- backoff -------------------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(max_retries=8, initial_delay=0.5, max_delay=4.0, max_total_delay=1e9)
    script = Script([httpx.ConnectError])
    sleep = FakeSleep()
    with (
        sync_client(script, sleep, retry_policy=policy) as client,
        pytest.raises(ConnectionError, match="after 8 retries"),
    ):
        client.get_session("s1")
    assert len(script.requests) == 9
    assert len(sleep.waits) == 8
    for i, wait in enumerate(sleep.waits):
        assert 0.0 <= wait <= min(4.0, 0.5 * 2**i)
    draws = [policy.backoff(3) for _ in range(2000)]
    assert 0.0 <= min(draws) < 0.5
    assert 3.5 < max(draws) <= 4.0
    assert 1.8 < sum(draws) / len(draws) < 2.2


def test_max_retries() -> None:
    script = Script([problem_response(503)])
    sleep = FakeSleep()
    with (
        sync_client(script, sleep, max_retries=0) as client,
        pytest.raises(ServiceUnavailableError),
    ):
        client.get_session("s1")
    assert len(script.requests) == 1
    with (
        sync_client(script, sleep, max_retries=2) as client,
        pytest.raises(ServiceUnavailableError),
    ):
        client.get_session("s1")
    assert len(script.requests) == 4
    no_waiting = RetryPolicy(max_retries=5, max_total_delay=0.0)
    with (
        sync_client(script, sleep, retry_policy=no_waiting) as client,
        pytest.raises(ServiceUnavailableError),
    ):
        client.get_session("s1")
    assert len(script.requests) == 5
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="max_delay"):
        RetryPolicy(max_delay=float("inf"))


# --- what is retried -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        problem_response(400),
        problem_response(404),
        problem_response(422, "validation-error"),
        problem_response(500),
        problem_response(409, "something-else"),
    ],
    ids=["400", "404", "422", "500", "409-other"],
)
def test_refusals_are_not_retried(answer: httpx.Response) -> None:
    script = Script([answer, step_json()])
    sleep = FakeSleep()
    with sync_client(script, sleep) as client, pytest.raises(OptserveError):
        client.step("s1", GRADS)
    assert len(script.requests) == 1
    assert sleep.waits == []


@pytest.mark.parametrize(
    "answer",
    [
        problem_response(409, "idempotency-key-in-flight"),
        problem_response(409, "version-conflict"),
        problem_response(429),
        problem_response(502),
        problem_response(503),
        problem_response(504),
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.ReadError,
        httpx.RemoteProtocolError,
    ],
    ids=lambda a: str(a.status_code) if isinstance(a, httpx.Response) else a.__name__,
)
def test_transient_failures_of_a_step_are_retried(answer: httpx.Response) -> None:
    script = Script([answer, step_json()])
    sleep = FakeSleep()
    with sync_client(script, sleep) as client:
        assert client.step("s1", GRADS).version == 1
    assert len(script.requests) == 2
    assert len(sleep.waits) == 1


def test_version_conflict_exhausted_is_a_conflict_error() -> None:
    script = Script([problem_response(409, "version-conflict")])
    with (
        sync_client(script, FakeSleep(), max_retries=3) as client,
        pytest.raises(ConflictError) as info,
    ):
        client.step("s1", GRADS)
    assert info.value.version_conflict
    assert not info.value.in_flight
    assert len(script.requests) == 4


@pytest.mark.parametrize(
    ("answer", "retried"),
    [
        (httpx.ConnectError, True),  # nothing was sent
        (httpx.ConnectTimeout, True),
        (problem_response(503), True),  # the server refused it
        (problem_response(429), True),
        (httpx.ReadTimeout, False),  # it may have been created: no second session
        (httpx.RemoteProtocolError, False),
        (problem_response(502), False),
        (problem_response(504), False),
    ],
    ids=lambda a: a if isinstance(a, bool) else getattr(a, "__name__", None) or str(a.status_code),
)
def test_create_is_retried_only_when_it_surely_did_not_happen(
    answer: httpx.Response | type[httpx.TransportError], retried: bool
) -> None:
    created = httpx.Response(201, json=session_doc())
    script = Script([answer, created])
    with sync_client(script, FakeSleep()) as client:
        if retried:
            assert client.create_session(GRADS, {"name": "sgd", "lr": 0.1}).id == "s1"
        else:
            with pytest.raises((TimeoutError, ConnectionError, InternalServerError)):
                client.create_session(GRADS, {"name": "sgd", "lr": 0.1})
    assert len(script.requests) == (2 if retried else 1)


def test_a_delete_whose_answer_was_lost() -> None:
    script = Script([httpx.ReadTimeout, problem_response(404)])
    with sync_client(script, FakeSleep()) as client:
        assert client.delete_session("s1") is None  # the first attempt deleted it
    script = Script([problem_response(503), problem_response(404)])
    with sync_client(script, FakeSleep()) as client, pytest.raises(NotFoundError):
        client.delete_session("s1")  # the 503 deleted nothing: 404 is the answer


# --- one Idempotency-Key per logical step --------------------------------------------------

FLAKY = [
    httpx.ConnectError,
    httpx.ReadTimeout,
    httpx.RemoteProtocolError,
    problem_response(409, "idempotency-key-in-flight"),
    problem_response(503, headers={"Retry-After": "0"}),
    step_json(1, version=1),
    step_json(2, version=2),
]


def check_keys(script: Script) -> None:
    keys = script.header("Idempotency-Key")
    assert len(keys) == 7
    first = keys[0]
    assert first is not None
    assert uuid.UUID(first).version == 4
    assert keys[:6] == [first] * 6  # every retry of the first step
    assert keys[6] not in (None, first)  # the next step: a key of its own
    bodies = [r.content for r in script.requests[:6]]
    assert bodies == [bodies[0]] * 6  # and the same bytes (the server fingerprints them)


def test_one_idempotency_key_across_retries() -> None:
    script = Script(list(FLAKY))
    sleep = FakeSleep()
    with sync_client(script, sleep, max_retries=5) as client:
        assert client.step("s1", GRADS, loss=0.5).step == 1
        assert client.step("s1", GRADS).step == 2
    check_keys(script)
    assert len(sleep.waits) == 5
    assert sleep.waits[4] == 0.0


@pytest.mark.asyncio
async def test_one_idempotency_key_across_retries_async() -> None:
    script = Script(list(FLAKY))
    sleep = FakeSleep()
    async with async_client(script, sleep, max_retries=5, binary=False) as client:
        assert (await client.step("s1", GRADS, loss=0.5)).step == 1
        assert (await client.step("s1", GRADS)).step == 2
    check_keys(script)
    assert script.requests[0].headers["content-type"] == "application/json"


def test_an_explicit_idempotency_key_is_sent() -> None:
    replay = step_json()
    replay.headers["Idempotent-Replayed"] = "true"
    script = Script([httpx.ReadTimeout, replay])
    with sync_client(script, FakeSleep()) as client:
        result = client.step("s1", GRADS, idempotency_key="my-key-7")
    assert result.replayed
    assert script.header("Idempotency-Key") == ["my-key-7", "my-key-7"]


# --- exactly once through a lossy proxy ----------------------------------------------------

N_STEPS = 24
LR = 0.1
X0 = {"x": np.linspace(-1.0, 1.0, 5), "m": np.arange(6.0).reshape(2, 3)}
#: the proxy's choice per step request; `delay` holds the answer past the read timeout
WEIGHTS = {"ok": 0.4, "drop_before": 0.2, "drop_after": 0.2, "delay": 0.2}
PATIENT = RetryPolicy(max_retries=40, initial_delay=0.01, max_delay=0.05, max_total_delay=60)
TIMEOUT = httpx.Timeout(10.0, read=0.4)


def lossy_grads(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([11, i])
    return {n: rng.standard_normal(v.shape) for n, v in X0.items()}


def proxy_for(server: LiveServer, seed: int) -> FaultProxy:
    return FaultProxy(
        server.port,
        seed=seed,
        weights=WEIGHTS,
        delay=0.8,
        faulty=lambda method, path: path.endswith("/step"),
    )


def check_exactly_once(
    proxy: FaultProxy, versions: list[int], replayed: list[bool], final: dict[str, np.ndarray]
) -> None:
    counts = proxy.counts()
    assert all(counts[kind] > 0 for kind in WEIGHTS), counts
    assert versions == list(range(1, N_STEPS + 1))
    assert any(replayed), "no step was answered by its recorded response"
    grads = [lossy_grads(i) for i in range(N_STEPS)]
    expected, _ = core_run({"name": "sgd", "lr": LR}, X0, grads, "float64")
    for name, x0 in X0.items():
        np.testing.assert_array_equal(final[name], expected[-1][name])
        np.testing.assert_allclose(final[name], x0 - LR * sum(g[name] for g in grads), rtol=1e-12)


def test_steps_through_a_lossy_proxy_apply_once(memory_server: LiveServer) -> None:
    with (
        proxy_for(memory_server, seed=5) as proxy,
        OptimizerClient(proxy.url, retry_policy=PATIENT, timeout=TIMEOUT) as client,
    ):
        session = client.create_session(X0, {"name": "sgd", "lr": LR}, dtype="float64")
        results = [client.step(session.id, lossy_grads(i)) for i in range(N_STEPS)]
        final = client.get_params(session.id)
    assert final.version == N_STEPS
    check_exactly_once(
        proxy, [r.version for r in results], [r.replayed for r in results], final.params
    )


@pytest.mark.asyncio
async def test_steps_through_a_lossy_proxy_apply_once_async(memory_server: LiveServer) -> None:
    with proxy_for(memory_server, seed=6) as proxy:
        async with AsyncOptimizerClient(
            proxy.url, retry_policy=PATIENT, timeout=TIMEOUT, binary=False
        ) as client:
            session = await client.create_session(X0, {"name": "sgd", "lr": LR}, dtype="float64")
            results = [await client.step(session.id, lossy_grads(i)) for i in range(N_STEPS)]
            final = await client.get_params(session.id)
    assert final.version == N_STEPS
    check_exactly_once(
        proxy, [r.version for r in results], [r.replayed for r in results], final.params
    )
