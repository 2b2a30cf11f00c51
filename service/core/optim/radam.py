"""RAdam, Adam with variance rectification (torch.optim.RAdam)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import adam_moments_, descent_grad
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class RAdamHyper(Hyper):
    """Hyperparameters of `radam`, with torch.optim.RAdam's names and defaults."""

    name: Literal["radam"] = "radam"
    lr: NonNeg = 1e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False


class RAdam(Optimizer[RAdamHyper]):
    r"""RAdam (Liu et al., 2020), exactly as ``torch.optim.RAdam`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        if weight_decay and decoupled_weight_decay:  p = p * (1 - lr * weight_decay)
        elif weight_decay:                           g = g + weight_decay * p
        m = m + (1 - beta1) * (g - m)               # torch lerp_
        v = beta2 * v + (1 - beta2) * g * g
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
        if rho_t > 5:
            r = sqrt((rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))
            p = p - m / (1 - beta1^t) * lr * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r
        else:
            p = p - m / (1 - beta1^t) * lr

    eps is added outside the square root, which is not bias-corrected (torch).
    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
    decoupled_weight_decay False, maximize False.
    State: ``exp_avg``, ``exp_avg_sq``, ``step``.

    Tested against ``torch.optim.RAdam`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "radam"
    hyper = RAdamHyper
    reference: ClassVar[str] = "torch.optim.RAdam"

    def state_arrays(self, hp: RAdamHyper) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def step_numpy(
        self,
        hp: RAdamHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        grad = descent_grad(
            grads,
            params,
            lr,
            maximize=hp.maximize,
            weight_decay=hp.weight_decay,
            decoupled=hp.decoupled_weight_decay,
        )
        exp_avg, exp_avg_sq = adam_moments_(state.arrays, grad, hp.betas)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        bias_corrected_exp_avg = exp_avg / bias_correction1
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * (beta2**step) / bias_correction2
        if rho_t > 5.0:
            rect = (
                (rho_t - 4.0)
                * (rho_t - 2.0)
                * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            ) ** 0.5
            # torch: `float / tensor` is `tensor.reciprocal() * float`
            adaptive_lr = np.reciprocal(np.sqrt(exp_avg_sq) + hp.eps) * bias_correction2**0.5
            params -= bias_corrected_exp_avg * lr * adaptive_lr * rect
        else:
            params -= bias_corrected_exp_avg * lr
