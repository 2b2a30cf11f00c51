"""Schedules with explicit rates that also cycle the momentum: CyclicLR and OneCycleLR.

Both ignore the optimizer's ``lr`` (they take their own ``base_lr`` / ``max_lr``) and,
with ``cycle_momentum`` (the default), give the momentum (SGD, RMSprop) or beta1 (Adam
family) for each step through ``momentum_value``; ``with_momentum`` (momentum.py) hands
it to the optimizer as torch writes it into the param group.
"""

from __future__ import annotations

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
    clamp,
    num,
    safe_pow,
)
from service.core.validators import NonNeg, UnitInterval, interval

#: a momentum or beta1 a schedule may write: torch's Adam needs beta1 in [0, 1)
Momentum = Annotated[float, interval(0.0, 1.0, hi_open=True)]
Positive = Annotated[float, interval(0.0, lo_open=True)]

CyclicMode = Literal["triangular", "triangular2", "exp_range"]
ScaleMode = Literal["cycle", "iterations"]
#: the scale_mode each built-in mode implies (torch overrides any scale_mode it is given)
_SCALE_MODE: dict[str, ScaleMode] = {
    "triangular": "cycle",
    "triangular2": "cycle",
    "exp_range": "iterations",
}


class CyclicSchedule(Schedule):
    r"""Cyclical learning rate (Smith 2017), torch ``CyclicLR``, with its built-in modes.

    With ``up = step_size_up``, ``down = step_size_down`` (``up`` if not given),
    ``size = up + down``, ``ratio = up / size``, all as floats, exactly torch's arithmetic::

        cycle = floor(1 + t / size)                 (1-based cycle number)
        x     = 1 + t / size - cycle                (position in the cycle, [0, 1))
        f     = x / ratio           if x <= ratio   (rising)
                (x - 1) / (ratio - 1)  otherwise     (falling)
        scale = 1                        triangular   (scale_mode "cycle")
                1 / 2 ** (cycle - 1)     triangular2  (scale_mode "cycle")
                gamma ** t               exp_range    (scale_mode "iterations")
        lr(t)       = base_lr + (max_lr - base_lr) * f * scale
        momentum(t) = max_momentum - (max_momentum - base_momentum) * f * scale

    The rate takes this schedule's own ``base_lr`` and ``max_lr``; the optimizer's ``lr``
    is not used (torch likewise overwrites the param group's lr). Momentum is cycled
    inversely to the rate when ``cycle_momentum`` (``momentum_value`` is None otherwise).

    Defaults as torch: step_size_up 2000, step_size_down None (= step_size_up), mode
    "triangular", gamma 1.0, cycle_momentum True, base_momentum 0.8, max_momentum 0.9
    (base_lr and max_lr are required). ``scale_mode`` is filled in from ``mode`` (torch
    ignores a scale_mode given without a custom scale_fn); giving one that contradicts
    the mode is refused.

    Tested against ``torch.optim.lr_scheduler.CyclicLR`` over 1,000 steps (every mode,
    symmetric and asymmetric cycles), rates and the momentum read back from the param
    group of ``torch.optim.SGD`` (momentum) and ``torch.optim.Adam`` (beta1), relative
    error <= 1e-12.

    Where we differ: no custom ``scale_fn`` (a spec is data, not a closure); one
    base_lr / max_lr / momentum pair for all tensors (no per-param-group lists);
    gamma must be in [0, 1] and the momenta in [0, 1) (torch checks neither).

    Bounded rate: the rate stays between base_lr and max_lr (peak ``max(base_lr,
    max_lr)``): ``exp_range`` with a gamma above 1 would grow without bound, hence the
    [0, 1] range. ``triangular2``'s ``2 ** (cycle - 1)`` is taken as inf once it
    overflows (scale 0) instead of raising. The cycled momentum is kept within
    ``[min, max]`` of the two momenta (at most an ulp's change), so it stays in [0, 1).
    """

    name: Literal["cyclic"] = "cyclic"
    base_lr: NonNeg
    max_lr: NonNeg
    step_size_up: StepCount = 2000
    step_size_down: StepIndex | None = None
    mode: CyclicMode = "triangular"
    gamma: UnitInterval = 1.0
    scale_mode: ScaleMode | None = Field(default=None, validate_default=True)
    cycle_momentum: bool = True
    base_momentum: Momentum = 0.8
    max_momentum: Momentum = 0.9
    reference: ClassVar[str] = "torch.optim.lr_scheduler.CyclicLR"

    @field_validator("scale_mode")
    @classmethod
    def _scale_mode_by_mode(cls, value: ScaleMode | None, info: ValidationInfo) -> ScaleMode:
        mode = info.data.get("mode")
        implied = _SCALE_MODE.get(mode, "cycle") if isinstance(mode, str) else "cycle"
        if value is not None and value != implied:
            raise PydanticCustomError(
                "scale_mode",
                "mode '{mode}' scales by '{implied}': got '{value}' "
                "(scale_mode only applies to a custom scale_fn, which a spec cannot carry)",
                {"mode": mode, "implied": implied, "value": value},
            )
        return implied

    def _factor_and_scale(self, t: int) -> tuple[float, float]:
        up = float(self.step_size_up)
        down = float(self.step_size_down) if self.step_size_down is not None else up
        total_size = up + down
        step_ratio = up / total_size
        cycle = math.floor(1 + t / total_size)
        x = 1.0 + t / total_size - cycle
        factor = x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1)
        if self.mode == "triangular":
            scale = 1.0
        elif self.mode == "triangular2":
            scale = 1 / safe_pow(2.0, cycle - 1)  # 0 once 2 ** (cycle - 1) overflows
        else:
            scale = safe_pow(self.gamma, t)
        return factor, scale

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        factor, scale = self._factor_and_scale(t)
        base_height = (self.max_lr - self.base_lr) * factor
        return self.base_lr + base_height * scale

    def momentum_value(self, t: int) -> float | None:
        if not self.cycle_momentum:
            return None
        factor, scale = self._factor_and_scale(t)
        base_height = (self.max_momentum - self.base_momentum) * factor
        lo, hi = sorted((self.base_momentum, self.max_momentum))
        return clamp(self.max_momentum - base_height * scale, lo, hi)

    @property
    def cycles_momentum(self) -> bool:
        return self.cycle_momentum

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        if self.mode == "exp_range" and self.gamma > 1.0:  # refused by the spec; for safety
            return math.inf
        if self.max_lr >= self.base_lr:  # f * scale <= 1
            return self.base_lr + (self.max_lr - self.base_lr) * 1.0 * 1.0
        return self.base_lr  # f * scale >= 0 takes the rate down from base_lr


class OneCycleSchedule(Schedule):
    r"""The 1cycle policy (Smith & Topin 2017; fastai's two phases by default), torch
    ``OneCycleLR``.

    With ``N = total_steps`` (or ``epochs * steps_per_epoch``), ``p = pct_start``,
    ``initial = max_lr / div_factor``, ``min = initial / final_div_factor``, the phases
    (end step as torch computes it, start = the previous phase's end, 0 for the first)::

        two phases:    p*N - 1      initial -> max_lr     max_momentum  -> base_momentum
                       N - 1        max_lr  -> min        base_momentum -> max_momentum
        three_phase:   p*N - 1      initial -> max_lr     max_momentum  -> base_momentum
                       2*p*N - 2    max_lr  -> initial    base_momentum -> max_momentum
                       N - 1        initial -> min        max_momentum  (held)

    at step t the first phase with ``t <= end`` (else the last one) gives
    ``pct = (t - start) / (end - start)`` and::

        cos:     lr = end_lr + (start_lr - end_lr) / 2 * (cos(pi * pct) + 1)
        linear:  lr = (end_lr - start_lr) * pct + start_lr

    and the momentum likewise between its phase ends (None when not cycle_momentum).
    The optimizer's ``lr`` is not used (torch overwrites the param group's lr).

    Past the end we hold the final rate and momentum: for ``t >= N - 1`` the schedule
    gives its value at ``N - 1`` (``min``, ``max_momentum``). torch raises once its step
    count exceeds N; at step exactly N it still returns a value, extrapolated past the
    last phase (``pct > 1``: with "cos" slightly above ``min``, with "linear" below it,
    negative when the last phase is short), which we deliberately do not reproduce.

    Defaults as torch: pct_start 0.3, anneal_strategy "cos", cycle_momentum True,
    base_momentum 0.85, max_momentum 0.95, div_factor 25, final_div_factor 1e4,
    three_phase False (max_lr is required, and total_steps or both epochs and
    steps_per_epoch; total_steps wins when all are given, as in torch).

    Tested against ``torch.optim.lr_scheduler.OneCycleLR`` over its 1,000 to 1,500
    steps (both anneal strategies, two and three phases, pct_start from 0 to 1), rates
    and the momentum read back from ``torch.optim.SGD`` (momentum) and
    ``torch.optim.Adam`` (beta1), relative error <= 1e-12; and driving our Adam and SGD
    against torch's for 300 steps (tests/core/test_schedule_parity.py).

    Where we differ: refused where torch would divide by zero at step 0
    (``pct_start * total_steps`` exactly 1: a first phase of no steps); one max_lr and
    momentum pair for all tensors; the momenta must be in [0, 1).

    Bounded rate: each phase's rate (and momentum) is kept between the two values it
    anneals between (at most an ulp's change where rounding strays), so the peak is the
    largest of ``max_lr / div_factor``, ``max_lr`` and the final rate over the phases the
    steps reach; ``check_rates`` refuses a ``div_factor`` or ``final_div_factor`` so small
    that one of them overflows. The momentum stays in [0, 1).
    """

    name: Literal["one_cycle"] = "one_cycle"
    max_lr: NonNeg
    total_steps: StepCount | None = None
    epochs: StepCount | None = None
    steps_per_epoch: StepCount | None = Field(default=None, validate_default=True)
    pct_start: UnitInterval = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: Momentum = 0.85
    max_momentum: Momentum = 0.95
    div_factor: Positive = 25.0
    final_div_factor: Positive = 1e4
    three_phase: bool = False
    reference: ClassVar[str] = "torch.optim.lr_scheduler.OneCycleLR"

    @field_validator("steps_per_epoch")
    @classmethod
    def _length_given(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "total_steps" not in info.data or "epochs" not in info.data:
            return value  # already refused on its own
        if info.data["total_steps"] is None and (info.data["epochs"] is None or value is None):
            raise PydanticCustomError(
                "one_cycle_length",
                "give total_steps, or both epochs and steps_per_epoch",
            )
        return value

    @field_validator("pct_start")
    @classmethod
    def _first_phase_has_steps(cls, value: float, info: ValidationInfo) -> float:
        total = _total_steps(
            info.data.get("total_steps"), info.data.get("epochs"), info.data.get("steps_per_epoch")
        )
        if total is not None and float(value * total) - 1 == 0:
            raise PydanticCustomError(
                "one_cycle_phase",
                "pct_start * total_steps must not be exactly 1 (a first phase of no steps, "
                "where torch divides by zero): got {value} * {total}",
                {"value": value, "total": total},
            )
        return value

    @property
    def steps(self) -> int:
        """The length of the cycle: total_steps, or epochs * steps_per_epoch."""
        total = _total_steps(self.total_steps, self.epochs, self.steps_per_epoch)
        assert total is not None  # checked by the validators
        return total

    def _phases(self) -> list[tuple[float, str, str, str, str]]:
        n = self.steps
        p = self.pct_start
        if self.three_phase:
            return [
                (float(p * n) - 1, "initial", "max", "max_m", "base_m"),
                (float(2 * p * n) - 2, "max", "initial", "base_m", "max_m"),
                (n - 1, "initial", "min", "max_m", "max_m"),
            ]
        return [
            (float(p * n) - 1, "initial", "max", "max_m", "base_m"),
            (n - 1, "max", "min", "base_m", "max_m"),
        ]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            value = end + (start - end) / 2.0 * cos_out
        else:
            value = (end - start) * pct + start
        return clamp(value, min(start, end), max(start, end))

    def _ends(self) -> dict[str, float]:
        """The rates and momenta the phases anneal between."""
        initial = self.max_lr / self.div_factor
        return {
            "initial": initial,
            "max": self.max_lr,
            "min": initial / self.final_div_factor,
            "max_m": self.max_momentum,
            "base_m": self.base_momentum,
        }

    def _at(self, t: int) -> tuple[float, float]:
        """(lr, momentum) at step t, t clamped to the last step of the cycle."""
        step_num = min(t, self.steps - 1)
        ends = self._ends()
        phases = self._phases()
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
            if step_num <= end_step or i == len(phases) - 1:
                pct = (step_num - start_step) / (end_step - start_step)
                return (
                    self._anneal(ends[lr0], ends[lr1], pct),
                    self._anneal(ends[m0], ends[m1], pct),
                )
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        return self._at(t)[0]

    def momentum_value(self, t: int) -> float | None:
        return self._at(t)[1] if self.cycle_momentum else None

    @property
    def cycles_momentum(self) -> bool:
        return self.cycle_momentum

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # the largest end of every phase some step in 0 .. steps - 1 falls in (a phase
        # covers the steps after every earlier phase's end, up to its own end)
        n = self.steps if steps is None else min(steps, self.steps)
        ends = self._ends()
        phases = self._phases()
        best, previous = 0.0, -math.inf
        for i, (end_step, lr0, lr1, _, _) in enumerate(phases):
            first = 0 if i == 0 else max(0, math.floor(previous) + 1)
            last = n - 1 if i == len(phases) - 1 else min(math.floor(end_step), n - 1)
            if first <= last:
                best = max(best, ends[lr0], ends[lr1])
            previous = max(previous, end_step)
        return best

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        ends = self._ends()
        if not math.isfinite(ends["initial"]):
            return ("div_factor",), (
                f"the initial rate max_lr / div_factor ({num(self.max_lr)} / "
                f"{num(self.div_factor)}) overflows to infinity"
            )
        return ("final_div_factor",), (
            f"the final rate max_lr / div_factor / final_div_factor ({num(self.max_lr)} / "
            f"{num(self.div_factor)} / {num(self.final_div_factor)}) overflows to infinity"
        )


def _total_steps(total_steps: object, epochs: object, steps_per_epoch: object) -> int | None:
    if isinstance(total_steps, int):
        return total_steps
    if isinstance(epochs, int) and isinstance(steps_per_epoch, int):
        return epochs * steps_per_epoch
    return None
