"""The optimizers: a registry by name, and parsing of hyperparameters.

>>> hp = parse_hyper({"name": "adam", "lr": 0.01})
>>> opt = get_optimizer(hp.name)
>>> state = opt.init(hp, params)
>>> params, state = opt.update(hp, grads, state, params)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from service.core.errors import HyperparameterError
from service.core.optim.adabelief import AdaBelief, AdaBeliefHyper
from service.core.optim.adabound import AdaBound, AdaBoundHyper, AMSBound, AMSBoundHyper
from service.core.optim.adadelta import Adadelta, AdadeltaHyper
from service.core.optim.adagrad import Adagrad, AdagradHyper
from service.core.optim.adam import Adam, AdamHyper, AdamW, AdamWHyper
from service.core.optim.adamax import Adamax, AdamaxHyper
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.lamb import Lamb, LambHyper
from service.core.optim.lion import Lion, LionHyper
from service.core.optim.nadam import NAdam, NAdamHyper
from service.core.optim.radam import RAdam, RAdamHyper
from service.core.optim.rmsprop import RMSprop, RMSpropHyper
from service.core.optim.sgd import SGD, SGDHyper
from service.core.optim.swats import SWATS, SWATSHyper
from service.core.optim.yogi import Yogi, YogiHyper

OptimizerHyper = Annotated[
    AdamHyper
    | AdamWHyper
    | SGDHyper
    | AdagradHyper
    | RMSpropHyper
    | AdadeltaHyper
    | AdamaxHyper
    | NAdamHyper
    | RAdamHyper
    | AdaBoundHyper
    | AMSBoundHyper
    | SWATSHyper
    | LionHyper
    | LambHyper
    | AdaBeliefHyper
    | YogiHyper,
    Field(discriminator="name"),
]

OPTIMIZERS: dict[str, Optimizer[Any]] = {
    opt.name: opt
    for opt in (
        SGD(),
        Adam(),
        AdamW(),
        Adagrad(),
        RMSprop(),
        Adadelta(),
        Adamax(),
        NAdam(),
        RAdam(),
        AdaBound(),
        AMSBound(),
        SWATS(),
        Lion(),
        Lamb(),
        AdaBelief(),
        Yogi(),
    )
}

_ADAPTER: TypeAdapter[Hyper] = TypeAdapter(OptimizerHyper)


def get_optimizer(name: str) -> Optimizer[Any]:
    """The optimizer registered as `name`."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(sorted(OPTIMIZERS))
        raise HyperparameterError(
            [{"loc": ("name",), "msg": f"unknown optimizer {name!r}; known: {known}"}]
        ) from None


def parse_hyper(data: Mapping[str, Any]) -> Hyper:
    """Validate an optimizer spec (`{"name": ..., hyperparameters...}`), defaults filled.

    Raises HyperparameterError naming each field at fault, e.g.
    `betas[0] must be in [0, 1): got 1.2`.
    """
    name = data.get("name")
    if not isinstance(name, str):
        raise HyperparameterError([{"loc": ("name",), "msg": "optimizer name is required"}])
    get_optimizer(name)
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise HyperparameterError(
            [{"loc": _strip_tag(e["loc"], name), "msg": e["msg"]} for e in exc.errors()]
        ) from None


def _strip_tag(loc: tuple[int | str, ...], name: str) -> tuple[int | str, ...]:
    # a discriminated union reports ('adam', 'betas', 0); the field is ('betas', 0)
    return loc[1:] if loc and loc[0] == name else loc


__all__ = [
    "OPTIMIZERS",
    "Hyper",
    "Optimizer",
    "OptimizerHyper",
    "get_optimizer",
    "parse_hyper",
]
