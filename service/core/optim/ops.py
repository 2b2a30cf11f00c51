"""Elementwise primitives with torch's operation order, for the NumPy references.

NumPy scalars in these formulas are Python floats, which NumPy casts to the array's
dtype first (NEP 50), as torch's CPU kernels cast a scalar to the tensor's dtype; so a
float32 session computes in float32 like `torch.optim` does.
"""

from __future__ import annotations

import numpy as np


def lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """`start += weight * (end - start)` in place, as `torch.Tensor.lerp_`.

    torch switches to `end - (end - start) * (1 - weight)` for `|weight| >= 0.5`
    for accuracy near 1; so does this.
    """
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1.0 - weight)


def ema_sq_(avg_sq: np.ndarray, grad: np.ndarray, decay: float) -> None:
    """`avg_sq = decay * avg_sq + (1 - decay) * grad**2` in place (torch `mul_().addcmul_()`)."""
    avg_sq *= decay
    avg_sq += (1.0 - decay) * grad * grad


def descent_grad(
    grads: np.ndarray,
    params: np.ndarray,
    lr: float,
    *,
    maximize: bool,
    weight_decay: float,
    decoupled: bool = False,
) -> np.ndarray:
    """The gradient a step descends along, with weight decay, as torch's optimizers begin.

    `-grads` when maximizing; then, if `weight_decay`: decoupled decay shrinks `params`
    in place (`p *= 1 - lr * weight_decay`, torch's `param.mul_`) and leaves the gradient
    alone, otherwise L2 decay adds `weight_decay * p` to it. `grads` is never written.
    """
    grad = negate_if(grads, maximize)
    if weight_decay != 0 and decoupled:
        params *= 1.0 - lr * weight_decay
        return grad
    return l2_(grad, params, weight_decay)


def adam_moments_(
    state_arrays: dict[str, np.ndarray], grad: np.ndarray, betas: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Adam's moment updates in place, as torch's Adam/NAdam/RAdam write them:
    `exp_avg.lerp_(grad, 1 - beta1)`, `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)`.
    Returns `(exp_avg, exp_avg_sq)`."""
    exp_avg, exp_avg_sq = state_arrays["exp_avg"], state_arrays["exp_avg_sq"]
    lerp_(exp_avg, grad, 1.0 - betas[0])
    ema_sq_(exp_avg_sq, grad, betas[1])
    return exp_avg, exp_avg_sq


def negate_if(grads: np.ndarray, maximize: bool) -> np.ndarray:
    """The gradient to descend: `-grads` when maximizing (a new array; `grads` is untouched)."""
    return -grads if maximize else grads


def l2_(grad: np.ndarray, params: np.ndarray, weight_decay: float) -> np.ndarray:
    """L2 weight decay folded into the gradient (torch `grad.add(param, alpha=wd)`), new array."""
    return grad + weight_decay * params if weight_decay != 0 else grad
