"""Step-wise PyTorch schedules: StepLR, MultiStepLR, ExponentialLR, ConstantLR."""

from __future__ import annotations

import bisect
from typing import Annotated, ClassVar, Literal

from pydantic import field_validator

from service.core.schedules.base import Schedule, ScheduleState
from service.core.validators import NonNeg, NonNegInt, PositiveInt, interval

Factor = Annotated[float, interval(0.0, 1.0)]


class StepSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** (t // step_size)`` (torch ``StepLR``).

    Defaults: gamma 0.1 (step_size is required, as in torch). Tested against
    ``torch.optim.lr_scheduler.StepLR`` over 1,000 steps (tests/core/test_schedule_parity.py),
    relative error <= 1e-12 in float64.
    """

    name: Literal["step"] = "step"
    step_size: PositiveInt
    gamma: NonNeg = 0.1
    reference: ClassVar[str] = "torch.optim.lr_scheduler.StepLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * self.gamma ** (t // self.step_size)


class MultiStepSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** (number of milestones <= t)`` (torch ``MultiStepLR``).

    A milestone given twice decays twice, as torch's Counter of milestones does.
    Defaults: gamma 0.1. Tested against ``torch.optim.lr_scheduler.MultiStepLR`` over
    1,000 steps, relative error <= 1e-12.
    """

    name: Literal["multistep"] = "multistep"
    milestones: list[NonNegInt]
    gamma: NonNeg = 0.1
    reference: ClassVar[str] = "torch.optim.lr_scheduler.MultiStepLR"

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, value: list[int]) -> list[int]:
        return sorted(value)

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)


class ExponentialSchedule(Schedule):
    """``lr(t) = base_lr * gamma ** t``, decayed every step (torch ``ExponentialLR``).

    gamma is required, as in torch. Tested against
    ``torch.optim.lr_scheduler.ExponentialLR`` over 1,000 steps, relative error <= 1e-12.
    """

    name: Literal["exponential"] = "exponential"
    gamma: NonNeg
    reference: ClassVar[str] = "torch.optim.lr_scheduler.ExponentialLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * self.gamma**t


class ConstantSchedule(Schedule):
    """``lr(t) = base_lr * factor`` for ``t < total_iters``, then ``base_lr`` (``ConstantLR``).

    Defaults as torch: factor 1/3, total_iters 5. Tested against
    ``torch.optim.lr_scheduler.ConstantLR`` over 1,000 steps, relative error <= 1e-12.
    """

    name: Literal["constant"] = "constant"
    factor: Factor = 1.0 / 3
    total_iters: NonNegInt = 5
    reference: ClassVar[str] = "torch.optim.lr_scheduler.ConstantLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return base_lr * self.factor if t < self.total_iters else base_lr
