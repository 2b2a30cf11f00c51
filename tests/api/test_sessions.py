"""Sessions over HTTP: create, read, params, step, delete, in JSON and safetensors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from service.api.schemas import ParamsResponse, SessionDoc, StepResponse
from tests.api.support import BINARY, Api, core_run, decode, encode

pytestmark = pytest.mark.asyncio

PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
ADAM = {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0}


async def test_create_answers_the_session_document(api: Api) -> None:
    r = await api.client.post(
        "/v1/sessions",
        json={
            "optimizer": ADAM,
            "schedule": {"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}},
            "params": PARAMS,
            "dtype": "float32",
        },
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    SessionDoc.model_validate(doc)
    assert r.headers["location"] == f"/v1/sessions/{doc['id']}"
    assert len(doc["id"]) >= 22  # >= 128 bits of randomness, URL-safe
    assert (doc["step"], doc["version"], doc["lr"]) == (0, 0, 0.0)  # warm-up from 0
    assert doc["optimizer"] == {
        "name": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-08,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    assert doc["schedule"]["warmup"] == {"steps": 100, "start_factor": 0.0}
    assert doc["schedule"]["alpha"] == 0.0  # defaults filled
    assert doc["dtype"] == "float32"
    assert doc["params"] == {"w": {"shape": [2, 2]}, "b": {"shape": [2]}}
    assert await api.get(doc["id"]) == doc


async def test_ids_are_random(api: Api) -> None:
    ids = {
        (await api.create({"optimizer": {"name": "sgd"}, "params": {"x": 1.0}}))["id"]
        for _ in range(5)
    }
    assert len(ids) == 5


async def test_json_step_get_params_delete(api: Api) -> None:
    doc = await api.create({"optimizer": ADAM, "params": PARAMS})
    sid = doc["id"]
    r = await api.step(sid, {"grads": GRADS, "loss": 0.73})
    assert r.status_code == 200, r.text
    body = r.json()
    StepResponse.model_validate(body)
    expected, lrs = core_run(ADAM, PARAMS, [GRADS])
    assert (body["step"], body["version"], body["lr"], body["skipped"]) == (1, 1, lrs[0], False)
    for name in PARAMS:
        np.testing.assert_array_equal(
            np.asarray(body["params"][name], np.float32), expected[0][name]
        )
    assert "updates" not in body

    r = await api.client.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200
    ParamsResponse.model_validate(r.json())
    assert r.json()["step"] == 1
    assert r.json()["version"] == 1
    assert r.json()["params"] == body["params"]

    doc = await api.get(sid)
    assert (doc["step"], doc["version"], doc["lr"]) == (1, 1, 0.001)

    r = await api.client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 204
    assert r.content == b""
    assert (await api.client.get(f"/v1/sessions/{sid}")).status_code == 404
    assert (await api.client.get(f"/v1/sessions/{sid}/params")).status_code == 404
    assert (await api.step(sid, {"grads": GRADS})).status_code == 404
    assert (await api.client.delete(f"/v1/sessions/{sid}")).status_code == 404


async def test_scalar_tensors_and_integers(api: Api) -> None:
    doc = await api.create(
        {"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"s": 2, "v": [1, 2]}}
    )
    assert doc["params"] == {"s": {"shape": []}, "v": {"shape": [2]}}
    r = await api.step(doc["id"], {"grads": {"s": 1, "v": [2, -2]}})
    assert r.status_code == 200, r.text
    assert r.json()["params"] == {"s": 1.5, "v": [0.0, 3.0]}


@pytest.mark.parametrize("kind", ["params", "updates", "none"])
async def test_return_kinds_json(api: Api, kind: str) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    r = await api.step(sid, {"grads": GRADS, "return": kind})
    assert r.status_code == 200, r.text
    body = r.json()
    (after,), _ = core_run(ADAM, PARAMS, [GRADS])
    others = {"params", "updates"} - {kind}
    assert not others & body.keys()
    if kind == "params":
        for n in PARAMS:
            np.testing.assert_array_equal(np.asarray(body["params"][n], np.float32), after[n])
    elif kind == "updates":
        for n in PARAMS:
            want = after[n] - np.asarray(PARAMS[n], np.float32)
            np.testing.assert_array_equal(np.asarray(body["updates"][n], np.float32), want)
    else:
        assert set(body) == {
            *("step", "version", "lr", "skipped", "grad_norm", "clipped"),
            *("staleness", "contributors"),
        }
    assert body["version"] == 1


@pytest.mark.parametrize("kind", ["params", "updates", "none"])
async def test_return_kinds_binary(api: Api, kind: str) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    grads = {k: np.asarray(v, np.float32) for k, v in GRADS.items()}
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode(grads, {"return": kind, "loss": "0.5"}),
        headers={"Content-Type": BINARY, "Accept": BINARY},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == BINARY
    tensors, meta = decode(r.content)
    (after,), lrs = core_run(ADAM, PARAMS, [GRADS])
    assert meta["step"] == "1"
    assert meta["version"] == "1"
    assert meta["return"] == kind
    assert float(meta["lr"]) == lrs[0]
    assert meta["skipped"] == "false"
    if kind == "none":
        assert tensors == {}
    for n, value in tensors.items():
        assert value.dtype == np.float32
        want = after[n] if kind == "params" else after[n] - np.asarray(PARAMS[n], np.float32)
        np.testing.assert_array_equal(value, want)


async def test_binary_create_with_the_safetensors_library(api: Api) -> None:
    """A client that writes with the real safetensors package and reads with it too."""
    params = {"w": np.array([[0.1, -0.2], [0.3, 0.4]]), "b": np.zeros(2)}
    schedule = {"name": "step", "step_size": 1, "gamma": 0.5}
    body = st_save(
        params,
        metadata={
            "optimizer": json.dumps({"name": "sgd", "lr": 0.1, "momentum": 0.9}),
            "schedule": json.dumps(schedule),
            "dtype": "float64",
        },
    )
    r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert r.headers["content-type"] == "application/json"  # documents are JSON
    assert doc["dtype"] == "float64"
    assert doc["optimizer"]["momentum"] == 0.9
    assert set(doc["params"]) == {"w", "b"}
    sid = doc["id"]
    grads = [{"w": np.full((2, 2), 0.5), "b": np.array([1.0, -1.0])} for _ in range(3)]
    for g in grads:
        r = await api.client.post(
            f"/v1/sessions/{sid}/step",
            content=st_save(g),
            headers={"Content-Type": BINARY, "Accept": BINARY},
        )
        assert r.status_code == 200, r.text
    out = st_load(r.content)
    expected, lrs = core_run(
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        params,
        grads,
        "float64",
        schedule,
    )
    for n in params:
        assert out[n].dtype == np.float64
        np.testing.assert_array_equal(out[n], expected[-1][n])
    assert lrs == [0.1, 0.05, 0.025]

    r = await api.client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200
    assert r.headers["content-type"] == BINARY
    tensors, meta = decode(r.content)
    assert meta == {"step": "3", "version": "3"}
    np.testing.assert_array_equal(tensors["w"], expected[-1]["w"])


async def test_mixed_formats(api: Api) -> None:
    """JSON request with a binary answer, and a binary request with a JSON answer."""
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS, "dtype": "float64"}))["id"]
    grads = [GRADS, {"w": [[0.5, 0.5], [0.5, 0.5]], "b": [0.0, 1.0]}]
    expected, _ = core_run(ADAM, PARAMS, grads, "float64")
    r = await api.step(sid, {"grads": grads[0]}, headers={"Accept": BINARY})
    assert r.status_code == 200
    assert r.headers["content-type"] == BINARY
    tensors, _ = decode(r.content)
    np.testing.assert_array_equal(tensors["w"], expected[0]["w"])
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode({k: np.asarray(v) for k, v in grads[1].items()}),
        headers={"Content-Type": BINARY, "Accept": "application/json"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    np.testing.assert_array_equal(np.asarray(body["params"]["w"]), expected[1]["w"])
    np.testing.assert_array_equal(np.asarray(body["params"]["b"]), expected[1]["b"])


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("application/octet-stream", True),
        ("application/json;q=0.5, application/octet-stream", True),
        ("application/json, application/octet-stream;q=0.9", False),
        ("application/octet-stream, */*;q=0.1", True),
    ],
)
async def test_accept_negotiation(api: Api, accept: str | None, binary: bool) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {} if accept is None else {"Accept": accept}
    r = await api.client.get(f"/v1/sessions/{sid}/params", headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == (BINARY if binary else "application/json")


async def test_binary_grads_of_another_dtype_are_cast(api: Api) -> None:
    sid = (
        await api.create({"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"x": [1.0, 2.0]}})
    )["id"]
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode({"x": np.array([1, 1], np.int32)}),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 200, r.text
    assert r.json()["params"] == {"x": [0.0, 1.0]}


async def test_many_steps_through_the_cache_and_from_the_store(api: Api) -> None:
    """Steps read the cached state; a cold replica (cache emptied) reads the store."""
    spec: dict[str, Any] = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "amsgrad": True}
    params = {"w": np.linspace(-1, 1, 3000).reshape(30, 100).tolist()}
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal((30, 100)).tolist()} for _ in range(6)]
    sid = (await api.create({"optimizer": spec, "params": params}))["id"]
    engine = api.app.state.engine
    for i, g in enumerate(grads):
        if i % 2:
            engine.cache.pop(sid)
        r = await api.step(sid, {"grads": g, "return": "none"})
        assert r.status_code == 200, r.text
    expected, _ = core_run(spec, params, grads)
    got = await api.params(sid)
    np.testing.assert_array_equal(got["w"], expected[-1]["w"])
