"""SWATS: Adam that switches to SGD with momentum (Keskar & Socher, 2017)."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from service.core.errors import StateError
from service.core.layout import FlatLayout
from service.core.optim.base import Hyper, Optimizer
from service.core.optim.ops import descent_grad, ema_sq_
from service.core.state import OptState
from service.core.validators import BetaPair, NonNeg, Positive


class SWATSHyper(Hyper):
    """Hyperparameters of `swats`, with Mrpatekful/swats' names and defaults.

    `lr` must be > 0: the SGD phase's rate is scaled by `lr / hp.lr`.
    `switch_rtol` and `switch_atol` set the switching test (see `SWATS`).
    """

    name: Literal["swats"] = "swats"
    lr: Positive = 1e-3
    betas: BetaPair = (0.9, 0.999)
    eps: NonNeg = 1e-8
    weight_decay: NonNeg = 0.0
    amsgrad: bool = False
    maximize: bool = False
    switch_rtol: NonNeg = 1e-5
    switch_atol: NonNeg = 1e-8


class SWATS(Optimizer[SWATSHyper]):
    r"""SWATS (Keskar & Socher, 2017): Adam, then SGD with momentum once the projected
    rate settles, as the paper's Algorithm 1.

    At step ``k`` (1-based, counting both phases), gradient ``g`` (negated if
    ``maximize``; plus ``weight_decay * p``, L2, in both phases), ``lr`` the rate of this
    step (a schedule's value)::

        Adam phase:
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            if amsgrad: v_max = max(v_max, v)  and v_max replaces v below
            s = -lr * sqrt(1 - beta2^k) / (1 - beta1^k) * m / (sqrt(v) + eps)
            p = p + s
            if s.g != 0:                           (dot products over the whole vector)
                gamma = s.s / (-s.g)
                lambda = beta2 * lambda + (1 - beta2) * gamma
                Lambda = lambda / (1 - beta2^k)
                if k > 1 and Lambda > 0 and |Lambda - gamma| <= tol(gamma):
                    switch: sgd_lr = Lambda, switch_step = k, momentum buffer b = 0
            tol(gamma) = switch_atol + switch_rtol * |gamma|
        SGD phase (every step after the switch):
            b = beta1 * b + g
            p = p - (1 - beta1) * sgd_lr * (lr / hp.lr) * b

    The switching tolerance is ``|Lambda - gamma| <= switch_atol + switch_rtol * |gamma|``
    (``torch.allclose(Lambda, gamma)``'s test, as Mrpatekful/swats), defaults
    ``switch_rtol = 1e-5``, ``switch_atol = 1e-8``; the paper's Algorithm 1 uses
    ``|Lambda - gamma| < eps`` (its eps = 1e-9), i.e. ``switch_rtol = 0``,
    ``switch_atol = 1e-9`` up to ``<`` vs ``<=``. The dot products are accumulated in
    float64 whatever the session's dtype; ``lambda`` is a float64 scalar. In practice
    the default tolerance makes the switch a rare event on noisy problems (gamma must
    land within 1e-5 of its running mean): on the test's noisy quadratic it switched
    within 600 steps for 3 seeds of 8, while ``switch_rtol = 1e-3`` (at lr 1e-2)
    switched within 100 steps in every case tried.
    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, amsgrad False,
    maximize False, switch_rtol 1e-5, switch_atol 1e-8.
    State: arrays ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad),
    ``momentum_buffer`` (made, as zeros, at the switch); scalars ``step``,
    ``switched`` (bool), ``switch_step`` (int, 0 before the switch), ``sgd_lr`` (float,
    0 before the switch), ``lambda`` (float).

    Reference: N. S. Keskar, R. Socher, "Improving Generalization Performance by
    Switching from Adam to SGD", arXiv 1712.07628, 2017 (Algorithm 1); code
    ``swats/swats.py`` and ``swats/optim.py`` of github.com/Mrpatekful/swats compared.

    Tested (tests/core/test_reference_optimizers.py) against a NumPy transcription of
    Algorithm 1 looping over a list of tensors: 200 steps, every option, relative error
    <= 1e-12 (float64) and <= 1e-4 (float32 against the float64 reference, on runs
    whose switch decision is not within float32 rounding of the tolerance); a noisy
    quadratic where it switches, with the same ``switch_step`` and ``sgd_lr``
    (relative 1e-12) as the reference and SGD-rule steps after.

    Deviations from Mrpatekful/swats: its ``gamma`` and ``lambda`` are per tensor and
    the whole group switches (at that tensor's rate) when any one tensor passes the test;
    here, as in docs/references.md and the paper's vector notation, one ``gamma`` over the
    whole flat vector. Its SGD phase scales the momentum buffer itself by
    ``1 - beta1`` each step (an in-place ``grad.mul_`` on the buffer); here the buffer
    is the paper's ``b = beta1 * b + g`` and only the step is scaled. It writes the
    switched rate into the group's ``lr`` (where a scheduler then acts on it directly);
    here it is kept in ``sgd_lr`` and scaled by ``lr / hp.lr``. ``maximize``
    and the tolerance hyperparameters are added; its ``nesterov`` (optim.py) is not
    offered; ``lr`` must be > 0.
    """

    name = "swats"
    hyper = SWATSHyper
    reference: ClassVar[str] = (
        "Keskar & Socher 2017, Improving Generalization Performance by Switching from Adam "
        "to SGD (Algorithm 1); Mrpatekful/swats"
    )
    lazy_arrays = ("momentum_buffer",)

    def state_arrays(self, hp: SWATSHyper) -> tuple[str, ...]:
        base = ("exp_avg", "exp_avg_sq")
        return (*base, "max_exp_avg_sq") if hp.amsgrad else base

    def initial_scalars(self, hp: SWATSHyper) -> dict[str, float | int | bool]:
        return {"step": 0, "switched": False, "switch_step": 0, "sgd_lr": 0.0, "lambda": 0.0}

    def step_numpy(
        self,
        hp: SWATSHyper,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        beta1, beta2 = hp.betas
        step = state.advance()
        scalars = state.scalars
        grad = descent_grad(grads, params, lr, maximize=hp.maximize, weight_decay=hp.weight_decay)

        if scalars.get("switched", False):
            buf = state.arrays.get("momentum_buffer")
            if buf is None:
                raise StateError("swats state has switched to SGD but holds no momentum_buffer")
            buf *= beta1
            buf += grad
            params -= ((1.0 - beta1) * float(scalars["sgd_lr"]) * (lr / hp.lr)) * buf
            return

        exp_avg, exp_avg_sq = state.arrays["exp_avg"], state.arrays["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        ema_sq_(exp_avg_sq, grad, beta2)
        second = exp_avg_sq
        if hp.amsgrad:
            second = state.arrays["max_exp_avg_sq"]
            np.maximum(second, exp_avg_sq, out=second)
        bias_correction2 = 1.0 - beta2**step
        step_size = lr * bias_correction2**0.5 / (1.0 - beta1**step)
        denom = np.sqrt(second)
        denom += hp.eps
        adam_step = np.divide(exp_avg, denom, out=denom)
        adam_step *= -step_size
        params += adam_step

        s64 = adam_step.astype(np.float64, copy=False)
        s_dot_g = float(np.dot(s64, grad.astype(np.float64, copy=False)))
        if s_dot_g != 0:
            gamma = float(np.dot(s64, s64)) / -s_dot_g
            lam = beta2 * float(scalars.get("lambda", 0.0)) + (1.0 - beta2) * gamma
            scalars["lambda"] = lam
            rate = lam / bias_correction2
            if (
                step > 1
                and rate > 0
                and abs(rate - gamma) <= hp.switch_atol + hp.switch_rtol * abs(gamma)
            ):
                scalars["switched"] = True
                scalars["switch_step"] = step
                scalars["sgd_lr"] = rate
                state.arrays["momentum_buffer"] = np.zeros_like(params)
