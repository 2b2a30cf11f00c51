"""A session's parsed spec: `Spec`, what it stores, and its schedule state as JSON.

`Spec` is the validated configuration of a session (optimizer hyperparameters, schedule,
dtype, layout, gradient transforms, and the training features of docs/training.md: LR
range test, parameter averages, consistency, history length). `Spec.stored()` is what
`SessionMeta.spec` holds and `Spec.load()` parses it back (a spec stored before a field
existed loads with that field's default); the schedule state goes through
`encode_schedule_state` / `decode_schedule_state` (non-finite floats as strings, since
JSON cannot hold them).

A stored spec is read back even when today's rules would refuse it at create (a
schedule nested deeper or holding more schedules than `parse_schedule`'s caps allow, or
one whose rate overflows, stored by older code): every read of a session parses its spec,
and a read must not fail because of what one session holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from service.core import FlatLayout, GradientTransforms
from service.core.averaging import EMAConfig, SWAConfig, parse_ema, parse_swa
from service.core.consistency import Consistency, SyncConsistency, parse_consistency
from service.core.errors import ScheduleError
from service.core.federated import (
    FederatedConfig,
    get_server_optimizer,
    parse_federated,
    parse_server_hyper,
)
from service.core.lr_finder import LRFinderConfig, parse_lr_finder_config, ramp_lr
from service.core.optim import Hyper, Optimizer, get_optimizer, parse_hyper
from service.core.schedules import Schedule, ScheduleSpec, ScheduleState, parse_schedule
from service.core.schedules.momentum import with_momentum

#: the format tag of a stored spec
SPEC_FORMAT = 1
#: history entries a session keeps unless its spec says otherwise
DEFAULT_HISTORY = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    """What one session may hold (from `Settings`): checked at create, import and PUT."""

    #: parameters (elements over all tensors)
    max_params: int = 200_000_000
    #: history entries the session may ask to keep
    max_history: int = 10_000
    #: tensors
    max_tensors: int = 10_000


@dataclass(frozen=True, slots=True)
class Spec:
    """A session's validated configuration (what `SessionMeta.spec` stores as data)."""

    hp: Hyper
    optimizer: Optimizer[Any]
    schedule: Schedule | None
    dtype: np.dtype[Any]
    layout: FlatLayout
    transforms: GradientTransforms
    lr_finder: LRFinderConfig | None = None
    ema: EMAConfig | None = None
    swa: SWAConfig | None = None
    consistency: Consistency = field(default_factory=lambda: parse_consistency(None))
    history: int = DEFAULT_HISTORY
    federated: FederatedConfig | None = None

    @property
    def sync(self) -> SyncConsistency | None:
        """The sync settings, when workers' gradients are accumulated."""
        return self.consistency if isinstance(self.consistency, SyncConsistency) else None

    @property
    def averaging(self) -> bool:
        return self.ema is not None or self.swa is not None

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
            "lr_finder": _dump(self.lr_finder),
            "ema": _dump(self.ema),
            "swa": _dump(self.swa),
            "consistency": self.consistency.model_dump(mode="json"),
            "history": self.history,
            "federated": _dump(self.federated),
        }

    @classmethod
    def load(cls, stored: Mapping[str, Any]) -> Spec:
        federated = _maybe(parse_federated, stored.get("federated"))
        hp = (parse_hyper if federated is None else parse_server_hyper)(stored["optimizer"])
        optimizer = (get_optimizer if federated is None else get_server_optimizer)(hp.name)
        schedule = None if stored.get("schedule") is None else _stored_schedule(stored["schedule"])
        return cls(
            hp=hp,
            optimizer=optimizer,
            schedule=schedule,
            dtype=np.dtype(stored["dtype"]),
            layout=FlatLayout.from_shapes((n, tuple(s)) for n, s in stored["layout"]),
            transforms=GradientTransforms.model_validate(stored.get("transforms") or {}),
            lr_finder=_maybe(parse_lr_finder_config, stored.get("lr_finder")),
            ema=_maybe(parse_ema, stored.get("ema")),
            swa=_maybe(parse_swa, stored.get("swa")),
            consistency=parse_consistency(stored.get("consistency")),
            history=int(stored.get("history", DEFAULT_HISTORY)),
            federated=federated,
        )

    def lr(self, t: int, schedule_state: ScheduleState | None, ramp_step: int = 0) -> float:
        """The rate of step `t` (of a range test: its ramp's rate at `ramp_step`, the
        count of losses it holds, or the last rate once the ramp is over)."""
        if self.lr_finder is not None:
            return ramp_lr(self.lr_finder, min(ramp_step, self.lr_finder.num_steps - 1))
        if self.schedule is None:
            return float(self.hp.lr)
        return float(self.schedule.lr(t, self.hp.lr, schedule_state))

    def hyper_at(self, t: int) -> Hyper:
        """The hyperparameters of step `t` (the schedule's cycled momentum, if any)."""
        if self.schedule is None:
            return self.hp
        return with_momentum(self.hp, self.schedule.momentum(t))


#: schedule specs validated without the caps of `parse_schedule` (stored ones only)
_STORED_SCHEDULE: TypeAdapter[Schedule] = TypeAdapter(ScheduleSpec)


def _stored_schedule(data: Any) -> Schedule:
    """A stored schedule spec: as `parse_schedule` reads it or, for one stored before its
    caps (nesting, schedules in all, list lengths) and over them, validated without them
    (it was validated when stored; evaluating it costs O(its size) all the same)."""
    try:
        return parse_schedule(data)
    except ScheduleError as exc:
        if not isinstance(data, Mapping):
            raise
        try:
            return _STORED_SCHEDULE.validate_python(dict(data))
        except ValidationError:
            raise exc from None


def _dump(model: Any) -> dict[str, Any] | None:
    return None if model is None else dict(model.model_dump(mode="json"))


def _maybe(parse: Any, data: Any) -> Any:
    return None if data is None else parse(data)


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
