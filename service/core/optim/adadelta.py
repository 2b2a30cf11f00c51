"""Adadelta (torch.optim.Adadelta)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad, ema_sq_
from service.core.state import OptState
from service.core.validators import NonNeg, UnitInterval


class AdadeltaHyper(Hyper):
    """Hyperparameters of `adadelta`, with torch.optim.Adadelta's names and defaults."""

    name: Literal["adadelta"] = "adadelta"
    lr: NonNeg = 1.0
    rho: UnitInterval = 0.9
    eps: NonNeg = 1e-6
    weight_decay: NonNeg = 0.0
    maximize: bool = False


class Adadelta(Optimizer[AdadeltaHyper]):
    r"""Adadelta (Zeiler, 2012), exactly as ``torch.optim.Adadelta`` computes it.

    Update rule, gradient ``g`` (negated if ``maximize``)::

        g = g + weight_decay * p                      (if weight_decay)
        v = rho * v + (1 - rho) * g * g
        d = sqrt(u + eps) / sqrt(v + eps) * g
        u = rho * u + (1 - rho) * d * d
        p = p - lr * d

    Defaults: lr 1.0, rho 0.9, eps 1e-6, weight_decay 0, maximize False.
    State: ``square_avg`` (v), ``acc_delta`` (u), ``step``.

    Tested against ``torch.optim.Adadelta`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "adadelta"
    hyper = AdadeltaHyper
    reference: ClassVar[str] = "torch.optim.Adadelta"

    def state_arrays(self, hp: AdadeltaHyper) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def step_numpy(
        self,
        hp: AdadeltaHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        square_avg, acc_delta = state.arrays["square_avg"], state.arrays["acc_delta"]
        ema_sq_(square_avg, grad, hp.rho)
        std = np.sqrt(square_avg + hp.eps)
        delta = np.sqrt(acc_delta + hp.eps)
        delta /= std
        delta *= grad
        ema_sq_(acc_delta, delta, hp.rho)
        params += -lr * delta
