"""Yogi, Adam with an additive second-moment update (Zaheer et al., 2018)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import negate_if
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg


class YogiHyper(Hyper):
    """Hyperparameters of `yogi`, with optax's defaults (betas named as torch's)."""

    name: Literal["yogi"] = "yogi"
    lr: NonNeg = 1e-2
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-3
    initial_accumulator_value: NonNeg = 1e-6
    maximize: bool = False


class Yogi(Optimizer[YogiHyper]):
    r"""Yogi (Zaheer et al., NeurIPS 2018), as optax's ``scale_by_yogi`` computes it.

    Update rule, at step ``t`` (1-based), gradient ``g`` (negated if ``maximize``)::

        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * sign(v - g * g) * g * g
        m_hat = m / (1 - beta1^t)
        v_hat = v / (1 - beta2^t)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    with ``m`` and ``v`` both starting at ``initial_accumulator_value`` (optax).
    Defaults: lr 1e-2, betas (0.9, 0.999), eps 1e-3, initial_accumulator_value 1e-6,
    maximize False. State: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``step``.

    Bias correction is applied, as optax (and TensorFlow Addons' Yogi) do; the paper's
    Algorithm 2 has none. Without it the first steps are mis-scaled like uncorrected
    Adam's: after one step ``m = (1 - beta1) g`` and ``v ~ (1 - beta2) g^2``, so
    ``m / sqrt(v) ~ 3.2 sign(g)`` at the default betas instead of ``~ sign(g)``; with it
    the first step has Adam's size, and the later ones converge to the paper's as
    ``beta^t -> 0``.

    Reference: M. Zaheer, S. Reddi, D. Sachan, S. Kale, S. Kumar, "Adaptive Methods for
    Nonconvex Optimization", NeurIPS 2018 (Algorithm 2); code ``optax.yogi`` /
    ``optax.scale_by_yogi`` (google-deepmind/optax ``optax/_src/transform.py``).

    Tested (tests/core/test_reference_optimizers.py) against a per-tensor NumPy
    transcription of optax's rule: 200 steps, every option, relative error <= 1e-12
    (float64) and <= 1e-4 (float32 against the float64 reference).

    Deviations from the reference code: optax's ``eps_root`` (for differentiating through
    the update) is not offered (it is 0 by default); ``maximize`` is added. Deviation
    from the paper: bias correction and ``m_0 = initial_accumulator_value`` (optax's),
    where Algorithm 2 starts ``m`` at 0.
    """

    name = "yogi"
    hyper = YogiHyper
    reference: ClassVar[str] = (
        "Zaheer et al. 2018, Adaptive Methods for Nonconvex Optimization; "
        "optax.yogi (scale_by_yogi)"
    )

    def state_arrays(self, hp: YogiHyper) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def initial_array(self, hp: YogiHyper, name: str, params: np.ndarray) -> np.ndarray:
        return np.full_like(params, hp.initial_accumulator_value)

    def step_numpy(
        self,
        hp: YogiHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        grad = negate_if(grads, hp.maximize)
        exp_avg, exp_avg_sq = state.arrays["exp_avg"], state.arrays["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        grad_sq = grad * grad
        exp_avg_sq -= (1.0 - beta2) * np.sign(exp_avg_sq - grad_sq) * grad_sq
        denom = np.sqrt(exp_avg_sq / (1.0 - beta2**step))
        denom += hp.eps
        params -= lr * (exp_avg / (1.0 - beta1**step)) / denom
