"""Every row of docs/api.md's error table, as RFC 9457 problem+json, and a refused request
changes nothing: the session's version is the same afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from service.store.base import StateStore
from tests.api.support import (
    BINARY,
    Api,
    ConflictingStore,
    SwitchableStore,
    encode,
    make_settings,
    open_api,
)

pytestmark = pytest.mark.asyncio

PROBLEM = "application/problem+json"
PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
ADAM = {"name": "adam", "lr": 0.001}


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status
    assert body["type"].startswith("urn:optserve:problem:")
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    for e in body["errors"]:
        assert set(e) == {"loc", "msg"}
    return body


def locs(body: dict[str, Any]) -> list[list[Any]]:
    return [e["loc"] for e in body["errors"]]


@pytest_asyncio.fixture
async def session(api: Api) -> AsyncIterator[str]:
    """A session with one step applied (version 1)."""
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    assert (await api.step(sid, {"grads": GRADS})).status_code == 200
    yield sid
    assert await api.version(sid) == 1, "a refused request changed the session"


# --- 400 -----------------------------------------------------------------------------------


async def test_400_bad_json(api: Api, session: str) -> None:
    for path in ("/v1/sessions", f"/v1/sessions/{session}/step"):
        r = await api.client.post(
            path, content=b'{"grads": {', headers={"Content-Type": "application/json"}
        )
        assert locs(problem(r, 400)) == [["body"]]
    r = await api.client.post(
        "/v1/schedules/preview", content=b"[1,", headers={"Content-Type": "application/json"}
    )
    problem(r, 400)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x05",
        (10**9).to_bytes(8, "little") + b"{}",
        (7).to_bytes(8, "little") + b"notjson",
        (4).to_bytes(8, "little") + b"[1] ",
        (40).to_bytes(8, "little")
        + b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'[:40],
        (64).to_bytes(8, "little")
        + b'{"w":{"dtype":"F32","shape":[9],"data_offsets":[0,36]}}        '
        + b"\x00" * 8,
    ],
)
async def test_400_bad_safetensors(api: Api, session: str, body: bytes) -> None:
    r = await api.client.post(
        f"/v1/sessions/{session}/step", content=body, headers={"Content-Type": BINARY}
    )
    problem(r, 400)
    r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    problem(r, 400)


# --- 401 -----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def auth_api(store: StateStore) -> AsyncIterator[Api]:
    settings = make_settings(api_keys={"key-a": "tenant-a", "key-b": "tenant-b"})
    async with open_api(store, settings, headers={"Authorization": "Bearer key-a"}) as a:
        yield a


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Bearer key-a-but-longer", "Basic a2V5LWE=", "Bearer "]
)
async def test_401(auth_api: Api, authorization: str | None) -> None:
    sid = (await auth_api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {} if authorization is None else {"Authorization": authorization}
    c = auth_api.client
    for r in (
        await c.post("/v1/sessions", json={"optimizer": ADAM, "params": PARAMS}, headers=headers),
        await c.get(f"/v1/sessions/{sid}", headers=headers),
        await c.get(f"/v1/sessions/{sid}/params", headers=headers),
        await c.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS}, headers=headers),
        await c.delete(f"/v1/sessions/{sid}", headers=headers),
        await c.post(
            "/v1/schedules/preview",
            json={"schedule": {"name": "step", "step_size": 1}},
            headers=headers,
        ),
    ):
        problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert await auth_api.version(sid) == 0
    assert (await c.get("/healthz")).status_code == 200  # health needs no key


# --- 404 -----------------------------------------------------------------------------------


async def test_404_unknown_and_other_tenant_are_the_same(auth_api: Api) -> None:
    sid = (await auth_api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    c = auth_api.client
    other = {"Authorization": "Bearer key-b"}
    mine = {"Authorization": "Bearer key-a"}
    bodies = []
    for target, headers in (
        (sid, other),
        ("no-such-session", mine),
        ("x" * 500, mine),
        (sid[:-1] + "!", mine),
    ):
        for r in (
            await c.get(f"/v1/sessions/{target}", headers=headers),
            await c.get(f"/v1/sessions/{target}/params", headers=headers),
            await c.post(f"/v1/sessions/{target}/step", json={"grads": GRADS}, headers=headers),
            await c.delete(f"/v1/sessions/{target}", headers=headers),
        ):
            bodies.append(problem(r, 404))
    assert all(b == bodies[0] for b in bodies)
    assert await auth_api.version(sid) == 0  # still there, untouched, for its tenant


async def test_404_unknown_route_is_a_problem(api: Api) -> None:
    problem(await api.client.get("/v2/nothing"), 404)
    problem(await api.client.put("/v1/sessions"), 405)


# --- 409 -----------------------------------------------------------------------------------


async def test_409_idempotency_key_in_flight(api: Api, session: str) -> None:
    assert await api.store.claim_idempotency(session, "busy-key", 60, "other") is None
    r = await api.step(session, {"grads": GRADS}, headers={"Idempotency-Key": "busy-key"})
    body = problem(r, 409)
    assert locs(body) == [["header", "Idempotency-Key"]]
    assert "in flight" in body["detail"]
    # Retry-After: when the holder's lease ends (it has ~60 s left)
    assert 55 <= int(r.headers["retry-after"]) <= 60
    # the claim belongs to the other request: still held
    assert await api.store.claim_idempotency(session, "busy-key", 60, "mine") is not None


async def test_409_unresolved_version_conflict(store: StateStore) -> None:
    conflicting = ConflictingStore(store)
    async with open_api(conflicting, make_settings(max_commit_retries=3)) as api:
        sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
        conflicting.conflicts = 3
        r = await api.step(sid, {"grads": GRADS}, headers={"Idempotency-Key": "k1"})
        assert problem(r, 409)["type"].endswith("version-conflict")
        assert conflicting.commits_refused == 3
        assert await api.version(sid) == 0
        # the key was released: the retry goes through (a conflict resolved on retry)
        conflicting.conflicts = 2
        r = await api.step(sid, {"grads": GRADS}, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        metrics = (await api.client.get("/metrics")).text
        assert "optserve_version_conflicts_total" in metrics


# --- 413 -----------------------------------------------------------------------------------


async def test_413_body_over_the_limit(store: StateStore) -> None:
    async with open_api(store, make_settings(max_body_bytes=4096)) as api:
        sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
        big = {"grads": {"w": [[0.0] * 2] * 2, "b": [0.0] * 2}, "pad": "x" * 5000}
        r = await api.step(sid, big)  # Content-Length says it
        assert problem(r, 413)["status"] == 413
        r = await api.client.post(
            "/v1/sessions", content=b"x" * 5000, headers={"Content-Type": BINARY}
        )
        problem(r, 413)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: bytes are counted
            for _ in range(10):
                yield b" " * 1000

        r = await api.client.post(
            f"/v1/sessions/{sid}/step",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in r.request.headers
        problem(r, 413)
        r = await api.client.post(  # a route whose body FastAPI reads itself
            "/v1/schedules/preview", content=chunks(), headers={"Content-Type": "application/json"}
        )
        problem(r, 413)
        assert await api.version(sid) == 0
        ok = await api.step(sid, {"grads": GRADS})  # under the limit: fine
        assert ok.status_code == 200


# --- 415 (an extension: neither JSON nor safetensors) ---------------------------------------


async def test_415_other_content_type(api: Api, session: str) -> None:
    r = await api.client.post(
        f"/v1/sessions/{session}/step", content=b"grads", headers={"Content-Type": "text/plain"}
    )
    assert locs(problem(r, 415)) == [["header", "Content-Type"]]


# --- 422 -----------------------------------------------------------------------------------


CREATE_422 = [
    ({"optimizer": {"name": "adamm"}, "params": PARAMS}, ["body", "optimizer", "name"]),
    ({"optimizer": {"lr": 0.1}, "params": PARAMS}, ["body", "optimizer", "name"]),
    (
        {"optimizer": {"name": "adam", "betas": [1.2, 0.9]}, "params": PARAMS},
        ["body", "optimizer", "betas", 0],
    ),
    ({"optimizer": {"name": "adam", "lr": -1}, "params": PARAMS}, ["body", "optimizer", "lr"]),
    (
        {
            "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "dampening": 0.5},
            "params": PARAMS,
        },
        None,
    ),
    ({"optimizer": {"name": "adam", "bogus": 1}, "params": PARAMS}, ["body", "optimizer", "bogus"]),
    (
        {"optimizer": ADAM, "schedule": {"name": "cosine_warm"}, "params": PARAMS},
        ["body", "schedule", "name"],
    ),
    (
        {"optimizer": ADAM, "schedule": {"name": "step"}, "params": PARAMS},
        ["body", "schedule", "step_size"],
    ),
    (
        {
            "optimizer": ADAM,
            "schedule": {"name": "step", "step_size": 2, "warmup": {"steps": 0}},
            "params": PARAMS,
        },
        ["body", "schedule", "warmup", "steps"],
    ),
    (
        {
            "optimizer": {"name": "adagrad"},
            "schedule": {"name": "one_cycle", "max_lr": 1, "total_steps": 9},
            "params": PARAMS,
        },
        ["body", "schedule", "cycle_momentum"],
    ),
    ({"optimizer": ADAM, "params": {}}, ["body", "params"]),
    ({"optimizer": ADAM, "params": {"w": [[1, 2], [3]]}}, ["body", "params", "w"]),
    ({"optimizer": ADAM, "params": {"w": [1, "2"]}}, ["body", "params", "w"]),
    ({"optimizer": ADAM, "params": {"w": [1, None]}}, ["body", "params", "w"]),
    ({"optimizer": ADAM, "params": {"w": [True, False]}}, ["body", "params", "w"]),
    ({"optimizer": ADAM, "params": {"w": {"a": 1}}}, ["body", "params", "w"]),
    ({"optimizer": ADAM, "params": {"w": [1e39]}}, ["body", "params", "w"]),  # float32 overflow
    ({"optimizer": ADAM, "params": {"w": [1.0]}, "dtype": "float16"}, ["body", "dtype"]),
    ({"optimizer": ADAM, "params": {"w": [1.0]}, "nonfinite": "ignore"}, ["body", "nonfinite"]),
    (
        {"optimizer": ADAM, "params": {"w": [1.0]}, "transforms": {"clip_norm": -1}},
        ["body", "transforms", "clip_norm"],
    ),
    (
        {
            "optimizer": ADAM,
            "params": {"w": [1.0]},
            "transforms": {"nonfinite": "error"},
            "nonfinite": "skip",
        },
        ["body", "nonfinite"],
    ),
    ({"optimizer": ADAM, "params": {"w": [1.0]}, "extra": 1}, ["body", "extra"]),
    ({"params": {"w": [1.0]}}, ["body", "optimizer"]),
    ([1, 2], ["body"]),
]


@pytest.mark.parametrize(("body", "loc"), CREATE_422)
async def test_422_create(api: Api, body: Any, loc: list[Any] | None) -> None:
    before = await api.store.count_sessions()
    r = await api.client.post("/v1/sessions", json=body)
    b = problem(r, 422)
    assert b["errors"], b
    if loc is not None:
        assert loc in locs(b), b
    else:
        assert all(e["loc"][:2] == ["body", "optimizer"] for e in b["errors"])
    assert await api.store.count_sessions() == before  # nothing was created


async def test_422_hyperparameter_message_names_the_field(api: Api) -> None:
    r = await api.client.post(
        "/v1/sessions", json={"optimizer": {"name": "adam", "betas": [1.2, 0.9]}, "params": PARAMS}
    )
    b = problem(r, 422)
    assert b["detail"] == "betas[0] must be in [0, 1): got 1.2"
    assert b["errors"] == [
        {"loc": ["body", "optimizer", "betas", 0], "msg": "must be in [0, 1): got 1.2"}
    ]


async def test_422_over_max_params(store: StateStore) -> None:
    async with open_api(store, make_settings(max_params=3)) as api:
        r = await api.client.post("/v1/sessions", json={"optimizer": ADAM, "params": PARAMS})
        assert locs(problem(r, 422)) == [["body", "params"]]


async def test_422_binary_create(api: Api) -> None:
    w = np.ones(2, np.float32)
    for metadata, loc in (
        ({}, ["body", "optimizer"]),
        ({"optimizer": "{not json"}, ["body", "optimizer"]),
        ({"optimizer": '{"name": "nope"}'}, ["body", "optimizer", "name"]),
        ({"optimizer": '{"name": "sgd"}', "dtype": "int8"}, ["body", "dtype"]),
    ):
        r = await api.client.post(
            "/v1/sessions", content=encode({"w": w}, metadata), headers={"Content-Type": BINARY}
        )
        assert loc in locs(problem(r, 422)), metadata
    nan = np.array([1.0, np.nan], np.float32)
    r = await api.client.post(
        "/v1/sessions",
        content=encode({"w": nan}, {"optimizer": '{"name": "sgd"}'}),
        headers={"Content-Type": BINARY},
    )
    assert locs(problem(r, 422)) == [["body", "params", "w"]]
    r = await api.client.post(
        "/v1/sessions",
        content=encode({"w": np.array([True])}, {"optimizer": '{"name": "sgd"}'}),
        headers={"Content-Type": BINARY},
    )
    assert locs(problem(r, 422)) == [["body", "params", "w"]]


STEP_422: list[tuple[Any, list[Any]]] = [
    ({"grads": {**GRADS, "v": [1.0]}}, ["body", "grads", "v"]),  # unknown tensor
    ({"grads": {"w": GRADS["w"]}}, ["body", "grads", "b"]),  # missing tensor
    ({"grads": {"w": [[0.1, 0.2]], "b": GRADS["b"]}}, ["body", "grads", "w"]),  # wrong shape
    ({"grads": {"w": 0.5, "b": GRADS["b"]}}, ["body", "grads", "w"]),  # wrong shape (scalar)
    ({"grads": {"w": [[1e39, 0], [0, 0]], "b": GRADS["b"]}}, ["body", "grads", "w"]),  # inf in f32
    ({"grads": {"w": [["a", 0], [0, 0]], "b": GRADS["b"]}}, ["body", "grads", "w"]),
    ({"grads": {"w": [[0, 0], [0]], "b": GRADS["b"]}}, ["body", "grads", "w"]),  # ragged
    ({"grads": GRADS, "return": "everything"}, ["body", "return"]),
    ({"grads": GRADS, "loss": "low"}, ["body", "loss"]),
    ({"grads": GRADS, "lr": 0.1}, ["body", "lr"]),
    ({}, ["body", "grads"]),
]


@pytest.mark.parametrize(("body", "loc"), STEP_422)
async def test_422_step(api: Api, session: str, body: Any, loc: list[Any]) -> None:
    r = await api.step(session, body)
    assert loc in locs(problem(r, 422))


async def test_422_step_json_non_finite_literal(api: Api, session: str) -> None:
    body = b'{"grads": {"w": [[1e999, 0], [0, 0]], "b": [0, 0]}}'
    r = await api.client.post(
        f"/v1/sessions/{session}/step", content=body, headers={"Content-Type": "application/json"}
    )
    problem(r, 422)


async def test_422_step_binary(api: Api, session: str) -> None:
    ok = {k: np.asarray(v, np.float32) for k, v in GRADS.items()}
    cases: list[tuple[dict[str, Any], dict[str, str] | None, list[Any]]] = [
        ({**ok, "w": np.array([[np.nan, 0], [0, 0]], np.float32)}, None, ["body", "grads", "w"]),
        ({**ok, "b": np.array([np.inf, 0], np.float32)}, None, ["body", "grads", "b"]),
        ({**ok, "w": np.zeros(4, np.float32)}, None, ["body", "grads", "w"]),
        ({"w": ok["w"]}, None, ["body", "grads", "b"]),
        ({**ok, "zz": np.zeros(1, np.float32)}, None, ["body", "grads", "zz"]),
        (ok, {"loss": "small"}, ["body", "loss"]),
        (ok, {"loss": "nan"}, ["body", "loss"]),
        (ok, {"return": "all"}, ["body", "return"]),
    ]
    for tensors, metadata, loc in cases:
        r = await api.client.post(
            f"/v1/sessions/{session}/step",
            content=encode(tensors, metadata),
            headers={"Content-Type": BINARY},
        )
        assert loc in locs(problem(r, 422)), (loc, r.text)


async def test_422_same_key_different_body(api: Api) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {"Idempotency-Key": "key-1"}
    first = await api.step(sid, {"grads": GRADS, "return": "none"}, headers=headers)
    assert first.status_code == 200
    assert first.json()["version"] == 1
    r = await api.step(sid, {"grads": GRADS, "return": "params"}, headers=headers)
    assert locs(problem(r, 422)) == [["header", "Idempotency-Key"]]
    r = await api.client.post(f"/v1/sessions/{sid}/step", content=b"{}", headers=headers)
    problem(r, 422)
    assert await api.version(sid) == 1
    # the same key on another session is another key
    other = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    assert (await api.step(other, {"grads": GRADS}, headers=headers)).status_code == 200


async def test_422_bad_idempotency_key(api: Api, session: str) -> None:
    r = await api.step(session, {"grads": GRADS}, headers={"Idempotency-Key": "x" * 300})
    assert locs(problem(r, 422)) == [["header", "Idempotency-Key"]]


async def test_422_preview(api: Api) -> None:
    for body, loc in (
        ({"schedule": {"name": "nope"}}, ["body", "schedule", "name"]),
        ({"schedule": {"name": "step", "step_size": 0}}, ["body", "schedule", "step_size"]),
        ({"schedule": {"name": "step", "step_size": 1}, "steps": 0}, ["body", "steps"]),
        ({"schedule": {"name": "step", "step_size": 1}, "steps": 10**7}, ["body", "steps"]),
        ({"schedule": {"name": "step", "step_size": 1}, "lr": -1}, ["body", "lr"]),
        ({"lr": 0.1}, ["body", "schedule"]),
    ):
        r = await api.client.post("/v1/schedules/preview", json=body)
        assert loc in locs(problem(r, 422)), (body, r.text)


# --- 503 -----------------------------------------------------------------------------------


async def test_503_store_unreachable(store: StateStore) -> None:
    switch = SwitchableStore(store)
    async with open_api(switch, make_settings(retry_after=7)) as api:
        sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
        switch.down = True
        c = api.client
        for r in (
            await c.post("/v1/sessions", json={"optimizer": ADAM, "params": PARAMS}),
            await c.get(f"/v1/sessions/{sid}"),
            await c.get(f"/v1/sessions/{sid}/params"),
            await c.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS}),
            await c.post(
                f"/v1/sessions/{sid}/step", json={"grads": GRADS}, headers={"Idempotency-Key": "k"}
            ),
            await c.delete(f"/v1/sessions/{sid}"),
            await c.get("/readyz"),
        ):
            problem(r, 503)
            assert r.headers["retry-after"] == "7"
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        switch.down = False
        assert (await c.get("/readyz")).status_code == 200
        assert await api.version(sid) == 0
        r = await c.post(
            f"/v1/sessions/{sid}/step", json={"grads": GRADS}, headers={"Idempotency-Key": "k"}
        )
        assert r.status_code == 200
        assert r.json()["version"] == 1


async def test_store_down_at_startup_still_serves_503(store: StateStore) -> None:
    switch = SwitchableStore(store)
    switch.down = True
    async with open_api(switch) as api:
        r = await api.client.get("/readyz")
        problem(r, 503)
        switch.down = False
        assert (await api.client.get("/readyz")).status_code == 200


async def test_415_preview_takes_json_only(api: Api) -> None:
    body = b'{"schedule": {"name": "step", "step_size": 1}}'
    for content_type in ("application/x-www-form-urlencoded", BINARY):
        r = await api.client.post(
            "/v1/schedules/preview", content=body, headers={"Content-Type": content_type}
        )
        assert locs(problem(r, 415)) == [["header", "Content-Type"]]
