"""`GET /v1/sessions`: the caller's tenant's sessions, most recently updated first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from service.api.schemas import SessionList
from service.store.base import StateStore
from tests.api.support import Api, SwitchableStore, make_settings, open_api
from tests.api.test_errors import problem

pytestmark = pytest.mark.asyncio

PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
ADAM = {"name": "adam", "lr": 0.001}


async def listing(api: Api, **params: Any) -> dict[str, Any]:
    r = await api.client.get("/v1/sessions", params=params, headers=api.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    SessionList.model_validate(body)
    return body


def ids(body: dict[str, Any]) -> list[str]:
    return [s["id"] for s in body["sessions"]]


async def test_lists_sessions_most_recently_updated_first(api: Api) -> None:
    assert await listing(api) == {"sessions": [], "truncated": False}
    a = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    b = (await api.create({"optimizer": {"name": "sgd", "lr": 0.1}, "params": {"x": 1.0}}))["id"]
    c = (
        await api.create(
            {
                "optimizer": ADAM,
                "params": PARAMS,
                "lr_finder": {"start_lr": 1e-5, "end_lr": 1.0, "num_steps": 20},
            }
        )
    )["id"]
    assert ids(await listing(api)) == [c, b, a]
    r = await api.step(a, {"grads": GRADS, "loss": 0.5})
    assert r.status_code == 200, r.text
    body = await listing(api)
    assert ids(body) == [a, c, b]
    assert body["truncated"] is False
    doc = await api.get(a)
    assert body["sessions"][0] == {
        "id": a,
        "optimizer": "adam",
        "step": 1,
        "version": 1,
        "lr": doc["lr"],
        "updated_at": doc["updated_at"],
        "federated": False,
        "lr_finder": False,
    }
    assert body["sessions"][1]["lr_finder"] is True
    assert body["sessions"][2]["optimizer"] == "sgd"
    assert body["sessions"][2]["lr"] == 0.1
    # a deleted session is not listed
    assert (await api.client.delete(f"/v1/sessions/{c}")).status_code == 204
    assert ids(await listing(api)) == [a, b]


async def test_limit_and_truncated(api: Api) -> None:
    made = [(await api.create({"optimizer": ADAM, "params": PARAMS}))["id"] for _ in range(4)]
    newest = made[::-1]
    body = await listing(api, limit=2)
    assert (ids(body), body["truncated"]) == (newest[:2], True)
    body = await listing(api, limit=4)
    assert (ids(body), body["truncated"]) == (newest, False)
    body = await listing(api, limit=1000)
    assert (ids(body), body["truncated"]) == (newest, False)
    assert ids(await listing(api)) == newest  # default limit 100


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "many", "1.5"])
async def test_limit_out_of_range_is_422(api: Api, limit: str) -> None:
    r = await api.client.get(f"/v1/sessions?limit={limit}")
    body = problem(r, 422)
    assert body["errors"][0]["loc"] == ["query", "limit"]


@pytest_asyncio.fixture
async def tenants(store: StateStore) -> AsyncIterator[tuple[Api, Api]]:
    settings = make_settings(api_keys={"key-a": "tenant-a", "key-b": "tenant-b"})
    async with open_api(store, settings, headers={"Authorization": "Bearer key-a"}) as a:
        b = Api(a.client, a.app, a.store, a.settings, {"Authorization": "Bearer key-b"})
        yield a, b


async def test_tenants_see_only_their_sessions(tenants: tuple[Api, Api]) -> None:
    a, b = tenants
    mine = [(await a.create({"optimizer": ADAM, "params": PARAMS}))["id"] for _ in range(2)]
    theirs = (await b.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    assert ids(await listing(a)) == mine[::-1]
    assert ids(await listing(b)) == [theirs]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await a.client.get("/v1/sessions", headers=headers)
        problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_503_when_the_store_is_down(store: StateStore) -> None:
    switch = SwitchableStore(store)
    async with open_api(switch, make_settings(retry_after=7)) as api:
        await api.create({"optimizer": ADAM, "params": PARAMS})
        switch.down = True
        r = await api.client.get("/v1/sessions")
        problem(r, 503)
        assert r.headers["retry-after"] == "7"
