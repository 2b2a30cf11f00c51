"""Applying one step to a loaded session (pure): `apply_step`, and what it stands on.

The entry points for a push and a reported loss are `steps.compute_step` /
`compute_metrics`; a sync session's accumulation is `accumulation`.

The engine loads a session inside a store transaction and calls one of these with its
meta, params and state; they return what to commit (`Computed`: the new meta, the new
blobs or None to keep them, the encoded answer, the arrays to cache and the history
entry) and never write what they were given (optimizers run with `inplace=False`).
Refusals raise `SessionError`s before anything is committed (docs/design.md, decision 5).

**The state blob** holds the optimizer's `OptState` plus the session's own entries,
whose names carry a dot (no optimizer's do): `ema.*` and `swa.*` (parameter averages,
`service.core.averaging`) and `acc.sum` (a sync session's accumulated gradient).
`split_state` / `join_state` separate and reunite them.

**Per step** `t` (= steps applied before it): the rate is the schedule's (or, in a
range-test session, the ramp's at the count of losses in; in an async session with
`staleness_damping: inverse`, divided by `1 + staleness`), the optimizer's
hyperparameters get the schedule's cycled momentum, the gradient goes through the
session's transforms, then `optimizer.update`. After the update a loss-driven schedule
(`plateau`) and the range test fold in the step's loss, the averages take in the new
params, and a history entry records step, rate, loss, gradient norm and update norm.

**Version.** `meta.version` is the store's revision (every commit bumps it);
`meta.params_version` is the `version` clients see (docs/training.md): bumped by every
step, applied or skipped, and by nothing else.

**Tensors without a gradient** (`skip_missing`): the flat update runs with zeros in
their segments, after which their segments of the params and of every optimizer state
array are put back as they were, bit for bit (`_restore_segments`); see the engine's
docstring for how that compares with torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.core import FlatLayout, apply_transforms, find_nonfinite
from service.core.averaging import update_averages
from service.core.consistency import AsyncConsistency, damped_lr
from service.core.lr_finder import LRFinderState
from service.core.lr_finder import observe as observe_range_test
from service.core.state import OptState
from service.core.transforms import TransformResult
from service.sessions import codecs
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.errors import Invalid, field_error
from service.sessions.model import LastStep
from service.sessions.parsing import StepInput, nonfinite_grads
from service.sessions.spec import Spec, decode_schedule_state, encode_schedule_state
from service.store.base import SessionBlobs, SessionMeta

#: the state entry holding a sync session's accumulated gradient
ACC_SUM = "acc.sum"


@dataclass(slots=True)
class Computed:
    """What to commit and answer."""

    meta: SessionMeta
    blobs: SessionBlobs | None
    reply: Reply
    cached: Cached
    #: applied | skipped | pending | metrics (the step-duration metric's label)
    outcome: str
    history: bytes | None = None


# --- the state blob ----------------------------------------------------------------------


def split_state(state: OptState) -> tuple[OptState, OptState]:
    """(the optimizer's state, the session's own entries: names with a dot)."""
    opt = OptState(
        {k: v for k, v in state.arrays.items() if "." not in k},
        {k: v for k, v in state.scalars.items() if "." not in k},
    )
    own = OptState(
        {k: v for k, v in state.arrays.items() if "." in k},
        {k: v for k, v in state.scalars.items() if "." in k},
    )
    return opt, own


def join_state(*parts: OptState) -> OptState:
    """One state holding every part's entries (the parts' names do not overlap)."""
    joined = OptState()
    for part in parts:
        joined.arrays.update(part.arrays)
        joined.scalars.update(part.scalars)
    return joined


def _only(state: OptState, prefixes: tuple[str, ...], keep: bool) -> OptState:
    """The entries whose names start with one of `prefixes` (or, `keep=False`, the rest)."""
    return OptState(
        {k: v for k, v in state.arrays.items() if k.startswith(prefixes) == keep},
        {k: v for k, v in state.scalars.items() if k.startswith(prefixes) == keep},
    )


_AVERAGES = ("ema.", "swa.")


# --- meta helpers ------------------------------------------------------------------------


def range_test_state(meta: SessionMeta) -> LRFinderState:
    data = meta.extra.get("lr_finder")
    return LRFinderState() if data is None else LRFinderState.model_validate(data)


def current_lr(spec: Spec, meta: SessionMeta) -> float:
    """The rate the next step will use (before any staleness damping), as the session
    document, the listing, history entries and exports report it: always a finite
    number >= 0, and never an exception, since every read of a session goes through it.

    Sessions created now cannot have anything else (`check_rates` refuses a schedule
    whose rate is not finite at a step it can reach), but one stored by older code can:
    a rate past the float range (`exponential` with gamma 1e300 at step 2), or no rate
    at all (an error, a NaN), reads as the largest finite float (1.8e308). A step at
    such a rate is refused (422, nothing applied: its result is not finite)."""
    ramp = len(range_test_state(meta).lrs) if spec.lr_finder is not None else 0
    try:
        rate = float(spec.lr(meta.step, decode_schedule_state(meta.schedule_state), ramp))
    except (ArithmeticError, ValueError, TypeError, KeyError):
        rate = math.inf
    if not math.isfinite(rate):  # inf, or NaN
        return float(np.finfo(np.float64).max)
    return max(rate, 0.0)


# --- a step ------------------------------------------------------------------------------


@dataclass(slots=True)
class Loaded:
    """A session as a step finds it: its spec, meta and params, the optimizer's state and
    the session's own entries (`split_state`), and the `extra` the step commits (a copy
    of `meta.extra` the caller may have changed already: a sync step's pending)."""

    spec: Spec
    meta: SessionMeta
    params: np.ndarray
    opt: OptState
    own: OptState
    extra: dict[str, Any]

    @classmethod
    def of(cls, spec: Spec, meta: SessionMeta, params: np.ndarray, state: OptState) -> Loaded:
        opt, own = split_state(state)
        return cls(spec, meta, params, opt, own, dict(meta.extra))


@dataclass(slots=True)
class StepArgs:
    """What a step applies besides the session: the gradient (a sync step's combined
    one), its loss, the request (`step_input`: what to return, tensors without a
    gradient), its staleness, how many gradients it combines, the answer's format, what
    its history entry gets on top (a federated round: its kind and clients), and
    `lenient`: a non-finite result is skipped, not refused (a round's close, a deadline's
    flush: they must go through)."""

    grads: np.ndarray
    loss: float | None
    step_input: StepInput
    stale: int | None = None
    contributors: int = 1
    binary: bool = False
    history_extra: dict[str, Any] | None = None
    lenient: bool = False


@dataclass(slots=True)
class _Update:
    """The optimizer's update of a step: the new params and optimizer state (the old
    params and None when skipped), whether it is skipped, and whether a range test ends
    with it (a non-finite loss or result)."""

    params: np.ndarray
    opt: OptState | None
    skipped: bool
    diverged: bool


@dataclass(slots=True)
class _Done:
    """A step as committed: the new meta, blobs (None: keep them), params and state, and
    the update (new minus old params, when computed) with its norm."""

    meta: SessionMeta
    blobs: SessionBlobs | None
    params: np.ndarray
    state: OptState
    delta: np.ndarray | None = None
    update_norm: float = 0.0


def apply_step(s: Loaded, step: StepArgs) -> Computed:
    """Apply `step.grads` as the session's next step (see the module docstring).

    A step whose gradient or result is non-finite is skipped when the session's policy
    says `skip` (or with `step.lenient`), refused (422, nothing changed) otherwise."""
    spec, meta = s.spec, s.meta
    schedule_state = decode_schedule_state(meta.schedule_state)
    finder = range_test_state(meta) if spec.lr_finder is not None else None
    lr = spec.lr(meta.step, schedule_state, 0 if finder is None else len(finder.lrs))
    if isinstance(spec.consistency, AsyncConsistency):
        lr = damped_lr(lr, step.stale, spec.consistency.staleness_damping)
    now = time.time()
    result = apply_transforms(spec.transforms, step.grads, spec.layout)
    update = _update(s, lr, result, finder, step)
    if update.skipped:
        done = _skipped(s, update, finder, now)
    else:
        done = _applied(s, update, schedule_state, finder, step, now)
    grad_norm = result.grad_norm if math.isfinite(result.grad_norm) else None
    if spec.sync is not None:  # what pushes that waited for this step are answered
        last = LastStep(
            lr=float(lr),
            grad_norm=None if grad_norm is None else float(grad_norm),
            clipped=bool(result.clipped),
            skipped=update.skipped,
            contributors=step.contributors,
        )
        done.meta = done.meta.evolve(extra={**done.meta.extra, "last": last.model_dump()})
    counters: dict[str, Any] = {
        "step": done.meta.step,
        "version": done.meta.params_version,
        "lr": lr,
        "skipped": update.skipped,
        "grad_norm": grad_norm,
        "clipped": result.clipped,
        "staleness": step.stale,
        "contributors": step.contributors,
    }
    reply = _answer(s, done, counters, step)
    entry = _entry(spec, done, counters, step, now) if spec.history > 0 else None
    outcome = "skipped" if update.skipped else "applied"
    return Computed(
        done.meta,
        done.blobs,
        reply,
        Cached(done.meta.version, done.params, done.state),
        outcome,
        entry,
    )


def _update(
    s: Loaded, lr: float, result: TransformResult, finder: LRFinderState | None, step: StepArgs
) -> _Update:
    """Run the optimizer on the transformed gradient, unless the step is skipped: a
    non-finite loss in a range test, a non-finite gradient or result the session skips
    (or `step.lenient`); refused (422) when the session does not skip them."""
    spec = s.spec
    lenient = step.lenient or spec.transforms.nonfinite == "skip"
    diverged = finder is not None and step.loss is not None and not math.isfinite(step.loss)
    if result.nonfinite and not diverged and not lenient:
        raise nonfinite_grads(result.nonfinite, result.nonfinite_tensors)  # parse_step did
    if diverged or result.nonfinite:
        return _Update(s.params, None, True, diverged)
    with np.errstate(all="ignore"):  # an overflow is refused or skipped just below
        new_params, new_opt = spec.optimizer.update(
            spec.hyper_at(s.meta.step),
            result.grads,
            s.opt,
            s.params,
            lr,
            spec.layout,
            inplace=False,
        )
    missing = step.step_input.missing
    if missing:
        _restore_segments(spec.layout, missing, s.params, s.opt, new_params, new_opt)
    problem = nonfinite_result(spec.layout, new_params, new_opt, lr)
    if problem is None:
        return _Update(new_params, new_opt, False, False)
    # never committed: the session keeps finite params and state (its own export always
    # imports); a range test takes it as divergence
    if finder is None and not lenient:
        raise problem
    return _Update(s.params, None, True, finder is not None)


def _skipped(s: Loaded, update: _Update, finder: LRFinderState | None, now: float) -> _Done:
    """A skipped step: the version and `skipped` move on, params and optimizer state stay
    (a sync session's accumulator was emptied: its blobs are written)."""
    spec, meta = s.spec, s.meta
    if update.diverged:  # a non-finite loss or result ends the range test
        assert finder is not None
        assert spec.lr_finder is not None
        s.extra["lr_finder"] = observe_range_test(spec.lr_finder, finder, math.inf).model_dump()
    new_meta = meta.evolve(
        version=meta.version + 1,
        params_version=meta.params_version + 1,
        skipped=meta.skipped + 1,
        extra=s.extra,
        updated_at=now,
    )
    state = join_state(s.opt, s.own)
    blobs = SessionBlobs(s.params.tobytes(), state.to_bytes()) if spec.sync is not None else None
    return _Done(new_meta, blobs, s.params, state)


def _applied(
    s: Loaded,
    update: _Update,
    schedule_state: Any,
    finder: LRFinderState | None,
    step: StepArgs,
    now: float,
) -> _Done:
    """An applied step: a loss-driven schedule and the range test take its loss, the
    averages its params; the update's norm is computed for the history and `updates`."""
    spec, meta, loss = s.spec, s.meta, step.loss
    assert update.opt is not None
    if spec.schedule is not None and spec.schedule.stateful and loss is not None:
        assert schedule_state is not None
        schedule_state = spec.schedule.observe(schedule_state, loss)
    if finder is not None and spec.lr_finder is not None and loss is not None:
        s.extra["lr_finder"] = observe_range_test(spec.lr_finder, finder, loss).model_dump()
    own = s.own
    if spec.averaging:
        averages = update_averages(
            spec.ema, spec.swa, _only(own, _AVERAGES, True), update.params, meta.step + 1
        )
        own = join_state(_only(own, _AVERAGES, False), averages)
    state = join_state(update.opt, own)
    done = _Done(meta, None, update.params, state)
    if spec.history > 0 or step.step_input.ret == "updates":  # computed once for both
        done.delta = np.subtract(update.params, s.params)
        done.update_norm = _norm(done.delta)
    done.meta = meta.evolve(
        version=meta.version + 1,
        params_version=meta.params_version + 1,
        step=meta.step + 1,
        schedule_state=encode_schedule_state(schedule_state),
        extra=s.extra,
        updated_at=now,
    )
    done.blobs = SessionBlobs(update.params.tobytes(), state.to_bytes())
    return done


def _answer(s: Loaded, done: _Done, counters: dict[str, Any], step: StepArgs) -> Reply:
    """The step's answer: its counters and the new params, the update, or no tensor."""
    ret = step.step_input.ret
    tensors: dict[str, np.ndarray] | None = None
    if ret == "params":
        tensors = s.spec.layout.unflatten(done.params)
    elif ret == "updates":
        delta = np.subtract(done.params, s.params) if done.delta is None else done.delta
        tensors = s.spec.layout.unflatten(delta)
    return tensor_reply(counters, ret, tensors, step.binary)


def _entry(spec: Spec, done: _Done, counters: dict[str, Any], step: StepArgs, now: float) -> bytes:
    """The step's history entry, with `step.history_extra` on top (its `kind` too)."""
    more = dict(step.history_extra or {})
    loss = step.loss
    return history_entry(
        str(more.pop("kind", "step")),
        done.meta,
        now,
        counters["lr"],
        loss if loss is None or math.isfinite(loss) else None,
        grad_norm=counters["grad_norm"],
        update_norm=done.update_norm,
        skipped=counters["skipped"],
        staleness=step.stale,
        contributors=step.contributors,
        **more,
    )


def _norm(x: np.ndarray) -> float:
    """The L2 norm of finite `x`, finite too (a float32 sum of squares may overflow)."""
    with np.errstate(over="ignore"):
        norm = float(np.sqrt(np.dot(x, x)))
    if math.isfinite(norm):
        return norm
    scale = float(np.max(np.abs(x)))
    scaled = x.astype(np.float64) / scale
    return scale * math.sqrt(float(np.dot(scaled, scaled)))


def nonfinite_result(
    layout: FlatLayout, params: np.ndarray, state: OptState, lr: float
) -> Invalid | None:
    """The refusal of a step whose new params or optimizer state hold NaN or inf (an
    overflow: a huge rate, a zero eps over a zero gradient, ...), None when all is finite.
    The refusal names the tensors and the arrays at fault."""
    arrays = {"params": params, **state.arrays}
    bad = {key: a for key, a in arrays.items() if not np.isfinite(a).all()}
    scalars = [k for k, v in state.scalars.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad and not scalars:
        return None
    names: list[str] = []
    for array in bad.values():
        names.extend(n for n in find_nonfinite(array, layout)[1] if n not in names)
    where = ", ".join([*bad, *scalars])
    msg = (
        f"this step would make non-finite values (NaN or inf) in {where}; nothing was "
        f"applied: the rate ({lr:g}), the optimizer's settings (a zero eps, ...) or the "
        "gradient's size overflow"
    )
    at = names or list(layout.names[:1])
    return Invalid(msg, [field_error(["body", "grads", n], msg) for n in at])


def tensor_reply(
    counters: dict[str, Any], ret: str, tensors: dict[str, np.ndarray] | None, binary: bool
) -> Reply:
    """An answer of counters and tensors: safetensors with the counters as metadata, or
    JSON with the tensors under `ret`."""
    if binary:
        return codecs.binary_reply(tensors or {}, {**counters, "return": ret})
    body = dict(counters)
    if tensors is not None:
        body[ret] = tensors
    return codecs.json_reply(body)


def history_entry(
    kind: str, meta: SessionMeta, now: float, lr: float, loss: float | None, **more: Any
) -> bytes:
    """One history entry (docs/training.md): the counters after it, its time, rate and
    loss, and what else the kind records."""
    entry = {
        "kind": kind,
        "step": meta.step,
        "version": meta.params_version,
        "time": now,
        "lr": lr,
        "loss": loss,
    }
    return orjson.dumps({**entry, **more})


def _restore_segments(
    layout: FlatLayout,
    names: tuple[str, ...],
    params: np.ndarray,
    state: OptState,
    new_params: np.ndarray,
    new_state: OptState,
) -> None:
    """Put the segments of `names` back as they were before the step, in `new_params`
    and in every array of `new_state` (both are the step's own copies: `update(...,
    inplace=False)`); an array made by this step (a lazy buffer) gets zeros there, not
    what a zero gradient (plus weight decay) made of it."""
    for name in names:
        seg = layout[name]
        if seg.size == 0:
            continue
        lo, hi = seg.offset, seg.stop
        new_params[lo:hi] = params[lo:hi]
        for key, array in new_state.arrays.items():
            old = state.arrays.get(key)
            array[lo:hi] = 0 if old is None else old[lo:hi]
