"""The worst input a live server accepts must not break a session (issue 12, items 2
and 3): finite, allowed values whose results are not finite (SGD with `lr: 1e308` and a
gradient of 10, Adam / RMSprop / Adadelta with `eps: 0` and a zero gradient, weight
decay of 1e308, gradients at the largest float whose norm overflows), rates that grow
(`exponential` with `gamma: 10`, refused at create or harmless), the largest rates a
schedule allows, and sync accumulations that overflow.

Every request is answered (2xx, or 4xx problem+json that changes nothing; never 5xx,
with /healthz answering meanwhile), and afterwards the session document, its params
(finite numbers, never `null`), its history, its state export, its schedule plot and the
tenant's listing read (200), and the session's own export imports (as a new session
and over itself).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.hostile.support import (
    PARAMS,
    all_finite,
    assert_not_5xx,
    assert_readable,
    assert_unchanged,
    snapshot,
    while_probing_health,
)
from tests.support.live_server import LiveServer

BIG = 1.7e308


def grads(value: float) -> dict[str, Any]:
    return {"w": [[value, value], [value, value]], "b": [value]}


#: (session, the step bodies sent one after the other)
WORST: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "sgd lr 1e308, grad 10": (
        {"optimizer": {"name": "sgd", "lr": 1e308}, "dtype": "float64"},
        [{"grads": grads(10.0)}] * 3,
    ),
    "sgd lr 1e308, grad 10, float32": (
        {"optimizer": {"name": "sgd", "lr": 1e308}},
        [{"grads": grads(10.0)}] * 3,
    ),
    "sgd lr 1e308, grad 10, nonfinite skip": (
        {"optimizer": {"name": "sgd", "lr": 1e308}, "nonfinite": "skip", "dtype": "float64"},
        [{"grads": grads(10.0)}] * 3,
    ),
    "sgd lr 1.7e308 cosine, grad 1": (
        {
            "optimizer": {"name": "sgd", "lr": BIG},
            "schedule": {"name": "cosine", "T_max": 7},
            "dtype": "float64",
        },
        [{"grads": grads(1.0)}] * 4,
    ),
    "sgd lr 1.7e308 step schedule with warm-up": (
        {
            "optimizer": {"name": "sgd", "lr": BIG},
            "schedule": {"name": "step", "step_size": 2, "gamma": 0.5, "warmup": {"steps": 3}},
            "dtype": "float64",
        },
        [{"grads": grads(1.0)}] * 5,
    ),
    "sgd momentum, lr 1e30, grad 1e10, float32": (
        {"optimizer": {"name": "sgd", "lr": 1e30, "momentum": 0.9, "nesterov": True}},
        [{"grads": grads(1e10)}] * 3,
    ),
    "sgd weight_decay 1e308": (
        {"optimizer": {"name": "sgd", "lr": 1.0, "weight_decay": 1e308}, "dtype": "float64"},
        [{"grads": grads(1.0)}] * 3,
    ),
    "adam eps 0, zero grad": (
        {"optimizer": {"name": "adam", "lr": 0.01, "eps": 0.0}},
        [{"grads": grads(0.0)}] * 3,
    ),
    "adam eps 0, zero grad, nonfinite skip, ema": (
        {
            "optimizer": {"name": "adam", "lr": 0.01, "eps": 0.0},
            "nonfinite": "skip",
            "ema": {"decay": 0.9},
        },
        [{"grads": grads(0.0)}] * 3,
    ),
    "adam eps 0, amsgrad, zero grad, float64": (
        {
            "optimizer": {"name": "adam", "lr": 0.01, "eps": 0.0, "amsgrad": True},
            "dtype": "float64",
        },
        [{"grads": grads(0.0)}] * 2,
    ),
    "adam lr 1e308": (
        {"optimizer": {"name": "adam", "lr": 1e308}, "dtype": "float64"},
        [{"grads": grads(1.0)}] * 3,
    ),
    "rmsprop eps 0, zero grad": (
        {"optimizer": {"name": "rmsprop", "lr": 0.01, "eps": 0.0}},
        [{"grads": grads(0.0)}] * 2,
    ),
    "adadelta eps 0, zero grad": (
        {"optimizer": {"name": "adadelta", "lr": 1.0, "eps": 0.0}},
        [{"grads": grads(0.0)}] * 2,
    ),
    "adagrad eps 0, zero grad": (
        {"optimizer": {"name": "adagrad", "lr": 0.01, "eps": 0.0}},
        [{"grads": grads(0.0)}] * 2,
    ),
    "lion lr 1e308": (
        {"optimizer": {"name": "lion", "lr": 1e308}, "dtype": "float64"},
        [{"grads": grads(1.0)}] * 3,
    ),
    "grads at the largest float (norm overflows)": (
        {"optimizer": {"name": "sgd", "lr": 1e-300}, "dtype": "float64"},
        [{"grads": grads(BIG)}, {"grads": grads(-BIG)}],
    ),
    "grads at the largest float, clipped by norm": (
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "transforms": {"clip_norm": 1.0},
            "dtype": "float64",
        },
        [{"grads": grads(BIG)}] * 2,
    ),
    "grads over float32's largest, float32": (
        {"optimizer": {"name": "sgd", "lr": 0.1}},
        [{"grads": grads(1e39)}, {"grads": grads(3e38)}],
    ),
    "exponential gamma 10": (
        {"optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "exponential", "gamma": 10}},
        [{"grads": grads(1.0)}] * 5,
    ),
    "exponential gamma 10 until step 3, then cosine": (
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "schedule": {
                "name": "sequential",
                "schedulers": [
                    {"name": "exponential", "gamma": 10.0},
                    {"name": "cosine", "T_max": 10},
                ],
                "milestones": [3],
            },
        },
        [{"grads": grads(1.0)}] * 5,
    ),
    "one_cycle max_lr 1e308": (
        {
            "optimizer": {"name": "sgd", "lr": 1.0, "momentum": 0.9},
            "schedule": {"name": "one_cycle", "max_lr": 1e308, "total_steps": 50},
            "dtype": "float64",
        },
        [{"grads": grads(1.0)}] * 4,
    ),
    "plateau with losses of 1.7e308": (
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "schedule": {"name": "plateau", "patience": 0},
        },
        [{"grads": grads(1.0), "loss": BIG}, {"grads": grads(1.0), "loss": -BIG}] * 2,
    ),
    "sync accumulation of the largest floats": (
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "consistency": {"mode": "sync", "accumulate": 2},
            "dtype": "float64",
        },
        [{"grads": grads(BIG), "base_version": "@version"}] * 4,
    ),
    "lr range test to 1e308": (
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "lr_finder": {"start_lr": 1.0, "end_lr": 1e308, "num_steps": 17},
            "dtype": "float64",
        },
        [{"grads": grads(1.0), "loss": 1.0 + i} for i in range(8)],
    ),
}


@pytest.mark.parametrize("case", list(WORST))
def test_the_worst_accepted_input_leaves_a_readable_session(
    live: LiveServer, client: httpx.Client, case: str
) -> None:
    spec, steps = WORST[case]
    r = while_probing_health(
        live, lambda c: c.post("/v1/sessions", json={**spec, "params": PARAMS})
    )
    assert_not_5xx(r)
    if r.status_code != 201:  # refused at create: fine, as long as it is a problem
        assert client.get("/v1/sessions", params={"limit": 1000}).status_code == 200
        return
    sid = str(r.json()["id"])
    for body in steps:
        before = snapshot(client, sid)
        if body.get("base_version") == "@version":
            body = {**body, "base_version": before.version}
        r = while_probing_health(
            live, lambda c, body=body: c.post(f"/v1/sessions/{sid}/step", json=body)
        )
        assert_not_5xx(r)
        if r.status_code >= 400:
            assert_unchanged(client, sid, before)
        else:
            assert r.status_code in (200, 202), r.text
            answer = r.json()
            assert "lr" not in answer or all_finite(answer["lr"]), answer
            assert answer.get("grad_norm") is None or all_finite(answer["grad_norm"]), answer
            for name, value in (answer.get("params") or {}).items():
                assert all_finite(value), (name, answer)
    assert_readable(client, sid)
