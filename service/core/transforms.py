"""Gradient transforms a session can enable: clipping and non-finite detection.

Pure NumPy over the flat gradient vector of a session; a `FlatLayout` splits it into its
tensors for the per-tensor quantities (each tensor's norm, which tensors hold NaN/inf).
Per-tensor reductions are segment reductions over the flat vector (one NumPy reduction
per tensor, never a Python loop over elements).

Nothing here writes into the gradient it is given: every function returns a new array.
Arithmetic stays in the gradient's dtype (a float32 gradient is clipped in float32, as
torch does for a float32 `.grad`).

Reference semantics, which tests/core/test_transforms.py checks against torch:

* `clip_by_global_norm` is ``torch.nn.utils.clip_grad_norm_(params, max_norm,
  norm_type)``: with ``n_i`` the p-norm of tensor ``i``, the total norm is the p-norm of
  the vector of the ``n_i``::

      n_i   = (sum_j |g_ij|^p)^(1/p)          (p = inf: max_j |g_ij|)
      total = (sum_i n_i^p)^(1/p)             (p = inf: max_i n_i)
      coef  = min(max_norm / (total + 1e-6), 1)
      g     = g * coef

  The coefficient is always applied (a factor of exactly 1 below the threshold, so the
  gradient comes back unchanged). A finite gradient whose norm overflows the dtype
  (float32 elements above ~1.8e19 for p = 2) has total = inf and coef = 0, as in torch.
* `clip_by_tensor_norm` is the same with each tensor clipped by its own norm:
  ``g_i = g_i * min(max_norm / (n_i + 1e-6), 1)``, as a loop of ``clip_grad_norm_`` over
  the tensors one at a time.
* `clip_by_value` is ``torch.nn.utils.clip_grad_value_(params, clip_value)``:
  ``g = clamp(g, -clip_value, clip_value)``.
* `find_nonfinite` counts the NaN and +/-inf elements and names the tensors holding any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.core.errors import CoreError
from service.core.layout import FlatLayout, FloatArray

#: added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does
NORM_EPS = 1e-6


def _inf_from_text(value: object) -> object:
    """JSON has no infinity: accept the string "inf" (or "infinity") for the max norm."""
    if isinstance(value, str) and value.strip().lower() in {"inf", "+inf", "infinity"}:
        return math.inf
    return value


class GradientTransforms(BaseModel):
    """The gradient transforms of a session; every field off by default.

    `clip_norm`: clip by the total `norm_type`-norm to at most this (torch
    `clip_grad_norm_`'s `max_norm`); with `per_tensor`, each tensor by its own norm
    instead. `norm_type`: p > 0, or inf for the max norm; it is also the norm reported as
    `grad_norm`. `clip_value`: clamp every element to `[-clip_value, clip_value]`
    (torch `clip_grad_value_`). `nonfinite`: what the caller does with a gradient
    holding NaN/inf: refuse the step (`"error"`) or skip it (`"skip"`); the transforms
    only detect it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    clip_norm: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    norm_type: Annotated[float, BeforeValidator(_inf_from_text), Field(gt=0)] = 2.0
    per_tensor: bool = False
    clip_value: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    nonfinite: Literal["error", "skip"] = "error"


@dataclass(slots=True)
class TransformResult:
    """What `apply_transforms` did to one gradient.

    `grads`: the transformed gradient (a new array; the input is never modified), equal
    to the input when it holds non-finite values. `grad_norm`: the total `norm_type`
    norm of the incoming gradient, before any clipping (NaN or inf when it holds
    non-finite values). `clipped`: whether clipping changed the gradient (an element
    was clamped, or a norm coefficient was below 1). `nonfinite`: the number of NaN/inf
    elements; `nonfinite_tensors`: the names of the tensors holding them, in layout order.
    """

    grads: FloatArray
    grad_norm: float
    clipped: bool = False
    nonfinite: int = 0
    nonfinite_tensors: list[str] = field(default_factory=list)


def apply_transforms(
    config: GradientTransforms, grads: npt.ArrayLike, layout: FlatLayout | None = None
) -> TransformResult:
    """Apply a session's gradient transforms to its flat gradient.

    Order (the usual one for torch and optax users, who clamp values before rescaling
    by the norm):

    1. non-finite check: if any element is NaN or +/-inf, return at once with a copy of
       the input unchanged and `nonfinite > 0`; the caller refuses or skips the step
       according to `config.nonfinite`;
    2. clip by value (`clip_value`): ``g = clamp(g, -clip_value, clip_value)``;
    3. clip by norm (`clip_norm`, globally or `per_tensor`), on the value-clipped
       gradient: ``g = g * min(clip_norm / (norm + 1e-6), 1)``.

    `grad_norm` is always computed, on the incoming gradient (before step 2), with
    `config.norm_type`. `layout` defaults to one tensor holding the whole vector.
    """
    g, layout = _check(grads, layout)
    bad, bad_tensors = find_nonfinite(g, layout)
    norms = tensor_norms(g, layout, config.norm_type)
    grad_norm = float(_combine(norms, config.norm_type))
    if bad:
        return TransformResult(g.copy(), grad_norm, False, bad, bad_tensors)
    out = g
    clipped = False
    if config.clip_value is not None:
        out = clip_by_value(g, config.clip_value)
        clipped = bool(np.any(np.abs(g) > out.dtype.type(config.clip_value)))
        if config.clip_norm is not None and clipped:
            norms = tensor_norms(out, layout, config.norm_type)
    if config.clip_norm is not None:
        if config.per_tensor:
            coefs = _coefficients(norms, config.clip_norm)
            out = out * layout.per_element(coefs)
        else:
            coefs = _coefficients(_combine(norms, config.norm_type), config.clip_norm)
            out = out * coefs
        clipped = clipped or bool(np.any(coefs < 1))
    if out is g:
        out = g.copy()
    return TransformResult(out, grad_norm, clipped, 0, [])


def tensor_norms(grads: FloatArray, layout: FlatLayout, norm_type: float = 2.0) -> FloatArray:
    """The `norm_type`-norm of each tensor of `layout` (``torch.linalg.vector_norm``).

    ``n_i = (sum_j |g_ij|^p)^(1/p)``, ``max_j |g_ij|`` for p = inf; 0 for an empty
    tensor. One number per tensor, in the dtype of `grads`.
    """
    p = _check_norm_type(norm_type)
    a = np.abs(grads)
    with np.errstate(over="ignore", under="ignore"):
        if math.isinf(p):
            return _segment_max(a, layout)
        if p == 1.0:
            return layout.segment_sum(a)
        if p == 2.0:
            return np.sqrt(layout.segment_sum(a * a))
        dt = a.dtype.type
        norms: FloatArray = np.power(layout.segment_sum(np.power(a, dt(p))), dt(1.0 / p))
        return norms


def global_norm(
    grads: npt.ArrayLike, layout: FlatLayout | None = None, norm_type: float = 2.0
) -> float:
    """The total `norm_type`-norm over all tensors, as `clip_grad_norm_` returns it.

    ``total = (sum_i n_i^p)^(1/p)`` over the per-tensor norms ``n_i`` (`tensor_norms`),
    ``max_i n_i`` for p = inf: the norm of the whole flat vector, up to rounding.
    """
    g, layout = _check(grads, layout)
    return float(_combine(tensor_norms(g, layout, norm_type), norm_type))


def clip_by_global_norm(
    grads: npt.ArrayLike,
    max_norm: float,
    norm_type: float = 2.0,
    layout: FlatLayout | None = None,
) -> tuple[FloatArray, float]:
    """Clip by the total norm: ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``.

    ``g * min(max_norm / (total + 1e-6), 1)``, with `total` as in `global_norm`.
    Returns `(clipped gradient, total norm before clipping)`; `grads` is not modified.
    """
    g, layout = _check(grads, layout)
    total = _combine(tensor_norms(g, layout, norm_type), norm_type)
    return g * _coefficients(total, _check_max(max_norm, "max_norm")), float(total)


def clip_by_tensor_norm(
    grads: npt.ArrayLike,
    max_norm: float,
    norm_type: float = 2.0,
    layout: FlatLayout | None = None,
) -> tuple[FloatArray, float]:
    """Clip each tensor by its own norm: ``g_i * min(max_norm / (n_i + 1e-6), 1)``.

    The same as calling ``torch.nn.utils.clip_grad_norm_`` on each tensor alone.
    Returns `(clipped gradient, total norm before clipping)`, the total as in
    `global_norm`; `grads` is not modified.
    """
    g, layout = _check(grads, layout)
    norms = tensor_norms(g, layout, norm_type)
    coefs = _coefficients(norms, _check_max(max_norm, "max_norm"))
    return g * layout.per_element(coefs), float(_combine(norms, norm_type))


def clip_by_value(grads: npt.ArrayLike, clip_value: float) -> FloatArray:
    """Clamp every element to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    NaN stays NaN, as in torch. Returns a new array; `grads` is not modified.
    """
    g = np.asarray(grads)
    v = g.dtype.type(_check_max(clip_value, "clip_value"))
    out: FloatArray = np.minimum(np.maximum(g, -v), v)
    return out


def find_nonfinite(grads: npt.ArrayLike, layout: FlatLayout | None = None) -> tuple[int, list[str]]:
    """The number of NaN/+-inf elements and the names of the tensors holding them."""
    g, layout = _check(grads, layout)
    bad = ~np.isfinite(g)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return 0, []
    per_tensor = layout.segment_sum(bad.astype(np.int64))
    return count, [name for name, n in zip(layout.names, per_tensor, strict=True) if n > 0]


def _check(grads: npt.ArrayLike, layout: FlatLayout | None) -> tuple[FloatArray, FlatLayout]:
    g = np.asarray(grads)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.floating):
        raise CoreError(f"grads must be a flat (1-D) float array, not {g.dtype}{list(g.shape)}")
    if layout is None:
        layout = FlatLayout.single(g.size)
    elif layout.total != g.size:
        raise CoreError(f"layout holds {layout.total} elements, grads {g.size}")
    return g, layout


def _check_norm_type(norm_type: float) -> float:
    p = float(norm_type)
    if not p > 0:
        raise CoreError(f"norm_type must be > 0 or inf: got {norm_type}")
    return p


def _check_max(value: float, what: str) -> float:
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise CoreError(f"{what} must be a finite number > 0: got {value}")
    return v


def _combine(norms: FloatArray, norm_type: float) -> Any:
    """The p-norm of the per-tensor norms (a 0-d value in their dtype)."""
    p = float(norm_type)
    dt = norms.dtype.type
    if norms.size == 0:
        return dt(0.0)
    with np.errstate(over="ignore", under="ignore"):
        if math.isinf(p):
            return norms.max()
        if p == 1.0:
            return norms.sum()
        if p == 2.0:
            return np.sqrt(np.sum(norms * norms))
        return np.power(np.sum(np.power(norms, dt(p))), dt(1.0 / p))


def _coefficients(norms: Any, max_norm: float) -> Any:
    """``min(max_norm / (norm + 1e-6), 1)`` in the dtype of `norms` (torch's clip_coef)."""
    norms = np.asarray(norms)
    dt = norms.dtype.type
    with np.errstate(divide="ignore", over="ignore"):
        return np.minimum(dt(max_norm) / (norms + dt(NORM_EPS)), dt(1.0))


def _segment_max(values: FloatArray, layout: FlatLayout) -> FloatArray:
    """The max of non-negative `values` over each tensor's segment (0 for an empty one)."""
    sizes = np.diff(layout.offsets)
    out = np.zeros(len(layout), dtype=values.dtype)
    nonempty = sizes > 0
    if nonempty.any():
        # between consecutive non-empty starts lie only empty segments, so reduceat over
        # the non-empty starts alone reduces each non-empty segment exactly
        out[nonempty] = np.maximum.reduceat(values, layout.offsets[:-1][nonempty])
    return out


__all__ = [
    "NORM_EPS",
    "GradientTransforms",
    "TransformResult",
    "apply_transforms",
    "clip_by_global_norm",
    "clip_by_tensor_norm",
    "clip_by_value",
    "find_nonfinite",
    "global_norm",
    "tensor_norms",
]
