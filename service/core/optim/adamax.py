"""Adamax, Adam with the infinity norm (torch.optim.Adamax)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad, lerp_
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class AdamaxHyper(Hyper):
    """Hyperparameters of `adamax`, with torch.optim.Adamax's names and defaults."""

    name: Literal["adamax"] = "adamax"
    lr: NonNeg = 2e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    maximize: bool = False


class Adamax(Optimizer[AdamaxHyper]):
    r"""Adamax (Kingma & Ba, 2015, section 7), exactly as ``torch.optim.Adamax`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        g = g + weight_decay * p                      (if weight_decay)
        m = m + (1 - beta1) * (g - m)               # torch lerp_
        u = max(beta2 * u, |g| + eps)
        p = p - lr / (1 - beta1^t) * m / u

    eps is added to ``|g|`` inside the max (torch). Defaults: lr 2e-3,
    betas (0.9, 0.999), eps 1e-8, weight_decay 0, maximize False.
    State: ``exp_avg`` (m), ``exp_inf`` (u), ``step``.

    Tested against ``torch.optim.Adamax`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "adamax"
    hyper = AdamaxHyper
    reference: ClassVar[str] = "torch.optim.Adamax"

    def state_arrays(self, hp: AdamaxHyper) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def step_numpy(
        self,
        hp: AdamaxHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        exp_avg, exp_inf = state.arrays["exp_avg"], state.arrays["exp_inf"]
        lerp_(exp_avg, grad, 1.0 - beta1)
        exp_inf *= beta2
        np.maximum(exp_inf, np.abs(grad) + hp.eps, out=exp_inf)
        clr = lr / (1.0 - beta1**step)
        params += -clr * exp_avg / exp_inf
