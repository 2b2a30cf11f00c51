"""What a step, a pushed gradient or a reported loss does to a loaded session (pure).

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

**Sync sessions** (`consistency.mode = "sync"`): a push must be computed on the
current version; it is added to `acc.sum` and counted in `meta.extra["pending"]`; the
push that makes the count `accumulate` applies the combined gradient as one step (mean
or sum) with the mean of the pushes' losses (when all sent one). The others answer 202.
`meta.extra["last"]` keeps the last step's rate and norms for pushes that wait for it.
The pending record keeps `started_at`, the time of the accumulation's first push; once
`started_at + timeout` passed, the accumulation is resolved as `on_timeout` says, by the
next push (`compute_step`: "flush" makes that push the last contributor of a step of
fewer than `accumulate`; "drop" discards the accumulation as a skipped step, then that
push, computed on the same params, starts the next one) or by a reader waiting for the
step (`close_expired`, through the engine).

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
from service.core.consistency import (
    AsyncConsistency,
    ConsistencyError,
    accumulation_deadline,
    accumulation_expired,
    damped_lr,
    reduce_grads,
    staleness,
    too_stale,
)
from service.core.lr_finder import LRFinderState
from service.core.lr_finder import observe as observe_range_test
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.errors import Invalid, RangeTestOver, StaleGradient, field_error, invalid
from service.sessions.model import LastStep, Pending, read_last, read_pending
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


def pending_of(meta: SessionMeta) -> Pending:
    """A sync session's accumulation on its current version: `base_version`, `count`,
    `losses` (None once a push came without a loss) and `started_at` (Unix time of its
    first push; None when it is empty).

    A record written before accumulations had deadlines has no `started_at`: it counts
    from the session's `updated_at` (its last change, no earlier than its last push), so
    its deadline comes no earlier than it would have; the next push writes that down. An
    accumulation cannot start after the session's last change: a later `started_at` (a
    state file's, another replica's clock) reads as `updated_at`, so no record can put
    its deadline out of reach."""
    pending = read_pending(meta)
    if pending is None or pending.base_version != meta.params_version or not pending.count:
        return Pending.empty(meta.params_version)
    started, updated = pending.started_at, float(meta.updated_at)
    return pending.model_copy(
        update={"started_at": updated if started is None else min(started, updated)}
    )


def pending_deadline(spec: Spec, meta: SessionMeta) -> float | None:
    """When a sync session's open accumulation is due (Unix time; None when nothing is
    pending or the session is not sync)."""
    if spec.sync is None:
        return None
    started = pending_of(meta).started_at
    return None if started is None else accumulation_deadline(spec.sync, float(started))


def accumulation_due(spec: Spec, meta: SessionMeta) -> bool:
    """Whether a sync session's open accumulation passed its deadline, now: the next
    push or waiting reader resolves it (`close_expired`)."""
    if spec.sync is None:
        return False
    pending = pending_of(meta)
    return accumulation_expired(spec.sync, pending.count, pending.started_at, time.time())


def _mean_loss(losses: list[float | None] | None) -> float | None:
    """The step's loss from the pushes' (None when one came without; NaN when one was
    non-finite, which the store keeps as null)."""
    if not losses:
        return None
    return float(np.mean([math.nan if x is None else x for x in losses]))


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


def compute_step(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    state: OptState,
    step_input: StepInput,
    binary: bool,
) -> Computed:
    """One pushed gradient on the loaded session: a step, or (sync) an accumulation."""
    opt, own = split_state(state)
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
    grads, loss, contributors = step_input.grads, step_input.loss, 1
    extra = dict(meta.extra)
    history_extra: dict[str, Any] | None = None
    sync = spec.sync
    if sync is not None:
        assert step_input.base_version is not None  # parse_step insists
        if stale != 0:
            raise StaleGradient(
                f"this sync session is at version {version}; a gradient computed on version "
                f"{step_input.base_version} is late (pull the params again); nothing was "
                "accumulated",
                version,
                step_input.base_version,
            )
        now = time.time()
        pending = pending_of(meta)
        due = accumulation_expired(sync, pending.count, pending.started_at, now)
        dropped: bytes | None = None
        if due and sync.on_timeout == "drop":
            # the expired accumulation goes first, as a skipped step that leaves params,
            # state and rate as they were: this push, computed on those same params,
            # starts the next accumulation, on the new version
            meta, dropped = _dropped(spec, meta, own, extra, pending.count, now)
            extra, version = dict(meta.extra), meta.params_version
            pending, due = pending_of(meta), False
        count = pending.count + 1
        with np.errstate(over="ignore"):
            total = grads.copy() if count == 1 else np.add(own.arrays[ACC_SUM], grads)
        if spec.transforms.nonfinite != "skip" and not np.isfinite(total).all():
            # finite gradients whose sum overflows: refused, or the accumulation could
            # never complete (its sum stays non-finite)
            raise nonfinite_grads(*find_nonfinite(total, spec.layout))
        losses = pending.losses
        losses = None if losses is None or loss is None else [*losses, loss]
        if count < sync.accumulate and not due:
            own.arrays[ACC_SUM] = total
            started = now if count == 1 else pending.started_at
            extra["pending"] = Pending(
                base_version=version, count=count, losses=losses, started_at=started
            ).model_dump()
            done = _pending(spec, meta, params, join_state(opt, own), extra, count)
            done.history = dropped
            return done
        if count < sync.accumulate:  # the deadline passed: this push is the last one
            history_extra = {"flushed": True}
        grads = reduce_grads(total, count, sync.reduce)
        loss = _mean_loss(losses)
        contributors = count
        own.arrays.pop(ACC_SUM, None)
        extra["pending"] = Pending.empty(version + 1).model_dump()
    elif too_stale(spec.consistency, stale):
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
    return apply_step(
        spec,
        meta,
        params,
        opt,
        own,
        extra,
        grads,
        loss,
        step_input,
        stale,
        contributors,
        binary,
        history_extra=history_extra,
    )


def apply_step(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    opt: OptState,
    own: OptState,
    extra: dict[str, Any],
    grads: np.ndarray,
    loss: float | None,
    step_input: StepInput,
    stale: int | None,
    contributors: int,
    binary: bool,
    history_extra: dict[str, Any] | None = None,
    lenient: bool = False,
) -> Computed:
    """Apply `grads` as the session's next step (see the module docstring); the
    history entry gets `history_extra` on top (a federated round: its kind, clients).

    A step whose gradient or result is non-finite is skipped when the session's policy
    says `skip` (or with `lenient`, which a federated round's close uses: a round must
    always close), refused (422, nothing changed) otherwise."""
    t = meta.step
    schedule_state = decode_schedule_state(meta.schedule_state)
    finder = range_test_state(meta) if spec.lr_finder is not None else None
    lr = spec.lr(t, schedule_state, 0 if finder is None else len(finder.lrs))
    if isinstance(spec.consistency, AsyncConsistency):
        lr = damped_lr(lr, stale, spec.consistency.staleness_damping)
    now = time.time()
    result = apply_transforms(spec.transforms, grads, spec.layout)
    diverged = finder is not None and loss is not None and not math.isfinite(loss)
    new_params, new_state = params, join_state(opt, own)
    update_norm = 0.0
    delta: np.ndarray | None = None  # new minus old params, when the step needs it
    skipped = diverged or bool(result.nonfinite)
    if result.nonfinite and not diverged and spec.transforms.nonfinite != "skip" and not lenient:
        raise nonfinite_grads(result.nonfinite, result.nonfinite_tensors)  # parse_step did
    if not skipped:
        with np.errstate(all="ignore"):  # an overflow is refused or skipped just below
            new_params, new_opt = spec.optimizer.update(
                spec.hyper_at(t), result.grads, opt, params, lr, spec.layout, inplace=False
            )
        if step_input.missing:
            _restore_segments(spec.layout, step_input.missing, params, opt, new_params, new_opt)
        problem = nonfinite_result(spec.layout, new_params, new_opt, lr)
        if problem is not None:
            # never committed: the session keeps finite params and state (its own export
            # always imports); a range test takes it as divergence
            if finder is None and spec.transforms.nonfinite != "skip" and not lenient:
                raise problem
            skipped = True
            diverged = finder is not None
            new_params = params
    if skipped:
        if diverged:  # a non-finite loss or result ends the range test; nothing applied
            assert finder is not None
            assert spec.lr_finder is not None
            ended = observe_range_test(spec.lr_finder, finder, math.inf)
            extra["lr_finder"] = ended.model_dump()
        new_meta = meta.evolve(
            version=meta.version + 1,
            params_version=meta.params_version + 1,
            skipped=meta.skipped + 1,
            extra=extra,
            updated_at=now,
        )
        # params and optimizer state stay; a sync session's accumulator was emptied
        new_blobs = None
        if spec.sync is not None:
            new_blobs = SessionBlobs(params.tobytes(), new_state.to_bytes())
    else:
        if spec.schedule is not None and spec.schedule.stateful and loss is not None:
            assert schedule_state is not None
            schedule_state = spec.schedule.observe(schedule_state, loss)
        if finder is not None and spec.lr_finder is not None and loss is not None:
            extra["lr_finder"] = observe_range_test(spec.lr_finder, finder, loss).model_dump()
        if spec.averaging:
            averages = update_averages(
                spec.ema, spec.swa, _only(own, _AVERAGES, True), new_params, t + 1
            )
            own = join_state(_only(own, _AVERAGES, False), averages)
        new_state = join_state(new_opt, own)
        if spec.history > 0 or step_input.ret == "updates":  # computed once for both
            delta = np.subtract(new_params, params)
            update_norm = _norm(delta)
        new_meta = meta.evolve(
            version=meta.version + 1,
            params_version=meta.params_version + 1,
            step=meta.step + 1,
            schedule_state=encode_schedule_state(schedule_state),
            extra=extra,
            updated_at=now,
        )
        new_blobs = SessionBlobs(new_params.tobytes(), new_state.to_bytes())
    grad_norm = result.grad_norm if math.isfinite(result.grad_norm) else None
    if spec.sync is not None:  # what pushes that waited for this step are answered
        last = LastStep(
            lr=float(lr),
            grad_norm=None if grad_norm is None else float(grad_norm),
            clipped=bool(result.clipped),
            skipped=bool(skipped),
            contributors=contributors,
        )
        new_meta = new_meta.evolve(extra={**new_meta.extra, "last": last.model_dump()})
    counters: dict[str, Any] = {
        "step": new_meta.step,
        "version": new_meta.params_version,
        "lr": lr,
        "skipped": skipped,
        "grad_norm": grad_norm,
        "clipped": result.clipped,
        "staleness": stale,
        "contributors": contributors,
    }
    tensors: dict[str, np.ndarray] | None = None
    if step_input.ret == "params":
        tensors = spec.layout.unflatten(new_params)
    elif step_input.ret == "updates":
        tensors = spec.layout.unflatten(np.subtract(new_params, params) if delta is None else delta)
    reply = _tensor_reply(counters, step_input.ret, tensors, binary)
    entry = None
    if spec.history > 0:
        more = dict(history_extra or {})
        entry = _history_entry(
            str(more.pop("kind", "step")),
            new_meta,
            now,
            lr,
            loss if loss is None or math.isfinite(loss) else None,
            grad_norm=grad_norm,
            update_norm=update_norm,
            skipped=skipped,
            staleness=stale,
            contributors=contributors,
            **more,
        )
    return Computed(
        new_meta,
        new_blobs,
        reply,
        Cached(new_meta.version, new_params, new_state),
        "skipped" if skipped else "applied",
        entry,
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


def _pending(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    state: OptState,
    extra: dict[str, Any],
    count: int,
) -> Computed:
    """A sync push that does not complete the accumulation: commit it, answer 202."""
    assert spec.sync is not None
    version = meta.params_version
    new_meta = meta.evolve(version=meta.version + 1, extra=extra, updated_at=time.time())
    body = {
        "status": "pending",
        "version": version,
        "wait_for": version + 1,
        "pending": count,
        "accumulate": spec.sync.accumulate,
    }
    location = f"/v1/sessions/{meta.id}/params?min_version={version + 1}"
    reply = codecs.json_reply(body, status=202, headers={"Location": location})
    blobs = SessionBlobs(params.tobytes(), state.to_bytes())
    return Computed(new_meta, blobs, reply, Cached(new_meta.version, params, state), "pending")


def _dropped(
    spec: Spec,
    meta: SessionMeta,
    own: OptState,
    extra: dict[str, Any],
    count: int,
    now: float,
) -> tuple[SessionMeta, bytes | None]:
    """Discard an expired sync accumulation of `count` gradients (`on_timeout: "drop"`)
    as a skipped step: `acc.sum` leaves `own`; `version` and `skipped` go up by one while
    params, optimizer state, `step` and schedule stay; `last` tells the pushes waiting for
    the version that their step was skipped. The new meta (its store revision is left to
    the caller's commit: `meta.version` unchanged) and the history entry, which records
    `dropped: count` and `contributors: 0`."""
    own.arrays.pop(ACC_SUM, None)
    lr = current_lr(spec, meta)
    version = meta.params_version + 1
    last = LastStep(lr=lr, grad_norm=None, clipped=False, skipped=True, contributors=0)
    new_meta = meta.evolve(
        params_version=version,
        skipped=meta.skipped + 1,
        extra={
            **extra,
            "pending": Pending.empty(version).model_dump(),
            "last": last.model_dump(),
        },
        updated_at=now,
    )
    entry = None
    if spec.history > 0:
        entry = _history_entry(
            "step",
            new_meta,
            now,
            lr,
            None,
            grad_norm=None,
            update_norm=0.0,
            skipped=True,
            staleness=None,
            contributors=0,
            dropped=count,
        )
    return new_meta, entry


def close_expired(
    spec: Spec, meta: SessionMeta, params: np.ndarray, state: OptState
) -> Computed | None:
    """Resolve a sync accumulation whose deadline passed, as the session's `on_timeout`
    says, for a reader that waits for its step (nobody may push again): "flush" applies
    the combined gradients that arrived as one step (history: `flushed`), leniently (a
    non-finite result is skipped rather than refused: the accumulation must close);
    "drop" discards them as a skipped step (`_dropped`). None when there is nothing to
    resolve: not sync, nothing pending, not due yet, or resolved by someone else."""
    sync = spec.sync
    if sync is None:
        return None
    now = time.time()
    pending = pending_of(meta)
    count = pending.count
    if not accumulation_expired(sync, count, pending.started_at, now):
        return None
    opt, own = split_state(state)
    extra = dict(meta.extra)
    if sync.on_timeout == "drop":
        dropped, entry = _dropped(spec, meta, own, extra, count, now)
        new_meta = dropped.evolve(version=meta.version + 1)
        new_state = join_state(opt, own)
        body = {"step": new_meta.step, "version": new_meta.params_version, "dropped": count}
        return Computed(
            new_meta,
            SessionBlobs(params.tobytes(), new_state.to_bytes()),
            codecs.json_reply(body),
            Cached(new_meta.version, params, new_state),
            "dropped",
            entry,
        )
    total = own.arrays.pop(ACC_SUM)
    loss = _mean_loss(pending.losses)
    grads = reduce_grads(total, count, sync.reduce)
    extra["pending"] = Pending.empty(meta.params_version + 1).model_dump()
    return apply_step(
        spec,
        meta,
        params,
        opt,
        own,
        extra,
        grads,
        loss,
        StepInput(grads, loss, "none", base_version=meta.params_version),
        0,
        count,
        False,
        history_extra={"flushed": True},
        lenient=True,
    )


def _tensor_reply(
    counters: dict[str, Any], ret: str, tensors: dict[str, np.ndarray] | None, binary: bool
) -> Reply:
    if binary:
        return codecs.binary_reply(tensors or {}, {**counters, "return": ret})
    body = dict(counters)
    if tensors is not None:
        body[ret] = tensors
    return codecs.json_reply(body)


def waited_reply(
    spec: Spec, meta: SessionMeta, params: np.ndarray, ret: str, binary: bool
) -> Reply:
    """The answer to a sync push whose step happened while it waited: the counters and
    params of the version the wait ended on, with that version's step's rate and norms
    (`skipped` for an accumulation dropped at its deadline)."""
    last = read_last(meta)
    contributors = spec.sync.accumulate if spec.sync is not None else 1
    if last is not None and last.contributors is not None:
        contributors = last.contributors  # fewer at a deadline, 0 when dropped
    counters: dict[str, Any] = {
        "step": meta.step,
        "version": meta.params_version,
        "lr": current_lr(spec, meta) if last is None else last.lr,
        "skipped": last is not None and last.skipped,
        "grad_norm": None if last is None else last.grad_norm,
        "clipped": last is not None and last.clipped,
        "staleness": 0,
        "contributors": contributors,
    }
    tensors = spec.layout.unflatten(params) if ret == "params" else None
    return _tensor_reply(counters, ret, tensors, binary)


# --- a reported loss ---------------------------------------------------------------------


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
    entry = _history_entry("metrics", new_meta, now, lr, loss) if spec.history > 0 else None
    return Computed(
        new_meta,
        None,
        codecs.json_reply(body),
        Cached(new_meta.version, params, state),
        "metrics",
        entry,
    )


def _history_entry(
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
