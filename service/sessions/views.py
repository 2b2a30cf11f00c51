"""Read-only views of a session (docs/training.md): params (averaged, or once a version is
reached), the range-test result and plot, the history, the schedule plot.

Each takes the engine (for its store, cache and waiting) and answers encoded bytes or
JSON-ready data; nothing here writes. Plots are drawn in a worker thread (matplotlib
takes tens of milliseconds), so the event loop keeps serving; what a plot draws is
computed there too (its cost grows with its steps and the session's history), and a
plot draws whatever values it is given (only the finite ones show), so one session's
numbers never make a read fail.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import orjson

from service.core import plots
from service.core.averaging import read_average
from service.core.errors import SpecError
from service.core.lr_finder import LRFinderConfig, next_lr, ramp_lr, suggest
from service.core.schedules import parse_schedule
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.codecs import Reply
from service.sessions.engine import Engine
from service.sessions.engine_base import heavy
from service.sessions.errors import NoAverage, NoRangeTest, WaitTimeout, invalid, spec_error
from service.sessions.parsing import MAX_PREVIEW_COST, check_preview
from service.sessions.requests import PreviewPlotRequest
from service.sessions.spec import Spec
from service.sessions.stepping import current_lr, range_test_state, split_state
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

    return await engine.offload(heavy(spec), encode)


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
    return meta, await engine.load_spec(meta)


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
    reported.

    Without `steps` it draws `max(100, 2 * step)` steps, at most `MAX_PLOT_STEPS` and the
    `MAX_PREVIEW_COST` evaluations a preview may take (so a session's own numbers never
    make its plot fail); `steps` past either is a 422 naming the limit. The rates are
    computed and drawn in a worker thread, and only finite ones are drawn."""
    meta, spec = await _meta_spec(engine, tenant, session_id)
    schedule = spec.schedule
    nodes = 1 if schedule is None else schedule.nodes
    most = max(1, min(MAX_PLOT_STEPS, MAX_PREVIEW_COST // nodes))
    if steps is None:
        n = min(max(100, 2 * meta.step), most)
    elif not 1 <= steps <= MAX_PLOT_STEPS:
        raise invalid(["query", "steps"], f"must be in [1, {MAX_PLOT_STEPS}]: got {steps}")
    elif steps > most:
        raise invalid(
            ["query", "steps"],
            f"{steps} steps of a spec of {nodes} schedules is {steps * nodes} schedule "
            f"evaluations, over the limit of {MAX_PREVIEW_COST}; ask for at most {most} steps",
        )
    else:
        n = steps
    current = meta.step
    title = None
    raw_history: list[bytes] = []
    lr_now = current_lr(spec, meta)
    if spec.lr_finder is not None:
        config = spec.lr_finder
        n = config.num_steps if steps is None else n
        current = len(range_test_state(meta).lrs)
        title = f"LR range test ramp ({config.mode}), {config.num_steps} steps"
    elif schedule is not None and schedule.stateful:
        raw_history = await engine.store.history(session_id, spec.history)
        title = f"{schedule.name}: rates used so far, {lr_now:g} from step {meta.step} on"
    marked = current if current < n else None

    def draw() -> bytes:
        rates: np.ndarray | None = None
        if spec.lr_finder is not None:
            config = spec.lr_finder
            last = config.num_steps - 1
            rates = np.array([ramp_lr(config, min(i, last)) for i in range(n)])
        elif schedule is not None and schedule.stateful:
            rates = _used_rates(raw_history, n)
            rates[min(meta.step, n) :] = lr_now
        return plots.schedule_png(schedule, spec.hp.lr, n, marked, rates=rates, title=title)

    return await engine.offload(True, draw)


def _used_rates(raw_history: list[bytes], n: int) -> np.ndarray:
    """The rates the history's steps used, by step (NaN where unknown: not in the
    history, skipped, or not a finite number)."""
    rates = np.full(n, math.nan)
    for raw in raw_history:
        entry = orjson.loads(raw)
        if not isinstance(entry, dict) or entry.get("kind") != "step" or entry.get("skipped"):
            continue
        step, lr = entry.get("step"), entry.get("lr")
        if isinstance(step, int) and isinstance(lr, (int, float)) and 0 <= step - 1 < n:
            rates[step - 1] = float(lr)
    return rates


async def preview_png(engine: Engine, request: PreviewPlotRequest) -> bytes:
    """`POST /v1/schedules/preview.png`: the preview's curves as a PNG, refused (422) as
    the preview is (`check_preview`); parsed, checked and drawn in a worker thread."""
    current = request.current_step

    def draw() -> bytes:
        try:
            schedule = parse_schedule(request.schedule)
        except SpecError as exc:
            raise spec_error(exc, ["body", "schedule"]) from None
        if current is not None and current >= request.steps:
            raise invalid(
                ["body", "current_step"], f"must be below steps ({request.steps}): got {current}"
            )
        check_preview(schedule, request.lr, request.steps)
        return plots.schedule_png(schedule, request.lr, request.steps, current)

    return await engine.offload(True, draw)
