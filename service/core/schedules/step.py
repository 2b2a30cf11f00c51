"""Step-wise PyTorch schedules: StepLR, MultiStepLR, ExponentialLR, ConstantLR.

A gamma above 1 is accepted by the spec (torch takes it too), but the rate then grows
at every decay: `check_rates` (bounds.py) refuses such a schedule on its own (it grows
without bound), or when its rate passes the float range within the steps it runs
(inside a `sequential`, up to its milestone; `multistep`, at its last milestone).
Powers are computed without raising: an overflow gives inf, never OverflowError.
"""

from __future__ import annotations

import bisect
from typing import Annotated, ClassVar, Literal

from pydantic import field_validator

from service.core.schedules.base import (
    Loc,
    Schedule,
    ScheduleState,
    StepCount,
    StepIndex,
    growth_problem,
    num,
    safe_pow,
    scaled_pow,
    unbounded,
)
from service.core.validators import NonNeg, interval

Factor = Annotated[float, interval(0.0, 1.0)]


class StepSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** (t // step_size)`` (torch ``StepLR``).

    Defaults: gamma 0.1 (step_size is required, as in torch). Tested against
    ``torch.optim.lr_scheduler.StepLR`` over 1,000 steps (tests/core/test_schedule_parity.py),
    relative error <= 1e-12 in float64.

    Bounded rate: peak ``base_lr`` for gamma <= 1; gamma > 1 grows without bound and is
    refused by ``check_rates`` unless a ``sequential`` milestone ends it first (its peak
    is then its rate at the last step it runs).
    """

    name: Literal["step"] = "step"
    step_size: StepCount
    gamma: NonNeg = 0.1
    reference: ClassVar[str] = "torch.optim.lr_scheduler.StepLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return scaled_pow(base_lr, self.gamma, t // self.step_size)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        if self.gamma <= 1.0:
            return self.value(0, base_lr, None)
        if steps is None:
            return unbounded(base_lr)
        return self.value(steps - 1, base_lr, None)

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        return growth_problem(
            "gamma",
            self.gamma,
            lambda t: self.value(t, base_lr, None),
            lambda t: _power_text(self.gamma, t // self.step_size),
            base_lr,
            steps,
            offset,
        )


class MultiStepSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** (number of milestones <= t)`` (torch ``MultiStepLR``).

    A milestone given twice decays twice, as torch's Counter of milestones does.
    Defaults: gamma 0.1. Tested against ``torch.optim.lr_scheduler.MultiStepLR`` over
    1,000 steps, relative error <= 1e-12.

    Bounded rate: peak ``base_lr * max(1, gamma ** len(milestones))`` (up to the
    milestones reached within the steps it runs); refused by ``check_rates`` when that
    overflows (gamma 10 with 400 milestones, say).
    """

    name: Literal["multistep"] = "multistep"
    milestones: list[StepIndex]
    gamma: NonNeg = 0.1
    reference: ClassVar[str] = "torch.optim.lr_scheduler.MultiStepLR"

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, value: list[int]) -> list[int]:
        return sorted(value)

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return scaled_pow(base_lr, self.gamma, bisect.bisect_right(self.milestones, t))

    def _last(self, steps: int | None) -> int:
        """The step after which the rate no longer changes within `steps`."""
        if steps is None:
            return self.milestones[-1] if self.milestones else 0
        return steps - 1

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        if self.gamma <= 1.0:
            return self.value(0, base_lr, None)
        return self.value(self._last(steps), base_lr, None)

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        return growth_problem(
            "gamma",
            self.gamma,
            lambda t: self.value(t, base_lr, None),
            lambda t: _power_text(self.gamma, bisect.bisect_right(self.milestones, t)),
            base_lr,
            self._last(steps) + 1,
            offset,
        )


class ExponentialSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** t``, decayed every step (torch ``ExponentialLR``).

    gamma is required, as in torch. Tested against
    ``torch.optim.lr_scheduler.ExponentialLR`` over 1,000 steps, relative error <= 1e-12.

    Bounded rate: peak ``base_lr`` for gamma <= 1. gamma > 1 grows without bound and is
    refused by ``check_rates``, unless it runs inside a ``sequential`` up to a milestone
    (its peak is then ``base_lr * gamma ** (last step it runs)``, refused if that
    overflows).
    """

    name: Literal["exponential"] = "exponential"
    gamma: NonNeg
    reference: ClassVar[str] = "torch.optim.lr_scheduler.ExponentialLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return scaled_pow(base_lr, self.gamma, t)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        if self.gamma <= 1.0:
            return self.value(0, base_lr, None)
        if steps is None:
            return unbounded(base_lr)
        return self.value(steps - 1, base_lr, None)

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        return growth_problem(
            "gamma",
            self.gamma,
            lambda t: self.value(t, base_lr, None),
            lambda t: _power_text(self.gamma, t),
            base_lr,
            steps,
            offset,
        )


class ConstantSchedule(Schedule):
    """``lr(t) = base_lr * factor`` for ``t < total_iters``, then ``base_lr`` (``ConstantLR``).

    Defaults as torch: factor 1/3, total_iters 5. Tested against
    ``torch.optim.lr_scheduler.ConstantLR`` over 1,000 steps, relative error <= 1e-12.
    """

    name: Literal["constant"] = "constant"
    factor: Factor = 1.0 / 3
    total_iters: StepIndex = 5
    reference: ClassVar[str] = "torch.optim.lr_scheduler.ConstantLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * self.factor if t < self.total_iters else base_lr

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        last = self.total_iters if steps is None else min(steps - 1, self.total_iters)
        return max(self.value(0, base_lr, None), self.value(last, base_lr, None))


def _power_text(gamma: float, k: int) -> str:
    factor = safe_pow(gamma, k)
    return num(factor) if factor != float("inf") else f"{num(gamma)} ** {k}"
