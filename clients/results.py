"""The results of the clients' calls: the session document (`Session`), a step's answer
(`StepResult`), params (`ParamsResult`), a schedule preview (`SchedulePreview`), the
answer to a loss (`MetricsResult`), history entries (`HistoryEntry`), a range test
(`LRFinderResult`, its `Suggestion`s) and a federated session's round (`RoundInfo`) and
the answer to an update (`UpdateResult`). clients/decoding.py builds them from the
answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class Session:
    """A session document (`GET /v1/sessions/{id}`): `lr` is the rate of the next step
    (NaN when there is none: a range test that is over), `shapes` each tensor's shape;
    `doc` is the whole document as the server sent it.

    The training extensions (docs/training.md), as the server echoes them with defaults
    filled, None when absent (or from a server without them): `lr_finder` (the range
    test's config), `ema`, `swa`, `consistency` (`{"mode": "async" | "sync", ...}`),
    `history` (how many history entries it keeps) and, for sync sessions, `pending`
    (`{"base_version", "count", "accumulate", "started_at", "deadline"}`: the open
    accumulation, with Unix times, null when it is empty).

    Federated sessions (docs/federated.md): `federated` (`min_clients`,
    `expected_clients`, `round_timeout`, `aggregator`, `update`, defaults filled) and
    `round`, the open round's number; both None for other sessions.
    """

    id: str
    step: int
    version: int
    lr: float
    optimizer: dict[str, Any]
    schedule: dict[str, Any] | None
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    doc: dict[str, Any] = field(repr=False)
    lr_finder: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    swa: dict[str, Any] | None = None
    consistency: dict[str, Any] | None = None
    history: int | None = None
    pending: dict[str, Any] | None = None
    federated: dict[str, Any] | None = None
    round: int | None = None

    @property
    def sync(self) -> bool:
        """The session combines `accumulate` gradients per step (consistency "sync")."""
        return (self.consistency or {}).get("mode") == "sync"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Session:
        params = doc.get("params") or {}
        lr = doc.get("lr")
        history = doc.get("history")
        round_ = doc.get("round")
        consistency = doc.get("consistency")
        if isinstance(consistency, str):
            consistency = {"mode": consistency}
        return cls(
            id=str(doc["id"]),
            step=int(doc["step"]),
            version=int(doc["version"]),
            lr=math.nan if lr is None else float(lr),
            optimizer=dict(doc["optimizer"]),
            schedule=_opt_dict(doc.get("schedule")),
            dtype=str(doc["dtype"]),
            shapes={str(n): tuple(int(d) for d in info["shape"]) for n, info in params.items()},
            doc=dict(doc),
            lr_finder=_opt_dict(doc.get("lr_finder")),
            ema=_opt_dict(doc.get("ema")),
            swa=_opt_dict(doc.get("swa")),
            consistency=_opt_dict(consistency),
            history=None if history is None else int(history),
            pending=_opt_dict(doc.get("pending")),
            federated=_opt_dict(doc.get("federated")),
            round=None if round_ is None else int(round_),
        )


StepStatus = Literal["applied", "pending"]


@dataclass(frozen=True, eq=False)
class StepResult:
    """The answer to a step: the counters after it, the rate it used, the new params
    (`return_="params"`) or the updates (new minus old, `return_="updates"`).

    `skipped`: the gradient was non-finite and the session skips such steps;
    `grad_norm`: the gradient's norm (None when non-finite); `clipped`: clipping changed
    the gradient; `replayed`: this is the server's recorded answer to an earlier
    attempt with the same `Idempotency-Key` (the step was applied once, then).
    `staleness`: the session's version minus the `base_version` sent (None without
    one); `contributors`: the gradients combined into the step (K in a sync session;
    fewer when the accumulation was flushed at its deadline).

    A push into a sync session that did not complete the accumulation is `status
    "pending"` (the 202 answer, with `block=False`): `version` is the session's,
    `wait_for` the version the step will make, `pending` / `accumulate` how many of the
    K gradients are in; `step` is -1 and `lr` NaN (unknown yet), `contributors` 0, no
    params. A pending push the client waited for (`block=True`) is `status "applied"`
    with the params read at version >= `wait_for`, `staleness` 0, `contributors` K (a
    params read does not say how many: the history does), and the counters of that
    read; the rate, which a params read does not carry, is NaN then (`skipped`,
    `grad_norm`, `clipped` unknown: their defaults). With a `wait`, the
    server usually answers the step itself (with its rate) before the client has to.
    """

    step: int
    version: int
    lr: float
    params: dict[str, np.ndarray] | None = None
    updates: dict[str, np.ndarray] | None = None
    skipped: bool = False
    grad_norm: float | None = None
    clipped: bool = False
    replayed: bool = False
    status: StepStatus = "applied"
    staleness: int | None = None
    contributors: int = 1
    wait_for: int | None = None
    pending: int | None = None
    accumulate: int | None = None


@dataclass(frozen=True, eq=False)
class ParamsResult:
    """A session's current params, with the counters they belong to; for averaged params
    (`average="ema"`/`"swa"`), which average and how many steps are in it."""

    step: int
    version: int
    params: dict[str, np.ndarray]
    average: str | None = None
    averaged_steps: int | None = None


@dataclass(frozen=True)
class SchedulePreview:
    """The rates at steps `0 .. steps-1`, and the cycled momentum if the schedule has one."""

    lrs: list[float]
    momenta: list[float] | None = None


@dataclass(frozen=True)
class MetricsResult:
    """The answer to `post_metrics`: the counters (unchanged), the rate of the next step
    after the loss was taken in, and whether the schedule watches losses (`observed`)."""

    step: int
    version: int
    lr: float
    observed: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One entry of a session's history (`kind` "step", "metrics" or "round"): `step` /
    `version` after it, `time` (Unix seconds), the rate, and what the entry has of loss,
    gradient norm (as received), update norm, skipped, staleness and contributors
    (None where the server gave none); a federated round's entry also has its `round`,
    `clients`, their `num_examples` in all and their `metrics` averaged."""

    kind: str
    step: int
    version: int
    time: float
    lr: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    update_norm: float | None = None
    skipped: bool | None = None
    staleness: int | None = None
    contributors: int | None = None
    round: int | None = None
    clients: list[str] | None = None
    num_examples: int | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class Suggestion:
    """A rate suggested by a range test (`method`: steepest, minimum, steep, valley), or
    why there is none (`lr` None and `reason`); `index` / `loss` locate the point of
    the smoothed curve the method picked."""

    method: str
    lr: float | None
    index: int | None = None
    loss: float | None = None
    reason: str | None = None
    reference: str | None = None


@dataclass(frozen=True)
class LRFinderResult:
    """An LR range test (`GET .../lr-finder`): its `config`, the rate, loss and smoothed
    loss of each recorded step, the best smoothed loss, whether it is over and why
    (`stop_reason` "completed" or "diverged"; `nonfinite_lr`: the rate whose loss was
    not finite), the rate of its next step (None when over), and the `suggestions` by
    method. `session_id` is set by `lr_find` (None from `lr_finder`)."""

    config: dict[str, Any]
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    best_loss: float | None
    done: bool
    stop_reason: str | None
    nonfinite_lr: float | None
    next_lr: float | None
    suggestions: dict[str, Suggestion]
    session_id: str | None = None


@dataclass(frozen=True, eq=False)
class RoundInfo:
    """The open round of a federated session (`GET .../round`, docs/federated.md).

    `round`: its number; `opened_at` / `deadline`: Unix times (the server's clock);
    `received`: the updates in so far, from `clients` (their ids, in arrival order);
    `min_clients` / `expected_clients` (None: only the deadline closes it): the
    session's; `step` / `version`: the global params' counters; `lr`: the server rate
    the round will close with; `params`: the global params (name -> array; float64
    from a JSON answer).
    """

    round: int
    deadline: float
    opened_at: float
    received: int
    min_clients: int
    expected_clients: int | None
    clients: list[str]
    step: int
    version: int
    lr: float
    params: dict[str, np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class UpdateResult:
    """The answer to a federated update: the round it was for, `accepted`, how many
    updates that round holds (`received`), whether this update closed it (`closed`, then
    `next_round` is the round now open); `replayed`: the server's recorded answer to the
    same update sent before (an earlier attempt whose answer was lost)."""

    round: int
    accepted: bool
    received: int
    closed: bool
    next_round: int | None = None
    replayed: bool = False


def _opt_dict(value: Any) -> dict[str, Any] | None:
    return None if value is None else dict(value)


__all__ = [
    "HistoryEntry",
    "LRFinderResult",
    "MetricsResult",
    "ParamsResult",
    "RoundInfo",
    "SchedulePreview",
    "Session",
    "StepResult",
    "StepStatus",
    "Suggestion",
    "UpdateResult",
]
