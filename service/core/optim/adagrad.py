"""Adagrad with learning-rate decay (torch.optim.Adagrad)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad
from service.core.state import OptState
from service.core.validators import NonNeg


class AdagradHyper(Hyper):
    """Hyperparameters of `adagrad`, with torch.optim.Adagrad's names and defaults."""

    name: Literal["adagrad"] = "adagrad"
    lr: NonNeg = 1e-2
    lr_decay: NonNeg = 0.0
    weight_decay: NonNeg = 0.0
    initial_accumulator_value: NonNeg = 0.0
    eps: NonNeg = 1e-10
    maximize: bool = False


class Adagrad(Optimizer[AdagradHyper]):
    r"""Adagrad (Duchi, Hazan & Singer, 2011), exactly as ``torch.optim.Adagrad`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        g = g + weight_decay * p                      (if weight_decay)
        clr = lr / (1 + (t - 1) * lr_decay)
        s = s + g * g
        p = p - clr * g / (sqrt(s) + eps)

    ``s`` starts at ``initial_accumulator_value``. Defaults: lr 1e-2, lr_decay 0,
    weight_decay 0, initial_accumulator_value 0, eps 1e-10, maximize False.
    State: ``sum``, ``step``.

    Tested against ``torch.optim.Adagrad`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "adagrad"
    hyper = AdagradHyper
    reference: ClassVar[str] = "torch.optim.Adagrad"

    def state_arrays(self, hp: AdagradHyper) -> tuple[str, ...]:
        return ("sum",)

    def initial_array(self, hp: AdagradHyper, name: str, params: np.ndarray) -> np.ndarray:
        if name == "sum":
            return np.full_like(params, hp.initial_accumulator_value)
        return super().initial_array(hp, name, params)

    def step_numpy(
        self,
        hp: AdagradHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        step = state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        clr = lr / (1 + (step - 1) * hp.lr_decay)
        state_sum = state.arrays["sum"]
        state_sum += grad * grad
        std = np.sqrt(state_sum) + hp.eps
        params += -clr * grad / std
