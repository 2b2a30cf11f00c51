"""The API's numbers are the core's: optimizers, schedules (lr per step and in GET),
plateau driven by reported losses, preview, skipped non-finite steps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from service.core.schedules import parse_schedule
from tests.api.support import BINARY, Api, core_run, decode, encode

pytestmark = pytest.mark.asyncio


def _problem(
    shapes: dict[str, tuple[int, ...]], steps: int, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s).tolist() for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s).tolist() for n, s in shapes.items()} for _ in range(steps)]
    return params, grads


CASES = [
    ({"name": "adam", "lr": 0.01}, "float32"),
    ({"name": "adam", "lr": 0.01, "betas": [0.8, 0.99], "amsgrad": True}, "float64"),
    ({"name": "adam", "lr": 0.01, "weight_decay": 0.1}, "float64"),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, "float32"),
    ({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}, "float64"),
    ({"name": "rmsprop", "lr": 0.01, "momentum": 0.5}, "float32"),
    ({"name": "lamb", "lr": 0.01}, "float64"),
]


@pytest.mark.parametrize(("optimizer", "dtype"), CASES)
async def test_steps_equal_the_core(api: Api, optimizer: dict[str, Any], dtype: str) -> None:
    params, grads = _problem({"w": (4, 3), "b": (3,), "s": ()}, steps=5)
    sid = (await api.create({"optimizer": optimizer, "params": params, "dtype": dtype}))["id"]
    expected, lrs = core_run(optimizer, params, grads, dtype)
    for t, g in enumerate(grads):
        r = await api.step(sid, {"grads": g})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["step"], body["version"], body["lr"]) == (t + 1, t + 1, lrs[t])
        for n in params:
            got = np.asarray(body["params"][n], dtype=dtype)
            np.testing.assert_array_equal(got, expected[t][n])  # exact, JSON included
    tensors = await api.params(sid)
    for n in params:
        assert tensors[n].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(tensors[n], expected[-1][n])


async def test_binary_steps_are_bit_exact(api: Api) -> None:
    optimizer = {"name": "adam", "lr": 0.003, "decoupled_weight_decay": True, "weight_decay": 0.01}
    params, grads = _problem({"w": (50, 20)}, steps=4, seed=3)
    sid = (await api.create({"optimizer": optimizer, "params": params}))["id"]
    expected, _ = core_run(optimizer, params, grads)
    for t, g in enumerate(grads):
        r = await api.client.post(
            f"/v1/sessions/{sid}/step",
            content=encode({"w": np.asarray(g["w"], np.float32)}),
            headers={"Content-Type": BINARY, "Accept": BINARY},
        )
        tensors, _ = decode(r.content)
        assert tensors["w"].tobytes() == expected[t]["w"].tobytes()


SCHEDULES = [
    {"name": "cosine_decay", "decay_steps": 10, "warmup": {"steps": 3, "start_factor": 0.1}},
    {"name": "step", "step_size": 2, "gamma": 0.5, "warmup": {"steps": 2}},
    {"name": "one_cycle", "max_lr": 0.5, "total_steps": 12},
    {"name": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3},
    {"name": "exponential", "gamma": 0.9},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["name"])
async def test_lr_per_step_and_in_get(api: Api, schedule: dict[str, Any]) -> None:
    """A step reports the rate it used (schedule at t); GET the rate the next will use.
    Schedules that cycle the momentum hand it to SGD's momentum, as torch does."""
    optimizer = {"name": "sgd", "lr": 0.2, "momentum": 0.9}
    params, grads = _problem({"w": (3,)}, steps=8, seed=1)
    doc = await api.create({"optimizer": optimizer, "schedule": schedule, "params": params})
    sched = parse_schedule(schedule)
    assert doc["lr"] == sched.lr(0, 0.2)
    expected, lrs = core_run(optimizer, params, grads, schedule=schedule)
    assert lrs == [sched.lr(t, 0.2) for t in range(8)]
    for t, g in enumerate(grads):
        body = (await api.step(doc["id"], {"grads": g})).json()
        assert body["lr"] == lrs[t]
        np.testing.assert_array_equal(np.asarray(body["params"]["w"], np.float32), expected[t]["w"])
        assert (await api.get(doc["id"]))["lr"] == sched.lr(t + 1, 0.2)


async def test_cycled_beta1_for_adam(api: Api) -> None:
    optimizer = {"name": "adam", "lr": 0.01}
    schedule = {"name": "one_cycle", "max_lr": 0.05, "total_steps": 6}
    params, grads = _problem({"w": (5,)}, steps=6, seed=2)
    sid = (await api.create({"optimizer": optimizer, "schedule": schedule, "params": params}))["id"]
    expected, _ = core_run(optimizer, params, grads, schedule=schedule)
    for g in grads:
        r = await api.step(sid, {"grads": g})
    np.testing.assert_array_equal(
        np.asarray(r.json()["params"]["w"], np.float32), expected[-1]["w"]
    )


async def test_plateau_is_advanced_by_losses(api: Api) -> None:
    optimizer = {"name": "sgd", "lr": 1.0}
    schedule = {"name": "plateau", "patience": 1, "factor": 0.5}
    params, grads = _problem({"w": (2,)}, steps=8, seed=4)
    losses: list[float | None] = [1.0, 0.5, 0.6, 0.7, None, 0.8, 0.9, 1.0]
    sid = (await api.create({"optimizer": optimizer, "schedule": schedule, "params": params}))["id"]
    expected, lrs = core_run(optimizer, params, grads, schedule=schedule, losses=losses)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]  # losses drive it; None does not
    for t, (g, loss) in enumerate(zip(grads, losses, strict=True)):
        body: dict[str, Any] = {"grads": g}
        if loss is not None:
            body["loss"] = loss
        r = await api.step(sid, body)
        assert r.json()["lr"] == lrs[t], t
    np.testing.assert_array_equal(
        np.asarray(r.json()["params"]["w"], np.float32), expected[-1]["w"]
    )
    assert (await api.get(sid))["lr"] == 0.25


async def test_plateau_binary_loss_in_metadata(api: Api) -> None:
    schedule = {"name": "plateau", "patience": 0, "factor": 0.1}
    sid = (
        await api.create(
            {"optimizer": {"name": "sgd", "lr": 1.0}, "schedule": schedule, "params": {"x": [0.0]}}
        )
    )["id"]
    for loss in ("1.0", "2.0"):
        r = await api.client.post(
            f"/v1/sessions/{sid}/step",
            content=encode({"x": np.array([1.0], np.float32)}, {"loss": loss}),
            headers={"Content-Type": BINARY},
        )
        assert r.status_code == 200, r.text
    assert (await api.get(sid))["lr"] == pytest.approx(0.1)


async def test_nonfinite_skip(api: Api) -> None:
    doc = await api.create(
        {"optimizer": {"name": "adam", "lr": 0.1}, "params": {"w": [1.0, 2.0]}, "nonfinite": "skip"}
    )
    sid = doc["id"]
    assert doc["nonfinite"] == "skip"
    r = await api.step(sid, {"grads": {"w": [1.0, 1.0]}})
    after_one = r.json()["params"]
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode({"w": np.array([np.nan, 1.0], np.float32)}, {"loss": "nan"}),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["skipped"] is True
    assert body["grad_norm"] is None
    assert (body["step"], body["version"]) == (1, 2)
    assert body["params"] == after_one
    # JSON cannot hold NaN, but 1e39 overflows float32: skipped as well
    r = await api.step(sid, {"grads": {"w": [1e39, 0.0]}, "return": "updates"})
    assert r.json()["skipped"] is True
    assert r.json()["updates"] == {"w": [0.0, 0.0]}
    doc = await api.get(sid)
    assert (doc["step"], doc["version"], doc["skipped"]) == (1, 3, 2)
    # the next finite step is the second Adam step
    r = await api.step(sid, {"grads": {"w": [1.0, 1.0]}})
    expected, _ = core_run({"name": "adam", "lr": 0.1}, {"w": [1.0, 2.0]}, [{"w": [1.0, 1.0]}] * 2)
    np.testing.assert_array_equal(np.asarray(r.json()["params"]["w"], np.float32), expected[1]["w"])
    assert (r.json()["step"], r.json()["version"]) == (2, 4)


async def test_clipping_transforms(api: Api) -> None:
    doc = await api.create(
        {
            "optimizer": {"name": "sgd", "lr": 1.0},
            "params": {"a": [0.0, 0.0], "b": [0.0]},
            "transforms": {"clip_norm": 1.0},
            "dtype": "float64",
        }
    )
    assert doc["transforms"]["clip_norm"] == 1.0
    r = await api.step(doc["id"], {"grads": {"a": [3.0, 0.0], "b": [4.0]}})
    body = r.json()
    assert body["grad_norm"] == 5.0
    assert body["clipped"] is True
    coef = 1.0 / (5.0 + 1e-6)
    assert body["params"] == {"a": [-3.0 * coef, 0.0], "b": [-4.0 * coef]}


PREVIEWS = [
    {"name": "step", "step_size": 30, "gamma": 0.1},
    {"name": "cosine_decay", "decay_steps": 50, "warmup": {"steps": 10, "start_factor": 0.25}},
    {"name": "one_cycle", "max_lr": 1.0, "total_steps": 100},
    {"name": "noisy_linear_cosine_decay", "decay_steps": 80},
]


@pytest.mark.parametrize("schedule", PREVIEWS, ids=lambda s: s["name"])
async def test_preview_equals_the_core(api: Api, schedule: dict[str, Any]) -> None:
    r = await api.client.post(
        "/v1/schedules/preview", json={"lr": 0.1, "schedule": schedule, "steps": 100}
    )
    assert r.status_code == 200, r.text
    sched = parse_schedule(schedule)
    assert r.json()["lrs"] == sched.lrs(100, 0.1).tolist()
    momenta = sched.momenta(100)
    assert r.json()["momenta"] == (None if momenta is None else momenta.tolist())
    assert all(math.isfinite(x) for x in r.json()["lrs"])


async def test_preview_is_what_a_session_uses(api: Api) -> None:
    schedule = {"name": "exponential", "gamma": 0.5, "warmup": {"steps": 2}}
    r = await api.client.post(
        "/v1/schedules/preview", json={"lr": 0.4, "schedule": schedule, "steps": 5}
    )
    lrs = r.json()["lrs"]
    sid = (
        await api.create(
            {"optimizer": {"name": "sgd", "lr": 0.4}, "schedule": schedule, "params": {"x": 0.0}}
        )
    )["id"]
    used = [(await api.step(sid, {"grads": {"x": 1.0}})).json()["lr"] for _ in range(5)]
    assert used == lrs
