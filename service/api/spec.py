"""A session's parsed spec: `Spec`, what it stores, and its schedule state as JSON.

`Spec` is the validated configuration of a session (optimizer hyperparameters, schedule,
dtype, layout, gradient transforms). `Spec.stored()` is what `SessionMeta.spec` holds and
`Spec.load()` parses it back; the schedule state goes through `encode_schedule_state` /
`decode_schedule_state` (non-finite floats as strings, since JSON cannot hold them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import FlatLayout, GradientTransforms
from service.core.optim import Hyper, Optimizer, get_optimizer, parse_hyper
from service.core.schedules import Schedule, ScheduleState, parse_schedule
from service.core.schedules.momentum import with_momentum

#: the format tag of a stored spec
SPEC_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Spec:
    """A session's validated configuration (what `SessionMeta.spec` stores as data)."""

    hp: Hyper
    optimizer: Optimizer[Any]
    schedule: Schedule | None
    dtype: np.dtype[Any]
    layout: FlatLayout
    transforms: GradientTransforms

    def stored(self) -> dict[str, Any]:
        """The spec as JSON-safe data (non-finite floats as strings, which parse back)."""
        return {
            "format": SPEC_FORMAT,
            "optimizer": self.hp.model_dump(mode="json"),
            "schedule": None if self.schedule is None else self.schedule.model_dump(mode="json"),
            "dtype": self.dtype.name,
            "layout": [[s.name, list(s.shape)] for s in self.layout.specs],
            "transforms": _json_safe(self.transforms.model_dump()),
            "nonfinite": self.transforms.nonfinite,
        }

    @classmethod
    def load(cls, stored: Mapping[str, Any]) -> Spec:
        hp = parse_hyper(stored["optimizer"])
        schedule = None if stored.get("schedule") is None else parse_schedule(stored["schedule"])
        return cls(
            hp=hp,
            optimizer=get_optimizer(hp.name),
            schedule=schedule,
            dtype=np.dtype(stored["dtype"]),
            layout=FlatLayout.from_shapes((n, tuple(s)) for n, s in stored["layout"]),
            transforms=GradientTransforms.model_validate(stored.get("transforms") or {}),
        )

    def lr(self, t: int, schedule_state: ScheduleState | None) -> float:
        """The rate of step `t`."""
        if self.schedule is None:
            return float(self.hp.lr)
        return float(self.schedule.lr(t, self.hp.lr, schedule_state))

    def hyper_at(self, t: int) -> Hyper:
        """The hyperparameters of step `t` (the schedule's cycled momentum, if any)."""
        if self.schedule is None:
            return self.hp
        return with_momentum(self.hp, self.schedule.momentum(t))


def _json_safe(value: Any) -> Any:
    """Non-finite floats as the strings 'inf', '-inf', 'nan' (JSON cannot hold them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def encode_schedule_state(state: ScheduleState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {k: _json_safe(v) for k, v in state.items()}


def decode_schedule_state(data: Mapping[str, Any] | None) -> ScheduleState | None:
    if data is None:
        return None
    return {k: float(v) if isinstance(v, str) else v for k, v in data.items()}
