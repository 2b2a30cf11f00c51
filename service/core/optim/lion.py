"""Lion, the sign-momentum optimizer found by program search (Chen et al., 2023)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import negate_if
from service.core.state import OptState
from service.core.validators import NonNeg, UnitPair


class LionHyper(Hyper):
    """Hyperparameters of `lion`, with lucidrains/lion-pytorch's names and defaults."""

    name: Literal["lion"] = "lion"
    lr: NonNeg = 1e-4
    betas: UnitPair = (0.9, 0.99)
    weight_decay: NonNeg = 0.0
    maximize: bool = False


class Lion(Optimizer[LionHyper]):
    r"""Lion (Chen et al., 2023), as ``lion_pytorch.Lion`` (lucidrains) computes it.

    Update rule, gradient ``g`` (negated if ``maximize``)::

        p = p * (1 - lr * weight_decay)               (decoupled decay)
        u = sign(beta1 * m + (1 - beta1) * g)         (sign(0) = 0)
        p = p - lr * u
        m = beta2 * m + (1 - beta2) * g

    Defaults: lr 1e-4, betas (0.9, 0.99), weight_decay 0, maximize False (the paper's
    Program 1 and the reference code). Betas may be anywhere in [0, 1], as the reference
    allows. State: ``exp_avg``, ``step`` (the step count is kept for uniformity; the rule
    does not use it).

    Reference: X. Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS
    2023 (Program 1 / Algorithm 2); code ``lion_pytorch/lion_pytorch.py`` of
    github.com/lucidrains/lion-pytorch (and google/automl ``lion``).

    Tested (tests/core/test_reference_optimizers.py) against a per-tensor NumPy
    transcription of the reference code: 200 steps, every option, relative error
    <= 1e-12 (float64) and <= 1e-4 (float32 against the float64 reference).

    Deviations from the reference code: lucidrains' ``decoupled_weight_decay`` switch
    (which divides weight_decay by the initial lr) and its Triton kernel are not
    offered; ``maximize`` is added; lr may be 0 (the reference asserts lr > 0).
    """

    name = "lion"
    hyper = LionHyper
    reference: ClassVar[str] = (
        "Chen et al. 2023, Symbolic Discovery of Optimization Algorithms; "
        "lucidrains/lion-pytorch lion_pytorch.Lion"
    )

    def state_arrays(self, hp: LionHyper) -> tuple[str, ...]:
        return ("exp_avg",)

    def step_numpy(
        self,
        hp: LionHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        state.advance()
        grad = negate_if(grads, hp.maximize)
        exp_avg = state.arrays["exp_avg"]
        if hp.weight_decay != 0:
            params *= 1.0 - lr * hp.weight_decay
        update = exp_avg * beta1
        update += (1.0 - beta1) * grad
        np.sign(update, out=update)
        update *= lr
        params -= update
        exp_avg *= beta2
        exp_avg += (1.0 - beta2) * grad
