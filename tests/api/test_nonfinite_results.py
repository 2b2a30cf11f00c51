"""A step whose RESULT would be non-finite is never committed (issue 12, item 2).

Finite, accepted input can still overflow: Adam with `eps: 0` over a zero gradient
divides 0 by 0; SGD with `lr: 1e308` and a gradient of 10 overflows. Such a step follows
the session's `nonfinite` policy, as a non-finite gradient does: refused with a 422
naming the tensors (nothing changes), or skipped (`skipped: true`, only the version
moves). Either way the session keeps finite params and state, stays readable, and its
own export imports. A range test takes a non-finite result as divergence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.api.support import BINARY, Api

pytestmark = pytest.mark.asyncio

ADAM_EPS0 = {"name": "adam", "lr": 0.1, "eps": 0.0}
SGD_HUGE = {"name": "sgd", "lr": 1e308}
# each: optimizer, dtype, params, grads that make the step overflow, the tensors named
OVERFLOWS = [
    (ADAM_EPS0, "float32", {"w": [1.0, 2.0], "b": [0.5]}, {"w": [0.0, 1.0], "b": [1.0]}, ["w"]),
    (ADAM_EPS0, "float64", {"w": [1.0]}, {"w": [0.0]}, ["w"]),
    # float32: the rate itself is inf, and inf * 0 is NaN in b
    (SGD_HUGE, "float32", {"w": [1.0], "b": [2.0]}, {"w": [10.0], "b": [0.0]}, ["w", "b"]),
    (SGD_HUGE, "float64", {"w": [[1.0, 2.0]]}, {"w": [[10.0, 10.0]]}, ["w"]),
    ({"name": "sgd", "lr": 1e38, "momentum": 0.9}, "float32", {"w": [1.0]}, {"w": [10.0]}, ["w"]),
]


async def _state_file_imports(api: Api, sid: str) -> None:
    exported = await api.client.get(f"/v1/sessions/{sid}/state")
    assert exported.status_code == 200, exported.text
    imported = await api.client.post(
        "/v1/sessions/import", content=exported.content, headers={"Content-Type": BINARY}
    )
    assert imported.status_code == 201, imported.text


@pytest.mark.parametrize(("optimizer", "dtype", "params", "grads", "names"), OVERFLOWS)
async def test_an_overflowing_step_is_refused(
    api: Api,
    optimizer: dict[str, Any],
    dtype: str,
    params: dict[str, Any],
    grads: dict[str, Any],
    names: list[str],
) -> None:
    sid = (await api.create({"optimizer": optimizer, "params": params, "dtype": dtype}))["id"]
    before = await api.params(sid)
    r = await api.step(sid, {"grads": grads})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert "non-finite" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [["body", "grads", n] for n in names]
    doc = await api.get(sid)
    assert (doc["step"], doc["version"], doc["skipped"]) == (0, 0, 0)
    after = await api.params(sid)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    await _state_file_imports(api, sid)
    # the session goes on with a sane gradient where the rate allows it
    listing = await api.client.get("/v1/sessions")
    assert listing.status_code == 200


@pytest.mark.parametrize(("optimizer", "dtype", "params", "grads", "names"), OVERFLOWS)
async def test_an_overflowing_step_is_skipped_when_the_session_says_so(
    api: Api,
    optimizer: dict[str, Any],
    dtype: str,
    params: dict[str, Any],
    grads: dict[str, Any],
    names: list[str],
) -> None:
    body = {"optimizer": optimizer, "params": params, "dtype": dtype, "nonfinite": "skip"}
    sid = (await api.create(body))["id"]
    before = await api.params(sid)
    r = await api.step(sid, {"grads": grads})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["skipped"], answer["step"], answer["version"]) == (True, 0, 1)
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(answer["params"][name], dtype), value)
        assert np.isfinite(answer["params"][name]).all()
    doc = await api.get(sid)
    assert (doc["step"], doc["version"], doc["skipped"]) == (0, 1, 1)
    await _state_file_imports(api, sid)


async def test_the_optimizer_state_is_checked_too(api: Api) -> None:
    """Adam's second moment overflows float32 ((1 - beta2) * grad**2 = 1e39 > 3.4e38)
    while the params stay finite: still refused, naming the array."""
    sid = (await api.create({"optimizer": {"name": "adam", "lr": 1e-3}, "params": {"w": [0.0]}}))[
        "id"
    ]
    r = await api.step(sid, {"grads": {"w": [1e21]}})
    assert r.status_code == 422, r.text
    assert "exp_avg_sq" in r.json()["detail"]
    assert (await api.get(sid))["version"] == 0


async def test_a_range_test_diverges_on_a_non_finite_result(api: Api) -> None:
    finder = {"start_lr": 1e300, "end_lr": 1e307, "num_steps": 20}
    body = {"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"w": [1.0]}, "lr_finder": finder}
    sid = (await api.create(body))["id"]
    r = await api.step(sid, {"grads": {"w": [1e10]}, "loss": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] is True
    result = (await api.client.get(f"/v1/sessions/{sid}/lr-finder")).json()
    assert (result["done"], result["stop_reason"]) == (True, "diverged")
    assert result["nonfinite_lr"] == 1e300
    assert (await api.params(sid))["w"].tolist() == [1.0]
    await _state_file_imports(api, sid)


async def test_a_sync_accumulation_that_overflows_is_refused(api: Api) -> None:
    body = {
        "optimizer": {"name": "sgd", "lr": 0.1},
        "params": {"w": [1.0]},
        "consistency": {"mode": "sync", "accumulate": 3},
    }
    sid = (await api.create(body))["id"]
    first = await api.step(sid, {"grads": {"w": [3e38]}, "base_version": 0})
    assert first.status_code == 202, first.text
    r = await api.step(sid, {"grads": {"w": [3e38]}, "base_version": 0})
    assert r.status_code == 422, r.text  # 6e38 overflows float32
    assert r.json()["errors"][0]["loc"] == ["body", "grads", "w"]
    assert (await api.get(sid))["pending"]["count"] == 1
    for _ in range(2):  # the accumulation still completes with sane gradients
        r = await api.step(sid, {"grads": {"w": [-3e38]}, "base_version": 0})
    assert r.status_code == 200, r.text
    assert r.json()["contributors"] == 3
    await _state_file_imports(api, sid)
