"""What a pushed gradient and a reported loss do to a loaded session (pure): the entry
points the engine's transactions call (`compute_step`, `compute_metrics`). A push is
checked (staleness, a range test that is over), then goes into a sync session's
accumulation (`accumulation.accumulate`) or is applied as one step
(`stepping.apply_step`); a reported loss feeds a loss-driven schedule.
"""

from __future__ import annotations

import time

import numpy as np

from service.core.consistency import ConsistencyError, staleness, too_stale
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.accumulation import accumulate
from service.sessions.cache import Cached
from service.sessions.errors import RangeTestOver, StaleGradient, invalid
from service.sessions.parsing import StepInput
from service.sessions.spec import Spec, decode_schedule_state, encode_schedule_state
from service.sessions.stepping import (
    Computed,
    Loaded,
    StepArgs,
    apply_step,
    current_lr,
    history_entry,
    range_test_state,
)
from service.store.base import SessionMeta


def compute_step(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    state: OptState,
    step_input: StepInput,
    binary: bool,
) -> Computed:
    """One pushed gradient on the loaded session: a step, or (sync) an accumulation."""
    version = meta.params_version
    try:
        stale = staleness(version, step_input.base_version)
    except ConsistencyError as exc:
        raise invalid(["body", "base_version"], str(exc)) from None
    if spec.lr_finder is not None:
        finder = range_test_state(meta)
        if finder.done:
            raise RangeTestOver(
                f"the range test is over ({finder.stop_reason}) after {len(finder.lrs)} "
                "steps; read GET /v1/sessions/{id}/lr-finder for the result; nothing was applied"
            )
    loaded = Loaded.of(spec, meta, params, state)
    if spec.sync is not None:
        return accumulate(loaded, step_input, stale, binary)
    if too_stale(spec.consistency, stale):
        assert step_input.base_version is not None
        assert stale is not None
        limit = getattr(spec.consistency, "max_staleness", None)
        raise StaleGradient(
            f"the gradient was computed on version {step_input.base_version}, {stale} "
            f"versions behind the session (version {version}); this session takes at most "
            f"{limit}; nothing was applied",
            version,
            step_input.base_version,
        )
    step = StepArgs(step_input.grads, step_input.loss, step_input, stale, binary=binary)
    return apply_step(loaded, step)


def compute_metrics(
    spec: Spec, meta: SessionMeta, params: np.ndarray, state: OptState, loss: float
) -> Computed:
    """A loss reported without a step: a loss-driven schedule takes it; the params and
    their version stay."""
    if spec.lr_finder is not None:
        raise invalid(
            ["body", "loss"], "a range-test session takes its losses with its steps, not here"
        )
    schedule_state = decode_schedule_state(meta.schedule_state)
    observed = spec.schedule is not None and spec.schedule.stateful
    if observed:
        assert spec.schedule is not None
        assert schedule_state is not None
        schedule_state = spec.schedule.observe(schedule_state, loss)
    now = time.time()
    new_meta = meta.evolve(
        version=meta.version + 1,
        schedule_state=encode_schedule_state(schedule_state),
        updated_at=now,
    )
    lr = current_lr(spec, new_meta)
    body = {"step": meta.step, "version": meta.params_version, "lr": lr, "observed": observed}
    entry = history_entry("metrics", new_meta, now, lr, loss) if spec.history > 0 else None
    return Computed(
        new_meta,
        None,
        codecs.json_reply(body),
        Cached(new_meta.version, params, state),
        "metrics",
        entry,
    )
