"""TensorFlow/Keras decay schedules PyTorch lacks: exponential, natural-exp, inverse-time,
polynomial and piecewise-constant decay.

`t` is TF's `global_step` (the schedule's own step: after any warm-up, see base.py) and
`base_lr` is TF's `initial_learning_rate` (`learning_rate` in TF1), except for
`piecewise_constant`, whose `values` are absolute rates. TF computes in the dtype of the
initial rate (float32 for a Python float); we compute in float64. Fields are named and
defaulted as in TF; our ranges are stricter where TF would produce NaN, inf or growth
(each docstring says where).
"""

from __future__ import annotations

import bisect
import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

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

#: a per-period decay factor: 0 (drop to 0) .. 1 (no decay)
DecayFactor = Annotated[float, interval(0.0, 1.0)]


def _progress(t: int, decay_steps: int, staircase: bool) -> float:
    """TF's `global_step / decay_steps`, floored when `staircase`."""
    p = float(t) / float(decay_steps)
    return float(math.floor(p)) if staircase else p


class ExponentialDecaySchedule(Schedule):
    """``lr(t) = base_lr * decay_rate ** p`` with ``p = t / decay_steps``
    (``p = floor(t / decay_steps)`` if ``staircase``).

    Defaults as TF: staircase False (decay_steps and decay_rate are required). TF takes any
    decay_rate; we take [0, 1] (a rate above 1 grows without bound and overflows), so the
    peak is ``base_lr``; the power is computed without raising (inf on overflow).
    Reference: TF ``exponential_decay`` (tensorflow/python/training/learning_rate_decay_v2.py;
    ``ExponentialDecay`` in keras/src/optimizers/schedules/learning_rate_schedule.py, same
    formula). Tested against the formula written out independently in
    tests/core/test_schedule_formulas.py over 2,000 steps, relative error <= 1e-12.
    """

    name: Literal["exponential_decay"] = "exponential_decay"
    decay_steps: StepCount
    decay_rate: DecayFactor
    staircase: bool = False
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.ExponentialDecay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        p = _progress(t, self.decay_steps, self.staircase)
        return scaled_pow(base_lr, self.decay_rate, p)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # decay_rate <= 1 (the spec's range): the rate at step 0; a growing rate (a spec
        # built around validation) like exponential's
        if self.decay_rate <= 1.0:
            return self.value(0, base_lr, None)
        if steps is None:
            return unbounded(base_lr)
        return self.value(steps - 1, base_lr, None)

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        return growth_problem(
            "decay_rate",
            self.decay_rate,
            lambda t: self.value(t, base_lr, None),
            lambda t: num(
                safe_pow(self.decay_rate, _progress(t, self.decay_steps, self.staircase))
            ),
            base_lr,
            steps,
            offset,
        )


class NaturalExpDecaySchedule(Schedule):
    """``lr(t) = base_lr * exp(-decay_rate * p)`` with ``p = t / decay_steps``
    (``p = floor(t / decay_steps)`` if ``staircase``).

    Defaults as TF: staircase False (decay_steps and decay_rate are required); decay_rate
    must be >= 0 (a negative rate grows without bound). TF2's ``natural_exp_decay``
    computes ``exp(-decay_rate * p)`` as written here; TF1's ``tf.compat.v1.train`` one
    computes ``exp(-decay_rate) ** p`` through ``ExponentialDecay``: equal up to rounding
    (checked in the tests). Keras 3 has no such schedule. Reference: TF
    ``natural_exp_decay`` (tensorflow/python/training/learning_rate_decay_v2.py). Tested
    against the formula written out independently in tests/core/test_schedule_formulas.py
    over 2,000 steps, relative error <= 1e-12.
    """

    name: Literal["natural_exp_decay"] = "natural_exp_decay"
    decay_steps: StepCount
    decay_rate: NonNeg
    staircase: bool = False
    reference: ClassVar[str] = "tf.compat.v1.train.natural_exp_decay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        p = _progress(t, self.decay_steps, self.staircase)
        return base_lr * math.exp(-self.decay_rate * p)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        return self.value(0, base_lr, None)  # exp(-decay_rate * p) <= 1 = its value at 0


class InverseTimeDecaySchedule(Schedule):
    """``lr(t) = base_lr / (1 + decay_rate * p)`` with ``p = t / decay_steps``
    (``p = floor(t / decay_steps)`` if ``staircase``).

    Defaults as TF: staircase False (decay_steps and decay_rate are required); decay_rate
    must be >= 0 (a negative rate divides by zero). Reference: TF ``inverse_time_decay``
    (tensorflow/python/training/learning_rate_decay_v2.py; ``InverseTimeDecay`` in
    keras/src/optimizers/schedules/learning_rate_schedule.py, same formula). Tested against
    the formula written out independently in tests/core/test_schedule_formulas.py over
    2,000 steps, relative error <= 1e-12.
    """

    name: Literal["inverse_time_decay"] = "inverse_time_decay"
    decay_steps: StepCount
    decay_rate: NonNeg
    staircase: bool = False
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.InverseTimeDecay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        p = _progress(t, self.decay_steps, self.staircase)
        return base_lr / (1.0 + self.decay_rate * p)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        return self.value(0, base_lr, None)  # the divisor is at least 1 = its value at 0


class PolynomialDecaySchedule(Schedule):
    """``lr(t) = (base_lr - end_learning_rate) * (1 - t' / T) ** power + end_learning_rate``.

    Without ``cycle``: ``t' = min(t, decay_steps)``, ``T = decay_steps`` (the rate stays at
    end_learning_rate after decay_steps). With ``cycle``: ``t' = t`` and
    ``T = decay_steps * ceil(t / decay_steps)`` (``decay_steps`` at ``t = 0``), so the rate
    reaches end_learning_rate at every multiple of decay_steps and jumps back up after it.
    end_learning_rate is an absolute rate (as in TF), not a fraction of base_lr.

    Defaults as TF: end_learning_rate 1e-4, power 1.0, cycle False (decay_steps is
    required); power must be >= 0. ``t' / T`` is kept <= 1: far out (t past 2**53) the
    rounded ``ceil(t / decay_steps)`` can leave ``T`` a little below ``t``, where TF
    would take a fractional power of a negative number (NaN). Peak:
    ``max(base_lr, end_learning_rate)``. Reference: TF ``polynomial_decay``
    (tensorflow/python/training/learning_rate_decay_v2.py; ``PolynomialDecay`` in
    keras/src/optimizers/schedules/learning_rate_schedule.py, same formula). Tested against
    the formula written out independently in tests/core/test_schedule_formulas.py over
    2,000 steps, relative error <= 1e-12.
    """

    name: Literal["polynomial_decay"] = "polynomial_decay"
    decay_steps: StepCount
    end_learning_rate: NonNeg = 1e-4
    power: NonNeg = 1.0
    cycle: bool = False
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.PolynomialDecay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        step = float(t)
        horizon = float(self.decay_steps)
        if self.cycle:
            multiplier = 1.0 if step == 0 else math.ceil(step / self.decay_steps)
            horizon = horizon * multiplier
        else:
            step = min(step, horizon)
        # p <= 1, but far out (t past 2**53) the rounded ceil(step / decay_steps) can leave
        # the horizon just below step: math.pow of a negative base would raise
        p = min(step / horizon, 1.0)
        end = self.end_learning_rate
        return (base_lr - end) * math.pow(1.0 - p, self.power) + end

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # (1 - p) ** power is in [0, 1]: the rate is between its value at step 0 and
        # end_learning_rate
        at_start = self.value(0, base_lr, None)
        return at_start if steps == 1 else max(at_start, self.end_learning_rate)


class PiecewiseConstantSchedule(Schedule):
    """``lr(t) = values[0]`` for ``t <= boundaries[0]``, ``values[i]`` for
    ``boundaries[i-1] < t <= boundaries[i]``, ``values[-1]`` for ``t > boundaries[-1]``.

    The values are absolute rates, as in TF: base_lr (the optimizer's ``lr``) is ignored,
    except by a generic ``warmup``, which ramps towards base_lr before ``values[0]`` starts.
    boundaries: at least one, integers >= 0, strictly increasing (TF's documented rule);
    values: rates >= 0, exactly one more than boundaries. No defaults (TF has none).
    Reference: TF ``piecewise_constant`` (tensorflow/python/training/learning_rate_decay_v2.py;
    ``PiecewiseConstantDecay`` in keras/src/optimizers/schedules/learning_rate_schedule.py,
    same rule). Tested against the formula written out independently in
    tests/core/test_schedule_formulas.py over 2,000 steps, relative error <= 1e-12.
    """

    name: Literal["piecewise_constant"] = "piecewise_constant"
    boundaries: Annotated[list[StepIndex], Field(min_length=1)]
    values: list[NonNeg]
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.PiecewiseConstantDecay"

    @field_validator("boundaries")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        for i in range(1, len(value)):
            if value[i] <= value[i - 1]:
                raise PydanticCustomError(
                    "not_increasing",
                    "must be strictly increasing: got {b} at index {i}, after {prev}",
                    {"i": i, "b": value[i], "prev": value[i - 1]},
                )
        return value

    @field_validator("values")
    @classmethod
    def _one_more_than_boundaries(cls, value: list[float], info: ValidationInfo) -> list[float]:
        boundaries = info.data.get("boundaries")
        if boundaries is not None and len(value) != len(boundaries) + 1:
            raise PydanticCustomError(
                "length_mismatch",
                "must have one more element than boundaries: "
                "got {n_values} values for {n_boundaries} boundaries",
                {"n_values": len(value), "n_boundaries": len(boundaries)},
            )
        return value

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return self.values[bisect.bisect_left(self.boundaries, t)]

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        reached = (
            len(self.values)
            if steps is None
            else bisect.bisect_left(self.boundaries, steps - 1) + 1
        )
        return max(self.values[:reached])
