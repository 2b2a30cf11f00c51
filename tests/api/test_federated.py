"""Federated sessions in process over both stores (docs/federated.md): rounds, closing
rules, idempotency per client and round, late updates, the server optimizer applied to
the aggregate, refusals that change nothing.

The simulations (10 clients on digits, stragglers, restart, Byzantine clients) run
against real servers in tests/e2e/test_federated_*.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.api.support import BINARY, Api, decode, encode

pytestmark = pytest.mark.asyncio

X0 = {"w": [1.0, -2.0, 3.0], "b": 0.5}


async def _create(api: Api, optimizer: dict[str, Any] | None = None, **federated: Any) -> str:
    body = {
        "optimizer": optimizer or {"name": "fedavg"},
        "params": X0,
        "dtype": "float64",
        "federated": {"min_clients": 2, "expected_clients": 3, "round_timeout": 30, **federated},
    }
    doc = await api.create(body)
    assert doc["round"] == 0
    return str(doc["id"])


async def _update(api: Api, sid: str, rnd: int, client: str, delta: Any, n: int = 1, **kw: Any):
    body = {"client_id": client, "delta": delta, "num_examples": n, **kw}
    return await api.client.post(
        f"/v1/sessions/{sid}/rounds/{rnd}/updates", json=body, headers=api.headers
    )


async def _round(api: Api, sid: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/sessions/{sid}/round", headers=api.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _d(w: list[float], b: float) -> dict[str, Any]:
    return {"w": w, "b": b}


async def test_a_round_closes_when_the_expected_clients_reported(api: Api) -> None:
    sid = await _create(api)
    deltas = [_d([1.0, 0.0, 0.0], 1.0), _d([0.0, 2.0, 0.0], 0.0), _d([0.0, 0.0, 3.0], -1.0)]
    weights = [1, 2, 3]
    for i, (delta, n) in enumerate(zip(deltas[:2], weights[:2], strict=True)):
        r = await _update(api, sid, 0, f"c{i}", delta, n, metrics={"loss": float(i)})
        assert r.status_code == 200, r.text
        assert r.json() == {"round": 0, "accepted": True, "received": i + 1, "closed": False}
    info = await _round(api, sid)
    assert info["round"] == 0
    assert info["clients"] == ["c0", "c1"]
    assert info["received"] == 2
    r = await _update(api, sid, 0, "c2", deltas[2], 3, metrics={"loss": 2.0})
    assert r.json() == {
        "round": 0,
        "accepted": True,
        "received": 3,
        "closed": True,
        "next_round": 1,
    }
    info = await _round(api, sid)
    assert info["round"] == 1
    assert info["received"] == 0
    assert info["version"] == 1
    mean_w = sum(n * np.asarray(d["w"]) for d, n in zip(deltas, weights, strict=True)) / 6
    mean_b = sum(n * d["b"] for d, n in zip(deltas, weights, strict=True)) / 6
    np.testing.assert_allclose(info["params"]["w"], np.asarray(X0["w"]) + mean_w, rtol=1e-15)
    assert info["params"]["b"] == pytest.approx(X0["b"] + mean_b, rel=1e-15)
    hist = await api.client.get(f"/v1/sessions/{sid}/history", headers=api.headers)
    entry = hist.json()["entries"][0]
    assert entry["kind"] == "round"
    assert entry["clients"] == ["c0", "c1", "c2"]
    assert entry["num_examples"] == 6
    assert entry["metrics"]["loss"] == pytest.approx((0 * 1 + 1 * 2 + 2 * 3) / 6)


async def test_late_and_early_updates_are_409_with_the_current_round(api: Api) -> None:
    sid = await _create(api, expected_clients=2)
    await _update(api, sid, 0, "a", _d([0.0] * 3, 0.0))
    await _update(api, sid, 0, "b", _d([0.0] * 3, 0.0))
    for rnd in (0, 5):
        r = await _update(api, sid, rnd, "late", _d([9.0] * 3, 9.0))
        assert r.status_code == 409, r.text
        assert r.json()["type"] == "urn:optserve:problem:round-closed"
        assert r.json()["round"] == 1
    info = await _round(api, sid)
    assert info["received"] == 0
    assert info["version"] == 1


async def test_updates_are_idempotent_per_client_and_round(api: Api) -> None:
    sid = await _create(api)
    first = await _update(api, sid, 0, "a", _d([1.0, 1.0, 1.0], 1.0))
    again = await _update(api, sid, 0, "a", _d([1.0, 1.0, 1.0], 1.0))
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await _update(api, sid, 0, "a", _d([2.0, 2.0, 2.0], 2.0))
    assert other.status_code == 422, other.text
    assert (await _round(api, sid))["received"] == 1
    await _update(api, sid, 0, "b", _d([0.0] * 3, 0.0))
    await _update(api, sid, 0, "c", _d([0.0] * 3, 0.0))
    replay = await _update(api, sid, 0, "a", _d([1.0, 1.0, 1.0], 1.0))  # after the close
    assert replay.status_code == 200
    assert replay.content == first.content
    assert (await _round(api, sid))["round"] == 1


async def test_the_deadline_closes_a_round_with_min_clients(api: Api) -> None:
    sid = await _create(api, expected_clients=None, round_timeout=0.3)
    await _update(api, sid, 0, "a", _d([1.0, 0.0, 0.0], 0.0))
    await asyncio.sleep(0.4)
    info = await _round(api, sid)
    assert info["round"] == 0  # one update, min_clients 2: stays open past its deadline
    r = await _update(api, sid, 0, "b", _d([0.0, 1.0, 0.0], 0.0))
    assert r.json()["closed"] is True  # past the deadline with min_clients: closes at once
    await _update(api, sid, 1, "a", _d([1.0, 0.0, 0.0], 0.0))
    await _update(api, sid, 1, "b", _d([1.0, 0.0, 0.0], 0.0))
    assert (await _round(api, sid))["round"] == 1
    await asyncio.sleep(0.4)
    info = await _round(api, sid)  # a look at the round closes it
    assert info["round"] == 2
    assert info["version"] == 2


async def test_weights_become_deltas_and_binary_updates(api: Api) -> None:
    sid = await _create(api, {"name": "fedavg", "lr": 0.5}, expected_clients=2)
    new_w = np.asarray(X0["w"]) + 2.0
    r = await api.client.post(
        f"/v1/sessions/{sid}/rounds/0/updates",
        json={"client_id": "a", "weights": {"w": new_w.tolist(), "b": 0.5}, "num_examples": 1},
        headers=api.headers,
    )
    assert r.status_code == 200, r.text
    body = encode(
        {"w": np.zeros(3), "b": np.array(1.0)},
        {"client_id": "b", "num_examples": "1", "kind": "delta", "metrics": '{"acc": 0.5}'},
    )
    r = await api.client.post(
        f"/v1/sessions/{sid}/rounds/0/updates",
        content=body,
        headers={**api.headers, "Content-Type": BINARY},
    )
    assert r.status_code == 200, r.text
    assert r.json()["closed"] is True
    r = await api.client.get(f"/v1/sessions/{sid}/round", headers={**api.headers, "Accept": BINARY})
    tensors, meta = decode(r.content)
    assert meta["round"] == "1"
    # mean delta: w +1, b +0.5; server lr 0.5
    np.testing.assert_allclose(tensors["w"], np.asarray(X0["w"]) + 0.5, rtol=1e-15)
    assert float(tensors["b"]) == pytest.approx(0.75, rel=1e-15)


async def test_fedadam_state_and_schedule_drive_the_server_step(api: Api) -> None:
    optimizer = {"name": "fedadam", "lr": 0.1, "betas": [0.9, 0.99], "tau": 1e-3}
    body = {
        "optimizer": optimizer,
        "params": X0,
        "dtype": "float64",
        "schedule": {"name": "step", "step_size": 1, "gamma": 0.5},
        "federated": {"min_clients": 1, "expected_clients": 1},
    }
    sid = (await api.create(body))["id"]
    x = np.asarray([*X0["w"], X0["b"]])
    m = np.zeros(4)
    v = np.full(4, 1e-6)
    for rnd in range(3):
        delta = np.array([0.1, -0.2, 0.3, -0.4]) * (rnd + 1)
        r = await _update(api, sid, rnd, "only", _d(delta[:3].tolist(), float(delta[3])))
        assert r.json()["closed"] is True
        lr = 0.1 * 0.5**rnd
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta**2
        x = x + lr * m / (np.sqrt(v) + 1e-3)
        info = await _round(api, sid)
        got = np.asarray([*info["params"]["w"], info["params"]["b"]])
        np.testing.assert_allclose(got, x, rtol=1e-13)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"optimizer": {"name": "adam"}}, ["body", "optimizer", "name"]),
        ({"federated": {"min_clients": 0}}, ["body", "federated", "min_clients"]),
        ({"federated": {"min_clients": 3, "expected_clients": 2}}, ["body", "federated"]),
        ({"federated": {"aggregator": {"name": "mode"}}}, ["body", "federated", "aggregator"]),
        ({"lr_finder": {}}, ["body", "lr_finder"]),
        ({"consistency": "sync"}, ["body", "consistency"]),
    ],
)
async def test_invalid_federated_sessions_name_the_field(
    api: Api, body: dict[str, Any], loc: list[str]
) -> None:
    request = {
        "optimizer": {"name": "fedavg"},
        "params": X0,
        "federated": {},
        **body,
    }
    r = await api.client.post("/v1/sessions", json=request, headers=api.headers)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["errors"]]
    assert any(got[: len(loc)] == loc for got in locs), locs


async def test_refused_updates_change_nothing(api: Api) -> None:
    sid = await _create(api)
    cases = [
        {"client_id": "a", "num_examples": 1},
        {"client_id": "a", "delta": _d([1.0, 2.0], 0.0), "num_examples": 1},
        {"client_id": "a", "delta": _d([1.0, 2.0, 3.0], 0.0), "num_examples": 0},
        {"client_id": "", "delta": _d([1.0, 2.0, 3.0], 0.0), "num_examples": 1},
        {"client_id": "a", "delta": _d([1.0, 2.0, 3.0], 0.0), "weights": X0, "num_examples": 1},
        {"client_id": "a", "delta": _d([1.0, 2.0, 3.0], 0.0), "num_examples": 1, "metrics": 1},
    ]
    for body in cases:
        r = await api.client.post(
            f"/v1/sessions/{sid}/rounds/0/updates", json=body, headers=api.headers
        )
        assert r.status_code == 422, (body, r.text)
    assert (await _round(api, sid))["received"] == 0
    r = await api.step(sid, {"grads": {"w": [0.0] * 3, "b": 0.0}})
    assert r.status_code == 422
    plain = (await api.create({"optimizer": {"name": "sgd"}, "params": X0}))["id"]
    r = await api.client.get(f"/v1/sessions/{plain}/round", headers=api.headers)
    assert r.status_code == 409
    assert r.json()["type"] == "urn:optserve:problem:not-federated"
