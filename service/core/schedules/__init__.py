"""Learning-rate schedules: a registry by name, and parsing of schedule specs.

>>> s = parse_schedule({"name": "step", "step_size": 30, "gamma": 0.1})
>>> s.lr(45, base_lr=0.1)
0.010000000000000002

A spec from a client goes through `parse_schedule` (which enforces the caps of
limits.py on the raw data first) and then `check_rates(schedule, base_lr)` (bounds.py),
which refuses a schedule whose rate is not finite at some step it can reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from service.core.errors import ScheduleError
from service.core.schedules.base import MAX_STEP, Schedule, ScheduleState, Warmup
from service.core.schedules.bounds import check_rates
from service.core.schedules.cosine import CosineRestartsSchedule, CosineSchedule
from service.core.schedules.cyclic import CyclicSchedule, OneCycleSchedule
from service.core.schedules.limits import (
    MAX_SCHEDULE_DEPTH,
    MAX_SCHEDULE_LIST,
    MAX_SCHEDULE_NODES,
    check_limits,
)
from service.core.schedules.linear import LinearSchedule, PolynomialSchedule
from service.core.schedules.plateau import PlateauSchedule
from service.core.schedules.sequential import SequentialSchedule
from service.core.schedules.step import (
    ConstantSchedule,
    ExponentialSchedule,
    MultiStepSchedule,
    StepSchedule,
)
from service.core.schedules.tf_cosine import (
    CosineDecayRestartsSchedule,
    CosineDecaySchedule,
    LinearCosineDecaySchedule,
    NoisyLinearCosineDecaySchedule,
)
from service.core.schedules.tf_decay import (
    ExponentialDecaySchedule,
    InverseTimeDecaySchedule,
    NaturalExpDecaySchedule,
    PiecewiseConstantSchedule,
    PolynomialDecaySchedule,
)

ScheduleSpec = Annotated[
    StepSchedule
    | MultiStepSchedule
    | ExponentialSchedule
    | ConstantSchedule
    | CosineSchedule
    | CosineRestartsSchedule
    | LinearSchedule
    | PolynomialSchedule
    | CyclicSchedule
    | OneCycleSchedule
    | PlateauSchedule
    | SequentialSchedule
    | ExponentialDecaySchedule
    | NaturalExpDecaySchedule
    | InverseTimeDecaySchedule
    | PolynomialDecaySchedule
    | PiecewiseConstantSchedule
    | CosineDecaySchedule
    | CosineDecayRestartsSchedule
    | LinearCosineDecaySchedule
    | NoisyLinearCosineDecaySchedule,
    Field(discriminator="name"),
]

SCHEDULES: dict[str, type[Schedule]] = {
    cls.model_fields["name"].default: cls
    for cls in (
        StepSchedule,
        MultiStepSchedule,
        ExponentialSchedule,
        ConstantSchedule,
        CosineSchedule,
        CosineRestartsSchedule,
        LinearSchedule,
        PolynomialSchedule,
        CyclicSchedule,
        OneCycleSchedule,
        PlateauSchedule,
        SequentialSchedule,
        ExponentialDecaySchedule,
        NaturalExpDecaySchedule,
        InverseTimeDecaySchedule,
        PolynomialDecaySchedule,
        PiecewiseConstantSchedule,
        CosineDecaySchedule,
        CosineDecayRestartsSchedule,
        LinearCosineDecaySchedule,
        NoisyLinearCosineDecaySchedule,
    )
}

# sequential's `schedulers` holds any spec, itself included: resolve its forward reference
SequentialSchedule.model_rebuild(_types_namespace={"ScheduleSpec": ScheduleSpec})

_ADAPTER: TypeAdapter[Schedule] = TypeAdapter(ScheduleSpec)


def parse_schedule(data: Mapping[str, Any]) -> Schedule:
    """Validate a schedule spec (`{"name": ..., parameters...}`), defaults filled.

    Raises ScheduleError naming each field at fault, and only ScheduleError, whatever
    `data` is. Before anything is built the raw data is held to the caps
    (`MAX_SCHEDULE_DEPTH` nested sequential levels, `MAX_SCHEDULE_NODES` schedules,
    `MAX_SCHEDULE_LIST` list elements; limits.py), so validation and every later step
    cost O(size of an accepted spec). Whether its rates stay finite depends on the
    optimizer's lr: `check_rates`.
    """
    if not isinstance(data, Mapping):
        raise ScheduleError(
            [{"loc": (), "msg": f"a schedule spec must be an object: got {type(data).__name__}"}]
        )
    name = data.get("name")
    if not isinstance(name, str):
        raise ScheduleError([{"loc": ("name",), "msg": "schedule name is required"}])
    if name not in SCHEDULES:
        known = ", ".join(sorted(SCHEDULES))
        raise ScheduleError(
            [{"loc": ("name",), "msg": f"unknown schedule {name!r}; known: {known}"}]
        )
    check_limits(data)
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise ScheduleError(
            [{"loc": _field_loc(tuple(e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        ) from None


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic's loc without the union tags it inserts: the schedule name in front, and
    a nested spec's name after its list index (`schedulers, 1, cosine, T_max` ->
    `schedulers, 1, T_max`)."""
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (part in SCHEDULES and (i == 0 or isinstance(loc[i - 1], int)))
    )


__all__ = [
    "MAX_SCHEDULE_DEPTH",
    "MAX_SCHEDULE_LIST",
    "MAX_SCHEDULE_NODES",
    "MAX_STEP",
    "SCHEDULES",
    "Schedule",
    "ScheduleSpec",
    "ScheduleState",
    "Warmup",
    "check_rates",
    "parse_schedule",
]
