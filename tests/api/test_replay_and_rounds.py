"""Idempotent replays follow `Accept`, and federated updates keep to their own keys
(issue 12, item 8).

- A step replayed with the same `Idempotency-Key` answers in the format the retry asks
  for: a JSON answer comes back as safetensors and the other way round, with the same
  numbers as a fresh answer in that format (406 when the recorded answer cannot be
  re-encoded).
- A client's different update for a round it already reported in is 422 on its
  `client_id`, not on an `Idempotency-Key` header it never sent; the same update again
  still gets the first answer.
- A request whose `Idempotency-Key` header looks like a federated update's old internal
  key (`fed:<round>:<client>`) no longer blocks that client's update; an update recorded
  under that old key (a round open across an upgrade) is still replayed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from service.sessions import engine_base, rounds
from service.store.base import IdempotencyRecord
from tests.api.support import BINARY, Api, decode, encode

pytestmark = pytest.mark.asyncio

JSON = "application/json"
PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0], "s": 1.5}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1], "s": 0.25}
ADAM = {"name": "adam", "lr": 0.01}
RETURNS = ["params", "updates", "none"]


async def _twins(api: Api) -> tuple[str, str]:
    """Two sessions made alike: one steps and is replayed, the other answers fresh."""
    body = {"optimizer": ADAM, "params": PARAMS, "history": 0}
    return (await api.create(body))["id"], (await api.create(body))["id"]


def _post_step(api: Api, sid: str, body: bytes, content_type: str, accept: str, key: str | None):
    headers = {**api.headers, "Content-Type": content_type, "Accept": accept}
    if key is not None:
        headers["Idempotency-Key"] = key
    return api.client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)


def _counters(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ("params", "updates")}


def _json_body(ret: str) -> bytes:
    return orjson.dumps({"grads": GRADS, "loss": 0.5, "return": ret})


def _binary_body(ret: str) -> bytes:
    grads = {k: np.asarray(v, np.float32) for k, v in GRADS.items()}
    return encode(grads, {"loss": "0.5", "return": ret})


@pytest.mark.parametrize("ret", RETURNS)
async def test_a_json_step_replayed_asking_for_binary_answers_safetensors(
    api: Api, ret: str
) -> None:
    sid, twin = await _twins(api)
    body = _json_body(ret)
    first = await _post_step(api, sid, body, JSON, JSON, "json-first")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == JSON
    again = await _post_step(api, sid, body, JSON, BINARY, "json-first")
    assert again.status_code == 200, again.text
    assert again.headers["content-type"] == BINARY
    assert again.headers["idempotent-replayed"] == "true"
    tensors, metadata = decode(again.content)
    # the numbers of the first (JSON) answer
    recorded = first.json()
    if ret == "none":
        assert tensors == {}
    else:
        assert list(tensors) == ["w", "b", "s"]
        for name, value in recorded[ret].items():
            assert tensors[name].dtype == np.float32
            np.testing.assert_array_equal(tensors[name], np.asarray(value, np.float32))
    assert metadata["return"] == ret
    assert int(metadata["step"]) == recorded["step"] == 1
    assert int(metadata["version"]) == recorded["version"] == 1
    assert float(metadata["lr"]) == recorded["lr"]
    assert float(metadata["grad_norm"]) == recorded["grad_norm"]
    assert "staleness" not in metadata  # null: left out, as a fresh binary answer does
    # and exactly what a fresh binary answer of the same step is
    fresh = await _post_step(api, twin, body, JSON, BINARY, None)
    assert fresh.status_code == 200, fresh.text
    assert again.content == fresh.content
    # applied once; the JSON retry still gets the recorded bytes
    assert await api.version(sid) == 1
    same = await _post_step(api, sid, body, JSON, JSON, "json-first")
    assert same.content == first.content


@pytest.mark.parametrize("ret", RETURNS)
async def test_a_binary_step_replayed_asking_for_json_answers_json(api: Api, ret: str) -> None:
    sid, twin = await _twins(api)
    body = _binary_body(ret)
    first = await _post_step(api, sid, body, BINARY, BINARY, "binary-first")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == BINARY
    again = await _post_step(api, sid, body, BINARY, JSON, "binary-first")
    assert again.status_code == 200, again.text
    assert again.headers["content-type"] == JSON
    assert again.headers["idempotent-replayed"] == "true"
    answer = again.json()
    tensors, metadata = decode(first.content)
    if ret == "none":
        assert "params" not in answer
        assert "updates" not in answer
    else:
        assert list(answer[ret]) == ["w", "b", "s"]
        for name, value in tensors.items():
            np.testing.assert_array_equal(np.asarray(answer[ret][name], np.float32), value)
    assert answer["step"] == int(metadata["step"]) == 1
    assert answer["version"] == int(metadata["version"]) == 1
    assert answer["lr"] == float(metadata["lr"])
    assert answer["grad_norm"] == float(metadata["grad_norm"])
    assert answer["skipped"] is False
    assert answer["clipped"] is False
    assert answer["staleness"] is None  # left out of the binary answer: null again
    # and exactly what a fresh JSON answer of the same step is
    fresh = await _post_step(api, twin, body, BINARY, JSON, None)
    assert fresh.status_code == 200, fresh.text
    assert _counters(answer) == _counters(fresh.json())
    assert again.content == fresh.content
    assert await api.version(sid) == 1
    same = await _post_step(api, sid, body, BINARY, BINARY, "binary-first")
    assert same.content == first.content


async def test_a_replay_that_cannot_be_re_encoded_is_406(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recorded answer that is no step answer (here: one a test put there) cannot be
    given as safetensors: 406, naming Accept; asked as recorded, it is replayed."""
    sid, _ = await _twins(api)
    body = _json_body("params")
    path = f"/v1/sessions/{sid}/step"
    fp = engine_base.fingerprint("POST", path, body)
    recorded = b'{"step": 1, "version": 1, "odd": [1, 2]}'

    async def record(session_id: str, key: str) -> IdempotencyRecord | None:
        return IdempotencyRecord(key, fp, 200, {"content-type": JSON}, recorded)

    monkeypatch.setattr(api.app.state.engine, "_record", record)
    r = await _post_step(api, sid, body, JSON, BINARY, "odd")
    assert r.status_code == 406, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"] == "urn:optserve:problem:not-acceptable"
    assert problem["status"] == 406
    assert "cannot be re-encoded as application/octet-stream" in problem["detail"]
    assert [e["loc"] for e in problem["errors"]] == [["header", "Accept"]]
    r = await _post_step(api, sid, body, JSON, JSON, "odd")
    assert r.status_code == 200
    assert r.content == recorded
    assert await api.version(sid) == 0


# --- federated rounds --------------------------------------------------------------------

X0 = {"w": [1.0, -2.0, 3.0], "b": 0.5}


async def _federated(api: Api) -> str:
    body = {
        "optimizer": {"name": "fedavg"},
        "params": X0,
        "dtype": "float64",
        "federated": {"min_clients": 2, "expected_clients": 3, "round_timeout": 30},
    }
    return str((await api.create(body))["id"])


async def _update(api: Api, sid: str, rnd: int, client: str, shift: float):
    body = {"client_id": client, "delta": {"w": [shift] * 3, "b": shift}, "num_examples": 1}
    return await api.client.post(
        f"/v1/sessions/{sid}/rounds/{rnd}/updates", json=body, headers=api.headers
    )


async def _round(api: Api, sid: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/sessions/{sid}/round", headers=api.headers)
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()
    return info


async def test_a_different_update_again_is_422_on_the_client_id(api: Api) -> None:
    sid = await _federated(api)
    first = await _update(api, sid, 0, "c0", 1.0)
    assert first.status_code == 200, first.text
    same = await _update(api, sid, 0, "c0", 1.0)
    assert same.status_code == 200
    assert same.content == first.content
    assert same.headers["idempotent-replayed"] == "true"
    other = await _update(api, sid, 0, "c0", 2.0)
    assert other.status_code == 422, other.text
    problem = other.json()
    assert problem["type"] == "urn:optserve:problem:validation-error"
    assert "client 'c0' already sent a different update for round 0" in problem["detail"]
    assert [e["loc"] for e in problem["errors"]] == [["body", "client_id"]]
    assert "Idempotency-Key" not in other.text
    info = await _round(api, sid)
    assert (info["round"], info["clients"], info["version"]) == (0, ["c0"], 0)
    # once the round closed, the same update still gets its first answer
    await _update(api, sid, 0, "c1", 0.0)
    await _update(api, sid, 0, "c2", 0.0)
    assert (await _round(api, sid))["round"] == 1
    late = await _update(api, sid, 0, "c0", 1.0)
    assert late.status_code == 200
    assert late.content == first.content


async def test_a_header_key_like_an_update_key_does_not_block_the_update(api: Api) -> None:
    sid = await _federated(api)
    headers = {**api.headers, "Idempotency-Key": "fed:0:c2"}
    metrics = await api.client.post(
        f"/v1/sessions/{sid}/metrics", json={"loss": 0.3}, headers=headers
    )
    assert metrics.status_code == 200, metrics.text
    r = await _update(api, sid, 0, "c2", 1.0)
    assert r.status_code == 200, r.text
    assert r.json() == {"round": 0, "accepted": True, "received": 1, "closed": False}
    assert "idempotent-replayed" not in r.headers
    assert (await _round(api, sid))["clients"] == ["c2"]
    # each key still replays its own answer
    again = await api.client.post(
        f"/v1/sessions/{sid}/metrics", json={"loss": 0.3}, headers=headers
    )
    assert again.status_code == 200
    assert again.content == metrics.content
    replay = await _update(api, sid, 0, "c2", 1.0)
    assert replay.content == r.content
    assert replay.headers["idempotent-replayed"] == "true"
    # the update counts in the round: three clients close it, c2's delta in the mean
    await _update(api, sid, 0, "c0", 0.0)
    closed = await _update(api, sid, 0, "c1", 0.0)
    assert closed.json()["closed"] is True
    info = await _round(api, sid)
    assert info["round"] == 1
    np.testing.assert_allclose(info["params"]["w"], np.asarray(X0["w"]) + 1 / 3, rtol=1e-15)
    hist = await api.client.get(f"/v1/sessions/{sid}/history", headers=api.headers)
    rounds = [e for e in hist.json()["entries"] if e["kind"] == "round"]
    assert rounds[0]["clients"] == ["c2", "c0", "c1"]


async def test_an_update_recorded_under_the_old_key_is_still_replayed(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round open across an upgrade: its updates were recorded under `fed:<r>:<id>`
    (simulated by recording one that way); the same update again is replayed, a
    different one is 422 on its client_id."""
    sid = await _federated(api)
    monkeypatch.setattr(rounds, "update_key", lambda rnd, client: f"fed:{rnd}:{client}")
    first = await _update(api, sid, 0, "c0", 1.0)
    assert first.status_code == 200, first.text
    assert await api.store.get_idempotency(sid, "fed:0:c0") is not None
    monkeypatch.undo()
    again = await _update(api, sid, 0, "c0", 1.0)
    assert again.status_code == 200, again.text
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    other = await _update(api, sid, 0, "c0", 2.0)
    assert other.status_code == 422, other.text
    assert [e["loc"] for e in other.json()["errors"]] == [["body", "client_id"]]
    info = await _round(api, sid)
    assert (info["clients"], info["version"]) == (["c0"], 0)


async def test_an_update_in_flight_is_409_on_the_client_id(api: Api) -> None:
    """While another request holds the claim of client c1's round-0 update, a second
    one is told so in terms of rounds (its `client_id`), with `Retry-After`."""
    sid = await _federated(api)
    from service.sessions.federation import update_key  # here: the code before it lacks it

    key = update_key(0, "c1")
    assert await api.store.claim_idempotency(sid, key, 30, "another-worker") is None
    r = await _update(api, sid, 0, "c1", 1.0)
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["type"].endswith("idempotency-key-in-flight")
    assert [e["loc"] for e in problem["errors"]] == [["body", "client_id"]]
    assert "Idempotency-Key" not in problem["detail"]
    assert int(r.headers["retry-after"]) >= 1
    assert (await _round(api, sid))["clients"] == []
