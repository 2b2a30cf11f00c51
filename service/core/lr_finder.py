"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3), as plain data and pure functions.

The server runs the test one step per HTTP request: it keeps an `LRFinderState` (plain
tuples and scalars, serializable to JSON and bytes), tells the client the rate for the
next step (`next_lr`), and folds in each reported loss with `observe`, which returns a
new state and never mutates its input. When the test is over, `suggest` proposes rates.

The test follows davidtvs/pytorch-lr-finder (`LRFinder.range_test` and `LRFinder.plot`):

* the rate of step `i` (0-based) over `N = num_steps` steps (its `ExponentialLR` and
  `LinearLR` schedulers over `num_iter`)::

      exp:    lr_i = start_lr * (end_lr / start_lr) ** (i / (N - 1))
      linear: lr_i = start_lr + (end_lr - start_lr) * i / (N - 1)

  so the first step runs at `start_lr` and the last at `end_lr`. (fastai's `LRFinder`
  uses `i / N` and never reaches `end_lr`; we use pytorch-lr-finder's ramp.)
* the loss reported for step `i` is recorded against `lr_i` (pytorch-lr-finder records
  the loss of the batch trained at `lr_i`, computed before that batch's update);
* smoothing, with `f = smooth_f` the weight of the NEW loss (default 0.05)::

      s_0 = loss_0                       (the first loss is not smoothed)
      s_i = f * loss_i + (1 - f) * s_{i-1}

  and, as pytorch-lr-finder, `smooth_f = 0` disables smoothing (`s_i = loss_i`);
* `best` is the smallest smoothed loss so far (`s_0` at first); the test stops as
  *diverged* when `s_i > diverge_th * best` (default 5), and that diverging point is
  recorded, as pytorch-lr-finder appends it before breaking out of its loop; otherwise it
  stops as *completed* once `num_steps` losses are in.

Where we differ from pytorch-lr-finder (each for a reason):

* a non-finite loss (NaN, +-inf) ends the test as *diverged* (pytorch-lr-finder has no
  such check, so a NaN would run on to `num_iter`; fastai stops on a NaN smoothed loss).
  That loss is not recorded, so every recorded number stays finite and the state is strict
  JSON; its rate is kept in `nonfinite_lr`. fastai's suggestions likewise drop everything
  from the first NaN on.
* a negative loss is refused (`LRFinderError`): the divergence rule `s > diverge_th * best`
  assumes positive losses (with a negative first loss both references stop at once);
  shift such a loss by a constant before reporting it.
* `num_steps` must be at least 17 (see `LRFinderConfig`).

Suggestions (`suggest`), each computed on the recorded SMOOTHED losses (pytorch-lr-finder's
`smooth_f` smoothing above, for every method; fastai smooths its losses differently, with a
debiased EMA `avg = 0.98 * avg + 0.02 * loss; smooth = avg / (1 - 0.98 ** n)` in its
`Recorder`, which we do not reproduce):

* `steepest` (pytorch-lr-finder's `plot(skip_start=10, skip_end=5, suggest_lr=True)`):
  trim 10 points at the start and 5 at the end, then `lr[argmin(np.gradient(loss))]`;
* on fastai's slice `lrs[num_steps // 10 : -5]` (`Learner.lr_find`, `num_it // 10`), the
  `fastai.callback.schedule` suggestion functions:

  - `minimum`: `lr[argmin(loss)] / 10` (the point marked is the minimum itself, as fastai
    plots it);
  - `steep`: `lr[argmin(g)]` with `g_k = (loss_{k+1} - loss_k) / (log lr_{k+1} - log lr_k)`;
  - `valley`: the longest strictly decreasing subsequence of the losses (fastai's `lds`
    dynamic program; not necessarily a contiguous run), ending at `end` with length
    `len`; with `start = end - len`, the index `start + int(len / 3) + int(len / 6)`.
    fastai's `start = end - len` lies one before where a contiguous run of that length
    ending at `end` would begin, so when the two first points decrease and no longer
    decreasing subsequence exists, its index is -1 and fastai returns the LAST rate of
    the slice; we clamp that index to 0.

  fastai computes on float32 tensors; we compute in float64, which can only matter in a
  near tie.

A suggestion with too few points is `Suggestion(lr=None, reason=...)`, never an
exception: `steepest` and `steep` need 2 points after trimming (pytorch-lr-finder catches
`np.gradient`'s ValueError; fastai's `argmin` would raise), `minimum` and `valley` need 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.core.errors import CoreError, SpecError, StateError
from service.core.validators import interval

#: points pytorch-lr-finder's plot trims at the start and at the end (`skip_start`, `skip_end`)
SKIP_START = 10
SKIP_END = 5
#: points fastai's `lr_find` trims at the end (`[num_it // 10 : -5]`)
FASTAI_SKIP_END = 5
#: the fewest steps whose completed test leaves the 2 points every suggestion needs after
#: pytorch-lr-finder's trimming (10 + 5 + 2; fastai's slice then holds at least 11 points)
MIN_STEPS = SKIP_START + SKIP_END + 2
#: the most steps: the state is a few lists of this length, re-read on every request
MAX_STEPS = 10_000

Mode = Literal["exp", "linear"]
StopReason = Literal["completed", "diverged"]
Method = Literal["steepest", "minimum", "steep", "valley"]
METHODS: tuple[Method, ...] = ("steepest", "minimum", "steep", "valley")


class LRFinderError(SpecError):
    """An invalid range-test configuration, or a loss the test cannot take."""


class LRFinderConfig(BaseModel):
    """The range test's settings, with pytorch-lr-finder's names (`num_iter` is `num_steps`,
    `step_mode` is `mode`) and defaults, and fastai's `start_lr` default (1e-7).

    * `start_lr` (1e-7) > 0 and `end_lr` (10) > `start_lr`: the rates of the first and
      the last step;
    * `num_steps` (100) in [17, 10000]: pytorch-lr-finder only needs 2 (the ramp divides
      by `num_steps - 1`), fastai raises it to 6; we ask for 17 so that a completed test
      always leaves the 2 points the `steepest` suggestion needs after trimming 10 at the
      start and 5 at the end. The upper bound keeps the stored state small;
    * `mode` ("exp"): "exp" or "linear" ramp;
    * `smooth_f` (0.05) in [0, 1): the weight of the new loss in the smoothing (0: none);
    * `diverge_th` (5) > 1: stop when the smoothed loss exceeds `diverge_th` times the best.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    start_lr: Annotated[float, interval(0.0, lo_open=True)] = 1e-7
    end_lr: Annotated[float, interval(0.0, lo_open=True)] = 10.0
    num_steps: Annotated[int, interval(MIN_STEPS, MAX_STEPS)] = 100
    mode: Mode = "exp"
    smooth_f: Annotated[float, interval(0.0, 1.0, hi_open=True)] = 0.05
    diverge_th: Annotated[float, interval(1.0, lo_open=True)] = 5.0

    @field_validator("end_lr")
    @classmethod
    def _above_start(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("start_lr")
        if start is not None and not value > start:
            raise PydanticCustomError(
                "lr_range",
                "must be > start_lr ({start}): got {value}",
                {"start": start, "value": value},
            )
        return value


def parse_lr_finder_config(data: Mapping[str, Any]) -> LRFinderConfig:
    """Validate a range-test configuration; raises LRFinderError naming each field at fault,
    e.g. `end_lr must be > start_lr (0.1): got 0.01`."""
    try:
        return LRFinderConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise LRFinderError(
            [{"loc": tuple(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        ) from None


def ramp_lr(config: LRFinderConfig, i: int) -> float:
    """The rate of step `i` (0-based, `0 <= i < num_steps`), as pytorch-lr-finder's
    `ExponentialLR` / `LinearLR` compute it with `r = i / (num_steps - 1)`:
    `start * (end / start) ** r` or `start + r * (end - start)`."""
    if not 0 <= i < config.num_steps:
        raise CoreError(f"step must be in [0, {config.num_steps}): got {i}")
    r = i / (config.num_steps - 1)
    if config.mode == "exp":
        return float(config.start_lr * (config.end_lr / config.start_lr) ** r)
    return config.start_lr + r * (config.end_lr - config.start_lr)


class LRFinderState(BaseModel):
    """The range test so far: one entry per reported loss, plus the stop status.

    * `lrs[i]`: the rate of step `i`; `losses[i]`: the loss reported for it;
      `smoothed[i]`: the smoothed loss (what the divergence rule and the suggestions use);
    * `best_loss`: the smallest smoothed loss (None before the first loss);
    * `done`, `stop_reason`: "completed" (every step in), "diverged" (the smoothed loss
      passed `diverge_th * best_loss`, or a loss was not finite), None while running;
    * `nonfinite_lr`: the rate of the step whose loss was not finite (not recorded).

    Frozen, with tuples, so a state is never changed in place; `to_json`/`to_bytes` and
    `from_json`/`from_bytes` round-trip it exactly (floats are written in their shortest
    round-trip form).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lrs: tuple[float, ...] = ()
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    best_loss: float | None = None
    done: bool = False
    stop_reason: StopReason | None = None
    nonfinite_lr: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LRFinderState:
        n = len(self.lrs)
        if len(self.losses) != n or len(self.smoothed) != n:
            raise ValueError(
                f"lrs, losses and smoothed must have one length: got "
                f"{n}, {len(self.losses)}, {len(self.smoothed)}"
            )
        if (self.best_loss is None) != (n == 0):
            raise ValueError("best_loss is set exactly when a loss is recorded")
        if self.done != (self.stop_reason is not None):
            raise ValueError("stop_reason is set exactly when done")
        if self.nonfinite_lr is not None and self.stop_reason != "diverged":
            raise ValueError("nonfinite_lr is set only when the test diverged")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_json(cls, data: str | bytes | bytearray) -> LRFinderState:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise StateError(f"not a range-test state: {exc.errors()[0]['msg']}") from None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> LRFinderState:
        return cls.from_json(bytes(data))


def next_lr(config: LRFinderConfig, state: LRFinderState) -> float | None:
    """The rate for the next step, or None when the test is over."""
    if state.done:
        return None
    return ramp_lr(config, len(state.lrs))


def observe(config: LRFinderConfig, state: LRFinderState, loss: float) -> LRFinderState:
    """Fold in the loss reported for the next step (run at `next_lr`); returns a new state.

    Pure: `state` is left as it was. Raises LRFinderError when the test is already over
    or the loss is negative.
    """
    if state.done:
        raise LRFinderError(
            [{"loc": ("loss",), "msg": f"the range test is over ({state.stop_reason})"}]
        )
    value = float(loss)
    if value < 0 and math.isfinite(value):  # -inf is a non-finite loss: diverged, below
        raise LRFinderError(
            [
                {
                    "loc": ("loss",),
                    "msg": f"must be >= 0 (the divergence rule compares it to "
                    f"diverge_th * best): got {value}",
                }
            ]
        )
    i = len(state.lrs)
    lr = ramp_lr(config, i)
    f = config.smooth_f
    smoothed = value if i == 0 or f == 0 else f * value + (1 - f) * state.smoothed[-1]
    if not (math.isfinite(value) and math.isfinite(smoothed)):
        return state.model_copy(
            update={"done": True, "stop_reason": "diverged", "nonfinite_lr": lr}
        )
    best = smoothed if state.best_loss is None else min(state.best_loss, smoothed)
    reason: StopReason | None = None
    if smoothed > config.diverge_th * best:
        reason = "diverged"
    elif i + 1 >= config.num_steps:
        reason = "completed"
    return state.model_copy(
        update={
            "lrs": (*state.lrs, lr),
            "losses": (*state.losses, value),
            "smoothed": (*state.smoothed, smoothed),
            "best_loss": best,
            "done": reason is not None,
            "stop_reason": reason,
        }
    )


class Suggestion(BaseModel):
    """A suggested rate, or why there is none.

    `lr` is the suggestion; `index` and `loss` locate the point of the curve the method
    picked (`state.lrs[index]`, `state.smoothed[index]`), which is what a plot marks;
    for `minimum` that point is the minimum and `lr` is a tenth of its rate.
    """

    model_config = ConfigDict(frozen=True)

    method: Method
    lr: float | None
    index: int | None = None
    loss: float | None = None
    reason: str | None = None
    reference: str


def _none(method: Method, reference: str, reason: str) -> Suggestion:
    return Suggestion(method=method, lr=None, reason=reason, reference=reference)


def _at(method: Method, reference: str, state: LRFinderState, index: int, lr: float) -> Suggestion:
    return Suggestion(
        method=method, lr=float(lr), index=index, loss=state.smoothed[index], reference=reference
    )


def _too_few(need: int, have: int, trimmed: str, recorded: int) -> str:
    return (
        f"needs at least {need} point{'s' if need > 1 else ''} after trimming {trimmed}; "
        f"have {have} of {recorded} recorded"
    )


def steepest(config: LRFinderConfig, state: LRFinderState) -> Suggestion:
    """pytorch-lr-finder's suggestion: trim `SKIP_START` points at the start and `SKIP_END`
    at the end, then the rate at `argmin(np.gradient(smoothed losses))`."""
    ref = "torch_lr_finder.LRFinder.plot (skip_start=10, skip_end=5)"
    stop = len(state.lrs) - SKIP_END
    lrs, losses = state.lrs[SKIP_START:stop], state.smoothed[SKIP_START:stop]
    if len(losses) < 2:
        trimmed = f"{SKIP_START} at the start and {SKIP_END} at the end"
        return _none("steepest", ref, _too_few(2, len(losses), trimmed, len(state.lrs)))
    k = int(np.argmin(np.gradient(np.asarray(losses, dtype=np.float64))))
    return _at("steepest", ref, state, SKIP_START + k, lrs[k])


def _fastai_slice(
    config: LRFinderConfig, state: LRFinderState
) -> tuple[int, np.ndarray, np.ndarray, str]:
    """fastai's `lrs[num_it // 10 : -5]` and the losses likewise, with the slice's start."""
    start = config.num_steps // 10
    lrs = np.asarray(state.lrs[start:-FASTAI_SKIP_END], dtype=np.float64)
    losses = np.asarray(state.smoothed[start:-FASTAI_SKIP_END], dtype=np.float64)
    return (
        start,
        lrs,
        losses,
        f"{start} at the start (num_steps // 10) and {FASTAI_SKIP_END} at the end",
    )


def minimum(config: LRFinderConfig, state: LRFinderState) -> Suggestion:
    """fastai's `minimum`: a tenth of the rate at the smallest loss of fastai's slice."""
    ref = "fastai.callback.schedule.minimum"
    start, lrs, losses, trimmed = _fastai_slice(config, state)
    if len(losses) < 1:
        return _none("minimum", ref, _too_few(1, 0, trimmed, len(state.lrs)))
    k = int(np.argmin(losses))
    return _at("minimum", ref, state, start + k, lrs[k] / 10)


def steep(config: LRFinderConfig, state: LRFinderState) -> Suggestion:
    """fastai's `steep`: the rate where `d loss / d log(lr)` (forward differences) is
    smallest, on fastai's slice; the left point of the steepest segment."""
    ref = "fastai.callback.schedule.steep"
    start, lrs, losses, trimmed = _fastai_slice(config, state)
    if len(losses) < 2:
        return _none("steep", ref, _too_few(2, len(losses), trimmed, len(state.lrs)))
    grads = np.diff(losses) / np.diff(np.log(lrs))
    k = int(np.argmin(grads))
    return _at("steep", ref, state, start + k, lrs[k])


def _longest_decreasing(losses: np.ndarray) -> tuple[int, int]:
    """`(end, length)` of the longest strictly decreasing subsequence, `end` the first index
    where a subsequence of that length ends (fastai's `lds` table and its `max_end`).

    fastai fills `lds[i] = 1 + max(lds[j] for j < i if losses[j] > losses[i])` in O(n^2);
    the same numbers come from patience sorting on the negated losses in O(n log n):
    `tails[m]` is the smallest negated end of a strictly increasing run of length m + 1.
    """
    tails: list[float] = []
    best_end, best_len = 0, 1 if len(losses) else 0
    for i, x in enumerate(-losses):
        m = bisect.bisect_left(tails, float(x))
        if m == len(tails):
            tails.append(float(x))
        else:
            tails[m] = float(x)
        if m + 1 > best_len:
            best_end, best_len = i, m + 1
    return best_end, best_len


def valley(config: LRFinderConfig, state: LRFinderState) -> Suggestion:
    """fastai's `valley`: in the longest strictly decreasing subsequence of fastai's slice
    (length `len`, ending at `end`, `start = end - len`), the rate at
    `start + int(len / 3) + int(len / 6)` (clamped to 0; see the module docstring)."""
    ref = "fastai.callback.schedule.valley"
    start, lrs, losses, trimmed = _fastai_slice(config, state)
    if len(losses) < 1:
        return _none("valley", ref, _too_few(1, 0, trimmed, len(state.lrs)))
    end, length = _longest_decreasing(losses)
    # fastai: max_start = max_end - lds[max_end]; sections = (max_end - max_start) / 3;
    # idx = max_start + int(sections) + int(sections / 2); a single point leaves both at 0
    if length <= 1:
        end, length = 0, 0
    sections = length / 3
    k = max(end - length + int(sections) + int(sections / 2), 0)
    return _at("valley", ref, state, start + k, lrs[k])


def suggest(config: LRFinderConfig, state: LRFinderState) -> dict[str, Suggestion]:
    """Every suggestion, by method name: steepest, minimum, steep, valley."""
    return {
        "steepest": steepest(config, state),
        "minimum": minimum(config, state),
        "steep": steep(config, state),
        "valley": valley(config, state),
    }


__all__ = [
    "MAX_STEPS",
    "METHODS",
    "MIN_STEPS",
    "LRFinderConfig",
    "LRFinderError",
    "LRFinderState",
    "Suggestion",
    "minimum",
    "next_lr",
    "observe",
    "parse_lr_finder_config",
    "ramp_lr",
    "steep",
    "steepest",
    "suggest",
    "valley",
]
