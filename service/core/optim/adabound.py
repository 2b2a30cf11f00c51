"""AdaBound and AMSBound (Luo et al., 2019; Luolc/AdaBound), one implementation."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad, ema_sq_
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg, Positive, interval

Gamma = Annotated[float, interval(0.0, 1.0, lo_open=True, hi_open=True)]


class AdaBoundHyper(Hyper):
    """Hyperparameters of `adabound`, with Luolc/AdaBound's names and defaults.

    `lr` must be > 0: it is the `base_lr` that the rate of each step is divided by.
    """

    name: Literal["adabound"] = "adabound"
    lr: Positive = 1e-3
    betas: BetaPair = (0.9, 0.999)
    final_lr: NonNeg = 0.1
    gamma: Gamma = 1e-3
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    amsbound: bool = False
    maximize: bool = False


class AMSBoundHyper(AdaBoundHyper):
    """Hyperparameters of `amsbound`: AdaBound's, with the AMSGrad max always on."""

    name: Literal["amsbound"] = "amsbound"  # type: ignore[assignment]
    amsbound: Literal[True] = True


class AdaBound(Optimizer[AdaBoundHyper]):
    r"""AdaBound (Luo et al., ICLR 2019), as ``adabound.AdaBound`` (Luolc/AdaBound) computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``),
    ``lr`` the rate of this step (a schedule's value) and ``base_lr = hp.lr``::

        g = g + weight_decay * p                      (if weight_decay; L2)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if amsbound: v_max = max(v_max, v)  and v_max replaces v below
        final_lr = hp.final_lr * lr / base_lr
        lower = final_lr * (1 - 1 / (gamma * t + 1))
        upper = final_lr * (1 + 1 / (gamma * t))
        eta = clip(lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + eps), lower, upper)
        p = p - eta * m

    eps is added outside the square root, which is not bias-corrected (as the reference).
    ``final_lr`` follows a schedule through ``lr / base_lr``, the reference's workaround
    for ``lr_scheduler``. Defaults: lr 1e-3, betas (0.9, 0.999), final_lr 0.1,
    gamma 1e-3, eps 1e-8, weight_decay 0, amsbound False, maximize False.
    State: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsbound), ``step``.

    Reference: L. Luo, Y. Xiong, Y. Liu, X. Sun, "Adaptive Gradient Methods with Dynamic
    Bound of Learning Rate", ICLR 2019; code ``adabound/adabound.py`` (class AdaBound) of
    github.com/Luolc/AdaBound.

    Tested (tests/core/test_reference_optimizers.py) against a per-tensor NumPy
    transcription of the reference code: 200 steps, every option, relative error
    <= 1e-12 (float64) and <= 1e-4 (float32 against the float64 reference).

    Deviations from the reference code: ``lr`` must be > 0 and ``gamma`` in (0, 1) (the
    reference accepts ``lr = 0`` and ``gamma = 0`` and then divides by zero);
    ``maximize`` is added; the gradient is never modified in place; AdaBoundW (its
    decoupled decay, not scaled by lr) is not offered.
    """

    name = "adabound"
    hyper = AdaBoundHyper
    reference: ClassVar[str] = (
        "Luo et al. 2019, Adaptive Gradient Methods with Dynamic Bound of Learning Rate; "
        "Luolc/AdaBound adabound.AdaBound"
    )

    def state_arrays(self, hp: AdaBoundHyper) -> tuple[str, ...]:
        base = ("exp_avg", "exp_avg_sq")
        return (*base, "max_exp_avg_sq") if hp.amsbound else base

    def step_numpy(
        self,
        hp: AdaBoundHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        exp_avg, exp_avg_sq = state.arrays["exp_avg"], state.arrays["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        ema_sq_(exp_avg_sq, grad, beta2)
        second = exp_avg_sq
        if hp.amsbound:
            second = state.arrays["max_exp_avg_sq"]
            np.maximum(second, exp_avg_sq, out=second)
        denom = np.sqrt(second)
        denom += hp.eps
        step_size = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
        final_lr = hp.final_lr * lr / hp.lr
        lower = final_lr * (1.0 - 1.0 / (hp.gamma * step + 1.0))
        upper = final_lr * (1.0 + 1.0 / (hp.gamma * step))
        eta = np.divide(step_size, denom, out=denom)
        np.clip(eta, lower, upper, out=eta)
        eta *= exp_avg
        params -= eta


class AMSBound(AdaBound):
    r"""AMSBound (Luo et al., ICLR 2019): :class:`AdaBound` with ``amsbound=True``.

    The same implementation and rule as :class:`AdaBound` (see there), with the AMSGrad
    maximum ``v_max = max(v_max, v)`` always in the denominator, as
    ``adabound.AdaBound(..., amsbound=True)``. Defaults as AdaBound.
    State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``step``.

    Tested like AdaBound (float64 1e-12, float32 1e-4), same deviations.
    """

    name = "amsbound"
    hyper = AMSBoundHyper  # type: ignore[assignment]  # strict __init__ differs (Literal[True] field)
    reference: ClassVar[str] = (
        "Luo et al. 2019, Adaptive Gradient Methods with Dynamic Bound of Learning Rate; "
        "Luolc/AdaBound adabound.AdaBound(amsbound=True)"
    )
