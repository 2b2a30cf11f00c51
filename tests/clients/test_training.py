"""The training extensions of the clients (docs/training.md) against scripted transports:
what each new call sends, how its answers are read, the wait for a pending sync push,
which refusals are retried, and `lr_find`'s loop against a fake range-test server."""

from __future__ import annotations

import json
import math
import pickle
import sys
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from clients import (
    AsyncOptimizerClient,
    ConflictError,
    HistoryEntry,
    LRFinderResult,
    MetricsResult,
    NoAverageError,
    NoRangeTestError,
    OptimizerClient,
    OptserveError,
    RangeTestOverError,
    StaleGradientError,
    StepResult,
    Suggestion,
    TimeoutError,
    WaitTimeoutError,
    lr_find,
    tensorfile,
)
from clients._base import WAIT_MARGIN
from clients.errors import error_for_status
from tests.clients.support import (
    PROBLEM,
    FakeRangeTestServer,
    FakeSleep,
    Script,
    problem_response,
    session_doc,
    step_json,
)

GRADS = {"x": np.array([0.1, 0.2, 0.3])}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def sync_client(script: Script, **kwargs: Any) -> OptimizerClient:
    return OptimizerClient(
        "http://optserve.test", transport=script.sync(), sleep=FakeSleep().sync, **kwargs
    )


def async_client(script: Script, **kwargs: Any) -> AsyncOptimizerClient:
    return AsyncOptimizerClient(
        "http://optserve.test", transport=httpx.MockTransport(script), sleep=FakeSleep(), **kwargs
    )


def problem(status: int, slug: str, **members: Any) -> httpx.Response:
    body = {
        "type": f"urn:optserve:problem:{slug}",
        "title": slug,
        "status": status,
        "detail": f"{slug} detail",
        "errors": [],
        **members,
    }
    return httpx.Response(status, json=body, headers={"Content-Type": PROBLEM})


def pending(version: int = 4, count: int = 1, k: int = 2) -> httpx.Response:
    body = {"status": "pending", "version": version, "wait_for": version + 1}
    body |= {"pending": count, "accumulate": k}
    return httpx.Response(
        202, json=body, headers={"Location": f"/v1/sessions/s1/params?min_version={version + 1}"}
    )


def params_json(step: int, version: int, **extra: Any) -> httpx.Response:
    body = {"step": step, "version": version, "params": {"x": [1.0, 2.0, 3.0]}, **extra}
    return httpx.Response(200, json=body)


def binary_answer(meta: dict[str, str], x: list[float] | None = None) -> httpx.Response:
    tensors = {"x": np.asarray(x or [1.0, 2.0, 3.0], dtype=np.float32)}
    return httpx.Response(
        200,
        content=tensorfile.encode(tensors, meta),
        headers={"Content-Type": "application/octet-stream"},
    )


def read_timeout(request: httpx.Request) -> float:
    timeout: dict[str, float] = request.extensions["timeout"]
    return timeout["read"]


# --- step: base_version and wait -----------------------------------------------------------


def test_base_version_and_wait_in_json() -> None:
    script = Script([step_json(5, staleness=1, contributors=1)])
    with sync_client(script, binary=False) as client:
        result = client.step("s1", GRADS, loss=0.5, base_version=3, wait=12.5)
    body = json.loads(script.requests[0].content)
    assert body["base_version"] == 3
    assert body["wait"] == 12.5
    assert (result.status, result.staleness, result.contributors) == ("applied", 1, 1)
    assert read_timeout(script.requests[0]) == 60.0  # the default 60 s exceeds 12.5 + margin
    script = Script([step_json(1)])
    with sync_client(script, binary=False, timeout=5.0) as client:
        client.step("s1", GRADS, wait=20)
        client.step("s1", GRADS)
    assert read_timeout(script.requests[0]) == 20 + WAIT_MARGIN  # longer than the wait
    assert read_timeout(script.requests[1]) == 5.0
    assert "wait" not in json.loads(script.requests[1].content)
    assert "base_version" not in json.loads(script.requests[1].content)


def test_base_version_and_wait_in_binary_metadata() -> None:
    meta = {"step": "5", "version": "5", "lr": "0.1", "return": "params"}
    script = Script([binary_answer({**meta, "staleness": "2", "contributors": "3"})])
    with sync_client(script) as client:
        result = client.step("s1", GRADS, loss=0.5, base_version=3, wait=0)
    _, sent = tensorfile.decode(script.requests[0].content)
    assert sent["base_version"] == "3"
    assert sent["wait"] == "0.0"
    assert (result.staleness, result.contributors, result.status) == (2, 3, "applied")
    script = Script([binary_answer(meta)])
    with sync_client(script) as client:
        plain = client.step("s1", GRADS)
    _, sent = tensorfile.decode(script.requests[0].content)
    assert "base_version" not in sent
    assert "wait" not in sent
    assert (plain.staleness, plain.contributors) == (None, 1)  # a server without them


def test_bad_base_version_and_wait_are_refused_before_sending() -> None:
    script = Script([step_json()])
    with sync_client(script) as client:
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="base_version"):
                client.step("s1", GRADS, base_version=bad)  # type: ignore[arg-type]
        for wait in (-1.0, 61.0, math.nan):
            with pytest.raises(ValueError, match="wait"):
                client.step("s1", GRADS, wait=wait)
    assert script.requests == []


# --- a pending push ------------------------------------------------------------------------


def check_polled(script: Script, result: StepResult) -> None:
    assert result.status == "applied"
    assert (result.step, result.version, result.wait_for) == (5, 5, 5)
    assert math.isnan(result.lr)  # a params read carries no rate
    assert (result.staleness, result.contributors, result.accumulate) == (0, 2, 2)
    assert result.params is not None
    np.testing.assert_array_equal(result.params["x"], [1.0, 2.0, 3.0])
    polls = script.requests[1:]
    assert len(polls) == 2
    for poll in polls:
        assert poll.method == "GET"
        assert poll.url.path == "/v1/sessions/s1/params"
        assert dict(poll.url.params) == {"min_version": "5", "timeout": "30.0"}
        assert read_timeout(poll) >= 30.0 + WAIT_MARGIN


def test_pending_push_polls_until_applied() -> None:
    # binary asked: the 202 comes as JSON all the same; then 408 (not yet), then the params
    script = Script([pending(), problem(408, "wait-timeout", version=4), params_json(5, 5)])
    with sync_client(script) as client:
        result = client.step("s1", GRADS, base_version=4, wait=1.0)
    check_polled(script, result)
    assert script.requests[0].headers["accept"] == "application/octet-stream"


@pytest.mark.asyncio
async def test_pending_push_polls_until_applied_async() -> None:
    script = Script([pending(), problem(408, "wait-timeout", version=4), params_json(5, 5)])
    async with async_client(script, binary=False) as client:
        result = await client.step("s1", GRADS, base_version=4)
    check_polled(script, result)


def test_pending_push_with_return_none_gives_no_params() -> None:
    script = Script([pending(), params_json(5, 5)])
    with sync_client(script) as client:
        result = client.step("s1", GRADS, base_version=4, return_="none")
    assert result.status == "applied"
    assert result.params is None


def test_block_false_returns_the_pending_result() -> None:
    replay = pending(7, count=2, k=3)
    replay.headers["Idempotent-Replayed"] = "true"
    script = Script([replay])
    with sync_client(script) as client:
        result = client.step("s1", GRADS, base_version=7, block=False)
    assert len(script.requests) == 1
    assert result.status == "pending"
    assert (result.version, result.wait_for, result.pending, result.accumulate) == (7, 8, 2, 3)
    assert (result.step, result.contributors, result.params) == (-1, 0, None)
    assert math.isnan(result.lr)
    assert result.replayed


@pytest.mark.asyncio
async def test_block_timeout_raises_a_timeout_error() -> None:
    script = Script([pending(), problem(408, "wait-timeout", version=4)])
    now = [0.0]

    def clock() -> float:
        now[0] += 20.0  # every look at the clock: 20 s later
        return now[0]

    with sync_client(script) as client:
        client._clock = clock
        with pytest.raises(TimeoutError, match=r"block_timeout=50\.0") as info:
            client.step("s1", GRADS, base_version=4, block_timeout=50.0)
    assert not isinstance(info.value, WaitTimeoutError)
    polls = script.requests[1:]
    assert [p.url.params["timeout"] for p in polls] == ["30.0", "30.0", "10.0"]  # what is left
    script = Script([pending(), problem(408, "wait-timeout", version=4)])
    async with async_client(script) as aclient:
        with pytest.raises(TimeoutError):
            await aclient.step("s1", GRADS, base_version=4, block_timeout=0)
    assert [p.url.params["timeout"] for p in script.requests[1:]] == ["0.0"]


# --- refusals ------------------------------------------------------------------------------


def test_a_stale_gradient_is_not_retried() -> None:
    script = Script([problem(409, "stale-gradient", version=9, base_version=6), step_json()])
    sleep = FakeSleep()
    with (
        OptimizerClient("http://t", transport=script.sync(), sleep=sleep.sync) as client,
        pytest.raises(StaleGradientError) as info,
    ):
        client.step("s1", GRADS, base_version=6)
    assert len(script.requests) == 1
    assert sleep.waits == []
    exc = info.value
    assert isinstance(exc, ConflictError)
    assert exc.stale
    assert not exc.in_flight
    assert not exc.version_conflict
    assert not exc.range_test_over
    assert (exc.current_version, exc.base_version) == (9, 6)
    assert exc.members == {"version": 9, "base_version": 6}
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is StaleGradientError
    assert again.current_version == 9


@pytest.mark.asyncio
async def test_a_stale_gradient_is_not_retried_async() -> None:
    script = Script([problem(409, "stale-gradient", version=3, base_version=1), step_json()])
    async with async_client(script) as client:
        with pytest.raises(StaleGradientError) as info:
            await client.step("s1", GRADS, base_version=1)
    assert info.value.current_version == 3
    assert len(script.requests) == 1


def test_range_test_over_is_not_retried() -> None:
    script = Script([problem(409, "range-test-over"), step_json()])
    with sync_client(script) as client, pytest.raises(RangeTestOverError) as info:
        client.step("s1", GRADS, loss=1.0)
    assert info.value.range_test_over
    assert len(script.requests) == 1


def test_problem_types_choose_the_class() -> None:
    def error(status: int, slug: str, **members: Any) -> OptserveError:
        answer = problem(status, slug, **members)
        return error_for_status(status, answer.content, answer.headers)

    assert type(error(409, "no-average")) is NoAverageError
    assert type(error(409, "no-range-test")) is NoRangeTestError
    assert type(error(409, "version-conflict")) is ConflictError
    timeout = error(408, "wait-timeout", version=4)
    assert type(timeout) is WaitTimeoutError
    assert isinstance(timeout, TimeoutError)
    assert isinstance(timeout, WaitTimeoutError)
    assert timeout.current_version == 4
    # a type that belongs to another status does not change the status's class
    assert type(error(422, "stale-gradient")).__name__ == "ValidationError"
    stale = error(409, "stale-gradient")  # without its members
    assert isinstance(stale, StaleGradientError)
    assert (stale.current_version, stale.base_version) == (None, None)


# --- params, metrics, history --------------------------------------------------------------


def test_get_params_query_and_averages() -> None:
    script = Script([params_json(8, 9, average="ema", averaged_steps=8)])
    with sync_client(script, binary=False, timeout=5.0) as client:
        got = client.get_params("s1", average="ema", min_version=9, timeout=45)
    request = script.requests[0]
    assert dict(request.url.params) == {"average": "ema", "min_version": "9", "timeout": "45.0"}
    assert read_timeout(request) == 45 + WAIT_MARGIN
    assert (got.step, got.version, got.average, got.averaged_steps) == (8, 9, "ema", 8)
    meta = {"step": "3", "version": "3", "average": "swa", "averaged_steps": "2"}
    script = Script([binary_answer(meta), binary_answer({"step": "3", "version": "3"})])
    with sync_client(script, timeout=5.0) as client:
        got = client.get_params("s1", average="swa")
        plain = client.get_params("s1", min_version=3)
    assert (got.average, got.averaged_steps) == ("swa", 2)
    assert (plain.average, plain.averaged_steps) == (None, None)
    assert dict(script.requests[0].url.params) == {"average": "swa"}
    assert read_timeout(script.requests[0]) == 5.0
    assert read_timeout(script.requests[1]) == 30.0 + WAIT_MARGIN  # the server's default wait
    assert script.requests[1].url.query == b"min_version=3"


def test_get_params_not_reached_is_a_wait_timeout_error() -> None:
    script = Script([problem(408, "wait-timeout", version=2)])
    with sync_client(script) as client, pytest.raises(WaitTimeoutError) as info:
        client.get_params("s1", min_version=3, timeout=1)
    assert info.value.current_version == 2
    assert len(script.requests) == 1  # a direct call does not repeat it


def test_metrics_reuse_one_key_across_retries() -> None:
    answer = httpx.Response(200, json={"step": 4, "version": 4, "lr": 0.05, "observed": True})
    script = Script(
        [httpx.ReadTimeout, problem_response(503, headers={"Retry-After": "0"}), answer]
    )
    with sync_client(script) as client:
        result = client.post_metrics("s1", 0.42)
    assert result == MetricsResult(step=4, version=4, lr=0.05, observed=True)
    keys = script.header("Idempotency-Key")
    assert len(keys) == 3
    assert keys[0] is not None
    assert uuid.UUID(keys[0]).version == 4
    assert keys == [keys[0]] * 3
    assert [json.loads(r.content) for r in script.requests] == [{"loss": 0.42}] * 3
    assert script.requests[0].url.path == "/v1/sessions/s1/metrics"
    with sync_client(Script([answer])) as client:
        client.post_metrics("s1", 1.0, idempotency_key="mine")
        with pytest.raises(ValueError, match="finite"):
            client.post_metrics("s1", math.inf)


@pytest.mark.asyncio
async def test_metrics_and_history_async() -> None:
    answer = httpx.Response(200, json={"step": 4, "version": 4, "lr": 0.05, "observed": False})
    history = httpx.Response(200, json={"limit": 10, "entries": []})
    script = Script([problem_response(429, headers={"Retry-After": "0"}), answer, history])
    async with async_client(script) as client:
        assert (await client.post_metrics("s1", 0.3)).observed is False
        assert await client.history("s1", limit=5) == []
    keys = script.header("Idempotency-Key")
    assert keys[0] == keys[1]
    assert script.requests[2].url.params["limit"] == "5"


def test_history_entries() -> None:
    body = {
        "limit": 1000,
        "entries": [
            {
                "kind": "step",
                "step": 12,
                "version": 12,
                "time": 1763740000.5,
                "lr": 0.01,
                "loss": 0.42,
                "grad_norm": 1.3,
                "update_norm": 0.013,
                "skipped": False,
                "staleness": 0,
                "contributors": 1,
            },
            {
                "kind": "metrics",
                "step": 11,
                "version": 11,
                "time": 1763739999.9,
                "lr": 0.01,
                "loss": 0.45,
            },
            {
                "kind": "step",
                "step": 11,
                "version": 11,
                "time": 1.0,
                "lr": 0.01,
                "loss": None,
                "grad_norm": None,
                "update_norm": 0.0,
                "skipped": True,
            },
        ],
    }
    script = Script([httpx.Response(200, json=body)])
    with sync_client(script) as client:
        entries = client.history("s1")
    assert script.requests[0].url.params["limit"] == "100"
    assert entries[0] == HistoryEntry(
        "step", 12, 12, 1763740000.5, 0.01, 0.42, 1.3, 0.013, False, 0, 1
    )
    assert entries[1] == HistoryEntry("metrics", 11, 11, 1763739999.9, 0.01, 0.45)
    assert (entries[2].grad_norm, entries[2].skipped, entries[2].staleness) == (None, True, None)


# --- the range test and plots --------------------------------------------------------------

LR_FINDER = {
    "config": {"start_lr": 1e-07, "end_lr": 10.0, "num_steps": 100, "mode": "exp",
               "smooth_f": 0.05, "diverge_th": 5.0},
    "lrs": [1e-7, 2e-7], "losses": [0.9, 0.8], "smoothed": [0.9, 0.895], "best_loss": 0.895,
    "done": True, "stop_reason": "diverged", "nonfinite_lr": None, "next_lr": None,
    "suggestions": {
        "steepest": {"method": "steepest", "lr": 0.065, "index": 41, "loss": 0.9,
                     "reason": None, "reference": "pytorch-lr-finder"},
        "valley": {"method": "valley", "lr": None, "reason": "needs at least 1 point",
                   "reference": "fastai"},
    },
}  # fmt: skip


def test_lr_finder_result() -> None:
    script = Script([httpx.Response(200, json=LR_FINDER)])
    with sync_client(script) as client:
        result = client.lr_finder("s1")
    assert script.requests[0].url.path == "/v1/sessions/s1/lr-finder"
    assert isinstance(result, LRFinderResult)
    assert result.config["num_steps"] == 100
    assert (result.lrs, result.losses, result.smoothed) == ([1e-7, 2e-7], [0.9, 0.8], [0.9, 0.895])
    assert (result.best_loss, result.done, result.stop_reason) == (0.895, True, "diverged")
    assert (result.nonfinite_lr, result.next_lr, result.session_id) == (None, None, None)
    assert result.suggestions["steepest"] == Suggestion(
        "steepest", 0.065, 41, 0.9, None, "pytorch-lr-finder"
    )
    valley = result.suggestions["valley"]
    assert (valley.lr, valley.index, valley.reason) == (None, None, "needs at least 1 point")
    script = Script([problem(409, "no-range-test")])
    with sync_client(script) as client, pytest.raises(NoRangeTestError):
        client.lr_finder("s1")


def png_response() -> httpx.Response:
    return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})


def test_png_calls() -> None:
    script = Script([png_response()])
    schedule = {"name": "step", "step_size": 3}
    with sync_client(script) as client:
        assert client.lr_finder_png("s1") == PNG
        assert client.schedule_png("s1") == PNG
        assert client.schedule_png("s1", steps=500) == PNG
        assert client.preview_schedule_png(schedule, 0.1, 10, current_step=4) == PNG
        assert client.preview_schedule_png(schedule, lr=0.1, steps=10) == PNG
    first, sched, sched_500, preview, preview_plain = script.requests
    assert (first.method, first.url.path) == ("GET", "/v1/sessions/s1/lr-finder.png")
    assert all(r.headers["accept"] == "image/png" for r in script.requests)
    assert (sched.url.path, sched.url.query) == ("/v1/sessions/s1/schedule.png", b"")
    assert sched_500.url.params["steps"] == "500"
    assert (preview.method, preview.url.path) == ("POST", "/v1/schedules/preview.png")
    assert json.loads(preview.content) == {
        "schedule": schedule, "lr": 0.1, "steps": 10, "current_step": 4,
    }  # fmt: skip
    assert "current_step" not in json.loads(preview_plain.content)
    html = httpx.Response(200, text="<html>", headers={"Content-Type": "text/html"})
    with sync_client(Script([html])) as client, pytest.raises(OptserveError, match="not a PNG"):
        client.lr_finder_png("s1")


@pytest.mark.asyncio
async def test_png_and_lr_finder_async() -> None:
    script = Script([png_response(), png_response(), png_response(),
                     httpx.Response(200, json=LR_FINDER)])  # fmt: skip
    async with async_client(script) as client:
        assert await client.lr_finder_png("s1") == PNG
        assert await client.schedule_png("s1", 20) == PNG
        assert await client.preview_schedule_png({"name": "constant"}, 0.1, 5) == PNG
        assert (await client.lr_finder("s1")).stop_reason == "diverged"


# --- creating sessions ---------------------------------------------------------------------

NEW_FIELDS: dict[str, Any] = {
    "lr_finder": {"num_steps": 50},
    "ema": {"decay": 0.99},
    "swa": {"start": 10, "every": 2},
    "consistency": "sync",
    "history": 50,
}


def created(**overrides: Any) -> httpx.Response:
    doc = session_doc(
        lr_finder={"start_lr": 1e-7, "end_lr": 10.0, "num_steps": 50},
        ema={"decay": 0.99, "bias_correction": True},
        swa={"start": 10, "every": 2},
        consistency={"mode": "sync", "accumulate": 2, "reduce": "mean"},
        history=50,
        pending={"base_version": 0, "count": 0, "accumulate": 2},
        **overrides,
    )
    return httpx.Response(201, json=doc)


def test_create_with_the_new_fields_in_json() -> None:
    script = Script([created()])
    with sync_client(script, binary=False) as client:
        session = client.create_session(GRADS, {"name": "sgd", "lr": 0.1}, **NEW_FIELDS)
    body = json.loads(script.requests[0].content)
    assert body["consistency"] == {"mode": "sync"}  # the short form spelled out
    for name in ("lr_finder", "ema", "swa", "history"):
        assert body[name] == NEW_FIELDS[name]
    assert session.sync
    assert session.history == 50
    assert session.ema == {"decay": 0.99, "bias_correction": True}
    assert session.swa == {"start": 10, "every": 2}
    assert session.lr_finder is not None
    assert session.lr_finder["num_steps"] == 50
    assert session.pending == {"base_version": 0, "count": 0, "accumulate": 2}


@pytest.mark.asyncio
async def test_create_with_the_new_fields_in_binary() -> None:
    script = Script([created(lr=None)])
    async with async_client(script) as client:
        session = await client.create_session(
            GRADS, {"name": "sgd"}, dtype="float64", **{**NEW_FIELDS, "consistency": None}
        )
    _, meta = tensorfile.decode(script.requests[0].content)
    assert json.loads(meta["lr_finder"]) == {"num_steps": 50}
    assert json.loads(meta["ema"]) == {"decay": 0.99}
    assert json.loads(meta["swa"]) == {"start": 10, "every": 2}
    assert meta["history"] == "50"
    assert "consistency" not in meta  # not given: not sent
    assert math.isnan(session.lr)  # a range test that is over has no next rate


def test_an_old_server_document() -> None:
    script = Script([httpx.Response(200, json=session_doc())])
    with sync_client(script) as client:
        session = client.get_session("s1")
    assert (session.lr_finder, session.ema, session.swa, session.consistency) == (None,) * 4
    assert (session.history, session.pending, session.sync) == (None, None, False)


# --- lr_find against a fake range-test server ----------------------------------------------

X = np.random.default_rng(0).standard_normal((32, 4))
Y = X @ np.array([1.0, -2.0, 0.5, 3.0])


class LeastSquares:
    """The loss and gradient of `mean((X w - y)^2)`; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        self.calls += 1
        w = np.asarray(p["w"], dtype=np.float64)
        r = X @ w - Y
        return float(r @ r / len(Y)), {"w": 2 * X.T @ r / len(Y)}


def fake_client(server: FakeRangeTestServer, **kwargs: Any) -> OptimizerClient:
    return OptimizerClient("http://optserve.test", transport=server.transport(), **kwargs)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_lr_find_diverges_without_wasting_a_step(binary: bool) -> None:
    server = FakeRangeTestServer()
    f = LeastSquares()
    with fake_client(server, binary=binary) as client:
        result = lr_find(client, {"w": np.zeros(4)}, f, num_steps=100, dtype="float64")
    assert result.done
    assert result.stop_reason == "diverged"
    assert 17 < len(result.lrs) < 100
    assert f.calls == server.steps == len(result.lrs)  # every loss computed was recorded
    assert result.session_id == "s1"
    assert server.sessions == {}  # deleted
    assert server.requests[-2:] == [("GET", "/v1/sessions/s1/lr-finder"),
                                    ("DELETE", "/v1/sessions/s1")]  # fmt: skip
    assert result.suggestions["steepest"].lr is not None
    assert result.config["num_steps"] == 100


def test_lr_find_completes_and_keeps_the_session() -> None:
    server = FakeRangeTestServer()
    f = LeastSquares()
    with fake_client(server) as client:
        result = lr_find(
            client,
            {"w": np.zeros(4)},
            f,
            start_lr=1e-6,
            end_lr=1e-3,
            num_steps=20,
            mode="linear",
            keep_session=True,
        )
    assert (result.done, result.stop_reason, len(result.lrs)) == (True, "completed", 20)
    assert f.calls == server.steps == 20
    assert server.sessions["s1"].config == {
        "start_lr": 1e-6, "end_lr": 1e-3, "num_steps": 20, "mode": "linear",
        "smooth_f": 0.05, "diverge_th": 5.0,
    }  # fmt: skip
    assert result.lrs[0] == 1e-6
    assert result.lrs[-1] == pytest.approx(1e-3)
    # the losses fell: the params came back from each step
    assert result.losses[-1] < result.losses[0]


def test_lr_find_when_the_server_stops_first() -> None:
    """The server's rule is the authority: here its divergence threshold is lower than
    the one the loop was told (so the server ends it first, and says so with a 409)."""
    server = FakeRangeTestServer()
    original = server._observe

    def strict(session: Any, lr: float, loss: float) -> None:
        session.config = {**session.config, "diverge_th": 1.01}
        original(session, lr, loss)

    server._observe = strict  # type: ignore[method-assign]
    f = LeastSquares()
    with fake_client(server) as client:
        result = lr_find(client, {"w": np.zeros(4)}, f, start_lr=1e-3, end_lr=100.0)
    assert result.stop_reason == "diverged"
    assert f.calls == server.steps == len(result.lrs) + 1  # one refused: the 409


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_lr_find_with_a_nonfinite_loss(binary: bool) -> None:
    server = FakeRangeTestServer()
    f = LeastSquares()

    def nan_at_5(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = f(p)
        return (math.nan if f.calls == 6 else loss), grads

    with fake_client(server, binary=binary) as client:
        if binary:
            result = lr_find(client, {"w": np.zeros(4)}, nan_at_5, num_steps=20)
        else:
            with pytest.warns(RuntimeWarning, match="non-finite loss"):
                result = lr_find(client, {"w": np.zeros(4)}, nan_at_5, num_steps=20)
    assert (result.done, result.stop_reason) == (True, "diverged")
    assert len(result.lrs) == 5
    assert result.nonfinite_lr == pytest.approx(1e-7 * (1e8) ** (5 / 19))
    assert result.next_lr is None
    assert server.steps == (6 if binary else 5)  # JSON cannot carry it: not sent
    assert server.sessions == {}


def test_lr_find_deletes_its_session_on_an_error() -> None:
    server = FakeRangeTestServer()

    def broken(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        raise RuntimeError("the model broke")

    with fake_client(server) as client, pytest.raises(RuntimeError, match="model broke"):
        lr_find(client, {"w": np.zeros(4)}, broken)
    assert server.sessions == {}
    assert server.requests[-1] == ("DELETE", "/v1/sessions/s1")


def test_lr_find_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    server = FakeRangeTestServer()
    with fake_client(server) as client:
        result = lr_find(client, {"w": np.zeros(4)}, LeastSquares(), num_steps=17, end_lr=1e-4,
                         progress=True)  # fmt: skip
    assert result.stop_reason == "completed"
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with (
        fake_client(server) as client,
        pytest.raises(ImportError, match="pip install tqdm"),
    ):
        lr_find(client, {"w": np.zeros(4)}, LeastSquares(), progress=True)
    assert server.sessions == {}
    assert server.requests[-1][1] == "/v1/sessions/s1"  # nothing after the first test
