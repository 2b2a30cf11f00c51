"""NAdam, Adam with Nesterov momentum (torch.optim.NAdam)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import adam_moments_, descent_grad
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class NAdamHyper(Hyper):
    """Hyperparameters of `nadam`, with torch.optim.NAdam's names and defaults."""

    name: Literal["nadam"] = "nadam"
    lr: NonNeg = 2e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    momentum_decay: NonNeg = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False


class NAdam(Optimizer[NAdamHyper]):
    r"""NAdam (Dozat, 2016), exactly as ``torch.optim.NAdam`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        if weight_decay and decoupled_weight_decay:  p = p * (1 - lr * weight_decay)
        elif weight_decay:                           g = g + weight_decay * p
        mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
        mu_{t+1} = beta1 * (1 - 0.5 * 0.96^((t + 1) * momentum_decay))
        P = P * mu_t                                # mu_product, P_0 = 1
        m = m + (1 - beta1) * (g - m)               # torch lerp_
        v = beta2 * v + (1 - beta2) * g * g
        d = sqrt(v / (1 - beta2^t)) + eps
        p = p - lr * (1 - mu_t) / (1 - P) * g / d
        p = p - lr * mu_{t+1} / (1 - P * mu_{t+1}) * m / d

    ``P`` is kept in the session's dtype, as torch keeps ``mu_product`` in the default
    dtype (rounded to float32 each step in a float32 session). Defaults: lr 2e-3,
    betas (0.9, 0.999), eps 1e-8, weight_decay 0, momentum_decay 4e-3,
    decoupled_weight_decay False, maximize False.
    State: ``exp_avg``, ``exp_avg_sq``, ``step``, ``mu_product``.

    Tested against ``torch.optim.NAdam`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "nadam"
    hyper = NAdamHyper
    reference: ClassVar[str] = "torch.optim.NAdam"

    def state_arrays(self, hp: NAdamHyper) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def initial_scalars(self, hp: NAdamHyper) -> dict[str, float | int | bool]:
        return {"step": 0, "mu_product": 1.0}

    def step_numpy(
        self,
        hp: NAdamHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        bias_correction2 = 1.0 - beta2**step
        grad = descent_grad(
            grads,
            params,
            lr,
            maximize=hp.maximize,
            weight_decay=hp.weight_decay,
            decoupled=hp.decoupled_weight_decay,
        )
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * hp.momentum_decay))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * hp.momentum_decay))
        # torch: a 0-d tensor of the default dtype, `mu_product *= mu` in that dtype
        dtype = params.dtype.type
        mu_product = float(dtype(state.scalars["mu_product"]) * dtype(mu))
        state.scalars["mu_product"] = mu_product
        exp_avg, exp_avg_sq = adam_moments_(state.arrays, grad, hp.betas)
        denom = np.sqrt(exp_avg_sq / bias_correction2)
        mu_product_next = mu_product * mu_next
        denom += hp.eps
        params += (-lr * (1.0 - mu) / (1.0 - mu_product)) * grad / denom
        params += ((-lr * mu_next) / (1.0 - mu_product_next)) * exp_avg / denom
