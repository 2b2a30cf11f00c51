"""Adam and AdamW (torch.optim.Adam / torch.optim.AdamW)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim import kernels
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import adam_moments_, descent_grad
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class AdamHyper(Hyper):
    """Hyperparameters of `adam`, with torch.optim.Adam's names and defaults."""

    name: Literal["adam"] = "adam"
    lr: NonNeg = 1e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    amsgrad: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False


class AdamWHyper(AdamHyper):
    """Hyperparameters of `adamw`: Adam's, with decoupled decay always on and wd 1e-2."""

    name: Literal["adamw"] = "adamw"  # type: ignore[assignment]
    weight_decay: NonNeg = 1e-2
    decoupled_weight_decay: Literal[True] = True


class Adam(Optimizer[AdamHyper]):
    r"""Adam (Kingma & Ba, 2015), exactly as ``torch.optim.Adam`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        if weight_decay and decoupled_weight_decay:  p = p * (1 - lr * weight_decay)
        elif weight_decay:                           g = g + weight_decay * p
        m = m + (1 - beta1) * (g - m)               # torch lerp_
        v = beta2 * v + (1 - beta2) * g * g
        if amsgrad: v_max = max(v_max, v)  and v_max replaces v below
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    eps is added outside the bias-corrected square root (torch; Keras and optax differ,
    see docs/references.md). Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight_decay 0, amsgrad False, maximize False, decoupled_weight_decay False.
    State: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), ``step``.

    Tested against ``torch.optim.Adam`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32),
    for both this NumPy reference and the fused kernel.
    """

    name = "adam"
    hyper = AdamHyper
    reference: ClassVar[str] = "torch.optim.Adam"
    has_fused = True

    def state_arrays(self, hp: AdamHyper) -> tuple[str, ...]:
        base = ("exp_avg", "exp_avg_sq")
        return (*base, "max_exp_avg_sq") if hp.amsgrad else base

    def step_numpy(
        self,
        hp: AdamHyper,
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
        step_size = lr / (1.0 - beta1**step)
        bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
        second = exp_avg_sq
        if hp.amsgrad:
            second = state.arrays["max_exp_avg_sq"]
            np.maximum(second, exp_avg_sq, out=second)
        denom = np.sqrt(second) / bias_correction2_sqrt + hp.eps
        params += -step_size * exp_avg / denom

    def step_fused(
        self,
        hp: AdamHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        kernels.adam_step(hp, grads, state, params, lr)


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019), exactly as ``torch.optim.AdamW`` computes it.

    Adam's rule (see :class:`Adam`) with decoupled weight decay always on: before the
    Adam update, ``p = p * (1 - lr * weight_decay)``. Defaults as torch: lr 1e-3,
    betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2, amsgrad False, maximize False.

    Tested against ``torch.optim.AdamW`` like Adam (float64 1e-10, float32 1e-5).
    """

    name = "adamw"
    hyper = AdamWHyper  # type: ignore[assignment]  # strict __init__ differs (Literal[True] field)
    reference: ClassVar[str] = "torch.optim.AdamW"
