"""SGD with momentum, dampening and Nesterov (torch.optim.SGD)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.core.layout import FlatLayout
from service.core.optim import kernels
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad
from service.core.state import OptState
from service.core.validators import NonNeg


class SGDHyper(Hyper):
    """Hyperparameters of `sgd`, with torch.optim.SGD's names and defaults."""

    name: Literal["sgd"] = "sgd"
    lr: NonNeg = 1e-3
    momentum: NonNeg = 0.0
    dampening: float = 0.0
    weight_decay: NonNeg = 0.0
    nesterov: bool = False
    maximize: bool = False

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: ValidationInfo) -> bool:
        if value and (info.data.get("momentum", 0.0) <= 0 or info.data.get("dampening", 0.0) != 0):
            raise PydanticCustomError("nesterov", "requires momentum > 0 and dampening = 0")
        return value


class SGD(Optimizer[SGDHyper]):
    r"""Stochastic gradient descent, exactly as ``torch.optim.SGD`` computes it.

    Update rule, gradient ``g`` (negated if ``maximize``)::

        g = g + weight_decay * p                      (if weight_decay)
        if momentum:
            b = g                         on the first step with momentum (no dampening)
            b = momentum * b + (1 - dampening) * g    afterwards
            g = g + momentum * b   if nesterov   else   b
        p = p - lr * g

    Defaults: lr 1e-3, momentum 0, dampening 0, weight_decay 0, nesterov False,
    maximize False. Nesterov needs momentum > 0 and dampening 0 (torch's rule).
    State: ``momentum_buffer`` (made on the first step with momentum, as torch's buffer
    that starts as ``None``), ``step``.

    Tested against ``torch.optim.SGD`` (tests/core/test_torch_parity.py): 200 steps,
    every option combination, relative error <= 1e-10 (float64), <= 1e-5 (float32),
    for both this NumPy reference and the fused kernel.
    """

    name = "sgd"
    hyper = SGDHyper
    reference: ClassVar[str] = "torch.optim.SGD"
    lazy_arrays = ("momentum_buffer",)
    has_fused = True

    def state_arrays(self, hp: SGDHyper) -> tuple[str, ...]:
        return ()

    def step_numpy(
        self,
        hp: SGDHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        state.advance()
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)
        if hp.momentum != 0:
            buf = state.arrays.get("momentum_buffer")
            if buf is None:
                buf = state.arrays["momentum_buffer"] = grad.copy()
            else:
                buf *= hp.momentum
                buf += (1.0 - hp.dampening) * grad
            grad = grad + hp.momentum * buf if hp.nesterov else buf
        params += -lr * grad

    def step_fused(
        self,
        hp: SGDHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        kernels.sgd_step(hp, grads, state, params, lr)
