"""Every torch.optim optimizer we serve, against torch.optim itself.

For each optimizer, every combination of the options that change the numbers runs
200 steps on several tensors with seeded random gradients, in float64 (relative error
<= 1e-10) and float32 (<= 1e-5), through the NumPy reference and through the fused
kernel where there is one. Params and every state entry are compared.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from service.core.optim import get_optimizer
from tests.core.torch_oracle import check_parity


def grid(**options: list[Any]) -> list[dict[str, Any]]:
    keys = list(options)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*options.values())]


CASES: dict[str, tuple[Any, list[dict[str, Any]]]] = {
    "sgd": (
        torch.optim.SGD,
        [
            {"lr": 0.01, **c}
            for c in grid(
                momentum=[0.0, 0.9],
                dampening=[0.0, 0.3],
                weight_decay=[0.0, 0.05],
                nesterov=[False, True],
                maximize=[False, True],
            )
            if not (c["nesterov"] and (c["momentum"] == 0 or c["dampening"] != 0))
        ],
    ),
    "adam": (
        torch.optim.Adam,
        [
            {"lr": 0.01, **c}
            for c in grid(
                amsgrad=[False, True],
                weight_decay=[0.0, 0.1],
                decoupled_weight_decay=[False, True],
                maximize=[False, True],
            )
        ]
        + [{"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6}],
    ),
    "adamw": (
        torch.optim.AdamW,
        [
            {"lr": 0.01, **c}
            for c in grid(amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True])
        ]
        + [{}],
    ),
    "adagrad": (
        torch.optim.Adagrad,
        [
            {"lr": 0.05, **c}
            for c in grid(
                lr_decay=[0.0, 0.01],
                weight_decay=[0.0, 0.05],
                initial_accumulator_value=[0.0, 0.1],
                maximize=[False, True],
            )
        ]
        + [{"eps": 1e-6}, {}],
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        [
            {"lr": 0.001, **c}
            for c in grid(
                momentum=[0.0, 0.9],
                centered=[False, True],
                weight_decay=[0.0, 0.05],
                maximize=[False, True],
            )
        ]
        + [
            {"lr": 0.001, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True},
            {"lr": 0.001, "alpha": 0.0},
            {},
        ],
    ),
    "adadelta": (
        torch.optim.Adadelta,
        [
            {"lr": 0.5, **c}
            for c in grid(weight_decay=[0.0, 0.05], maximize=[False, True], rho=[0.9, 0.5, 1.0])
        ]
        + [{"eps": 1e-4, "rho": 0.0}, {}],
    ),
    "adamax": (
        torch.optim.Adamax,
        [{"lr": 0.01, **c} for c in grid(weight_decay=[0.0, 0.1], maximize=[False, True])]
        + [{"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6}, {"betas": (0.0, 0.0)}, {}],
    ),
    "nadam": (
        torch.optim.NAdam,
        [
            {"lr": 0.01, **c}
            for c in grid(
                weight_decay=[0.0, 0.1],
                decoupled_weight_decay=[False, True],
                maximize=[False, True],
            )
        ]
        + [
            {"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6, "momentum_decay": 0.01},
            {"momentum_decay": 0.0},
            {},
        ],
    ),
    "radam": (
        torch.optim.RAdam,
        [
            {"lr": 0.01, **c}
            for c in grid(
                weight_decay=[0.0, 0.1],
                decoupled_weight_decay=[False, True],
                maximize=[False, True],
            )
        ]
        + [{"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6}, {}],
    ),
}

PARAMS = [
    pytest.param(name, hyper, dtype, impl, id=f"{name}-{i}-{np.dtype(dtype).name}-{impl}")
    for name, (_, hypers) in CASES.items()
    for i, hyper in enumerate(hypers)
    for dtype in (np.float64, np.float32)
    for impl in (("numpy", "fused") if get_optimizer(name).has_fused else ("numpy",))
]


@pytest.mark.parametrize(("name", "hyper", "dtype", "impl"), PARAMS)
def test_matches_torch(name: str, hyper: dict[str, Any], dtype: Any, impl: str) -> None:
    torch_cls = CASES[name][0]
    check_parity(name, hyper, torch_cls, dtype, impl)


def test_every_torch_optimizer_has_cases() -> None:
    from service.core.optim import OPTIMIZERS

    torch_backed = {n for n, o in OPTIMIZERS.items() if o.reference.startswith("torch.optim.")}
    assert torch_backed == set(CASES)
