"""The v1 contract (docs/api.md) over the wire, against both live servers: two uvicorn
workers on Redis, and the in-process store.

The in-process contract tests (tests/api) reach into the store and build apps with
their own settings, so they are not parametrized over a live server; this module
checks the important rows again through a real socket with a plain httpx client:
create/get/step/params/delete in JSON and in safetensors, every refusal (400, 404, 413,
422) as problem+json with the session unchanged, and the idempotent replay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save

from tests.api.support import core_run
from tests.e2e.support import (
    BINARY,
    MAX_BODY_BYTES,
    LiveServer,
    decode,
    encode,
    problem,
    read_params,
    session_doc,
)

PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
ADAM = {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0}


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_json_create_get_step_params_delete(client: httpx.Client) -> None:
    schedule = {"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}}
    r = client.post(
        "/v1/sessions",
        json={"optimizer": ADAM, "schedule": schedule, "params": PARAMS, "dtype": "float32"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    sid = doc["id"]
    assert r.headers["location"] == f"/v1/sessions/{sid}"
    assert (doc["step"], doc["version"], doc["lr"]) == (0, 0, 0.0)
    assert doc["optimizer"]["eps"] == 1e-08
    assert doc["schedule"]["warmup"] == {"steps": 100, "start_factor": 0.0}
    assert doc["params"] == {"w": {"shape": [2, 2]}, "b": {"shape": [2]}}
    assert session_doc(client, sid) == doc

    grads = [GRADS, {"w": [[0.5, -0.5], [0.25, 0.0]], "b": [1.0, 2.0]}]
    expected, lrs = core_run(ADAM, PARAMS, grads, "float32", schedule)
    for i, g in enumerate(grads):
        r = client.post(f"/v1/sessions/{sid}/step", json={"grads": g, "loss": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["step"], body["version"], body["lr"]) == (i + 1, i + 1, lrs[i])
        for name in PARAMS:
            np.testing.assert_array_equal(
                np.asarray(body["params"][name], np.float32), expected[i][name]
            )
    r = client.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200
    assert r.json() == {"step": 2, "version": 2, "params": body["params"]}
    tensors, meta = read_params(client, sid)
    assert meta == {"step": "2", "version": "2"}
    for name in PARAMS:
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], expected[-1][name])
    doc = session_doc(client, sid)
    assert (doc["step"], doc["version"]) == (2, 2)

    r = client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 204
    assert r.content == b""
    problem(client.get(f"/v1/sessions/{sid}"), 404)
    problem(client.get(f"/v1/sessions/{sid}/params"), 404)
    problem(client.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS}), 404)
    problem(client.delete(f"/v1/sessions/{sid}"), 404)


def test_binary_create_step_params(client: httpx.Client) -> None:
    params = {"w": np.array([[0.1, -0.2], [0.3, 0.4]]), "b": np.zeros(2)}
    optimizer = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    schedule = {"name": "step", "step_size": 1, "gamma": 0.5}
    body = st_save(
        params,
        metadata={
            "optimizer": json.dumps(optimizer),
            "schedule": json.dumps(schedule),
            "dtype": "float64",
        },
    )
    r = client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["dtype"] == "float64"
    assert doc["optimizer"]["momentum"] == 0.9
    sid = doc["id"]
    grads = [{"w": np.full((2, 2), 0.5), "b": np.array([1.0, -1.0])} for _ in range(3)]
    expected, lrs = core_run(optimizer, params, grads, "float64", schedule)
    kinds = ["params", "updates", "none"]
    for i, (g, kind) in enumerate(zip(grads, kinds, strict=True)):
        r = client.post(
            f"/v1/sessions/{sid}/step",
            content=encode(g, {"return": kind, "loss": "0.25"}),
            headers={"Content-Type": BINARY, "Accept": BINARY},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == BINARY
        tensors, meta = decode(r.content)
        assert (meta["step"], meta["version"], meta["return"]) == (str(i + 1), str(i + 1), kind)
        assert float(meta["lr"]) == lrs[i]
        before = params if i == 0 else expected[i - 1]
        if kind == "params":
            want = expected[i]
        elif kind == "updates":
            want = {n: expected[i][n] - before[n] for n in params}
        else:
            want = {}
        assert set(tensors) == set(want)
        for n, value in tensors.items():
            assert value.dtype == np.float64
            np.testing.assert_array_equal(value, want[n])
    tensors, meta = read_params(client, sid)
    assert meta == {"step": "3", "version": "3"}
    for n in params:
        np.testing.assert_array_equal(tensors[n], expected[-1][n])
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204


def test_refusals_change_nothing(client: httpx.Client) -> None:
    """Every refusal is problem+json and leaves the session at its version."""
    sid = create(client, {"optimizer": ADAM, "params": PARAMS})["id"]
    assert client.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS}).status_code == 200
    before, _ = read_params(client, sid)
    step = f"/v1/sessions/{sid}/step"
    as_json = {"Content-Type": "application/json"}
    as_binary = {"Content-Type": BINARY}
    ok32 = {k: np.asarray(v, np.float32) for k, v in GRADS.items()}

    # 400: malformed bodies
    assert problem(client.post(step, content=b'{"grads": {', headers=as_json), 400)["errors"]
    problem(client.post("/v1/sessions", content=b"[1,", headers=as_json), 400)
    for bad in (b"\x05", (10**9).to_bytes(8, "little") + b"{}", (7).to_bytes(8, "little")):
        problem(client.post(step, content=bad, headers=as_binary), 400)
        problem(client.post("/v1/sessions", content=bad, headers=as_binary), 400)

    # 404: no such session (the same answer for every kind of miss)
    misses = [
        problem(client.get("/v1/sessions/no-such-session"), 404),
        problem(client.get("/v1/sessions/no-such-session/params"), 404),
        problem(client.post("/v1/sessions/no-such-session/step", json={"grads": GRADS}), 404),
        problem(client.delete("/v1/sessions/no-such-session"), 404),
        problem(client.get(f"/v1/sessions/{sid[:-1]}!"), 404),
    ]
    assert all(m == misses[0] for m in misses)

    # 413: over the server's body limit, with a Content-Length and without one
    pad = "x" * (MAX_BODY_BYTES + 1024)
    problem(client.post(step, json={"grads": GRADS, "pad": pad}), 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"grads": '
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096

    r = client.post(step, content=chunks(), headers=as_json)
    assert "content-length" not in r.request.headers
    problem(r, 413)

    # 422: well-formed but invalid
    cases: list[Any] = [
        {"grads": {**GRADS, "v": [1.0]}},
        {"grads": {"w": GRADS["w"]}},
        {"grads": {"w": [[0.1, 0.2]], "b": GRADS["b"]}},
        {"grads": {"w": [[1e39, 0], [0, 0]], "b": GRADS["b"]}},
        {"grads": GRADS, "return": "everything"},
        {"grads": GRADS, "loss": "low"},
        {},
    ]
    for body in cases:
        assert problem(client.post(step, json=body), 422)["errors"], body
    for tensors, metadata in (
        ({**ok32, "w": np.array([[np.nan, 0], [0, 0]], np.float32)}, None),
        ({"w": ok32["w"]}, None),
        (ok32, {"loss": "nan"}),
    ):
        r = client.post(step, content=encode(tensors, metadata), headers=as_binary)
        problem(r, 422)
    r = client.post("/v1/sessions", json={"optimizer": {"name": "adamm"}, "params": PARAMS})
    assert ["body", "optimizer", "name"] in [e["loc"] for e in problem(r, 422)["errors"]]
    r = client.post(step, json={"grads": GRADS}, headers={"Idempotency-Key": "x" * 300})
    assert problem(r, 422)["errors"][0]["loc"] == ["header", "Idempotency-Key"]

    doc = session_doc(client, sid)
    assert (doc["step"], doc["version"]) == (1, 1), "a refused request changed the session"
    after, meta = read_params(client, sid)
    assert meta["version"] == "1"
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    # and the session still takes steps
    r = client.post(step, json={"grads": GRADS})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2


def test_idempotent_replay(client: httpx.Client) -> None:
    sid = create(client, {"optimizer": ADAM, "params": PARAMS})["id"]
    step = f"/v1/sessions/{sid}/step"
    key = {"Idempotency-Key": f"e2e-{uuid.uuid4()}"}
    first = client.post(step, json={"grads": GRADS, "loss": 0.5}, headers=key)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = client.post(step, json={"grads": GRADS, "loss": 0.5}, headers=key)
        assert again.status_code == 200
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]
        assert again.headers["idempotent-replayed"] == "true"
    # the same key with another body: refused, nothing applied
    r = client.post(step, json={"grads": GRADS, "return": "none"}, headers=key)
    assert problem(r, 422)["errors"][0]["loc"] == ["header", "Idempotency-Key"]

    # binary, with its own key
    bkey = {"Idempotency-Key": f"e2e-{uuid.uuid4()}", "Content-Type": BINARY, "Accept": BINARY}
    body = encode({k: np.asarray(v, np.float32) for k, v in GRADS.items()}, {"return": "updates"})
    first = client.post(step, content=body, headers=bkey)
    again = client.post(step, content=body, headers=bkey)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["content-type"] == BINARY
    assert again.headers["idempotent-replayed"] == "true"
    assert decode(again.content)[1]["version"] == "2"

    doc = session_doc(client, sid)
    assert (doc["step"], doc["version"]) == (2, 2)
    expected, _ = core_run(ADAM, PARAMS, [GRADS, GRADS])
    tensors, _ = read_params(client, sid)
    for name in PARAMS:
        np.testing.assert_array_equal(tensors[name], expected[-1][name])


def test_every_connection_sees_every_step(live: LiveServer) -> None:
    """Steps on fresh connections (so, with two workers, on either one): the versions
    follow each other and every reader sees the latest state."""
    with live.client() as c:
        sid = create(c, {"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"x": [0.0]}})["id"]
    for i in range(1, 13):
        with live.client(headers={"Connection": "close"}) as c:
            r = c.post(f"/v1/sessions/{sid}/step", json={"grads": {"x": [1.0]}})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == i
        with live.client(headers={"Connection": "close"}) as c:
            got = c.get(f"/v1/sessions/{sid}/params").json()
            assert got == {"step": i, "version": i, "params": {"x": [-0.5 * i]}}
