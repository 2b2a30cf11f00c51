"""Both clients against real servers (`optserve serve` on the in-process store, and two
workers on Redis), in binary and JSON form: every call of the API, with the numbers the
core computes when run directly."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from clients import (
    AsyncOptimizerClient,
    NotFoundError,
    OptimizerClient,
    ParamsResult,
    SchedulePreview,
    Session,
    StepResult,
)
from tests.api.support import core_run
from tests.support.live_server import LiveServer

ADAM = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.01}
SCHEDULE = {"name": "cosine_decay", "decay_steps": 10, "warmup": {"steps": 2, "start_factor": 0.5}}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}

pytestmark = pytest.mark.asyncio


def tensors(seed: int, shapes: dict[str, tuple[int, ...]], dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


class Caller:
    """Calls a method of either client (awaiting the async one's), so that one scenario
    runs through both."""

    def __init__(self, client: OptimizerClient | AsyncOptimizerClient) -> None:
        self.client = client

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


@pytest.fixture(params=["memory", "redis-2-workers"])
def server(request: pytest.FixtureRequest) -> LiveServer:
    name = "redis_server" if request.param == "redis-2-workers" else "memory_server"
    live: LiveServer = request.getfixturevalue(name)
    assert live.proc.poll() is None, live.log_tail()
    return live


@pytest_asyncio.fixture(params=["sync-binary", "sync-json", "async-binary", "async-json"])
async def call(request: pytest.FixtureRequest, server: LiveServer) -> AsyncIterator[Caller]:
    kind, form = request.param.split("-")
    binary = form == "binary"
    if kind == "sync":
        with OptimizerClient(server.base_url, binary=binary) as client:
            yield Caller(client)
    else:
        async with AsyncOptimizerClient(server.base_url, binary=binary) as aclient:
            yield Caller(aclient)


def as_dtype(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """JSON answers are float64: the session's values, exactly, once cast back."""
    return {n: np.asarray(a).astype(dtype) for n, a in arrays.items()}


def assert_tensors_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name].astype(w.dtype), w, err_msg=name)


async def test_every_call_matches_the_core(call: Caller) -> None:
    binary = call.client.binary
    shapes = {"w": (3, 4), "b": (4,)}
    params = tensors(1, shapes, "float32")
    grads = [tensors(10 + t, shapes, "float32") for t in range(4)]
    losses = [0.9, 0.8, 0.7, 0.6]
    expected, lrs = core_run(ADAM, params, grads, "float32", SCHEDULE, losses)

    session = await call("create_session", params, ADAM, SCHEDULE, dtype="float32")
    assert isinstance(session, Session)
    assert (session.step, session.version, session.dtype) == (0, 0, "float32")
    assert session.shapes == shapes
    assert session.lr == lrs[0]
    assert session.optimizer["eps"] == 1e-8  # defaults filled
    assert session.optimizer["betas"] == [0.9, 0.99]
    assert session.schedule is not None
    assert session.schedule["name"] == "cosine_decay"
    assert session.doc["id"] == session.id
    again = await call("get_session", session.id)
    assert again == session

    previous = params
    for t, kind in enumerate(["params", "updates", "none", "params"]):
        result = await call("step", session.id, grads[t], loss=losses[t], return_=kind)
        assert isinstance(result, StepResult)
        assert (result.step, result.version, result.lr) == (t + 1, t + 1, lrs[t])
        assert not result.skipped
        assert not result.clipped
        assert not result.replayed
        assert result.grad_norm is not None
        assert result.grad_norm > 0
        if kind == "params":
            assert result.updates is None
            assert result.params is not None
            assert_tensors_equal(result.params, expected[t])
            if binary:
                assert all(a.dtype == np.float32 for a in result.params.values())
                assert all(a.flags.writeable for a in result.params.values())
        elif kind == "updates":
            assert result.params is None
            assert result.updates is not None
            want = {n: expected[t][n] - previous[n] for n in shapes}
            assert_tensors_equal(result.updates, want)
        else:
            assert result.params is None
            assert result.updates is None
        previous = expected[t]

    got = await call("get_params", session.id)
    assert isinstance(got, ParamsResult)
    assert (got.step, got.version) == (4, 4)
    assert_tensors_equal(got.params, expected[-1])
    doc = await call("get_session", session.id)
    assert (doc.step, doc.version) == (4, 4)

    preview = await call("preview_schedule", SCHEDULE, lr=ADAM["lr"], steps=4)
    assert isinstance(preview, SchedulePreview)
    assert preview.lrs == lrs
    assert preview.momenta is None

    await call("delete_session", session.id)
    with pytest.raises(NotFoundError):
        await call("get_session", session.id)
    with pytest.raises(NotFoundError):
        await call("delete_session", session.id)
    with pytest.raises(NotFoundError):
        await call("step", session.id, grads[0])


async def test_float64_scalars_and_momentum(call: Caller) -> None:
    params = {"x": np.array([1.0, -2.0, 3.0]), "bias": np.float64(0.5)}
    grads = [{"x": np.array([0.1 * t, -0.2, 0.3]), "bias": np.float64(0.01 * t)} for t in range(3)]
    expected, lrs = core_run(SGD, params, grads, "float64")
    session = await call("create_session", params, SGD, dtype=np.float64)
    assert session.dtype == "float64"
    assert session.shapes == {"x": (3,), "bias": ()}
    assert session.schedule is None
    for t, g in enumerate(grads):
        result = await call("step", session.id, g)
        assert result.lr == lrs[t]
        assert result.params["bias"].shape == ()
        assert_tensors_equal(result.params, expected[t])


async def test_preview_with_cycled_momentum(call: Caller) -> None:
    schedule = {"name": "one_cycle", "max_lr": 0.1, "total_steps": 10}
    preview = await call("preview_schedule", schedule, lr=0.01, steps=10)
    assert len(preview.lrs) == 10
    assert max(preview.lrs) == pytest.approx(0.1)
    assert preview.momenta is not None
    assert len(preview.momenta) == 10


async def test_clipping_and_nonfinite_skip(call: Caller) -> None:
    params = {"x": np.zeros(4)}
    session = await call(
        "create_session",
        params,
        {"name": "sgd", "lr": 1.0},
        dtype="float64",
        transforms={"clip_norm": 1.0},
        nonfinite="skip",
    )
    assert session.doc["nonfinite"] == "skip"
    result = await call("step", session.id, {"x": np.full(4, 3.0)})
    assert result.clipped
    assert result.grad_norm == pytest.approx(6.0)
    np.testing.assert_allclose(result.params["x"], np.full(4, -0.5), rtol=1e-6)  # torch: +1e-6
    bad = {"x": np.array([1.0, np.nan, 0.0, 0.0])}
    if call.client.binary:
        skipped = await call("step", session.id, bad)
        assert skipped.skipped
        assert skipped.grad_norm is None
        assert (skipped.step, skipped.version) == (1, 2)
        np.testing.assert_array_equal(skipped.params["x"], result.params["x"])
    else:  # JSON cannot carry NaN: refused before anything is sent
        with pytest.raises(ValueError, match="JSON cannot hold NaN"):
            await call("step", session.id, bad)
        assert (await call("get_session", session.id)).version == 1


async def test_skip_missing(call: Caller) -> None:
    params = {"a": np.array([1.0, 2.0]), "b": np.array([3.0])}
    session = await call("create_session", params, {"name": "sgd", "lr": 0.5}, dtype="float64")
    result = await call("step", session.id, {"a": np.array([1.0, 1.0])}, skip_missing=True)
    np.testing.assert_array_equal(result.params["a"], [0.5, 1.5])
    np.testing.assert_array_equal(result.params["b"], [3.0])
    assert result.step == 1
