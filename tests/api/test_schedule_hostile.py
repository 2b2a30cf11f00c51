"""Hostile schedules (issue 12, items 1 and 3), seen from the API.

* Size: a spec nested too deep, holding too many schedules or too long a list is a 422
  naming the limit at create, preview and preview.png (nested sequential schedules once
  cost exponential time: depth 23 froze a worker for 48 s), a preview is held to a
  budget of schedule evaluations, and its work runs off the event loop.
* Rates: a schedule whose rate is not finite at some step it can reach on the
  optimizer's lr is a 422 at create and preview (it used to brick the session at the
  step where its rate overflowed), and a preview never answers a null rate.
* Reads: a session stored by older code with such a schedule (planted here through the
  store) still reads: GET, the listing, schedule.png and the state export answer 200 with
  finite numbers, and a step at its overflowing rate is a 422 that changes nothing.
  Plots draw inf, NaN and 1e308 without failing.

No test measures time: cost is asserted by counting schedule evaluations.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.support import BINARY, Api, decode, encode
from tests.support.schedule_specs import flat, nested

PROBLEM = "application/problem+json"
PNG = b"\x89PNG\r\n\x1a\n"
PARAMS = {"w": [1.0, -2.0], "b": [0.5]}
GRADS = {"w": [0.1, 0.2], "b": [-0.3]}
#: the limits this file expects (service.core.schedules.limits, service.sessions.parsing)
MAX_DEPTH = 8
MAX_NODES = 32
MAX_LIST = 10_000
MAX_COST = 2_000_000
FLOAT_MAX = float(np.finfo(np.float64).max)


# --- specs -----------------------------------------------------------------------------------


#: (what, optimizer lr, schedule, loc of the field at fault under the schedule)
OVERFLOWING: list[tuple[str, float, dict[str, Any], list[Any]]] = [
    ("gamma 10 on lr 1e308", 1e308, {"name": "exponential", "gamma": 10.0}, ["gamma"]),
    ("gamma 1e300", 0.1, {"name": "exponential", "gamma": 1e300}, ["gamma"]),
    ("gamma 1.5", 0.1, {"name": "exponential", "gamma": 1.5}, ["gamma"]),
    (
        "gamma 10 until step 400",
        0.1,
        {
            "name": "sequential",
            "schedulers": [
                {"name": "exponential", "gamma": 10.0},
                {"name": "cosine", "T_max": 10},
            ],
            "milestones": [400],
        },
        ["schedulers", 0, "gamma"],
    ),
    (
        "step gamma 1e300",
        0.1,
        {"name": "step", "step_size": 1, "gamma": 1e300},
        ["gamma"],
    ),
]

#: schedules whose rates stay finite: some grow, within bounds
BOUNDED: list[tuple[float, dict[str, Any]]] = [
    (0.1, {"name": "exponential", "gamma": 0.5}),
    (1e-3, {"name": "exponential", "gamma": 1.0}),
    (
        1e-3,
        {
            "name": "sequential",
            "schedulers": [
                {"name": "exponential", "gamma": 10.0},
                {"name": "cosine", "T_max": 10},
            ],
            "milestones": [5],
        },
    ),
    (1e308, {"name": "cosine", "T_max": 7}),
    (1.7e308, {"name": "step", "step_size": 2, "gamma": 0.5, "warmup": {"steps": 3}}),
    (0.0, {"name": "exponential", "gamma": 1e300}),
    (1.0, {"name": "one_cycle", "max_lr": 1e308, "total_steps": 50}),
]


def finite_lr(value: Any) -> float:
    assert isinstance(value, (int, float)), value
    assert math.isfinite(value), value
    assert value >= 0, value
    return float(value)


def problem_of(r: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


def assert_refused(r: httpx.Response, loc: list[Any], *phrases: str) -> None:
    """A 422 problem with an error at `loc` (or under it), each phrase in its message."""
    body = problem_of(r)
    hits = [e for e in body["errors"] if e["loc"][: len(loc)] == loc]
    assert hits, (loc, body)
    for phrase in phrases:
        assert any(phrase in e["msg"] for e in hits), (phrase, body)
        assert phrase in body["detail"], (phrase, body)


def create_body(schedule: dict[str, Any], lr: float = 0.1, **more: Any) -> dict[str, Any]:
    return {"optimizer": {"name": "sgd", "lr": lr}, "schedule": schedule, "params": PARAMS, **more}


async def create(api: Api, schedule: dict[str, Any], lr: float = 0.1) -> httpx.Response:
    return await api.client.post("/v1/sessions", json=create_body(schedule, lr))


async def preview(
    api: Api, schedule: dict[str, Any], lr: float = 0.1, steps: int = 100, png: bool = False
) -> httpx.Response:
    path = "/v1/schedules/preview.png" if png else "/v1/schedules/preview"
    return await api.client.post(path, json={"lr": lr, "schedule": schedule, "steps": steps})


async def every_entry(api: Api, schedule: dict[str, Any], lr: float = 0.1) -> list[httpx.Response]:
    """The answers of create, preview and preview.png to `schedule`."""
    return [
        await create(api, schedule, lr),
        await preview(api, schedule, lr, steps=1),
        await preview(api, schedule, lr, steps=1, png=True),
    ]


# --- size caps -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_nesting_deeper_than_the_cap_is_422_naming_it(api: Api) -> None:
    for r in await every_entry(api, nested(MAX_DEPTH + 1)):
        assert_refused(r, ["body", "schedule"], f"over the limit of {MAX_DEPTH}", "depth")
    assert (await create(api, nested(MAX_DEPTH))).status_code == 201


@pytest.mark.asyncio
async def test_depth_23_the_cpu_bomb_is_refused_before_any_evaluation(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec of the issue (23 nested sequential levels): refused by its size, so
    not a single schedule is evaluated."""
    calls = count_evaluations(monkeypatch)
    for r in await every_entry(api, nested(23)):
        assert_refused(r, ["body", "schedule"], f"over the limit of {MAX_DEPTH}")
    assert calls == []


@pytest.mark.asyncio
async def test_more_schedules_than_the_cap_is_422_naming_it(api: Api) -> None:
    for r in await every_entry(api, flat(MAX_NODES + 1)):
        assert_refused(r, ["body", "schedule"], f"over the limit of {MAX_NODES}")
    assert (await create(api, flat(MAX_NODES))).status_code == 201


@pytest.mark.asyncio
async def test_a_list_longer_than_the_cap_is_422_naming_it(api: Api) -> None:
    schedule = {"name": "multistep", "milestones": list(range(1, MAX_LIST + 2)), "gamma": 0.5}
    for r in await every_entry(api, schedule):
        assert_refused(r, ["body", "schedule", "milestones"], f"over the limit of {MAX_LIST}")


# --- cost ------------------------------------------------------------------------------------


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every evaluation of a schedule counted: each class's `value` (its rate) and
    `momentum_value` (its cycled momentum); the list gets the thread of each call."""
    from service.core.schedules import SCHEDULES

    calls: list[int] = []
    for cls in SCHEDULES.values():
        for method in ("value", "momentum_value"):
            if method not in vars(cls):  # inherited: `cycles_momentum` looks at which
                continue
            original = getattr(cls, method)

            def counted(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                calls.append(threading.get_ident())
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, counted)
    return calls


@pytest.mark.asyncio
async def test_a_preview_evaluates_each_schedule_at_most_once_per_step(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the deepest nesting allowed, a step costs at most one evaluation per schedule
    of the spec, rate and momentum each (finding whether and which momentum a nested
    schedule cycles took 2**depth evaluations)."""
    calls = count_evaluations(monkeypatch)
    nodes = 2 * MAX_DEPTH + 1
    one_cycle = {"name": "one_cycle", "max_lr": 0.1, "total_steps": 7}
    for spec, cycles in ((nested(MAX_DEPTH), False), (nested(MAX_DEPTH, one_cycle), True)):
        for steps in (1, 200):
            calls.clear()
            r = await preview(api, spec, steps=steps)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["lrs"]) == steps
            assert (body["momenta"] is not None) == cycles
            assert 0 < len(calls) <= 2 * steps * nodes, (cycles, steps)


@pytest.mark.asyncio
async def test_a_preview_is_evaluated_off_the_event_loop(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a small preview: its cost grows with the request."""
    calls = count_evaluations(monkeypatch)
    loop_thread = threading.get_ident()
    for png in (False, True):
        calls.clear()
        r = await preview(api, {"name": "exponential", "gamma": 0.9}, steps=20, png=png)
        assert r.status_code == 200, r.text
        assert calls
        assert loop_thread not in calls


@pytest.mark.asyncio
async def test_a_preview_over_the_evaluation_budget_is_422_naming_it(api: Api) -> None:
    schedule = flat(MAX_NODES)  # 32 schedules: 62,500 steps are the budget
    most = MAX_COST // MAX_NODES
    for png in (False, True):
        for steps in (most + 1, 100_000):
            r = await preview(api, schedule, steps=steps, png=png)
            assert_refused(r, ["body", "steps"], f"over the limit of {MAX_COST}", str(most))
    r = await preview(api, schedule, steps=most)
    assert r.status_code == 200, r.text
    assert len(r.json()["lrs"]) == most


@pytest.mark.asyncio
async def test_a_session_plot_over_the_budget_is_422_and_its_default_fits(api: Api) -> None:
    sid = (await api.create(create_body(flat(MAX_NODES))))["id"]
    most = MAX_COST // MAX_NODES
    r = await api.client.get(f"/v1/sessions/{sid}/schedule.png", params={"steps": most + 1})
    assert_refused(r, ["query", "steps"], f"over the limit of {MAX_COST}")
    r = await api.client.get(f"/v1/sessions/{sid}/schedule.png", params={"steps": most})
    assert r.status_code == 200, r.text
    assert r.content.startswith(PNG)


# --- rates that overflow ---------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "lr", "schedule", "loc"), OVERFLOWING, ids=lambda v: str(v))
async def test_a_schedule_whose_rate_overflows_is_422_everywhere(
    api: Api, what: str, lr: float, schedule: dict[str, Any], loc: list[Any]
) -> None:
    for r in await every_entry(api, schedule, lr):
        assert_refused(r, ["body", "schedule", *loc])
    for steps in (1, 3, 100):
        assert_refused(await preview(api, schedule, lr, steps=steps), ["body", "schedule", *loc])
    r = await api.client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    assert r.json()["sessions"] == []


@pytest.mark.asyncio
async def test_a_preview_never_answers_a_null_or_non_finite_rate(api: Api) -> None:
    """Whatever the schedule: a 422, or rates that are all finite numbers >= 0 (JSON has
    no infinity: an overflowed rate was answered as null)."""
    answered = 0
    cases = [(lr, s) for _, lr, s, _ in OVERFLOWING] + BOUNDED
    for lr, schedule in cases:
        for steps in (1, 10, 500):
            r = await preview(api, schedule, lr, steps=steps)
            if r.status_code == 422:
                problem_of(r)
                continue
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["lrs"]) == steps
            for value in body["lrs"] + (body["momenta"] or []):
                assert isinstance(value, (int, float)), (schedule, body)
                assert math.isfinite(value), (schedule, value)
                assert value >= 0, (schedule, value)
            answered += 1
    assert answered >= 3 * len(BOUNDED)


@pytest.mark.asyncio
async def test_schedules_with_bounded_rates_are_accepted_and_plotted(api: Api) -> None:
    """Rates that grow within bounds, rates near the float range, a zero base lr."""
    for lr, schedule in BOUNDED:
        r = await create(api, schedule, lr)
        assert r.status_code == 201, (schedule, r.text)
        doc = r.json()
        finite_lr(doc["lr"])
        r = await preview(api, schedule, lr, steps=60, png=True)
        assert r.status_code == 200, (schedule, r.text)
        assert r.content.startswith(PNG)
        r = await api.client.get(f"/v1/sessions/{doc['id']}/schedule.png")
        assert r.status_code == 200, (schedule, r.text)


@pytest.mark.asyncio
async def test_an_import_with_an_overflowing_schedule_is_422(api: Api) -> None:
    """A state file goes through the same rules as a creation request."""
    sid = (await api.create(create_body({"name": "exponential", "gamma": 0.5})))["id"]
    tensors, metadata = decode(await export(api, sid))
    spec = json.loads(metadata["spec"])
    for gamma in (1e300, 10.0):
        spec["schedule"]["gamma"] = gamma
        bad = encode(tensors, {**metadata, "spec": json.dumps(spec)})
        r = await import_(api, bad)
        assert_refused(r, ["body", "__metadata__", "spec", "schedule", "gamma"])


async def export(api: Api, sid: str) -> bytes:
    r = await api.client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    return r.content


async def import_(api: Api, data: bytes) -> httpx.Response:
    return await api.client.post(
        "/v1/sessions/import", content=data, headers={"Content-Type": BINARY}
    )


# --- sessions stored by older code -----------------------------------------------------------


async def plant(api: Api, sid: str, **changes: Any) -> None:
    """Rewrite session `sid` in the store as older code could have left it (`changes`
    to its meta; `schedule` replaces the stored spec's schedule), and forget it in the
    app's memory, as a replica that never saw it."""
    got = await api.store.read(sid)
    assert got is not None
    meta, blobs = got
    if "schedule" in changes:
        changes["spec"] = {**meta.spec, "schedule": changes.pop("schedule")}
    await api.store.delete(sid)
    await api.store.create(meta.evolve(**changes), blobs, api.settings.session_ttl)
    engine = api.app.state.engine
    engine._specs.pop(sid, None)
    engine.cache.pop(sid)


async def assert_reads(api: Api, sid: str) -> dict[str, Any]:
    """Every read of `sid` answers 200 with finite numbers; its document."""
    doc = await api.get(sid)
    finite_lr(doc["lr"])
    r = await api.client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    (summary,) = [s for s in r.json()["sessions"] if s["id"] == sid]
    finite_lr(summary["lr"])
    for params in ({}, {"steps": 5}, {"steps": 1}, {"steps": 10_000}):
        r = await api.client.get(f"/v1/sessions/{sid}/schedule.png", params=params)
        assert r.status_code == 200, (params, r.text)
        assert r.content.startswith(PNG)
    r = await api.client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    r = await api.client.get(f"/v1/sessions/{sid}/history")
    assert r.status_code == 200, r.text
    return doc


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("schedule", "step"),
    [
        ({"name": "exponential", "gamma": 1e300, "warmup": None}, 2),  # 0.1 * 1e600
        ({"name": "exponential", "gamma": 10.0, "warmup": None}, 400),  # 0.1 * 10**400
        ({"name": "step", "step_size": 1, "gamma": 1e300, "warmup": None}, 3),
    ],
    ids=["gamma-1e300-step-2", "gamma-10-step-400", "step-gamma-1e300"],
)
async def test_a_stored_session_whose_rate_overflowed_still_reads(
    api: Api, schedule: dict[str, Any], step: int
) -> None:
    sid = (await api.create(create_body({"name": "exponential", "gamma": 0.5})))["id"]
    await plant(api, sid, schedule=schedule, step=step)
    before = await assert_reads(api, sid)
    assert before["step"] == step
    assert before["schedule"]["gamma"] == schedule["gamma"]
    # a step at an overflowing rate: refused, nothing changed
    r = await api.step(sid, {"grads": GRADS})
    assert 400 <= r.status_code < 500, r.text
    problem_of(r, r.status_code)
    after = await assert_reads(api, sid)
    assert (after["step"], after["version"]) == (before["step"], before["version"])
    # its own export is refused on import (today's rules), not a 500
    problem_of(await import_(api, await export(api, sid)))


@pytest.mark.asyncio
async def test_a_stored_plateau_at_an_infinite_rate_still_reads(api: Api) -> None:
    body = create_body({"name": "plateau", "patience": 0})
    sid = (await api.create(body))["id"]
    r = await api.step(sid, {"grads": GRADS, "loss": 1.0})
    assert r.status_code == 200, r.text
    got = await api.store.read(sid)
    assert got is not None
    assert got[0].schedule_state is not None
    await plant(api, sid, schedule_state={**got[0].schedule_state, "lr": "inf"})
    await assert_reads(api, sid)
    r = await api.step(sid, {"grads": GRADS, "loss": 1.0})
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.asyncio
async def test_a_stored_session_nested_past_todays_caps_still_reads_and_steps(api: Api) -> None:
    """A spec stored before the caps (deeper, more schedules) is not refused on reading:
    its evaluation costs O(its size) all the same."""
    sid = (await api.create(create_body({"name": "exponential", "gamma": 0.5})))["id"]
    deep = nested(MAX_DEPTH + 4)
    await plant(api, sid, schedule=deep)
    doc = await assert_reads(api, sid)
    assert doc["schedule"]["name"] == "sequential"
    r = await api.step(sid, {"grads": GRADS})
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_a_plot_of_a_session_far_along_fits_its_default_steps(api: Api) -> None:
    """`schedule.png` without `steps` draws twice the session's steps, at most the
    plot's limit: a session at step 60,000 is not refused its own plot."""
    sid = (await api.create(create_body({"name": "exponential", "gamma": 0.5})))["id"]
    await plant(api, sid, step=60_000)
    r = await api.client.get(f"/v1/sessions/{sid}/schedule.png")
    assert r.status_code == 200, r.text
    assert r.content.startswith(PNG)


# --- plots -----------------------------------------------------------------------------------


def hostile_rates() -> Iterator[list[float]]:
    """Rates a plot may be given: inf, NaN, up to the float range, subnormal."""
    yield [1e308]
    yield [1e308, math.inf, math.inf]
    yield [0.1, math.nan, 0.05, math.inf]
    yield [math.nan, math.nan]
    yield [math.inf]
    yield [0.0, FLOAT_MAX]
    yield [1.7e308, 1.7e308, 1e-300]
    yield [5e-324, 1e-320]


def test_a_schedule_plot_draws_inf_nan_and_huge_rates() -> None:
    from service.core import plots

    for rates in hostile_rates():
        for current in (None, 0, len(rates) - 1):
            png = plots.schedule_png(None, 0.1, len(rates), current, rates=np.array(rates))
            assert png.startswith(PNG), rates


def test_a_schedule_plot_of_rates_near_the_float_range_draws() -> None:
    from service.core import plots
    from service.core.schedules import parse_schedule

    schedule = parse_schedule({"name": "cosine", "T_max": 5})
    for lr in (1e308, 1.7e308, FLOAT_MAX):
        for steps, current in ((1, 0), (2, None), (50, 10)):
            assert plots.schedule_png(schedule, lr, steps, current).startswith(PNG), lr


@pytest.mark.parametrize("mode", ["exp", "linear"])
@pytest.mark.parametrize(
    "losses",
    [[1e308], [0.0, 1e308, 1.79e308], [1.0, 2.0, 1.7e308], [1e-300, 1e300, 1.7e308]],
    ids=repr,
)
def test_a_range_test_plot_draws_huge_losses_and_rates(mode: str, losses: list[float]) -> None:
    from service.core import plots
    from service.core.lr_finder import LRFinderState, parse_lr_finder_config, ramp_lr, suggest

    for start, end in ((1e-7, 10.0), (1e300, 1.7e308)):
        config = parse_lr_finder_config(
            {"start_lr": start, "end_lr": end, "num_steps": 20, "mode": mode}
        )
        lrs = tuple(ramp_lr(config, i) for i in range(len(losses)))
        state = LRFinderState(
            lrs=lrs, losses=tuple(losses), smoothed=tuple(losses), best_loss=min(losses)
        )
        png = plots.lr_finder_png(config, state, suggest(config, state))
        assert png.startswith(PNG)
