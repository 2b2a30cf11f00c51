"""The sessions layer without HTTP (issue 17, item 7): `Engine` driven directly over the
in-process store and real Redis, as the routes drive it. Create, step, read, list,
idempotent replay, tenant isolation, a sync accumulation, state export and import, and
refusals as `SessionError`s that change nothing; the numbers are the core's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import pytest_asyncio

from service.sessions.codecs import BINARY, JSON
from service.sessions.engine import Engine
from service.sessions.engine_base import StepCall
from service.sessions.errors import Invalid, SessionNotFound, StaleGradient
from service.store.base import StateStore
from tests.api.support import base_store, core_run, decode, make_settings

pytestmark = pytest.mark.asyncio

TENANT = "team-a"
PARAMS = {"w": [[0.5, -1.0], [1.5, 2.0]], "b": [0.25, 0.0]}
GRADS = [{"w": [[0.1, 0.2], [-0.3, 0.4]], "b": [-0.5, 0.5]}, {"w": [[1, 0], [0, 1]], "b": [1, 1]}]
ADAM = {"name": "adam", "lr": 0.01}


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest_asyncio.fixture
async def engine(store_kind: str) -> AsyncIterator[Engine]:
    store: StateStore
    async with base_store(store_kind) as store:
        await store.open()
        try:
            yield Engine(make_settings(), store)
        finally:
            await store.close()


async def create(engine: Engine, **body: Any) -> str:
    request = {"optimizer": ADAM, "params": PARAMS, "dtype": "float64", **body}
    doc = await engine.create(TENANT, orjson.dumps(request), JSON)
    return str(doc["id"])


def call(sid: str, body: dict[str, Any], key: str | None = None, tenant: str = TENANT) -> StepCall:
    return StepCall(
        tenant,
        sid,
        orjson.dumps(body),
        JSON,
        False,
        idempotency_key=key,
        path=f"/v1/sessions/{sid}/step",
    )


async def test_steps_give_the_cores_numbers(engine: Engine) -> None:
    sid = await create(engine)
    for grads in GRADS:
        reply = await engine.step(call(sid, {"grads": grads}))
        assert reply.status == 200
    expected, lrs = core_run(ADAM, PARAMS, GRADS, dtype="float64")
    answer = orjson.loads(reply.body)
    for name, value in expected[-1].items():
        np.testing.assert_array_equal(np.asarray(answer["params"][name]), value)
    assert answer["lr"] == lrs[-1]
    doc = await engine.get(TENANT, sid)
    assert (doc["step"], doc["version"]) == (2, 2)
    listing = await engine.list_sessions(TENANT, 10)
    assert [s["id"] for s in listing["sessions"]] == [sid]


async def test_an_idempotent_retry_is_replayed_not_applied(engine: Engine) -> None:
    sid = await create(engine)
    first = await engine.step(call(sid, {"grads": GRADS[0]}, key="k1"))
    again = await engine.step(call(sid, {"grads": GRADS[0]}, key="k1"))
    assert again.body == first.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await engine.get(TENANT, sid))["version"] == 1


async def test_another_tenant_sees_no_session(engine: Engine) -> None:
    sid = await create(engine)
    with pytest.raises(SessionNotFound):
        await engine.get("team-b", sid)
    with pytest.raises(SessionNotFound):
        await engine.step(call(sid, {"grads": GRADS[0]}, tenant="team-b"))
    assert (await engine.list_sessions("team-b", 10))["sessions"] == []
    assert (await engine.get(TENANT, sid))["version"] == 0


async def test_a_refusal_is_a_session_error_that_changes_nothing(engine: Engine) -> None:
    sid = await create(engine)
    bad = {"grads": {"w": [[0.1, 0.2]], "b": [0.0, 0.0]}}
    with pytest.raises(Invalid) as info:
        await engine.step(call(sid, bad))
    assert info.value.status == 422
    assert info.value.errors[0]["loc"] == ["body", "grads", "w"]
    assert (await engine.get(TENANT, sid))["version"] == 0


async def test_a_sync_accumulation_combines_pushes(engine: Engine) -> None:
    sid = await create(engine, consistency={"mode": "sync", "accumulate": 2})
    first = await engine.step(call(sid, {"grads": GRADS[0], "base_version": 0}))
    assert first.status == 202
    assert (await engine.get(TENANT, sid))["pending"]["count"] == 1
    second = await engine.step(call(sid, {"grads": GRADS[1], "base_version": 0}))
    assert second.status == 200
    assert orjson.loads(second.body)["contributors"] == 2
    mean = {
        k: (np.asarray(GRADS[0][k], float) + np.asarray(GRADS[1][k], float)) / 2 for k in PARAMS
    }
    expected, _ = core_run(ADAM, PARAMS, [mean], dtype="float64")
    got = orjson.loads(second.body)["params"]
    for name, value in expected[0].items():
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-15)
    with pytest.raises(StaleGradient):  # computed on version 0, the session is at 1
        await engine.step(call(sid, {"grads": GRADS[1], "base_version": 0}))
    assert (await engine.get(TENANT, sid))["version"] == 1


async def test_an_export_imports_as_an_equal_session(engine: Engine) -> None:
    sid = await create(engine)
    await engine.step(call(sid, {"grads": GRADS[0]}))
    data = await engine.export_state(TENANT, sid)
    copy = await engine.import_state(TENANT, data, BINARY)
    assert copy["id"] != sid
    assert (copy["step"], copy["version"]) == (1, 1)
    tensors, _ = decode(data)
    again, _ = decode(await engine.export_state(TENANT, copy["id"]))
    assert sorted(again) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(again[name], value)
