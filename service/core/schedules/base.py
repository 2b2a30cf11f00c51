"""What every learning-rate schedule is: a validated spec and a pure function of the step.

A schedule (DESIGN.md, decision 2) gives the absolute rate for step `t` (0-based: the
number of steps applied before it) in closed form, so any replica computes any step
directly. `lr(t, base_lr)` starts from the optimizer's `lr` (`base_lr`) unless the
schedule takes explicit rates (`cyclic`, `one_cycle`). A schedule may also cycle the
momentum (SGD) or beta1 (Adam family): `momentum(t)` gives it, `None` when it does not.

Any schedule may carry `warmup: {"steps": N, "start_factor": f}` (API.md): for `t < N`
the rate is `base_lr * (f + (1 - f) * t / N)` (torch `LinearLR` with `end_factor=1`),
and from `t = N` on the schedule itself runs on `t - N` (its momentum too; during the
warm-up the momentum is the schedule's value at its own step 0).

The one stateful schedule (`plateau`) keeps a small state of scalars that reported
losses advance (`observe`); every other schedule ignores `state`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from service.core.errors import ScheduleError
from service.core.validators import PositiveInt, UnitInterval

#: the state of a stateful schedule: plain scalars, serializable like OptState scalars
ScheduleState = dict[str, float | int | bool]


class Warmup(BaseModel):
    """Linear warm-up before any schedule: `base_lr * (f + (1 - f) * t / steps)`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    steps: PositiveInt
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

    @property
    def warmup_steps(self) -> int:
        return self.warmup.steps if self.warmup is not None else 0

    def lr(self, t: int, base_lr: float, state: ScheduleState | None = None) -> float:
        """The rate for step `t` (0-based), warm-up included."""
        if t < 0:
            raise ScheduleError([{"loc": ("t",), "msg": f"step must be >= 0: got {t}"}])
        if self.warmup is not None and t < self.warmup.steps:
            f = self.warmup.start_factor
            return base_lr * (f + (1.0 - f) * t / self.warmup.steps)
        return float(self.value(t - self.warmup_steps, base_lr, state))

    def momentum(self, t: int) -> float | None:
        """The momentum / beta1 for step `t`, or None when this schedule does not cycle it."""
        return self.momentum_value(max(t - self.warmup_steps, 0))

    def lrs(self, steps: int, base_lr: float, start: int = 0) -> np.ndarray:
        """Rates for steps `start .. start + steps - 1` (what a preview shows)."""
        return np.array([self.lr(t, base_lr) for t in range(start, start + steps)])

    def momenta(self, steps: int, start: int = 0) -> np.ndarray | None:
        """Momenta for the same steps, or None when this schedule does not cycle it."""
        if self.momentum(start) is None:
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
