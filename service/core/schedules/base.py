"""What every learning-rate schedule is: a validated spec and a pure function of the step.

A schedule (docs/design.md, decision 2) gives the absolute rate for step `t` (0-based: the
number of steps applied before it) in closed form, so any replica computes any step
directly. `lr(t, base_lr)` starts from the optimizer's `lr` (`base_lr`) unless the
schedule takes explicit rates (`cyclic`, `one_cycle`). A schedule may also cycle the
momentum (SGD) or beta1 (Adam family): `momentum(t)` gives it, `None` when it does not
(`cycles_momentum` says which, from the spec alone).

Any schedule may carry `warmup: {"steps": N, "start_factor": f}` (docs/api.md): for `t < N`
the rate is `base_lr * (f + (1 - f) * t / N)` (torch `LinearLR` with `end_factor=1`),
and from `t = N` on the schedule itself runs on `t - N` (its momentum too; during the
warm-up the momentum is the schedule's value at its own step 0).

The one stateful schedule (`plateau`) keeps a small state of scalars that reported
losses advance (`observe`); every other schedule ignores `state`.

Hostile input. A spec is data from a client, so its cost and its numbers are bounded:

* Caps (`service.core.schedules.limits`, checked by `parse_schedule` on the raw data
  before anything is built): at most `MAX_SCHEDULE_DEPTH` (8) nested `sequential`
  levels, `MAX_SCHEDULE_NODES` (32) schedules in all (nested ones included), and
  `MAX_SCHEDULE_LIST` (10,000) elements in any list field (milestones, boundaries,
  values, schedulers). Every step count, period, milestone and boundary is at most
  `MAX_STEP` (2**63 - 1): no step beyond it is reachable.
* Cost: `lr(t)` and `momentum(t)` evaluate each schedule node at most once (one
  milestone bisection per `sequential` level), so a step costs O(number of nodes).
* Bounded rates: every schedule must give a finite rate >= 0 at every step it can
  reach, or be refused at create / preview. `peak(base_lr, steps)` gives the largest
  rate (analytically, never raising: `inf` when the rate grows without bound or past the
  float range), and `check_rates` (bounds.py) refuses a schedule whose peak is not
  finite, naming the parameter at fault. A rate that only grows (`exponential` with
  gamma > 1, say) is fine inside a `sequential` that hands over at a milestone.
  `lr(t)` and `momentum(t)` never raise OverflowError, ZeroDivisionError or ValueError
  for any step in [0, 2**63): powers that overflow give inf (an accepted schedule never
  reaches them), and a cycled momentum stays in [0, 1).
"""

from __future__ import annotations

import math
import sys
from abc import abstractmethod
from collections.abc import Callable
from typing import Annotated, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.core.errors import ScheduleError
from service.core.validators import UnitInterval

#: the state of a stateful schedule: plain scalars, serializable like OptState scalars
ScheduleState = dict[str, float | int | bool]

#: the last step a schedule can reach (step counters are 64-bit)
MAX_STEP = 2**63 - 1
#: a step count or period (1 .. MAX_STEP) and a step index (0 .. MAX_STEP)
StepCount = Annotated[int, Field(ge=1, le=MAX_STEP)]
StepIndex = Annotated[int, Field(ge=0, le=MAX_STEP)]

#: where a field of a spec is: ("gamma",), ("schedulers", 1, "gamma")
Loc = tuple[str | int, ...]

FLOAT_MAX = sys.float_info.max


def num(x: float) -> str:
    """A number for a message: shortest round-trip form, `1e308` rather than `1e+308`."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    text = repr(float(x)).replace("e+", "e")
    return text[:-2] if text.endswith(".0") else text


def safe_pow(x: float, y: float) -> float:
    """`x ** y` for `x, y >= 0`, never raising: inf when it overflows (even for an
    exponent too large for a float), 0 when it underflows."""
    try:
        return math.pow(x, y)
    except (OverflowError, ValueError):
        if x > 1.0:
            return math.inf
        return 1.0 if x == 1.0 else 0.0


def scaled(base_lr: float, factor: float) -> float:
    """`base_lr * factor`, but 0 for a zero base even when the factor overflowed (no NaN
    from 0 * inf)."""
    return base_lr * factor if base_lr != 0.0 else 0.0


def scaled_pow(base_lr: float, x: float, y: float) -> float:
    """`base_lr * x ** y` (`x, y >= 0`), never raising: inf only when the product itself
    is past the float range (not merely `x ** y`: `0.1 * 2.0 ** 1024` is 1.8e307)."""
    factor = safe_pow(x, y)
    if math.isfinite(factor) or base_lr == 0.0:
        return scaled(base_lr, factor)
    try:  # x > 1 here; the exact product in logarithms
        return math.exp(math.log(base_lr) + y * math.log(x))
    except (OverflowError, ValueError):
        return math.inf


def unbounded(base_lr: float) -> float:
    """The supremum of a rate that grows without bound from `base_lr`: inf, or 0 for a
    zero base (which stays 0 at every step)."""
    return math.inf if base_lr != 0.0 else 0.0


def clamp(value: float, lo: float, hi: float) -> float:
    """`value` brought into [lo, hi] (a NaN stays NaN)."""
    if value < lo:
        return lo
    if value > hi:
        return hi
    return value


def first_overflow(rate: Callable[[int], float], last: int) -> int | None:
    """The first step in [0, last] where a non-decreasing `rate` is not finite (bisection,
    O(log last) evaluations), or None if it is finite up to `last`."""
    if last < 0 or math.isfinite(rate(last)):
        return None
    lo, hi = 0, last  # rate(hi) is not finite
    while lo < hi:
        mid = (lo + hi) // 2
        if math.isfinite(rate(mid)):
            lo = mid + 1
        else:
            hi = mid
    return lo


def growth_problem(
    param: str,
    value: float,
    rate: Callable[[int], float],
    factor_text: Callable[[int], str],
    base_lr: float,
    steps: int | None,
    offset: int,
) -> tuple[Loc, str]:
    """Why a rate `base_lr * factor(t)` whose factor grows with `t` (`param` > 1) is not
    finite: unbounded when `steps` is None, else it overflows by the last step."""
    if steps is None:
        t = first_overflow(rate, MAX_STEP - offset)
        where = "" if t is None else f" (it passes 1.8e308 at step {offset + t})"
        return (param,), (
            f"{param} {num(value)} > 1 makes the rate grow without bound{where}; "
            f"use it inside a sequential schedule with a milestone, or a {param} <= 1"
        )
    t = first_overflow(rate, steps - 1)
    t = steps - 1 if t is None else t
    return (param,), (
        f"the rate overflows to infinity at step {offset + t} "
        f"(base lr {num(base_lr)} x max factor {factor_text(t)})"
    )


class Warmup(BaseModel):
    """Linear warm-up before any schedule: `base_lr * (f + (1 - f) * t / steps)`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    steps: StepCount
    start_factor: UnitInterval = 0.0


class Schedule(BaseModel):
    """Base of every schedule spec: frozen, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    name: str
    warmup: Warmup | None = None

    #: the implementation or formula the tests compare against
    reference: ClassVar[str]
    #: True for the one schedule that keeps state advanced by reported losses
    stateful: ClassVar[bool] = False

    @abstractmethod
    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        """The schedule's own rate at its step `t` (warm-up already handled)."""

    def momentum_value(self, t: int) -> float | None:
        """The cycled momentum / beta1 at the schedule's own step `t`, if it cycles one."""
        return None

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        """The largest `value(t, base_lr, None)` over the schedule's own steps
        `0 .. steps - 1` (`steps >= 1`; None: every `t >= 0`), or a bound on it that the
        computed rates never pass; inf when the rate grows without bound or past the
        float range. Analytic and cheap; never raises.

        This default (for schedules that do not say) is inf: nothing is known.
        """
        return math.inf

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        """Why `value_peak(base_lr, steps)` is not finite: (loc of the field at fault,
        message). `offset` is the absolute step at which the schedule's own step 0 runs
        (for the message). Only called when the peak is not finite."""
        return (), (
            f"the rate overflows to infinity: with base lr {num(base_lr)} this schedule's "
            "largest rate is past 1.8e308"
        )

    @property
    def cycles_momentum(self) -> bool:
        """Whether `momentum(t)` can be non-None, decided from the spec without evaluating
        anything. A schedule that cycles the momentum gives it at every step.

        This default says yes for any class that defines `momentum_value`; the built-in
        schedules that do (`cyclic`, `one_cycle`, `sequential`) answer from their spec.
        """
        return type(self).momentum_value is not Schedule.momentum_value

    @property
    def nodes(self) -> int:
        """The number of schedules in this spec: itself and every nested one."""
        return 1

    @property
    def warmup_steps(self) -> int:
        return self.warmup.steps if self.warmup is not None else 0

    def _warmup_lr(self, t: int, base_lr: float) -> float:
        assert self.warmup is not None
        f = self.warmup.start_factor
        return base_lr * (f + (1.0 - f) * t / self.warmup.steps)

    def lr(self, t: int, base_lr: float, state: ScheduleState | None = None) -> float:
        """The rate for step `t` (0-based), warm-up included."""
        if t < 0:
            raise ScheduleError([{"loc": ("t",), "msg": f"step must be >= 0: got {t}"}])
        if self.warmup is not None and t < self.warmup.steps:
            return self._warmup_lr(t, base_lr)
        return float(self.value(t - self.warmup_steps, base_lr, state))

    def momentum(self, t: int) -> float | None:
        """The momentum / beta1 for step `t`, or None when this schedule does not cycle it."""
        return self.momentum_value(max(t - self.warmup_steps, 0))

    def peak(self, base_lr: float, steps: int | None = None) -> float:
        """The largest rate `lr(t, base_lr)` over steps `0 .. steps - 1` (None: over every
        step `t >= 0`; 0 for no step), warm-up included, computed analytically per
        schedule: a bound that the computed rates never pass, equal to the largest of
        them or (for a few families, noted in `value_peak`) to the supremum of the
        formula. inf when the rate grows without bound or past the float range. Never
        raises. (`plateau`: the largest rate its initial state or any state reached from
        it by `observe` gives.)"""
        if steps is not None and steps <= 0:
            return 0.0
        n = self.warmup_steps
        warm = 0.0
        if self.warmup is not None:
            warm = self._warmup_lr((n if steps is None else min(steps, n)) - 1, base_lr)
            if steps is not None and steps <= n:
                return warm if not math.isnan(warm) else math.inf
        own = self.value_peak(base_lr, None if steps is None else steps - n)
        best = max(warm, own)
        return math.inf if math.isnan(best) or math.isnan(own) else best

    def rate_problem(
        self, base_lr: float, steps: int | None = None, offset: int = 0
    ) -> tuple[Loc, str] | None:
        """Why `peak(base_lr, steps)` is not finite, as (loc of the field at fault,
        message), or None when it is finite. `offset`: the absolute step at which this
        schedule's step 0 runs (for the message)."""
        if math.isfinite(self.peak(base_lr, steps)):
            return None
        n = self.warmup_steps
        return self.value_problem(base_lr, None if steps is None else steps - n, offset + n)

    def lrs(self, steps: int, base_lr: float, start: int = 0) -> np.ndarray:
        """Rates for steps `start .. start + steps - 1` (what a preview shows)."""
        return np.array([self.lr(t, base_lr) for t in range(start, start + steps)])

    def momenta(self, steps: int, start: int = 0) -> np.ndarray | None:
        """Momenta for the same steps, or None when this schedule does not cycle it."""
        if not self.cycles_momentum:
            return None
        return np.array([self.momentum(t) for t in range(start, start + steps)])

    def initial_state(self, base_lr: float) -> ScheduleState | None:
        """The state before the first step (None for stateless schedules)."""
        return None

    def observe(self, state: ScheduleState, loss: float) -> ScheduleState:
        """Advance a stateful schedule by one reported loss; returns the new state."""
        raise ScheduleError(
            [{"loc": ("name",), "msg": f"schedule {self.name!r} does not take losses"}]
        )
