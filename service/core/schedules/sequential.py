"""Schedules run one after another at milestones: SequentialLR.

`schedulers` holds schedule specs of any registered kind (sequential included), so its
type is the registry's union: it is declared here by name and resolved by
`service.core.schedules` (the registry), which calls `model_rebuild` with the union.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.core.schedules.base import Loc, Schedule, ScheduleState, StepIndex

if TYPE_CHECKING:
    from service.core.schedules import ScheduleSpec


class SequentialSchedule(Schedule):
    r"""Schedules one after another (torch ``SequentialLR``).

    With milestones ``m_1 <= ... <= m_{n-1}`` (one fewer than the schedules) and
    ``m_0 = 0``::

        i     = number of milestones <= t          (the schedule in charge at t)
        lr(t) = schedulers[i].lr(t - m_i, base_lr)

    so each schedule starts from its own step 0 at its milestone, as torch's SequentialLR
    does (at a milestone it resets the incoming scheduler to epoch 0 with that
    scheduler's closed form, which restarts base-relative schedules from the optimizer's
    base lr; between milestones it steps the scheduler in charge). A schedule's own
    ``warmup`` runs at its start. Schedules with explicit rates (``cyclic``,
    ``one_cycle``) keep them.

    Momentum, as torch leaves it in the param group: the schedule in charge gives it if
    it cycles one; otherwise the last value the most recent cycling schedule before it
    gave (its value at its last step); before any cycling schedule has run, the step-0
    value of the last cycling schedule in the list (torch: the max_momentum its
    constructor wrote into the group, the last constructor winning). None when no
    schedule cycles the momentum.

    Refused: ``plateau`` inside (it needs losses, and torch refuses it too); a number of
    milestones other than ``len(schedulers) - 1``; milestones out of order. A repeated
    milestone skips the schedules between (as in torch, they never run).

    Tested against ``torch.optim.lr_scheduler.SequentialLR`` over 1,000 steps with
    combinations of the stateless schedules (step, exponential, constant, linear,
    polynomial, cosine, cosine_restarts, and cyclic / one_cycle after a base-relative
    schedule with momentum read back from the param group), relative error <= 1e-12.

    Where we differ: every base-relative schedule runs on the optimizer's ``lr``. In
    torch, ``CyclicLR`` (when constructed first) and ``OneCycleLR`` (always) overwrite the
    param group's ``initial_lr``, which silently rebases the other schedulers in the
    sequence onto ``base_lr`` of the cyclic or ``max_lr / div_factor`` of the one-cycle
    schedule; we do not reproduce that (it depends on construction order). torch cannot
    resume a nested SequentialLR at a milestone (it has no closed form: NotImplementedError);
    here nesting works like any other schedule.

    Cost: ``lr(t)`` evaluates the one schedule in charge, and ``momentum(t)`` the one
    schedule that gives it (chosen from the specs: ``cycles_momentum``), so a step costs
    O(number of nested schedules) at any nesting (the caps: at most 8 levels, 32
    schedules, 10,000 list elements; see ``service.core.schedules.limits``).

    Bounded rate: the peak is the largest of the schedules' peaks, each over the steps
    it runs (from its milestone to the next; the last one without end). So a schedule
    that grows (``exponential`` with gamma > 1) is accepted before a milestone, with the
    rate it reaches at its last step as its peak, while on its own (or last) it is
    refused.
    """

    name: Literal["sequential"] = "sequential"
    schedulers: list[ScheduleSpec] = Field(min_length=1)
    milestones: list[StepIndex]
    reference: ClassVar[str] = "torch.optim.lr_scheduler.SequentialLR"

    @field_validator("schedulers")
    @classmethod
    def _stateless(cls, value: list[Schedule]) -> list[Schedule]:
        for i, schedule in enumerate(value):
            if schedule.stateful:
                raise PydanticCustomError(
                    "sequential_stateful",
                    "schedulers[{index}] is '{name}', which needs reported losses and "
                    "cannot run inside a sequence",
                    {"index": i, "name": schedule.name},
                )
        return value

    @field_validator("milestones")
    @classmethod
    def _one_per_boundary(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if any(b < a for a, b in itertools.pairwise(value)):
            raise PydanticCustomError(
                "milestones_order", "must be in increasing order: got {value}", {"value": value}
            )
        schedulers = info.data.get("schedulers")
        if schedulers is not None and len(value) != len(schedulers) - 1:
            raise PydanticCustomError(
                "milestones_count",
                "needs one milestone fewer than schedulers: got {got} for {n} schedulers",
                {"got": len(value), "n": len(schedulers)},
            )
        return value

    def _in_charge(self, t: int) -> tuple[int, int]:
        """(index of the schedule in charge at t, the step it started at)."""
        i = bisect.bisect_right(self.milestones, t)
        return i, (self.milestones[i - 1] if i > 0 else 0)

    def _span(self, j: int) -> tuple[int, int]:
        """(first step, end step) of schedule j: it runs on first <= t < end."""
        first = self.milestones[j - 1] if j > 0 else 0
        end = self.milestones[j] if j < len(self.milestones) else first
        return first, end

    def _run_length(self, j: int, steps: int | None) -> int | None:
        """How many of its own steps schedule j runs within steps 0 .. steps - 1 (None:
        without end; 0: never)."""
        first, end = self._span(j)
        if j == len(self.milestones):  # the last one runs on
            return None if steps is None else max(steps - first, 0)
        return max((end if steps is None else min(end, steps)) - first, 0)

    @functools.cached_property
    def cycles_momentum(self) -> bool:
        """Whether any schedule in the sequence cycles the momentum (then every step has
        one: see the class docstring)."""
        return any(schedule.cycles_momentum for schedule in self.schedulers)

    @functools.cached_property
    def nodes(self) -> int:
        return 1 + sum(schedule.nodes for schedule in self.schedulers)

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        i, start = self._in_charge(t)
        schedule: Schedule = self.schedulers[i]
        return schedule.lr(t - start, base_lr)

    def momentum_value(self, t: int) -> float | None:
        # Which schedule gives the momentum is decided from the spec (cycles_momentum),
        # so exactly one child is evaluated, once: O(nodes) per step for any nesting.
        if not self.cycles_momentum:
            return None
        schedules: Sequence[Schedule] = self.schedulers
        i, start = self._in_charge(t)
        if schedules[i].cycles_momentum:
            return schedules[i].momentum(t - start)
        for j in range(i - 1, -1, -1):
            first, end = self._span(j)
            if end > first and schedules[j].cycles_momentum:
                return schedules[j].momentum(end - first - 1)
        for schedule in reversed(schedules):
            if schedule.cycles_momentum:
                return schedule.momentum(0)
        return None  # unreachable: some schedule cycles it

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        best = 0.0
        for j, schedule in enumerate(self.schedulers):
            length = self._run_length(j, steps)
            if length != 0:
                best = max(best, schedule.peak(base_lr, length))
        return best

    def value_problem(self, base_lr: float, steps: int | None, offset: int) -> tuple[Loc, str]:
        for j, schedule in enumerate(self.schedulers):
            length = self._run_length(j, steps)
            if length == 0:
                continue
            problem = schedule.rate_problem(base_lr, length, offset + self._span(j)[0])
            if problem is not None:
                where, msg = problem
                return ("schedulers", j, *where), msg
        return super().value_problem(base_lr, steps, offset)
