"""The deadline of a sync accumulation (docs/training.md, `consistency.timeout` and
`on_timeout`), in process over both stores: an accumulation still open `timeout` seconds
after its first push is flushed (applied with what arrived, history `flushed`) or
dropped (a skipped step, history `dropped`), by the next push or by a reader waiting for
the step, so that a worker that never pushes cannot wedge the session.

Short real timeouts (0.3 s) show the waiting side; a shifted clock (the `clock` fixture
moves the `time.time()` of `service.sessions.accumulation` and `stepping`) shows what
happens on either side of a 60 s deadline without waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest

from service.core.consistency import SyncConsistency, parse_consistency
from service.sessions import accumulation, stepping
from tests.api.support import BINARY, Api, decode, encode

pytestmark = pytest.mark.asyncio

SGD = {"name": "sgd", "lr": 0.1}
W = {"w": [1.0, -2.0, 3.0]}
G1 = {"w": [0.5, 0.25, -1.0]}
G2 = {"w": [1.5, -0.75, 2.0]}
G3 = {"w": [-0.5, 1.0, 0.25]}
#: a deadline that never comes by itself within a test (the clock is moved past it)
LONG = 60.0
#: a deadline a test waits for
SHORT = 0.3

_real_time = time.time


class Clock:
    """`time.time()` as the sessions layer's steps see it: the real clock plus `shift`."""

    def __init__(self) -> None:
        self.shift = 0.0

    def time(self) -> float:
        return _real_time() + self.shift


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    for module in (accumulation, stepping):
        monkeypatch.setattr(module, "time", c)
    return c


async def _create(api: Api, accumulate: int = 3, **consistency: Any) -> dict[str, Any]:
    sync = {"mode": "sync", "accumulate": accumulate, **consistency}
    return await api.create(
        {"optimizer": SGD, "params": W, "dtype": "float64", "consistency": sync}
    )


async def _push(api: Api, sid: str, grads: dict[str, Any], base: int, **extra: Any) -> Any:
    return await api.step(sid, {"grads": grads, "base_version": base, **extra})


async def _history(api: Api, sid: str) -> list[dict[str, Any]]:
    r = await api.client.get(f"/v1/sessions/{sid}/history", headers=api.headers)
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


async def _wait_params(api: Api, sid: str, version: int, timeout: float) -> Any:
    return await api.client.get(
        f"/v1/sessions/{sid}/params?min_version={version}&timeout={timeout}",
        headers=api.headers,
    )


def _after(*grads: dict[str, Any]) -> list[float]:
    """W after one SGD step on the mean of `grads`."""
    mean = np.mean([g["w"] for g in grads], axis=0)
    return (np.asarray(W["w"]) - 0.1 * mean).tolist()


def _empty(version: int, accumulate: int = 3) -> dict[str, Any]:
    return {
        "base_version": version,
        "count": 0,
        "accumulate": accumulate,
        "started_at": None,
        "deadline": None,
    }


async def _export(api: Api, sid: str) -> bytes:
    r = await api.client.get(f"/v1/sessions/{sid}/state", headers=api.headers)
    assert r.status_code == 200, r.text
    return r.content


async def _import(api: Api, data: bytes) -> Any:
    return await api.client.post(
        "/v1/sessions/import", content=data, headers={"Content-Type": BINARY, **api.headers}
    )


def _edit_file(data: bytes, key: str, edit: Any) -> bytes:
    """The state file `data` with its JSON metadata `key` replaced by `edit(value)`."""
    tensors, metadata = decode(data)
    metadata[key] = json.dumps(edit(json.loads(metadata[key])))
    return encode(tensors, metadata)


# --- the settings ------------------------------------------------------------------------


async def test_the_settings_have_defaults_and_are_checked(api: Api) -> None:
    doc = await _create(api)
    assert doc["consistency"] == {
        "mode": "sync",
        "accumulate": 3,
        "reduce": "mean",
        "timeout": 60.0,
        "on_timeout": "flush",
    }
    assert doc["pending"] == _empty(0)
    doc = await _create(api, timeout=2.5, on_timeout="drop")
    assert doc["consistency"]["timeout"] == 2.5
    assert doc["consistency"]["on_timeout"] == "drop"
    assert (await _create(api, timeout=86400))["consistency"]["timeout"] == 86400.0
    bad: list[tuple[dict[str, Any], str]] = [
        ({"mode": "sync", "timeout": 0}, "timeout"),
        ({"mode": "sync", "timeout": -1.0}, "timeout"),
        ({"mode": "sync", "timeout": 86400.5}, "timeout"),
        ({"mode": "sync", "timeout": "60"}, "timeout"),
        ({"mode": "sync", "timeout": True}, "timeout"),
        ({"mode": "sync", "timeout": 1e308}, "timeout"),
        ({"mode": "sync", "timeout": [60]}, "timeout"),
        ({"mode": "sync", "timeout": {"seconds": 60}}, "timeout"),
        ({"mode": "sync", "on_timeout": "wait"}, "on_timeout"),
        ({"mode": "sync", "on_timeout": 1}, "on_timeout"),
        ({"mode": "sync", "on_timeout": "x" * 100_000}, "on_timeout"),
        ({"mode": "sync", "on_timeout": ["flush"]}, "on_timeout"),
        ({"mode": "async", "timeout": 5.0}, "timeout"),
    ]
    for consistency, field in bad:
        r = await api.client.post(
            "/v1/sessions",
            json={"optimizer": SGD, "params": W, "consistency": consistency},
            headers=api.headers,
        )
        assert r.status_code == 422, (consistency, r.text)
        assert r.json()["errors"][0]["loc"] == ["body", "consistency", field], r.text


async def test_a_stored_spec_without_the_settings_gets_the_defaults() -> None:
    old = parse_consistency({"mode": "sync", "accumulate": 3, "reduce": "mean"})
    assert isinstance(old, SyncConsistency)
    assert (old.timeout, old.on_timeout) == (60.0, "flush")


# --- flush -------------------------------------------------------------------------------


async def test_a_lone_waiting_push_gets_its_step_at_the_deadline(api: Api) -> None:
    """One worker pushes and waits; nobody else ever pushes: at `timeout` its own wait
    flushes the accumulation into a step of one gradient."""
    sid = (await _create(api, timeout=SHORT))["id"]
    start = time.monotonic()
    r = await _push(api, sid, G1, 0, loss=0.5, wait=10.0)
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert elapsed >= SHORT - 0.05
    assert elapsed < 5.0
    body = r.json()
    assert (body["version"], body["step"], body["skipped"]) == (1, 1, False)
    assert body["contributors"] == 1  # the step it waited for combined one gradient
    np.testing.assert_allclose(body["params"]["w"], _after(G1), rtol=1e-15)
    entry = (await _history(api, sid))[0]
    assert entry["flushed"] is True
    assert entry["contributors"] == 1
    assert entry["loss"] == 0.5
    assert "dropped" not in entry
    doc = await api.get(sid)
    assert (doc["version"], doc["step"], doc["skipped"]) == (1, 1, 0)
    assert doc["pending"] == _empty(1)


async def test_a_reader_waiting_for_the_version_flushes_what_arrived(api: Api) -> None:
    sid = (await _create(api, accumulate=4, timeout=SHORT))["id"]
    for g, loss in ((G1, 1.0), (G2, 2.0)):
        r = await _push(api, sid, g, 0, loss=loss)
        assert r.status_code == 202, r.text
    r = await _wait_params(api, sid, 1, 10.0)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    np.testing.assert_allclose(r.json()["params"]["w"], _after(G1, G2), rtol=1e-15)
    entry = (await _history(api, sid))[0]
    assert (entry["flushed"], entry["contributors"], entry["loss"]) == (True, 2, 1.5)
    # the session goes on: the next accumulation is a new one, on version 1
    r = await _push(api, sid, G3, 1)
    assert r.status_code == 202, r.text
    assert r.json()["wait_for"] == 2


async def test_readers_racing_for_the_deadline_make_one_step(api: Api) -> None:
    sid = (await _create(api, timeout=SHORT))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    answers = await asyncio.gather(
        _wait_params(api, sid, 1, 10.0),
        _wait_params(api, sid, 1, 10.0),
        _push(api, sid, G2, 0, wait=10.0),
    )
    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert {a.json()["version"] for a in answers[:2]} == {1}
    # the push either joined the flushed step (200), or came after it (409: stale)
    assert answers[2].status_code in (200, 409), answers[2].text
    doc = await api.get(sid)
    assert (doc["version"], doc["step"]) == (1, 1)
    steps = [e for e in await _history(api, sid) if e["kind"] == "step"]
    assert len(steps) == 1
    assert steps[0]["flushed"] is True


async def test_nothing_happens_before_the_deadline(api: Api, clock: Clock) -> None:
    sid = (await _create(api, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    clock.shift = LONG - 5.0
    r = await _wait_params(api, sid, 1, 0.2)
    assert r.status_code == 408, r.text
    r = await _push(api, sid, G2, 0, wait=0.2)
    assert r.status_code == 202, r.text
    assert r.json()["pending"] == 2
    doc = await api.get(sid)
    assert doc["version"] == 0
    assert doc["pending"]["count"] == 2


async def test_a_push_after_the_deadline_is_the_last_of_the_flushed_step(
    api: Api, clock: Clock
) -> None:
    """The accumulation waits for 4; one came, the deadline passed: the next push on the
    same version completes it as a step of 2 and is answered that step."""
    sid = (await _create(api, accumulate=4, timeout=LONG))["id"]
    before = _real_time()
    assert (await _push(api, sid, G1, 0, loss=1.0)).status_code == 202
    pending = (await api.get(sid))["pending"]
    assert before <= pending["started_at"] <= _real_time()
    clock.shift = LONG + 1.0
    r = await _push(api, sid, G2, 0, loss=3.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["step"], body["contributors"]) == (1, 1, 2)
    np.testing.assert_allclose(body["params"]["w"], _after(G1, G2), rtol=1e-15)
    entry = (await _history(api, sid))[0]
    assert (entry["flushed"], entry["contributors"], entry["loss"]) == (True, 2, 2.0)
    assert (await api.get(sid))["pending"] == _empty(1, accumulate=4)
    # a push that was computed on version 0 is late now, as for any step
    r = await _push(api, sid, G3, 0)
    assert r.status_code == 409, r.text


async def test_a_full_accumulation_after_the_deadline_is_a_plain_step(
    api: Api, clock: Clock
) -> None:
    sid = (await _create(api, accumulate=2, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    clock.shift = LONG + 1.0
    r = await _push(api, sid, G2, 0)
    assert r.status_code == 200, r.text
    assert r.json()["contributors"] == 2
    entry = (await _history(api, sid))[0]
    assert "flushed" not in entry


# --- drop --------------------------------------------------------------------------------


async def test_drop_answers_the_waiting_push_with_a_skipped_step(api: Api) -> None:
    sid = (await _create(api, timeout=SHORT, on_timeout="drop"))["id"]
    r = await _push(api, sid, G1, 0, loss=0.5, wait=10.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["step"], body["skipped"]) == (1, 0, True)
    assert body["contributors"] == 0  # nothing was applied
    assert body["params"]["w"] == W["w"]
    entry = (await _history(api, sid))[0]
    assert entry["kind"] == "step"
    assert (entry["skipped"], entry["contributors"], entry["dropped"]) == (True, 0, 1)
    assert (entry["version"], entry["step"], entry["update_norm"]) == (1, 0, 0.0)
    assert entry["loss"] is None
    doc = await api.get(sid)
    assert (doc["version"], doc["step"], doc["skipped"]) == (1, 0, 1)
    assert doc["pending"] == _empty(1)
    # the accumulated gradient is gone: the state file says so, and imports
    data = await _export(api, sid)
    tensors, _ = decode(data)
    assert not any("acc.sum" in name for name in tensors)
    r = await _import(api, data)
    assert r.status_code == 201, r.text
    # the session goes on from the same params, on version 1
    for g in (G2, G3):
        r = await _push(api, sid, g, 1)
    assert r.status_code == 202
    assert (await _push(api, sid, G1, 1)).status_code == 200


async def test_a_reader_waiting_for_the_version_drops_the_accumulation(api: Api) -> None:
    sid = (await _create(api, timeout=SHORT, on_timeout="drop"))["id"]
    for g in (G1, G2):
        assert (await _push(api, sid, g, 0)).status_code == 202
    r = await _wait_params(api, sid, 1, 10.0)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["params"]["w"] == W["w"]
    assert (await _history(api, sid))[0]["dropped"] == 2


async def test_a_push_after_the_deadline_starts_the_next_accumulation(
    api: Api, clock: Clock
) -> None:
    """Dropping leaves params, state and rate as they were, so the push that found the
    deadline passed, computed on those params, opens the next accumulation."""
    sid = (await _create(api, accumulate=2, timeout=LONG, on_timeout="drop"))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    clock.shift = LONG + 1.0
    r = await _push(api, sid, G2, 0)
    assert r.status_code == 202, r.text
    assert r.json() == {
        "status": "pending",
        "version": 1,
        "wait_for": 2,
        "pending": 1,
        "accumulate": 2,
    }
    doc = await api.get(sid)
    assert (doc["version"], doc["step"], doc["skipped"]) == (1, 0, 1)
    pending = doc["pending"]
    assert (pending["base_version"], pending["count"]) == (1, 1)
    assert pending["started_at"] == pytest.approx(clock.time(), abs=5.0)
    assert pending["deadline"] == pending["started_at"] + LONG
    entry = (await _history(api, sid))[0]
    assert (entry["version"], entry["dropped"], entry["skipped"]) == (1, 1, True)
    r = await _push(api, sid, G3, 1)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["step"], r.json()["contributors"]) == (2, 1, 2)
    np.testing.assert_allclose(r.json()["params"]["w"], _after(G2, G3), rtol=1e-15)


# --- the document and the state file ------------------------------------------------------


async def test_the_document_shows_when_the_accumulation_started_and_is_due(api: Api) -> None:
    sid = (await _create(api, timeout=30.0))["id"]
    assert (await api.get(sid))["pending"] == _empty(0)
    before = _real_time()
    assert (await _push(api, sid, G1, 0)).status_code == 202
    after = _real_time()
    pending = (await api.get(sid))["pending"]
    assert before <= pending["started_at"] <= after
    assert pending["deadline"] == pending["started_at"] + 30.0
    assert (await _push(api, sid, G2, 0)).status_code == 202
    again = (await api.get(sid))["pending"]
    assert again["count"] == 2
    assert again["started_at"] == pending["started_at"]  # the first push's time
    assert (await _push(api, sid, G3, 0)).status_code == 200
    assert (await api.get(sid))["pending"] == _empty(1)


async def test_the_state_file_keeps_the_start_of_the_accumulation(api: Api, clock: Clock) -> None:
    sid = (await _create(api, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    data = await _export(api, sid)
    extra = json.loads(decode(data)[1]["extra"])
    started = extra["pending"]["started_at"]
    assert started == (await api.get(sid))["pending"]["started_at"]
    r = await _import(api, data)
    assert r.status_code == 201, r.text
    copy = r.json()["id"]
    assert r.json()["pending"]["started_at"] == started
    assert r.json()["pending"]["deadline"] == started + LONG
    again = await _export(api, copy)
    assert json.loads(decode(again)[1]["extra"]) == extra
    # the copy's accumulation is due when the original's is: a reader flushes it
    clock.shift = LONG + 1.0
    r = await _wait_params(api, copy, 1, 5.0)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["params"]["w"], _after(G1), rtol=1e-15)


async def test_a_state_file_without_started_at_counts_from_the_import(
    api: Api, clock: Clock
) -> None:
    """A file written before accumulations had deadlines: its pending record has no
    `started_at`; the imported session's accumulation counts from the import."""
    sid = (await _create(api, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    data = await _export(api, sid)

    def old(extra: dict[str, Any]) -> dict[str, Any]:
        extra["pending"].pop("started_at")
        return extra

    clock.shift = 10.0
    r = await _import(api, _edit_file(data, "extra", old))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["pending"]["count"] == 1
    assert doc["pending"]["started_at"] == doc["updated_at"]
    assert doc["pending"]["deadline"] == doc["updated_at"] + LONG
    copy = doc["id"]
    r = await _wait_params(api, copy, 1, 0.2)
    assert r.status_code == 408, r.text  # not due: 60 s from the import
    clock.shift = 10.0 + LONG + 1.0
    r = await _wait_params(api, copy, 1, 5.0)
    assert r.status_code == 200, r.text
    assert (await _history(api, copy))[0]["flushed"] is True


@pytest.mark.parametrize("bad", [-1.0, "soon", True, [1.0]])
async def test_a_state_file_with_a_bad_started_at_is_refused(api: Api, bad: Any) -> None:
    sid = (await _create(api, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    data = await _export(api, sid)

    def spoil(extra: dict[str, Any]) -> dict[str, Any]:
        extra["pending"]["started_at"] = bad
        return extra

    r = await _import(api, _edit_file(data, "extra", spoil))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"][-3:] == ["extra", "pending", "started_at"], r.text


async def test_a_state_file_of_an_old_spec_gets_the_default_deadline(api: Api) -> None:
    sid = (await _create(api))["id"]
    data = await _export(api, sid)

    def old(spec: dict[str, Any]) -> dict[str, Any]:
        spec["consistency"] = {"mode": "sync", "accumulate": 3, "reduce": "mean"}
        return spec

    r = await _import(api, _edit_file(data, "spec", old))
    assert r.status_code == 201, r.text
    consistency = r.json()["consistency"]
    assert (consistency["timeout"], consistency["on_timeout"]) == (60.0, "flush")


async def test_a_stored_record_without_started_at_counts_from_the_last_change(
    api: Api,
) -> None:
    """A pending record written by older code (no `started_at`) in the store: its
    deadline counts from the session's `updated_at`; long past here, so the next reader
    flushes it."""
    sid = (await _create(api, timeout=LONG))["id"]
    assert (await _push(api, sid, G1, 0)).status_code == 202
    then = _real_time() - 2 * LONG
    async with api.store.transaction(sid) as tx:
        loaded = await tx.load()
        assert loaded is not None
        meta = loaded[0]
        pending = {k: v for k, v in meta.extra["pending"].items() if k != "started_at"}
        old = meta.evolve(
            version=meta.version + 1,
            extra={**meta.extra, "pending": pending},
            updated_at=then,
        )
        assert await tx.commit(old, None)
    doc = await api.get(sid)
    assert doc["pending"]["count"] == 1
    assert doc["pending"]["started_at"] == then
    assert doc["pending"]["deadline"] == then + LONG
    r = await _wait_params(api, sid, 1, 5.0)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["params"]["w"], _after(G1), rtol=1e-15)
    assert (await _history(api, sid))[0]["flushed"] is True
