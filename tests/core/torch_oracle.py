"""Run an optimizer in torch.optim and in optserve on the same data and compare.

The data: several tensors of different shapes (a matrix, a vector, a 3-D tensor and a
0-d scalar), initial values and a seeded sequence of random gradients at three
different scales, so that eps and the relative sizes of moments matter.

Relative error of an array: max |ours - torch| / (the largest |torch| value the tensor
has held so far in the run): the norm-wise error, taken against the magnitude the
computation carries. Elementwise ratios are meaningless where a value crosses zero (a
float32 scalar passing 0.002 on its way between 0.6 and -0.6 differs from float64 torch
itself by 1e-6 relative, though every operation was exact to half an ulp).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.core.layout import FlatLayout
from service.core.optim import get_optimizer, parse_hyper

SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("w1", (7, 5)),
    ("b1", (5,)),
    ("w2", (3, 4, 2)),
    ("scale", ()),
]
SCALES = {"w1": 1.0, "b1": 1e-3, "w2": 10.0, "scale": 0.5}
#: torch state entries that are per-tensor scalars, not arrays of the tensor's shape
SCALAR_KEYS = {"step", "mu_product"}
TOL = {np.float64: 1e-10, np.float32: 1e-5}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


@dataclass
class Problem:
    layout: FlatLayout
    init: dict[str, np.ndarray]
    grads: list[dict[str, np.ndarray]]


def make_problem(steps: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s) for n, s in SHAPES}
    grads = [{n: SCALES[n] * rng.standard_normal(s) for n, s in SHAPES} for _ in range(steps)]
    return Problem(FlatLayout.from_shapes(SHAPES), init, grads)


@contextlib.contextmanager
def torch_default_dtype(dtype: Any) -> Iterator[None]:
    """torch keeps scalar state (`step`, `mu_product`) in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPE[dtype])
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Scales:
    """The largest magnitude each compared quantity has reached so far in a run."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def rel_error(self, key: str, ours: Any, ref: Any) -> float:
        ours = np.asarray(ours, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if ref.size == 0:
            return 0.0
        scale = max(self.seen.get(key, 0.0), float(np.max(np.abs(ref))))
        self.seen[key] = scale
        diff = float(np.max(np.abs(ours - ref)))
        return diff / scale if scale > 0 else diff


def check_parity(
    name: str,
    hyper: dict[str, Any],
    torch_cls: Callable[..., torch.optim.Optimizer],
    dtype: Any,
    impl: str,
    *,
    steps: int = 200,
    torch_kwargs: dict[str, Any] | None = None,
    check_every: int = 20,
) -> float:
    """Run both for `steps` steps; assert params and state agree; return the worst error."""
    problem = make_problem(steps)
    layout = problem.layout
    tol = TOL[dtype]
    worst = 0.0
    scales = Scales()
    with torch_default_dtype(dtype):
        tparams = {
            n: torch.tensor(problem.init[n], dtype=TORCH_DTYPE[dtype], requires_grad=True)
            for n, _ in SHAPES
        }
        kwargs = dict(hyper) if torch_kwargs is None else torch_kwargs
        topt = torch_cls(list(tparams.values()), **kwargs)
        hp = parse_hyper({"name": name, **hyper})
        opt = get_optimizer(name)
        flat = layout.flatten(problem.init, dtype)
        state = opt.init(hp, flat, layout)
        for t, grads in enumerate(problem.grads, start=1):
            for n, p in tparams.items():
                p.grad = torch.tensor(grads[n], dtype=TORCH_DTYPE[dtype])
            topt.step()
            flat, state = opt.update(
                hp, layout.flatten(grads, dtype), state, flat, layout=layout, impl=impl
            )
            if t % check_every and t != 1 and t != steps:
                continue
            ours = layout.unflatten(flat)
            for n, p in tparams.items():
                err = scales.rel_error(n, ours[n], p.detach().numpy())
                worst = max(worst, err)
                assert err <= tol, f"step {t}: param {n} rel error {err:.3g} > {tol:g}"
                worst = max(worst, _compare_state(topt.state[p], state, layout, n, t, tol, scales))
    return worst


def _compare_state(
    tstate: dict[str, Any],
    state: Any,
    layout: FlatLayout,
    n: str,
    t: int,
    tol: float,
    scales: Scales,
) -> float:
    worst = 0.0
    spec = layout[n]
    tensor_keys = {k for k in tstate if k not in SCALAR_KEYS}
    assert tensor_keys == set(state.arrays), (
        f"state arrays {sorted(state.arrays)} != torch's {sorted(tensor_keys)}"
    )
    for key, value in tstate.items():
        if key in state.arrays:
            ours = state.arrays[key][spec.offset : spec.stop].reshape(spec.shape)
            err = scales.rel_error(f"{n}.{key}", ours, value.detach().numpy())
        else:
            assert key in state.scalars, f"torch state {key!r} missing from ours"
            err = scales.rel_error(f"{n}.{key}", state.scalars[key], float(value))
        assert err <= tol, f"step {t}: state {key} of {n} rel error {err:.3g} > {tol:g}"
        worst = max(worst, err)
    return worst
