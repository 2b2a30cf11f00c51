"""The training extensions of docs/training.md, in process over both stores: range-test
sessions, losses without a step, history, averages, sync and async workers, plots.

The end-to-end demonstrations on real servers (digits, restarts, threads) are in
tests/e2e/test_training_*.py; here each rule is checked on its own, refusals included
(every refusal leaves `version` where it was).
"""

from __future__ import annotations

import asyncio
import math
import struct
from typing import Any

import numpy as np
import pytest

from service.core.averaging import init_averages as init_avg
from service.core.averaging import parse_ema, parse_swa, read_average, update_averages
from service.core.lr_finder import LRFinderState, observe, parse_lr_finder_config, ramp_lr
from service.core.lr_finder import suggest as core_suggest
from tests.api.support import BINARY, Api, core_run, decode, encode

pytestmark = pytest.mark.asyncio

SGD = {"name": "sgd", "lr": 0.1}
W = {"w": [1.0, -2.0, 3.0]}
G = {"w": [0.5, 0.25, -1.0]}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def _create(api: Api, **extra: Any) -> dict[str, Any]:
    return await api.create({"optimizer": SGD, "params": W, "dtype": "float64", **extra})


async def _refused(api: Api, sid: str, r: Any, status: int, slug: str) -> dict[str, Any]:
    """`r` is a refusal of that kind, and the session's version did not move."""
    assert r.status_code == status, r.text
    problem: dict[str, Any] = r.json()
    assert problem["type"] == f"urn:optserve:problem:{slug}", problem
    return problem


# --- creation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"lr_finder": {"end_lr": 1e-9}}, ["body", "lr_finder", "end_lr"]),
        ({"lr_finder": {}, "schedule": {"name": "step", "step_size": 2}}, ["body", "schedule"]),
        ({"ema": {"decay": 1.0}}, ["body", "ema", "decay"]),
        ({"swa": {"every": 0}}, ["body", "swa", "every"]),
        ({"consistency": {"mode": "sync", "accumulate": 0}}, ["body", "consistency", "accumulate"]),
        ({"consistency": {"max_staleness": -1}}, ["body", "consistency", "max_staleness"]),
        ({"consistency": "sometimes"}, ["body", "consistency"]),
        ({"history": 10_001}, ["body", "history"]),
        ({"history": -1}, ["body", "history"]),
    ],
)
async def test_invalid_training_settings_name_the_field(
    api: Api, extra: dict[str, Any], loc: list[str]
) -> None:
    r = await api.client.post(
        "/v1/sessions", json={"optimizer": SGD, "params": W, **extra}, headers=api.headers
    )
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["errors"]]
    assert any(got[: len(loc)] == loc for got in locs), locs


async def test_the_document_shows_the_settings_with_defaults(api: Api) -> None:
    doc = await _create(
        api,
        ema={"decay": 0.9},
        swa={"start": 3},
        consistency={"mode": "sync", "accumulate": 3},
        history=7,
    )
    assert doc["ema"] == {"decay": 0.9, "bias_correction": True}
    assert doc["swa"] == {"start": 3, "every": 1}
    assert doc["consistency"] == {
        "mode": "sync",
        "accumulate": 3,
        "reduce": "mean",
        "timeout": 60.0,
        "on_timeout": "flush",
    }
    assert doc["history"] == 7
    assert doc["pending"] == {
        "base_version": 0,
        "count": 0,
        "accumulate": 3,
        "started_at": None,
        "deadline": None,
    }
    assert doc["lr_finder"] is None
    plain = await _create(api)
    assert plain["consistency"] == {
        "mode": "async",
        "max_staleness": None,
        "staleness_damping": "none",
    }
    assert (plain["ema"], plain["swa"], plain["pending"], plain["history"]) == (
        None,
        None,
        None,
        1000,
    )


async def test_binary_create_takes_the_settings_in_metadata(api: Api) -> None:
    body = encode(
        {"w": np.array([1.0, 2.0])},
        {
            "optimizer": '{"name": "sgd", "lr": 0.1}',
            "consistency": '"sync"',
            "ema": '{"decay": 0.5}',
            "history": "3",
        },
    )
    r = await api.client.post(
        "/v1/sessions", content=body, headers={**api.headers, "Content-Type": BINARY}
    )
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["consistency"]["mode"] == "sync"
    assert doc["history"] == 3
    assert doc["ema"]["decay"] == 0.5


# --- the LR range test -----------------------------------------------------------------------


async def test_range_test_session_follows_the_ramp_and_stops(api: Api) -> None:
    finder = {"start_lr": 1e-4, "end_lr": 1.0, "num_steps": 20, "mode": "exp"}
    doc = await _create(api, lr_finder=finder)
    sid = doc["id"]
    config = parse_lr_finder_config(finder)
    assert doc["lr"] == ramp_lr(config, 0)
    r = await api.step(sid, {"grads": G})
    problem = await _refused(api, sid, r, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["body", "loss"]
    r = await api.step(sid, {"grads": G, "loss": -1.0})
    await _refused(api, sid, r, 422, "validation-error")
    assert await api.version(sid) == 0
    state = LRFinderState()
    losses = [2.0 / (1 + i) for i in range(20)]
    for i, loss in enumerate(losses):
        r = await api.step(sid, {"grads": G, "loss": loss})
        assert r.status_code == 200, r.text
        assert r.json()["lr"] == ramp_lr(config, i)
        state = observe(config, state, loss)
    r = await api.step(sid, {"grads": G, "loss": 0.1})
    await _refused(api, sid, r, 409, "range-test-over")
    assert await api.version(sid) == 20
    got = (await api.client.get(f"/v1/sessions/{sid}/lr-finder", headers=api.headers)).json()
    assert got["stop_reason"] == "completed"
    assert got["done"]
    assert got["next_lr"] is None
    assert got["lrs"] == list(state.lrs)
    assert got["smoothed"] == list(state.smoothed)
    want = {k: v.model_dump(mode="json") for k, v in core_suggest(config, state).items()}
    assert got["suggestions"] == want
    png = await api.client.get(f"/v1/sessions/{sid}/lr-finder.png", headers=api.headers)
    assert png.headers["content-type"] == "image/png"
    assert _png_size(png.content) == (800, 500)
    r = await api.client.post(
        f"/v1/sessions/{sid}/metrics", json={"loss": 1.0}, headers=api.headers
    )
    await _refused(api, sid, r, 422, "validation-error")


async def test_range_test_ends_as_diverged_on_a_nonfinite_loss(api: Api) -> None:
    sid = (await _create(api, lr_finder={"num_steps": 20}))["id"]
    headers = {**api.headers, "Content-Type": BINARY}
    for loss in ("1.0", "0.9"):
        body = encode({"w": np.array(G["w"])}, {"loss": loss})
        r = await api.client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
        assert r.status_code == 200, r.text
    before = await api.params(sid)
    body = encode({"w": np.array([math.nan, 0.0, 0.0])}, {"loss": "nan"})
    r = await api.client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] is True
    np.testing.assert_array_equal((await api.params(sid))["w"], before["w"])
    got = (await api.client.get(f"/v1/sessions/{sid}/lr-finder", headers=api.headers)).json()
    assert got["stop_reason"] == "diverged"
    assert got["nonfinite_lr"] is not None
    assert len(got["losses"]) == 2


async def test_a_session_without_range_test_has_no_result(api: Api) -> None:
    sid = (await _create(api))["id"]
    for path in ("lr-finder", "lr-finder.png"):
        r = await api.client.get(f"/v1/sessions/{sid}/{path}", headers=api.headers)
        await _refused(api, sid, r, 409, "no-range-test")


# --- losses without a step, history -----------------------------------------------------------


async def test_metrics_drive_plateau_without_moving_the_version(api: Api) -> None:
    schedule = {"name": "plateau", "patience": 1, "factor": 0.5}
    sid = (await _create(api, schedule=schedule))["id"]
    lrs = []
    for _ in range(4):
        r = await api.client.post(
            f"/v1/sessions/{sid}/metrics", json={"loss": 1.0}, headers=api.headers
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["observed"] is True
        assert body["version"] == 0
        assert body["step"] == 0
        lrs.append(body["lr"])
    # torch: best=1 after the first, bad epochs 1, 2 -> reduce at the third report
    assert lrs == [0.1, 0.1, 0.05, 0.05]
    assert (await api.get(sid))["lr"] == 0.05
    r = await api.step(sid, {"grads": G})
    assert r.json()["lr"] == 0.05


async def test_metrics_are_idempotent_and_refuse_bad_losses(api: Api) -> None:
    schedule = {"name": "plateau", "patience": 0, "factor": 0.5}
    sid = (await _create(api, schedule=schedule))["id"]
    url = f"/v1/sessions/{sid}/metrics"
    key = {**api.headers, "Idempotency-Key": "m-1"}
    first = await api.client.post(url, json={"loss": 1.0}, headers=key)
    again = await api.client.post(url, json={"loss": 1.0}, headers=key)
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    second = await api.client.post(url, json={"loss": 1.0}, headers=api.headers)
    assert second.json()["lr"] == 0.05  # one bad report, not two (patience 0: reduce once)
    for bad in ({"loss": "1.0"}, {}, {"loss": 1.0, "other": 1}):
        r = await api.client.post(url, json=bad, headers=api.headers)
        assert r.status_code == 422, r.text
    r = await api.client.post(url, content=b'{"loss": 1e999}', headers=api.headers)
    assert r.status_code == 422, r.text
    plain = (await _create(api))["id"]
    r = await api.client.post(
        f"/v1/sessions/{plain}/metrics", json={"loss": 0.5}, headers=api.headers
    )
    assert r.status_code == 200
    assert r.json()["observed"] is False


async def test_history_is_bounded_newest_first_and_exact(api: Api) -> None:
    sid = (await _create(api, history=5))["id"]
    answers = []
    for i in range(8):
        r = await api.step(sid, {"grads": G, "loss": float(i), "return": "updates"})
        answers.append(r.json())
    await api.client.post(f"/v1/sessions/{sid}/metrics", json={"loss": 9.0}, headers=api.headers)
    r = await api.client.get(f"/v1/sessions/{sid}/history?limit=50", headers=api.headers)
    body = r.json()
    assert body["limit"] == 5
    entries = body["entries"]
    assert [e["kind"] for e in entries] == ["metrics"] + ["step"] * 4
    assert entries[0]["loss"] == 9.0
    assert entries[0]["step"] == 8
    for entry, answer in zip(entries[1:], reversed(answers[-4:]), strict=True):
        assert entry["step"] == answer["step"]
        assert entry["version"] == answer["version"]
        assert entry["lr"] == answer["lr"]
        assert entry["grad_norm"] == answer["grad_norm"]
        update = np.asarray(answer["updates"]["w"])
        assert entry["update_norm"] == pytest.approx(float(np.linalg.norm(update)), rel=1e-12)
        assert entry["loss"] == float(answer["step"] - 1)
    r = await api.client.get(f"/v1/sessions/{sid}/history?limit=2", headers=api.headers)
    assert len(r.json()["entries"]) == 2
    quiet = (await _create(api, history=0))["id"]
    await api.step(quiet, {"grads": G})
    r = await api.client.get(f"/v1/sessions/{quiet}/history", headers=api.headers)
    assert r.json() == {"limit": 0, "entries": []}


# --- averages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
async def test_averaged_params_equal_the_core(api: Api, bias_correction: bool) -> None:
    ema_spec = {"decay": 0.8, "bias_correction": bias_correction}
    swa_spec = {"start": 3, "every": 2}
    sid = (await _create(api, ema=ema_spec, swa=swa_spec))["id"]
    url = f"/v1/sessions/{sid}/params"
    r = await api.client.get(url + "?average=swa", headers=api.headers)
    await _refused(api, sid, r, 409, "no-average")
    rng = np.random.default_rng(0)
    grads = [{"w": rng.normal(size=3).tolist()} for _ in range(9)]
    for g in grads:
        assert (await api.step(sid, {"grads": g})).status_code == 200
    steps, _ = core_run(SGD, W, grads, dtype="float64")
    ema, swa = parse_ema(ema_spec), parse_swa(swa_spec)
    flat = np.asarray(W["w"], np.float64)
    averages = init_avg(ema, swa, flat)
    for t, p in enumerate(steps, start=1):
        averages = update_averages(ema, swa, averages, p["w"], t)
    for kind in ("ema", "swa"):
        want = read_average(kind, ema, swa, averages)
        assert want is not None
        body = (await api.client.get(f"{url}?average={kind}", headers=api.headers)).json()
        assert body["average"] == kind
        assert body["averaged_steps"] == want[1]
        np.testing.assert_array_equal(np.asarray(body["params"]["w"]), want[0])
        r = await api.client.get(f"{url}?average={kind}", headers={**api.headers, "Accept": BINARY})
        tensors, meta = decode(r.content)
        np.testing.assert_array_equal(tensors["w"], want[0])
        assert meta["averaged_steps"] == str(want[1])
    assert want[1] == 4  # swa: steps 3, 5, 7, 9
    plain = (await _create(api))["id"]
    r = await api.client.get(f"/v1/sessions/{plain}/params?average=ema", headers=api.headers)
    await _refused(api, plain, r, 422, "validation-error")


# --- sync workers ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["mean", "sum"])
async def test_sync_pushes_combine_into_one_step(api: Api, reduce: str) -> None:
    sync = {"mode": "sync", "accumulate": 3, "reduce": reduce}
    sid = (await _create(api, consistency=sync))["id"]
    pushes = [{"w": [1.0, 2.0, 3.0]}, {"w": [0.5, 0.0, -1.0]}, {"w": [0.0, 1.0, 1.0]}]
    for i, g in enumerate(pushes[:2]):
        r = await api.step(sid, {"grads": g, "base_version": 0, "loss": float(i)})
        assert r.status_code == 202, r.text
        assert r.json() == {
            "status": "pending",
            "version": 0,
            "wait_for": 1,
            "pending": i + 1,
            "accumulate": 3,
        }
        assert r.headers["location"] == f"/v1/sessions/{sid}/params?min_version=1"
        assert (await api.get(sid))["pending"]["count"] == i + 1
    assert await api.version(sid) == 0
    r = await api.step(sid, {"grads": pushes[2], "base_version": 0, "loss": 5.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["contributors"] == 3
    assert body["version"] == 1
    assert body["step"] == 1
    total = np.sum([g["w"] for g in pushes], axis=0)
    combined = total / 3 if reduce == "mean" else total
    want = np.asarray(W["w"]) - 0.1 * combined
    np.testing.assert_allclose(np.asarray(body["params"]["w"]), want, rtol=1e-15)
    entry = (await api.client.get(f"/v1/sessions/{sid}/history", headers=api.headers)).json()
    assert entry["entries"][0]["loss"] == pytest.approx(2.0)
    assert entry["entries"][0]["contributors"] == 3
    assert (await api.get(sid))["pending"] == {
        "base_version": 1,
        "count": 0,
        "accumulate": 3,
        "started_at": None,
        "deadline": None,
    }


async def test_sync_refusals_change_nothing(api: Api) -> None:
    sid = (await _create(api, consistency={"mode": "sync", "accumulate": 2}))["id"]
    r = await api.step(sid, {"grads": G})
    problem = await _refused(api, sid, r, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["body", "base_version"]
    for extra in ({"return": "updates"}, {"skip_missing": True}):
        r = await api.step(sid, {"grads": G, "base_version": 0, **extra})
        await _refused(api, sid, r, 422, "validation-error")
    r = await api.step(sid, {"grads": G, "base_version": 3})
    await _refused(api, sid, r, 422, "validation-error")
    await api.step(sid, {"grads": G, "base_version": 0})
    await api.step(sid, {"grads": G, "base_version": 0})
    r = await api.step(sid, {"grads": G, "base_version": 0})
    problem = await _refused(api, sid, r, 409, "stale-gradient")
    assert problem["version"] == 1
    assert problem["base_version"] == 0
    assert (await api.get(sid))["pending"]["count"] == 0


async def test_a_retried_push_is_counted_once_and_can_wait(api: Api) -> None:
    sid = (await _create(api, consistency={"mode": "sync", "accumulate": 2}))["id"]
    headers = {"Idempotency-Key": "push-1"}
    body = {"grads": G, "base_version": 0, "wait": 5.0}

    async def first_push() -> Any:
        return await api.step(sid, body, headers=headers)

    waiting = asyncio.create_task(first_push())
    await asyncio.sleep(0.3)
    again = await api.step(sid, {**body, "wait": 0.0}, headers={"Idempotency-Key": "push-2"})
    assert again.status_code == 200
    assert again.json()["contributors"] == 2
    waited = await waiting
    assert waited.status_code == 200, waited.text
    assert waited.json()["version"] == 1
    assert waited.json()["params"] == again.json()["params"]
    replay = await api.step(sid, body, headers=headers)  # the recorded 202, then the wait
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.status_code == 200
    assert replay.json()["version"] == 1
    assert (await api.get(sid))["step"] == 1


async def test_min_version_waits_or_answers_408(api: Api) -> None:
    sid = (await _create(api))["id"]
    url = f"/v1/sessions/{sid}/params"
    r = await api.client.get(url + "?min_version=0", headers=api.headers)
    assert r.status_code == 200
    r = await api.client.get(url + "?min_version=1&timeout=0.2", headers=api.headers)
    problem = await _refused(api, sid, r, 408, "wait-timeout")
    assert problem["version"] == 0

    async def later() -> None:
        await asyncio.sleep(0.2)
        await api.step(sid, {"grads": G})

    task = asyncio.create_task(later())
    r = await api.client.get(url + "?min_version=1&timeout=5", headers=api.headers)
    await task
    assert r.status_code == 200
    assert r.json()["version"] == 1


# --- async workers ------------------------------------------------------------------------------


async def test_async_staleness_limit_and_inverse_damping(api: Api) -> None:
    consistency = {"max_staleness": 2, "staleness_damping": "inverse"}
    sid = (await _create(api, consistency=consistency))["id"]
    r = await api.step(sid, {"grads": G})
    await _refused(api, sid, r, 422, "validation-error")
    seen = []
    for base in (0, 0, 0):
        r = await api.step(sid, {"grads": G, "base_version": base})
        assert r.status_code == 200, r.text
        seen.append((r.json()["staleness"], r.json()["lr"]))
    assert seen == [(0, 0.1), (1, 0.05), (2, 0.1 / 3)]
    r = await api.step(sid, {"grads": G, "base_version": 0})
    problem = await _refused(api, sid, r, 409, "stale-gradient")
    assert problem["version"] == 3
    assert problem["base_version"] == 0
    assert await api.version(sid) == 3
    r = await api.step(sid, {"grads": G, "base_version": 4})
    await _refused(api, sid, r, 422, "validation-error")
    plain = (await _create(api))["id"]
    r = await api.step(plain, {"grads": G})
    assert r.json()["staleness"] is None
    assert r.json()["lr"] == 0.1
    r = await api.step(plain, {"grads": G, "base_version": 0})
    assert r.json()["staleness"] == 1
    assert r.json()["lr"] == 0.1


# --- plots ---------------------------------------------------------------------------------------


async def test_schedule_plots(api: Api) -> None:
    schedule = {"name": "one_cycle", "max_lr": 0.1, "total_steps": 50}
    sid = (await _create(api, schedule=schedule))["id"]
    await api.step(sid, {"grads": G})
    for query in ("", "?steps=50", "?steps=1"):
        r = await api.client.get(f"/v1/sessions/{sid}/schedule.png{query}", headers=api.headers)
        assert r.status_code == 200, r.text
        assert _png_size(r.content) == (800, 500)
    r = await api.client.get(f"/v1/sessions/{sid}/schedule.png?steps=0", headers=api.headers)
    assert r.status_code == 422
    plateau = (await _create(api, schedule={"name": "plateau"}))["id"]
    await api.step(plateau, {"grads": G, "loss": 1.0})
    r = await api.client.get(f"/v1/sessions/{plateau}/schedule.png", headers=api.headers)
    assert _png_size(r.content) == (800, 500)
    preview = {"lr": 0.1, "schedule": schedule, "steps": 50, "current_step": 10}
    r = await api.client.post("/v1/schedules/preview.png", json=preview, headers=api.headers)
    assert r.status_code == 200
    assert _png_size(r.content) == (800, 500)
    r = await api.client.post(
        "/v1/schedules/preview.png", json={**preview, "current_step": 50}, headers=api.headers
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "current_step"]
