"""A sync session's accumulation (pure, as `stepping`).

**Sync sessions** (`consistency.mode = "sync"`): a push must be computed on the
current version; it is added to `acc.sum` and counted in `meta.extra["pending"]`; the
push that makes the count `accumulate` applies the combined gradient as one step (mean
or sum) with the mean of the pushes' losses (when all sent one). The others answer 202.
`meta.extra["last"]` keeps the last step's rate and norms for pushes that wait for it.
The pending record keeps `started_at`, the time of the accumulation's first push; once
`started_at + timeout` passed, the accumulation is resolved as `on_timeout` says, by the
next push (`accumulate`: "flush" makes that push the last contributor of a step of
fewer than `accumulate`; "drop" discards the accumulation as a skipped step, then that
push, computed on the same params, starts the next one) or by a reader waiting for the
step (`close_expired`, through the engine).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from service.core import find_nonfinite
from service.core.consistency import accumulation_deadline, accumulation_expired, reduce_grads
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.errors import StaleGradient
from service.sessions.model import LastStep, Pending, read_last, read_pending
from service.sessions.parsing import StepInput, nonfinite_grads
from service.sessions.spec import Spec
from service.sessions.stepping import (
    ACC_SUM,
    Computed,
    Loaded,
    StepArgs,
    apply_step,
    current_lr,
    history_entry,
    join_state,
    tensor_reply,
)
from service.store.base import SessionBlobs, SessionMeta


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


def mean_loss(losses: list[float | None] | None) -> float | None:
    """The step's loss from the pushes' (None when one came without; NaN when one was
    non-finite, which the store keeps as null)."""
    if not losses:
        return None
    return float(np.mean([math.nan if x is None else x for x in losses]))


def accumulate(s: Loaded, step_input: StepInput, stale: int | None, binary: bool) -> Computed:
    """A push into a sync session, computed on its current version (else 409): added to
    the accumulation, answered 202 (`_pending`), or, as the last one (`accumulate`
    reached, or the deadline passed under "flush"), applied with the others as one step
    (mean or sum; the pushes' mean loss). Under "drop", an expired accumulation is first
    discarded as a skipped step, and this push starts the next one."""
    spec, sync = s.spec, s.spec.sync
    assert sync is not None
    assert step_input.base_version is not None  # parse_step insists
    version = s.meta.params_version
    if stale != 0:
        raise StaleGradient(
            f"this sync session is at version {version}; a gradient computed on version "
            f"{step_input.base_version} is late (pull the params again); nothing was "
            "accumulated",
            version,
            step_input.base_version,
        )
    now = time.time()
    pending = pending_of(s.meta)
    due = accumulation_expired(sync, pending.count, pending.started_at, now)
    dropped: bytes | None = None
    if due and sync.on_timeout == "drop":
        # the expired accumulation goes first, as a skipped step that leaves params,
        # state and rate as they were: this push, computed on those same params,
        # starts the next accumulation, on the new version
        s.meta, dropped = _dropped(spec, s.meta, s.own, s.extra, pending.count, now)
        s.extra, version = dict(s.meta.extra), s.meta.params_version
        pending, due = pending_of(s.meta), False
    count = pending.count + 1
    with np.errstate(over="ignore"):
        grads = step_input.grads
        total = grads.copy() if count == 1 else np.add(s.own.arrays[ACC_SUM], grads)
    if spec.transforms.nonfinite != "skip" and not np.isfinite(total).all():
        # finite gradients whose sum overflows: refused, or the accumulation could
        # never complete (its sum stays non-finite)
        raise nonfinite_grads(*find_nonfinite(total, spec.layout))
    loss, losses = step_input.loss, pending.losses
    losses = None if losses is None or loss is None else [*losses, loss]
    if count < sync.accumulate and not due:
        s.own.arrays[ACC_SUM] = total
        started = now if count == 1 else pending.started_at
        s.extra["pending"] = Pending(
            base_version=version, count=count, losses=losses, started_at=started
        ).model_dump()
        done = _pending(spec, s.meta, s.params, join_state(s.opt, s.own), s.extra, count)
        done.history = dropped
        return done
    # the deadline passed: this push is the last one of a step of fewer than accumulate
    flushed = {"flushed": True} if count < sync.accumulate else None
    s.own.arrays.pop(ACC_SUM, None)
    s.extra["pending"] = Pending.empty(version + 1).model_dump()
    grads = reduce_grads(total, count, sync.reduce)
    step = StepArgs(grads, mean_loss(losses), step_input, stale, count, binary, flushed)
    return apply_step(s, step)


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
        entry = history_entry(
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
    s = Loaded.of(spec, meta, params, state)
    if sync.on_timeout == "drop":
        dropped, entry = _dropped(spec, meta, s.own, s.extra, count, now)
        new_meta = dropped.evolve(version=meta.version + 1)
        new_state = join_state(s.opt, s.own)
        body = {"step": new_meta.step, "version": new_meta.params_version, "dropped": count}
        return Computed(
            new_meta,
            SessionBlobs(params.tobytes(), new_state.to_bytes()),
            codecs.json_reply(body),
            Cached(new_meta.version, params, new_state),
            "dropped",
            entry,
        )
    total = s.own.arrays.pop(ACC_SUM)
    loss = mean_loss(pending.losses)
    grads = reduce_grads(total, count, sync.reduce)
    s.extra["pending"] = Pending.empty(meta.params_version + 1).model_dump()
    request = StepInput(grads, loss, "none", base_version=meta.params_version)
    flush = StepArgs(grads, loss, request, 0, count, history_extra={"flushed": True}, lenient=True)
    return apply_step(s, flush)


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
    return tensor_reply(counters, ret, tensors, binary)
