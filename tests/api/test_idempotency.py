"""`Idempotency-Key`: a retry gets the first answer again, byte for byte, and the
gradient is applied once (docs/api.md; docs/references.md "Idempotency")."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.api.support import BINARY, Api, core_run, decode, encode

pytestmark = pytest.mark.asyncio

PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
ADAM = {"name": "adam", "lr": 0.01}


async def test_replay_is_identical_and_applied_once(api: Api) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {"Idempotency-Key": "step-0001"}
    first = await api.step(sid, {"grads": GRADS, "loss": 0.5}, headers=headers)
    assert first.status_code == 200
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = await api.step(sid, {"grads": GRADS, "loss": 0.5}, headers=headers)
        assert again.status_code == 200
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]
        assert again.headers["idempotent-replayed"] == "true"
    doc = await api.get(sid)
    assert (doc["step"], doc["version"]) == (1, 1)
    (once,), _ = core_run(ADAM, PARAMS, [GRADS])
    np.testing.assert_array_equal((await api.params(sid))["w"], once["w"])
    # a new key is a new step
    r = await api.step(sid, {"grads": GRADS, "loss": 0.5}, headers={"Idempotency-Key": "step-0002"})
    assert r.json()["version"] == 2
    metrics = (await api.client.get("/metrics")).text
    assert "optserve_idempotent_replays_total" in metrics


async def test_binary_replay(api: Api) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    body = encode({k: np.asarray(v, np.float32) for k, v in GRADS.items()}, {"return": "updates"})
    headers = {"Content-Type": BINARY, "Accept": BINARY, "Idempotency-Key": "bin"}
    first = await api.client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
    again = await api.client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["content-type"] == BINARY
    _, meta = decode(again.content)
    assert meta["version"] == "1"
    assert await api.version(sid) == 1


async def test_a_refused_request_is_not_recorded(api: Api) -> None:
    """A request refused by validation leaves its key free: the corrected retry runs."""
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {"Idempotency-Key": "fix-me"}
    bad = await api.step(sid, {"grads": {"w": GRADS["w"]}}, headers=headers)
    assert bad.status_code == 422
    nan = encode({"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)})
    bad = await api.client.post(
        f"/v1/sessions/{sid}/step", content=nan, headers={**headers, "Content-Type": BINARY}
    )
    assert bad.status_code == 422
    good = await api.step(sid, {"grads": GRADS}, headers=headers)
    assert good.status_code == 200
    assert good.json()["version"] == 1
    assert "idempotent-replayed" not in good.headers
    assert await api.store.get_idempotency(sid, "fix-me") is not None


async def test_concurrent_retries_apply_once(api: Api) -> None:
    """Requests racing with one key: one applies, the others replay it or hear 409."""
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {"Idempotency-Key": "race"}
    replies = await asyncio.gather(
        *(api.step(sid, {"grads": GRADS}, headers=headers) for _ in range(8))
    )
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 409}
    ok = [r for r in replies if r.status_code == 200]
    assert ok
    assert all(r.content == ok[0].content for r in ok)
    assert await api.version(sid) == 1


async def test_concurrent_steps_without_keys_all_apply(api: Api) -> None:
    """Concurrent steps of one session are serialised by the version check: each
    applies once, in some order, and the result is the core's for that many steps."""
    sid = (await api.create({"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"x": [0.0]}}))[
        "id"
    ]
    replies = await asyncio.gather(
        *(api.step(sid, {"grads": {"x": [1.0]}, "return": "none"}) for _ in range(5))
    )  # each may lose the race up to 4 times: within max_commit_retries (5)
    assert all(r.status_code == 200 for r in replies)
    assert sorted(r.json()["version"] for r in replies) == [1, 2, 3, 4, 5]
    assert (await api.params(sid))["x"].tolist() == [-2.5]


async def test_a_key_recorded_while_the_step_ran_is_replayed_not_reapplied(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose claim expired while it ran, and whose key a retry recorded meanwhile,
    must not apply the gradient again: the record is re-read inside the transaction.

    Simulated by hiding the record from every look the engine makes before its
    transaction (as if it committed just after them)."""
    sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
    headers = {"Idempotency-Key": "slow-step"}
    first = await api.step(sid, {"grads": GRADS}, headers=headers)
    assert first.status_code == 200
    engine = api.app.state.engine

    async def no_record(session_id: str, key: str) -> None:
        return None

    monkeypatch.setattr(engine, "_record", no_record)
    again = await api.step(sid, {"grads": GRADS}, headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert await api.version(sid) == 1
    # the replay released our claim: the next new-key step is not blocked
    r = await api.step(sid, {"grads": GRADS}, headers={"Idempotency-Key": "next"})
    assert r.status_code == 200
    assert r.json()["version"] == 2
    # and the same key again is still free of claims (no 409)
    monkeypatch.undo()
    assert (await api.step(sid, {"grads": GRADS}, headers=headers)).status_code == 200
