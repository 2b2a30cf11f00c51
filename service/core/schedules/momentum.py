"""Handing a schedule's cycled momentum to an optimizer.

torch's CyclicLR and OneCycleLR write the cycled value into the param group: into
`momentum` for optimizers that have it (SGD, RMSprop), else into `betas[0]` (the Adam
family). `with_momentum` does the same on our frozen hyperparameters: it returns a copy
for this step, leaving the session's stored hyperparameters as they were.
"""

from __future__ import annotations

from typing import TypeVar

from service.core.errors import ScheduleError
from service.core.optim.base import Hyper

H = TypeVar("H", bound=Hyper)


def supports_momentum(hp: Hyper) -> bool:
    """Whether a schedule can cycle this optimizer's momentum (torch's rule)."""
    fields = type(hp).model_fields
    return "momentum" in fields or "betas" in fields


def with_momentum(hp: H, value: float | None) -> H:
    """`hp` with its momentum (or beta1) set to `value`; `hp` itself when `value` is None."""
    if value is None:
        return hp
    fields = type(hp).model_fields
    if "betas" in fields:  # torch checks betas first (OneCycleLR/CyclicLR `use_beta1`)
        betas = getattr(hp, "betas")  # noqa: B009 - present on this model, absent on Hyper
        return hp.model_copy(update={"betas": (float(value), *betas[1:])})
    if "momentum" in fields:
        return hp.model_copy(update={"momentum": float(value)})
    raise ScheduleError(
        [
            {
                "loc": ("cycle_momentum",),
                "msg": f"optimizer {hp.name!r} has neither momentum nor betas to cycle",
            }
        ]
    )
