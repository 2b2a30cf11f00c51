"""Hyperparameters of the torch-backed optimizers: torch's defaults, torch's refusals.

For each optimizer, `parse_hyper({"name": X})` must give exactly the defaults of
`torch.optim.X.__init__`, and every value torch's constructor refuses must be refused
with a HyperparameterError naming the field (torch is asked too, so the two agree).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from service.core.errors import HyperparameterError
from service.core.optim import get_optimizer, parse_hyper

#: torch constructor arguments that are not hyperparameters of the numbers
NOT_NUMERIC = {"self", "params", "foreach", "fused", "capturable", "differentiable"}

TORCH = {
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}

#: (optimizer, field location, refused value as given in the spec)
REFUSED: list[tuple[str, tuple[str | int, ...], dict[str, Any]]] = [
    ("adagrad", ("lr",), {"lr": -1e-3}),
    ("adagrad", ("lr_decay",), {"lr_decay": -0.1}),
    ("adagrad", ("weight_decay",), {"weight_decay": -0.1}),
    ("adagrad", ("initial_accumulator_value",), {"initial_accumulator_value": -0.1}),
    ("adagrad", ("eps",), {"eps": -1e-10}),
    ("rmsprop", ("lr",), {"lr": -1e-3}),
    ("rmsprop", ("alpha",), {"alpha": -0.5}),
    ("rmsprop", ("eps",), {"eps": -1e-8}),
    ("rmsprop", ("weight_decay",), {"weight_decay": -0.1}),
    ("rmsprop", ("momentum",), {"momentum": -0.9}),
    ("adadelta", ("lr",), {"lr": -1.0}),
    ("adadelta", ("rho",), {"rho": 1.2}),
    ("adadelta", ("rho",), {"rho": -0.1}),
    ("adadelta", ("eps",), {"eps": -1e-6}),
    ("adadelta", ("weight_decay",), {"weight_decay": -0.1}),
    ("adamax", ("lr",), {"lr": -2e-3}),
    ("adamax", ("betas", 0), {"betas": (1.0, 0.999)}),
    ("adamax", ("betas", 1), {"betas": (0.9, -0.1)}),
    ("adamax", ("eps",), {"eps": -1e-8}),
    ("adamax", ("weight_decay",), {"weight_decay": -0.1}),
    ("nadam", ("lr",), {"lr": -2e-3}),
    ("nadam", ("betas", 0), {"betas": (-0.1, 0.999)}),
    ("nadam", ("betas", 1), {"betas": (0.9, 1.0)}),
    ("nadam", ("eps",), {"eps": -1e-8}),
    ("nadam", ("weight_decay",), {"weight_decay": -0.1}),
    ("nadam", ("momentum_decay",), {"momentum_decay": -4e-3}),
    ("radam", ("lr",), {"lr": -1e-3}),
    ("radam", ("betas", 0), {"betas": (1.2, 0.999)}),
    ("radam", ("betas", 1), {"betas": (0.9, 1.5)}),
    ("radam", ("eps",), {"eps": -1e-8}),
    ("radam", ("weight_decay",), {"weight_decay": -0.1}),
]

#: edge values torch accepts, which must be accepted too
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("adagrad", {"lr": 0.0, "lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 0.0}),
    ("rmsprop", {"lr": 0.0, "alpha": 0.0, "momentum": 0.0, "eps": 0.0}),
    ("rmsprop", {"alpha": 1.5}),
    ("adadelta", {"rho": 0.0, "eps": 0.0}),
    ("adadelta", {"rho": 1.0}),
    ("adamax", {"betas": (0.0, 0.0), "eps": 0.0}),
    ("nadam", {"betas": (0.0, 0.0), "momentum_decay": 0.0}),
    ("radam", {"betas": (0.0, 0.0), "eps": 0.0}),
]


def _torch_defaults(name: str) -> dict[str, Any]:
    signature = inspect.signature(TORCH[name].__init__)
    return {k: p.default for k, p in signature.parameters.items() if k not in NOT_NUMERIC}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_defaults_are_torchs(name: str) -> None:
    hp = parse_hyper({"name": name})
    ours = hp.model_dump(exclude={"name"})
    assert ours == _torch_defaults(name)
    assert get_optimizer(name).reference == f"torch.optim.{TORCH[name].__name__}"


@pytest.mark.parametrize(
    ("name", "loc", "spec"),
    REFUSED,
    ids=[f"{n}-{'.'.join(map(str, loc))}" for n, loc, _ in REFUSED],
)
def test_refuses_what_torch_refuses(
    name: str, loc: tuple[str | int, ...], spec: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        TORCH[name]([torch.zeros(2, requires_grad=True)], **spec)
    with pytest.raises(HyperparameterError) as info:
        parse_hyper({"name": name, **spec})
    assert [tuple(e["loc"]) for e in info.value.errors] == [loc]  # type: ignore[arg-type]
    assert "must be" in str(info.value)
    assert str(loc[0]) in str(info.value)


@pytest.mark.parametrize(("name", "spec"), ACCEPTED)
def test_accepts_what_torch_accepts(name: str, spec: dict[str, Any]) -> None:
    TORCH[name]([torch.zeros(2, requires_grad=True)], **spec)
    hp = parse_hyper({"name": name, **spec})
    for key, value in spec.items():
        assert getattr(hp, key) == value


def test_message_states_the_rule() -> None:
    with pytest.raises(HyperparameterError, match=r"rho must be in \[0, 1\]: got 1.2"):
        parse_hyper({"name": "adadelta", "rho": 1.2})
    with pytest.raises(HyperparameterError, match=r"betas\[0\] must be in \[0, 1\): got 1"):
        parse_hyper({"name": "nadam", "betas": (1.0, 0.999)})


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"name": "adam", "lr": "0.1"}, ("lr",)),
        ({"name": "adam", "amsgrad": 1}, ("amsgrad",)),
        ({"name": "sgd", "nesterov": "true"}, ("nesterov",)),
        ({"name": "adam", "betas": ["0.9", 0.999]}, ("betas", 0)),
    ],
)
def test_specs_are_strict_about_types(spec: dict[str, Any], loc: tuple[Any, ...]) -> None:
    """A JSON string is not a number and 1 is not True: both are refused, naming the field."""
    with pytest.raises(HyperparameterError) as info:
        parse_hyper(spec)
    assert info.value.errors[0]["loc"] == loc


def test_betas_come_as_a_json_list_and_ints_are_numbers() -> None:
    hp = parse_hyper({"name": "adam", "lr": 1, "betas": [0, 0.5]})
    assert hp.lr == 1.0
    assert hp.betas == (0.0, 0.5)  # type: ignore[attr-defined]
