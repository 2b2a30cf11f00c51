"""AdaBelief, Adam with the belief (centred) second moment (Zhuang et al., 2020)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import l2_, negate_if
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class AdaBeliefHyper(Hyper):
    """Hyperparameters of `adabelief`, with adabelief_pytorch 0.2's names and defaults."""

    name: Literal["adabelief"] = "adabelief"
    lr: NonNeg = 1e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-16
    weight_decay: NonNeg = 0.0
    amsgrad: bool = False
    weight_decouple: bool = True
    fixed_decay: bool = False
    maximize: bool = False


class AdaBelief(Optimizer[AdaBeliefHyper]):
    r"""AdaBelief (Zhuang et al., NeurIPS 2020), as ``adabelief_pytorch.AdaBelief``
    0.2 computes it with ``rectify=False``.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        if weight_decouple:  p = p * (1 - weight_decay)        if fixed_decay
                             p = p * (1 - lr * weight_decay)   otherwise
        elif weight_decay:   g = g + weight_decay * p          (L2)
        m = beta1 * m + (1 - beta1) * g
        s = beta2 * s + (1 - beta2) * (g - m)^2 + eps      (eps is kept in the state)
        if amsgrad: s_max = max(s_max, s)  and s_max replaces s below
        p = p - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)

    Note ``g - m`` uses the *updated* ``m`` (Algorithm 2 of the paper and the code).
    Defaults (adabelief_pytorch 0.2): lr 1e-3, betas (0.9, 0.999), eps 1e-16,
    weight_decay 0, amsgrad False, weight_decouple True, fixed_decay False; maximize
    False. State: ``exp_avg`` (m), ``exp_avg_var`` (s; and ``max_exp_avg_var`` with
    amsgrad), ``step``.

    Reference: J. Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief
    in Observed Gradients", NeurIPS 2020 (Algorithm 2); code
    ``pypi_packages/adabelief_pytorch0.2.0/adabelief_pytorch/AdaBelief.py`` of
    github.com/juntang-zhuang/Adabelief-Optimizer.

    Tested (tests/core/test_reference_optimizers.py) against a per-tensor NumPy
    transcription of the reference code's ``rectify=False`` branch: 200 steps, every
    option, relative error <= 1e-12 (float64) and <= 1e-4 (float32 against the float64
    reference).

    Deviations from adabelief_pytorch 0.2: the rectified (RAdam-like) update, its
    default ``rectify=True``, and ``degenerated_to_sgd`` are not offered: this is the
    paper's Algorithm 2, i.e. the package with ``rectify=False``; against the package's
    default ``rectify=True`` the numbers differ (plain momentum steps while RAdam's
    ``N_sma < 5``, a rectification factor after). ``maximize`` is added. The gradient
    is never modified in place (0.2 adds the L2 term into ``p.grad`` itself). No
    change-log printing.
    """

    name = "adabelief"
    hyper = AdaBeliefHyper
    reference: ClassVar[str] = (
        "Zhuang et al. 2020, AdaBelief Optimizer; "
        "juntang-zhuang/Adabelief-Optimizer adabelief_pytorch 0.2 AdaBelief(rectify=False)"
    )

    def state_arrays(self, hp: AdaBeliefHyper) -> tuple[str, ...]:
        base = ("exp_avg", "exp_avg_var")
        return (*base, "max_exp_avg_var") if hp.amsgrad else base

    def step_numpy(
        self,
        hp: AdaBeliefHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        grad = negate_if(grads, hp.maximize)
        if hp.weight_decouple:
            if hp.weight_decay != 0:
                params *= 1.0 - (hp.weight_decay if hp.fixed_decay else lr * hp.weight_decay)
        else:
            grad = l2_(grad, params, hp.weight_decay)
        exp_avg, exp_avg_var = state.arrays["exp_avg"], state.arrays["exp_avg_var"]
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        residual = grad - exp_avg
        exp_avg_var *= beta2
        exp_avg_var += (1.0 - beta2) * residual * residual
        exp_avg_var += hp.eps
        second = exp_avg_var
        if hp.amsgrad:
            second = state.arrays["max_exp_avg_var"]
            np.maximum(second, exp_avg_var, out=second)
        denom = np.sqrt(second)
        denom /= (1.0 - beta2**step) ** 0.5
        denom += hp.eps
        params -= lr / (1.0 - beta1**step) * exp_avg / denom
