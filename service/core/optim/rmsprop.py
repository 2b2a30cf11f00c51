"""RMSprop, plain or centered, with optional momentum (torch.optim.RMSprop)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad, ema_sq_, lerp_
from service.core.state import OptState
from service.core.validators import NonNeg


class RMSpropHyper(Hyper):
    """Hyperparameters of `rmsprop`, with torch.optim.RMSprop's names and defaults."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: NonNeg = 1e-2
    alpha: NonNeg = 0.99
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    momentum: NonNeg = 0.0
    centered: bool = False
    maximize: bool = False


class RMSprop(Optimizer[RMSpropHyper]):
    r"""RMSprop (Hinton, 2012), exactly as ``torch.optim.RMSprop`` computes it.

    Update rule, gradient ``g`` (negated if ``maximize``)::

        g = g + weight_decay * p                      (if weight_decay)
        v = alpha * v + (1 - alpha) * g * g
        if centered:
            m = m + (1 - alpha) * (g - m)             # torch lerp_
            d = sqrt(v - m * m) + eps
        else:
            d = sqrt(v) + eps
        if momentum > 0:
            b = momentum * b + g / d
            p = p - lr * b
        else:
            p = p - lr * g / d

    eps is added outside the square root (torch; Keras differs). Defaults: lr 1e-2,
    alpha 0.99, eps 1e-8, weight_decay 0, momentum 0, centered False, maximize False.
    State: ``square_avg`` (and ``momentum_buffer`` with momentum > 0, ``grad_avg`` when
    centered), ``step``.

    Tested against ``torch.optim.RMSprop`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32).
    """

    name = "rmsprop"
    hyper = RMSpropHyper
    reference: ClassVar[str] = "torch.optim.RMSprop"

    def state_arrays(self, hp: RMSpropHyper) -> tuple[str, ...]:
        names: tuple[str, ...] = ("square_avg",)
        if hp.momentum > 0:
            names += ("momentum_buffer",)
        if hp.centered:
            names += ("grad_avg",)
        return names

    def step_numpy(
        self,
        hp: RMSpropHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        square_avg = state.arrays["square_avg"]
        ema_sq_(square_avg, grad, hp.alpha)
        if hp.centered:
            grad_avg = state.arrays["grad_avg"]
            lerp_(grad_avg, grad, 1.0 - hp.alpha)
            avg = np.sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = np.sqrt(square_avg)
        avg += hp.eps
        if hp.momentum > 0:
            buf = state.arrays["momentum_buffer"]
            buf *= hp.momentum
            buf += grad / avg
            params += -lr * buf
        else:
            params += -lr * grad / avg
