"""Read-only views of a session (docs/training.md): params (averaged, or once a version is
reached), the range-test result and plot, the history, the schedule plot.

Each takes the engine (for its store, cache and waiting) and answers encoded bytes or
JSON-ready data; nothing here writes. Plots are drawn in a worker thread (matplotlib
takes tens of milliseconds), so the event loop keeps serving.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import orjson

from service.api import codecs
from service.api.codecs import Reply
from service.api.engine import OFFLOAD_ELEMENTS, Engine
from service.api.errors import NoAverage, NoRangeTest, WaitTimeout, invalid, spec_error
from service.api.schemas import PreviewPlotRequest
from service.api.spec import Spec
from service.api.stepping import current_lr, range_test_state, split_state
from service.core import plots
from service.core.averaging import read_average
from service.core.errors import SpecError
from service.core.lr_finder import LRFinderConfig, next_lr, ramp_lr, suggest
from service.core.schedules import parse_schedule
from service.core.state import OptState
from service.store.base import SessionMeta

Average = Literal["ema", "swa"]
#: most steps a schedule plot draws
MAX_PLOT_STEPS = 100_000


async def read_params(
    engine: Engine,
    tenant: str,
    session_id: str,
    binary: bool,
    *,
    average: Average | None = None,
    min_version: int | None = None,
    timeout: float = 30.0,
) -> Reply:
    """`GET .../params`: the params (or an average of them), after waiting for
    `min_version` when asked (408 if it is not reached within `timeout` seconds)."""
    if min_version is not None:
        wait = min(timeout, engine.settings.max_wait)
        reached = await engine.wait_version(tenant, session_id, min_version, wait)
        if reached is None:
            meta = await engine.owned_meta(tenant, session_id)
            raise WaitTimeout(
                f"version {min_version} was not reached within {wait:g} s; the session is at "
                f"version {meta.params_version}; ask again to keep waiting",
                meta.params_version,
            )
    current = await engine.load_current(tenant, session_id, with_state=average is not None)
    meta, spec, params = current.meta, current.spec, current.params
    counters: dict[str, Any] = {"step": meta.step, "version": meta.params_version}
    if average is not None:
        assert current.state is not None
        params, counters = _average(spec, meta, current.state, average, counters)

    def encode() -> Reply:
        tensors = spec.layout.unflatten(params)
        if binary:
            return codecs.binary_reply(tensors, counters)
        return codecs.json_reply({**counters, "params": tensors})

    return await engine.offload(params.size > OFFLOAD_ELEMENTS, encode)


def _average(
    spec: Spec, meta: SessionMeta, state: OptState, kind: Average, counters: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    if (spec.ema if kind == "ema" else spec.swa) is None:
        raise invalid(
            ["query", "average"],
            f"this session keeps no {kind} average (create it with {kind!r} settings)",
        )
    _, own = split_state(state)
    got = read_average(kind, spec.ema, spec.swa, own)
    if got is None:
        start = f" (SWA starts at step {spec.swa.start})" if kind == "swa" and spec.swa else ""
        raise NoAverage(
            f"no step has been averaged into the {kind} average yet{start}; the session is "
            f"at step {meta.step}"
        )
    averaged, n = got
    return averaged, {**counters, "average": kind, "averaged_steps": n}


# --- the range test ------------------------------------------------------------------------


async def lr_finder(engine: Engine, tenant: str, session_id: str) -> dict[str, Any]:
    """`GET .../lr-finder`: the range test so far, its suggestions, the next rate."""
    meta, spec = await _meta_spec(engine, tenant, session_id)
    config = _range_test_config(spec)
    state = range_test_state(meta)
    return {
        "config": config.model_dump(mode="json"),
        **state.model_dump(mode="json"),
        "next_lr": next_lr(config, state),
        "suggestions": {k: v.model_dump(mode="json") for k, v in suggest(config, state).items()},
    }


async def lr_finder_png(engine: Engine, tenant: str, session_id: str) -> bytes:
    """`GET .../lr-finder.png`: loss against rate with the suggestions marked."""
    meta, spec = await _meta_spec(engine, tenant, session_id)
    config = _range_test_config(spec)
    state = range_test_state(meta)

    def draw() -> bytes:
        return plots.lr_finder_png(config, state, suggest(config, state))

    return await engine.offload(True, draw)


def _range_test_config(spec: Spec) -> LRFinderConfig:
    if spec.lr_finder is None:
        raise NoRangeTest("this session runs no LR range test (create it with 'lr_finder')")
    return spec.lr_finder


async def _meta_spec(engine: Engine, tenant: str, session_id: str) -> tuple[SessionMeta, Spec]:
    meta = await engine.owned_meta(tenant, session_id, refresh=True)
    return meta, engine.spec_of(meta)


# --- history -------------------------------------------------------------------------------


async def history(engine: Engine, tenant: str, session_id: str, limit: int) -> dict[str, Any]:
    """`GET .../history`: the newest `limit` entries, most recent first."""
    _, spec = await _meta_spec(engine, tenant, session_id)
    entries = await engine.store.history(session_id, min(limit, spec.history))
    return {"limit": spec.history, "entries": [orjson.loads(e) for e in entries]}


# --- schedule plots ------------------------------------------------------------------------


async def schedule_png(engine: Engine, tenant: str, session_id: str, steps: int | None) -> bytes:
    """`GET .../schedule.png`: the session's rates with its current step marked.

    A range test draws its ramp; a loss-driven schedule (plateau) draws the rates its
    steps used (from the history; gaps where the history no longer reaches) and the
    current rate from the current step on, since later rates depend on losses not yet
    reported."""
    meta, spec = await _meta_spec(engine, tenant, session_id)
    n = max(100, 2 * meta.step) if steps is None else steps
    if not 1 <= n <= MAX_PLOT_STEPS:
        raise invalid(["query", "steps"], f"must be in [1, {MAX_PLOT_STEPS}]: got {n}")
    rates: np.ndarray | None = None
    current = meta.step
    title = None
    if spec.lr_finder is not None:
        config = spec.lr_finder
        n = config.num_steps if steps is None else n
        rates = np.array([ramp_lr(config, min(i, config.num_steps - 1)) for i in range(n)])
        current = len(range_test_state(meta).lrs)
        title = f"LR range test ramp ({config.mode}), {config.num_steps} steps"
    elif spec.schedule is not None and spec.schedule.stateful:
        rates = np.full(n, math.nan)
        for raw in await engine.store.history(session_id, spec.history):
            entry = orjson.loads(raw)
            if entry.get("kind") == "step" and not entry.get("skipped"):
                t = int(entry["step"]) - 1
                if 0 <= t < n:
                    rates[t] = float(entry["lr"])
        lr_now = current_lr(spec, meta)
        rates[min(meta.step, n) :] = lr_now
        title = f"{spec.schedule.name}: rates used so far, {lr_now:g} from step {meta.step} on"
    marked = current if current < n else None
    schedule = spec.schedule

    def draw() -> bytes:
        return plots.schedule_png(schedule, spec.hp.lr, n, marked, rates=rates, title=title)

    return await engine.offload(True, draw)


async def preview_png(engine: Engine, request: PreviewPlotRequest) -> bytes:
    """`POST /v1/schedules/preview.png`: the preview's curves as a PNG."""
    try:
        schedule = parse_schedule(request.schedule)
    except SpecError as exc:
        raise spec_error(exc, ["body", "schedule"]) from None
    current = request.current_step
    if current is not None and current >= request.steps:
        raise invalid(
            ["body", "current_step"], f"must be below steps ({request.steps}): got {current}"
        )

    def draw() -> bytes:
        return plots.schedule_png(schedule, request.lr, request.steps, current)

    return await engine.offload(True, draw)
