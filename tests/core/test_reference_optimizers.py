"""The optimizers PyTorch lacks, against independent references written out here.

Each reference below is a plain NumPy float64 transcription of the paper's algorithm /
the reference code (named in its docstring), written the way that PyTorch-style code
is: a loop over a list of tensors of different shapes, state kept per tensor. None of
optserve's helpers are used by the references. Every case runs 200 steps with seeded
random gradients, through optserve's `update` on the flat vector, and compares the
params and every state entry at every step:

* float64: relative error <= 1e-12;
* float32 (inputs rounded to float32, reference still in float64): <= 1e-4.

Relative error of a tensor: max |ours - reference| / max |reference| (norm-wise, per
tensor; the absolute error where the reference is all zeros). In float64 that bound
holds with max |reference| of the current step; in float32 max |reference| is the
largest the tensor has held so far in the run (see `Checker`: a shrinking tensor or a
0-d value crossing zero makes the current one meaningless as a scale).

Also: SWATS switching on a noisy quadratic (same switch step, rate and SGD-phase steps
as the reference), LAMB's trust ratio being per tensor, hyperparameter defaults and
range checks, and state round trips.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from service.core.errors import HyperparameterError
from service.core.layout import FlatLayout
from service.core.optim import OPTIMIZERS, get_optimizer, parse_hyper
from service.core.state import OptState

STEPS = 200
TOL = {np.float64: 1e-12, np.float32: 1e-4}


#: name, shape, gradient scale (0: a tensor that never gets a gradient)
SHAPES: list[tuple[str, tuple[int, ...], float]] = [
    ("w1", (6, 5), 1.0),
    ("b1", (5,), 1e-3),
    ("w2", (2, 3, 4), 10.0),
    ("scale", (), 0.5),
    ("frozen", (3, 2), 0.0),
]

# --------------------------------------------------------------------------------------
# References. Each takes the full hyperparameters (reference defaults filled in by
# `with_defaults`), the list of initial tensors, and steps a list of tensors in place.
# --------------------------------------------------------------------------------------

#: the reference implementations' own defaults (from their code / papers)
DEFAULTS: dict[str, dict[str, Any]] = {
    "adabound": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "final_lr": 0.1,
        "gamma": 1e-3,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsbound": False,
        "maximize": False,
    },
    "amsbound": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "final_lr": 0.1,
        "gamma": 1e-3,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsbound": True,
        "maximize": False,
    },
    "swats": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "switch_rtol": 1e-5,
        "switch_atol": 1e-8,
    },
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False},
    "lamb": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
        "maximize": False,
    },
    "adabelief": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-16,
        "weight_decay": 0.0,
        "amsgrad": False,
        "weight_decouple": True,
        "fixed_decay": False,
        "maximize": False,
    },
    "yogi": {
        "lr": 1e-2,
        "betas": (0.9, 0.999),
        "eps": 1e-3,
        "initial_accumulator_value": 1e-6,
        "maximize": False,
    },
}


def with_defaults(name: str, hyper: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS[name], **hyper}


@dataclass
class Reference:
    """Per-tensor state, PyTorch style; `step` takes lists of tensors."""

    hp: dict[str, Any]
    tensors: list[np.ndarray]
    state: list[dict[str, np.ndarray]] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Make the per-tensor state (each reference overrides this)."""

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        raise NotImplementedError


class AdaBoundRef(Reference):
    """Luolc/AdaBound `adabound/adabound.py`, class AdaBound.step, per tensor."""

    def __post_init__(self) -> None:
        self.base_lr = self.hp["lr"]
        for p in self.tensors:
            st = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
            if self.hp["amsbound"]:
                st["max_exp_avg_sq"] = np.zeros_like(p)
            self.state.append(st)
        self.scalars["step"] = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        beta1, beta2 = hp["betas"]
        self.scalars["step"] += 1
        t = self.scalars["step"]
        for p, grad, st in zip(params, grads, self.state, strict=True):
            if hp["maximize"]:
                grad = -grad
            if hp["weight_decay"] != 0:
                grad = grad + hp["weight_decay"] * p
            exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
            exp_avg[...] = exp_avg * beta1 + (1 - beta1) * grad
            exp_avg_sq[...] = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
            if hp["amsbound"]:
                st["max_exp_avg_sq"][...] = np.maximum(st["max_exp_avg_sq"], exp_avg_sq)
                denom = np.sqrt(st["max_exp_avg_sq"]) + hp["eps"]
            else:
                denom = np.sqrt(exp_avg_sq) + hp["eps"]
            bias_correction1 = 1 - beta1**t
            bias_correction2 = 1 - beta2**t
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
            final_lr = hp["final_lr"] * lr / self.base_lr
            lower_bound = final_lr * (1 - 1 / (hp["gamma"] * t + 1))
            upper_bound = final_lr * (1 + 1 / (hp["gamma"] * t))
            steps = np.full_like(denom, step_size) / denom
            steps = np.minimum(np.maximum(steps, lower_bound), upper_bound) * exp_avg
            p -= steps


class SWATSRef(Reference):
    """Keskar & Socher 2017, Algorithm 1, over a list of tensors.

    Adam phase as in the paper (eps outside the uncorrected sqrt, as Mrpatekful/swats),
    gamma from dot products summed over all tensors; switch test
    `k > 1 and Lambda > 0 and |Lambda - gamma| <= atol + rtol |gamma|`; then
    `v = b1 v + g; p -= (1 - b1) Lambda (lr / base_lr) v`.
    """

    def __post_init__(self) -> None:
        self.base_lr = self.hp["lr"]
        for p in self.tensors:
            st = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
            if self.hp["amsgrad"]:
                st["max_exp_avg_sq"] = np.zeros_like(p)
            self.state.append(st)
        self.scalars.update(step=0, switched=False, switch_step=0, sgd_lr=0.0)
        self.scalars["lambda"] = 0.0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        beta1, beta2 = hp["betas"]
        self.scalars["step"] += 1
        k = self.scalars["step"]
        gs = []
        for p, grad in zip(params, grads, strict=True):
            g = -grad if hp["maximize"] else grad
            if hp["weight_decay"] != 0:
                g = g + hp["weight_decay"] * p
            gs.append(g)
        if self.scalars["switched"]:
            rate = self.scalars["sgd_lr"] * lr / self.base_lr
            for p, g, st in zip(params, gs, self.state, strict=True):
                v = st["momentum_buffer"]
                v[...] = beta1 * v + g
                p -= (1 - beta1) * rate * v
            return
        p_dot_g = 0.0
        p_dot_p = 0.0
        bias_correction2 = 1 - beta2**k
        for p, g, st in zip(params, gs, self.state, strict=True):
            m, a = st["exp_avg"], st["exp_avg_sq"]
            m[...] = beta1 * m + (1 - beta1) * g
            a[...] = beta2 * a + (1 - beta2) * g * g
            if hp["amsgrad"]:
                st["max_exp_avg_sq"][...] = np.maximum(st["max_exp_avg_sq"], a)
                a = st["max_exp_avg_sq"]
            step_size = lr * math.sqrt(bias_correction2) / (1 - beta1**k)
            adam_step = -step_size * m / (np.sqrt(a) + hp["eps"])
            p += adam_step
            p_dot_g += float(np.sum(adam_step * g))
            p_dot_p += float(np.sum(adam_step * adam_step))
        if p_dot_g != 0:
            gamma = p_dot_p / -p_dot_g
            lam = beta2 * self.scalars["lambda"] + (1 - beta2) * gamma
            self.scalars["lambda"] = lam
            ratio = lam / bias_correction2
            self.last_gamma, self.last_ratio = gamma, ratio
            tol = hp["switch_atol"] + hp["switch_rtol"] * abs(gamma)
            if k > 1 and ratio > 0 and abs(ratio - gamma) <= tol:
                self.scalars.update(switched=True, switch_step=k, sgd_lr=ratio)
                for p, st in zip(params, self.state, strict=True):
                    st["momentum_buffer"] = np.zeros_like(p)


class LionRef(Reference):
    """lucidrains/lion-pytorch `lion_pytorch.py`, update_fn, per tensor."""

    def __post_init__(self) -> None:
        self.state = [{"exp_avg": np.zeros_like(p)} for p in self.tensors]
        self.scalars["step"] = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        beta1, beta2 = hp["betas"]
        self.scalars["step"] += 1
        for p, grad, st in zip(params, grads, self.state, strict=True):
            if hp["maximize"]:
                grad = -grad
            exp_avg = st["exp_avg"]
            p *= 1.0 - lr * hp["weight_decay"]
            update = np.sign(exp_avg * beta1 + grad * (1.0 - beta1))
            p += -lr * update
            exp_avg[...] = exp_avg * beta2 + grad * (1.0 - beta2)


class LambRef(Reference):
    """optax.lamb: scale_by_adam, add_decayed_weights, scale_by_trust_ratio, -lr.

    Keeps the last trust ratio of every tensor in `ratios`.
    """

    def __post_init__(self) -> None:
        self.state = [
            {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)} for p in self.tensors
        ]
        self.scalars["step"] = 0
        self.ratios: list[float] = []

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        b1, b2 = hp["betas"]
        self.scalars["step"] += 1
        count = self.scalars["step"]
        self.ratios = []
        for p, grad, st in zip(params, grads, self.state, strict=True):
            if hp["maximize"]:
                grad = -grad
            mu = st["exp_avg"]
            nu = st["exp_avg_sq"]
            mu[...] = (1 - b1) * grad + b1 * mu
            nu[...] = (1 - b2) * grad**2 + b2 * nu
            mu_hat = mu / (1 - b1**count)
            nu_hat = nu / (1 - b2**count)
            update = mu_hat / (np.sqrt(nu_hat) + hp["eps"])
            update = update + hp["weight_decay"] * p
            param_norm = np.sqrt(np.sum(p * p))
            update_norm = np.sqrt(np.sum(update * update))
            if param_norm == 0.0 or update_norm == 0.0:
                trust_ratio = 1.0
            else:
                trust_ratio = param_norm / update_norm
            self.ratios.append(float(trust_ratio))
            p += -lr * (update * trust_ratio)


class AdaBeliefRef(Reference):
    """adabelief_pytorch 0.2.0 `AdaBelief.py`, AdaBelief.step with rectify=False."""

    def __post_init__(self) -> None:
        for p in self.tensors:
            st = {"exp_avg": np.zeros_like(p), "exp_avg_var": np.zeros_like(p)}
            if self.hp["amsgrad"]:
                st["max_exp_avg_var"] = np.zeros_like(p)
            self.state.append(st)
        self.scalars["step"] = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        beta1, beta2 = hp["betas"]
        self.scalars["step"] += 1
        t = self.scalars["step"]
        for p, grad, st in zip(params, grads, self.state, strict=True):
            if hp["maximize"]:
                grad = -grad
            if hp["weight_decouple"]:
                if not hp["fixed_decay"]:
                    p *= 1.0 - lr * hp["weight_decay"]
                else:
                    p *= 1.0 - hp["weight_decay"]
            elif hp["weight_decay"] != 0:
                grad = grad + hp["weight_decay"] * p
            exp_avg, exp_avg_var = st["exp_avg"], st["exp_avg_var"]
            bias_correction1 = 1 - beta1**t
            bias_correction2 = 1 - beta2**t
            exp_avg[...] = exp_avg * beta1 + grad * (1 - beta1)
            grad_residual = grad - exp_avg
            exp_avg_var[...] = exp_avg_var * beta2 + (1 - beta2) * grad_residual * grad_residual
            exp_avg_var += hp["eps"]
            if hp["amsgrad"]:
                max_exp_avg_var = st["max_exp_avg_var"]
                max_exp_avg_var[...] = np.maximum(max_exp_avg_var, exp_avg_var)
                denom = np.sqrt(max_exp_avg_var) / math.sqrt(bias_correction2) + hp["eps"]
            else:
                denom = np.sqrt(exp_avg_var) / math.sqrt(bias_correction2) + hp["eps"]
            step_size = lr / bias_correction1
            p += -step_size * (exp_avg / denom)


class YogiRef(Reference):
    """optax.scale_by_yogi then scale(-lr), per tensor."""

    def __post_init__(self) -> None:
        value = self.hp["initial_accumulator_value"]
        self.state = [
            {"exp_avg": np.full_like(p, value), "exp_avg_sq": np.full_like(p, value)}
            for p in self.tensors
        ]
        self.scalars["step"] = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> None:
        hp = self.hp
        b1, b2 = hp["betas"]
        self.scalars["step"] += 1
        count = self.scalars["step"]
        for p, g, st in zip(params, grads, self.state, strict=True):
            if hp["maximize"]:
                g = -g
            mu, nu = st["exp_avg"], st["exp_avg_sq"]
            mu[...] = (1 - b1) * g + b1 * mu
            nu[...] = nu - (1 - b2) * np.sign(nu - g * g) * (g * g)
            mu_hat = mu / (1 - b1**count)
            nu_hat = nu / (1 - b2**count)
            p += -lr * (mu_hat / (np.sqrt(nu_hat) + hp["eps"]))


REFERENCES: dict[str, Callable[..., Reference]] = {
    "adabound": AdaBoundRef,
    "amsbound": AdaBoundRef,
    "swats": SWATSRef,
    "lion": LionRef,
    "lamb": LambRef,
    "adabelief": AdaBeliefRef,
    "yogi": YogiRef,
}

# --------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------


def grid(**options: list[Any]) -> list[dict[str, Any]]:
    keys = list(options)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*options.values())]


CASES: dict[str, list[dict[str, Any]]] = {
    "adabound": [
        {"lr": 0.01, **c}
        for c in grid(weight_decay=[0.0, 0.05], maximize=[False, True], amsbound=[False, True])
    ]
    # every case clips some elements to each bound; gamma 0.1 tightens them 100x faster
    + [
        {"lr": 0.01, "betas": (0.8, 0.95), "final_lr": 0.05, "gamma": 0.1, "eps": 1e-6},
        {"lr": 0.01, "gamma": 0.1, "amsbound": True},
        {},
    ],
    "amsbound": [{"lr": 0.01, **c} for c in grid(weight_decay=[0.0, 0.05], maximize=[False, True])]
    + [{"lr": 0.01, "gamma": 0.1, "final_lr": 0.02}, {}],
    "swats": [
        {"lr": 0.01, **c}
        for c in grid(weight_decay=[0.0, 0.05], maximize=[False, True], amsgrad=[False, True])
    ]
    + [{"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6}, {}],
    "lion": [{"lr": 1e-3, **c} for c in grid(weight_decay=[0.0, 0.1], maximize=[False, True])]
    + [{"lr": 1e-3, "betas": (0.95, 0.98)}, {"lr": 1e-3, "betas": (0.0, 1.0)}, {}],
    "lamb": [{"lr": 0.01, **c} for c in grid(weight_decay=[0.0, 0.01], maximize=[False, True])]
    + [{"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8}, {}],
    "adabelief": [
        {"lr": 0.01, **c}
        for c in grid(
            weight_decay=[0.0, 0.1],
            weight_decouple=[True, False],
            fixed_decay=[False, True],
            amsgrad=[False, True],
            maximize=[False, True],
        )
        if not (c["fixed_decay"] and not c["weight_decouple"])
    ]
    + [{"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-8}, {}],
    "yogi": [{"lr": 0.01, **c} for c in grid(maximize=[False, True])]
    + [
        {"lr": 0.003, "betas": (0.8, 0.95), "eps": 1e-6},
        {"initial_accumulator_value": 0.0},
        {"initial_accumulator_value": 0.5},
        {},
    ],
}


def schedule(base: float, t: int) -> float:
    """A learning-rate schedule's value at step t: a cosine from base down to 0.1 base."""
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / STEPS)))


@dataclass
class Problem:
    layout: FlatLayout
    init: list[np.ndarray]
    grads: list[list[np.ndarray]]


def make_problem(dtype: Any, seed: int = 0) -> Problem:
    """Initial params and STEPS gradients per tensor, rounded to `dtype` (then float64)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(shape) for _, shape, _ in SHAPES]
    init[1][...] = 0.0  # a tensor starting at zero (LAMB's zero-norm case)
    grads = [
        [scale * rng.standard_normal(shape) for _, shape, scale in SHAPES] for _ in range(STEPS)
    ]

    def rounded(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=dtype).astype(np.float64)

    return Problem(
        FlatLayout.from_shapes([(n, s) for n, s, _ in SHAPES]),
        [rounded(a) for a in init],
        [[rounded(g) for g in step] for step in grads],
    )


def rel_error(ours: np.ndarray, ref: np.ndarray, scale: float | None = None) -> float:
    """max |ours - ref| / max |ref| over one tensor (absolute if ref is all zeros).

    `scale`, when given, replaces max |ref| (see `Checker`).
    """
    diff = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref), initial=0.0))
    if scale is None:
        scale = float(np.max(np.abs(ref), initial=0.0))
    return diff / scale if scale > 0 else diff


@dataclass
class Checker:
    """Compares params, state arrays and scalars with the reference after each step.

    The error of a tensor is max |ours - ref| / S, with S the largest |ref| value that
    tensor (or state entry) has held so far in the run. S is max |ref| of the current
    step except where a tensor shrinks: a 0-d tensor (or a momentum) crossing zero
    makes the current max |ref| arbitrarily small and the ratio meaningless, though
    every operation was exact to half an ulp (tests/core/torch_oracle.py does the
    same). With `strict` (float64 runs), the error against the current max |ref| is
    held to `tol` as well. `worst` is the largest error seen; `worst_now` the same
    against the current max |ref|.
    """

    tol: float
    strict: bool = False
    scales: dict[str, float] = field(default_factory=dict)
    worst: float = 0.0
    worst_now: float = 0.0

    def _one(self, key: str, ours: np.ndarray, ref: np.ndarray, where: str) -> None:
        now = float(np.max(np.abs(ref), initial=0.0))
        scale = self.scales[key] = max(self.scales.get(key, 0.0), now)
        err = rel_error(ours, ref, scale)
        assert err <= self.tol, f"{where}: {key} off by {err:.3g} (tol {self.tol:g})"
        self.worst = max(self.worst, err)
        err_now = rel_error(ours, ref)
        if self.strict:
            assert err_now <= self.tol, f"{where}: {key} off by {err_now:.3g} (tol {self.tol:g})"
        self.worst_now = max(self.worst_now, err_now)

    def check(
        self,
        layout: FlatLayout,
        params: np.ndarray,
        state: OptState,
        ref_params: list[np.ndarray],
        ref: Reference,
        where: str,
    ) -> None:
        names = list(layout.names)
        ours = layout.unflatten(params)
        for name, ref_p in zip(names, ref_params, strict=True):
            self._one(f"param {name}", ours[name], ref_p, where)
        assert set(state.arrays) == set(ref.state[0]), f"{where}: state {sorted(state.arrays)}"
        for key, flat in state.arrays.items():
            views = layout.unflatten(flat)
            for i, name in enumerate(names):
                self._one(f"{key}[{name}]", views[name], ref.state[i][key], where)
        for key, value in ref.scalars.items():
            ours_value = state.scalars[key]
            assert type(ours_value) is type(value), f"{where}: scalar {key} type"
            if isinstance(value, float):
                self._one(key, np.array(ours_value), np.array(value), where)
            else:
                assert ours_value == value, f"{where}: scalar {key} {ours_value} vs {value}"


def run_parity(name: str, hyper: dict[str, Any], dtype: Any, scheduled: bool) -> Checker:
    """Run optserve and the reference side by side; the worst relative error seen."""
    problem = make_problem(dtype)
    layout = problem.layout
    hp = parse_hyper({"name": name, **hyper})
    opt = get_optimizer(name)
    full = with_defaults(name, hyper)
    ref_params = [p.copy() for p in problem.init]
    ref = REFERENCES[name](full, ref_params)
    params = layout.flatten(dict(zip(layout.names, problem.init, strict=True)), dtype)
    state = opt.init(hp, params, layout)
    checker = Checker(TOL[dtype], strict=dtype is np.float64)
    for t, step_grads in enumerate(problem.grads):
        lr = schedule(full["lr"], t) if scheduled else full["lr"]
        grads = layout.flatten(dict(zip(layout.names, step_grads, strict=True)), dtype)
        grads.setflags(write=False)  # the optimizer must never write the gradients
        params, state = opt.update(hp, grads, state, params, lr if scheduled else None, layout)
        ref.step(ref_params, step_grads, lr)
        checker.check(layout, params, state, ref_params, ref, f"step {t + 1}")
    return checker


PARAMS = [
    pytest.param(
        name,
        hyper,
        dtype,
        scheduled,
        id=f"{name}-{i}-{np.dtype(dtype).name}{'-sched' if scheduled else ''}",
    )
    for name, hypers in CASES.items()
    for i, hyper in enumerate(hypers)
    for dtype in (np.float64, np.float32)
    for scheduled in (False, True)
]


@pytest.mark.parametrize(("name", "hyper", "dtype", "scheduled"), PARAMS)
def test_matches_reference(name: str, hyper: dict[str, Any], dtype: Any, scheduled: bool) -> None:
    run_parity(name, hyper, dtype, scheduled)


# --------------------------------------------------------------------------------------
# Registry, hyperparameters
# --------------------------------------------------------------------------------------


def test_every_reference_optimizer_has_cases() -> None:
    for name in REFERENCES:
        opt = get_optimizer(name)
        assert not opt.reference.startswith("torch.optim.")
        assert name in CASES
    assert {n for n, o in OPTIMIZERS.items() if not o.reference.startswith("torch.")} >= set(
        REFERENCES
    )


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_are_the_references(name: str) -> None:
    hp = parse_hyper({"name": name})
    for key, value in DEFAULTS[name].items():
        assert getattr(hp, key) == value, key


def test_amsbound_shares_adabound() -> None:
    adabound, amsbound = get_optimizer("adabound"), get_optimizer("amsbound")
    assert type(amsbound).step_numpy is type(adabound).step_numpy
    assert isinstance(amsbound, type(adabound))
    assert parse_hyper({"name": "amsbound"}).amsbound is True  # type: ignore[attr-defined]
    with pytest.raises(HyperparameterError):
        parse_hyper({"name": "amsbound", "amsbound": False})


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "adabound", "lr": 0.0},
        {"name": "adabound", "gamma": 0.0},
        {"name": "adabound", "gamma": 1.0},
        {"name": "adabound", "betas": (1.0, 0.9)},
        {"name": "swats", "lr": 0.0},
        {"name": "swats", "switch_rtol": -1e-3},
        {"name": "lion", "betas": (0.9, 1.5)},
        {"name": "lamb", "eps": -1.0},
        {"name": "adabelief", "weight_decay": -0.1},
        {"name": "yogi", "initial_accumulator_value": -1.0},
        {"name": "yogi", "rectify": True},
    ],
)
def test_rejects_out_of_range(spec: dict[str, Any]) -> None:
    with pytest.raises(HyperparameterError):
        parse_hyper(spec)


# --------------------------------------------------------------------------------------
# LAMB: the trust ratio is per tensor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_trust_ratio_is_per_tensor(weight_decay: float) -> None:
    rng = np.random.default_rng(3)
    layout = FlatLayout.from_shapes([("a", (4, 3)), ("b", (5,)), ("c", (2, 2))])
    params = rng.standard_normal(layout.total)
    grads = rng.standard_normal(layout.total)
    hp = parse_hyper({"name": "lamb", "lr": 0.01, "weight_decay": weight_decay})
    opt = get_optimizer("lamb")

    def step_of(p: np.ndarray) -> dict[str, np.ndarray]:
        new, _ = opt.update(hp, grads, opt.init(hp, p, layout), p, None, layout)
        return layout.unflatten(new - p)

    base = step_of(params)
    scaled = params.copy()
    layout.unflatten(scaled)["a"][...] *= 3.0
    moved = step_of(scaled)
    # only tensor a's ratio changes: b and c take exactly the same step
    np.testing.assert_array_equal(moved["b"], base["b"])
    np.testing.assert_array_equal(moved["c"], base["c"])
    assert not np.allclose(moved["a"], base["a"])
    if weight_decay == 0:
        # the Adam direction does not depend on p, so a's ratio (and step) triples
        np.testing.assert_allclose(moved["a"], 3.0 * base["a"], rtol=1e-12)

    # the steps against the reference, whose ratios differ from tensor to tensor
    old = [v.copy() for v in layout.unflatten(params).values()]
    ref_params = [v.copy() for v in old]
    ref = LambRef(with_defaults("lamb", {"lr": 0.01, "weight_decay": weight_decay}), ref_params)
    ref.step(ref_params, list(layout.unflatten(grads).values()), 0.01)
    assert len(set(ref.ratios)) == 3
    for name, new, prev in zip(layout.names, ref_params, old, strict=True):
        assert rel_error(base[name], new - prev) <= 1e-12, name


def test_lamb_zero_norms_give_ratio_one() -> None:
    layout = FlatLayout.from_shapes([("zero_params", (3,)), ("zero_grads", (2,))])
    params = np.array([0.0, 0.0, 0.0, 1.0, -2.0])
    grads = np.array([1.0, -2.0, 0.5, 0.0, 0.0])
    hp = parse_hyper({"name": "lamb", "lr": 0.1})
    opt = get_optimizer("lamb")
    new, _ = opt.update(hp, grads, opt.init(hp, params, layout), params, None, layout)
    # zero params: ratio 1, so the step is lr * Adam's first step (~ lr * sign(g))
    adam_first = np.sign(grads[:3]) * (np.abs(grads[:3]) / (np.abs(grads[:3]) + 1e-6))
    np.testing.assert_allclose(new[:3], -0.1 * adam_first, rtol=1e-12)
    # zero update (no gradient, no decay): nothing moves, and no NaN
    np.testing.assert_array_equal(new[3:], params[3:])


# --------------------------------------------------------------------------------------
# SWATS: the switch
# --------------------------------------------------------------------------------------

SWITCH_SHAPES = [("w", (32, 24)), ("b", (24,)), ("c", (4, 6, 8))]


@dataclass
class SwitchRun:
    switch_step: int
    sgd_lr: float
    checker: Checker


def held_schedule(base: float, t: int, steps: int) -> float:
    """`base` for the first half of the run, then a cosine down to 0.1 base."""
    half = steps // 2
    if t < half:
        return base
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - half) / (steps - half))))


def run_switch(
    hyper: dict[str, Any], dtype: Any, seed: int, steps: int, scheduled: bool
) -> SwitchRun:
    """A noisy quadratic, g = A p + noise (each run computes g from its own params).

    Gradients are noise-dominated (unit noise), so Adam's projected rate gamma is
    stationary and its running average settles on it: SWATS should switch. Checks
    every step against the reference (switch step, sgd_lr, lambda included), and each
    step after the switch against the SGD rule applied to optserve's own state. With
    `scheduled`, the rate is held for the first half, then decays (`held_schedule`).
    """
    rng = np.random.default_rng(seed)
    layout = FlatLayout.from_shapes(SWITCH_SHAPES)
    curvature = [rng.uniform(0.5, 2.0, s) for _, s in SWITCH_SHAPES]
    init = [
        np.asarray(rng.standard_normal(s), dtype=dtype).astype(np.float64) for _, s in SWITCH_SHAPES
    ]
    noise = [[rng.standard_normal(s) for _, s in SWITCH_SHAPES] for _ in range(steps)]
    full = with_defaults("swats", hyper)
    sign = -1.0 if full["maximize"] else 1.0  # maximize the negated quadratic instead

    def gradient(p: list[np.ndarray], t: int) -> list[np.ndarray]:
        return [sign * (a * x + n) for a, x, n in zip(curvature, p, noise[t], strict=True)]

    hp = parse_hyper({"name": "swats", **hyper})
    opt = get_optimizer("swats")
    ref_params = [p.copy() for p in init]
    ref = SWATSRef(full, ref_params)
    params = layout.flatten(dict(zip(layout.names, init, strict=True)), dtype)
    state = opt.init(hp, params, layout)
    checker = Checker(TOL[dtype], strict=dtype is np.float64)
    for t in range(steps):
        lr = held_schedule(full["lr"], t, steps) if scheduled else full["lr"]
        ours_p = [v.astype(np.float64) for v in layout.unflatten(params).values()]
        grads = layout.flatten(dict(zip(layout.names, gradient(ours_p, t), strict=True)), dtype)
        grads.setflags(write=False)
        before = params.copy()
        buf_before = state.arrays.get("momentum_buffer")
        buf_before = None if buf_before is None else buf_before.copy()
        was_switched = bool(state.scalars["switched"])
        params, state = opt.update(hp, grads, state, params, lr if scheduled else None, layout)
        ref.step(ref_params, gradient(ref_params, t), lr)
        checker.check(layout, params, state, ref_params, ref, f"step {t + 1}")
        if was_switched:
            # the SGD rule, straight from the state: b = b1 b + g; p -= (1-b1) rate b
            assert buf_before is not None
            beta1 = full["betas"][0]
            g = -grads if full["maximize"] else grads
            g = g + full["weight_decay"] * before if full["weight_decay"] else g
            buf = beta1 * buf_before + g
            rate = float(state.scalars["sgd_lr"]) * lr / full["lr"]
            expected = before - (1 - beta1) * rate * buf
            assert rel_error(params, expected.astype(np.float64)) <= 10 * np.finfo(dtype).eps
            assert rel_error(state.arrays["momentum_buffer"], buf.astype(np.float64)) <= (
                10 * np.finfo(dtype).eps
            )
    assert state.scalars["switch_step"] == ref.scalars["switch_step"]
    return SwitchRun(int(state.scalars["switch_step"]), float(state.scalars["sgd_lr"]), checker)


SWITCH_CASES = [
    {"lr": 0.01, "switch_rtol": 1e-3, **c}
    for c in grid(weight_decay=[0.0, 0.05], maximize=[False, True], amsgrad=[False, True])
] + [{"lr": 0.01, "switch_rtol": 1e-3, "betas": (0.8, 0.99)}]


@pytest.mark.parametrize("scheduled", [False, True], ids=["const", "sched"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("hyper", SWITCH_CASES, ids=[str(i) for i in range(len(SWITCH_CASES))])
def test_swats_switches_on_noisy_quadratic(
    hyper: dict[str, Any], dtype: Any, scheduled: bool
) -> None:
    run = run_switch(hyper, dtype, seed=0, steps=STEPS, scheduled=scheduled)
    # it switched, early enough that most of the run follows (and is checked on) SGD
    assert 1 < run.switch_step <= STEPS // 2
    assert run.sgd_lr > 0


def test_swats_switches_at_default_tolerance() -> None:
    """The default tolerance (rtol 1e-5, atol 1e-8) on the same kind of problem."""
    run = run_switch({}, np.float64, seed=1, steps=600, scheduled=False)
    assert 1 < run.switch_step < 600


def test_swats_state_round_trips_after_switch() -> None:
    """switched/switch_step/sgd_lr/lambda are plain scalars that survive to_bytes."""
    rng = np.random.default_rng(0)
    layout = FlatLayout.single(20)
    params = rng.standard_normal(20)
    hp = parse_hyper({"name": "swats", "lr": 0.01, "switch_rtol": 1.0})
    opt = get_optimizer("swats")
    state = opt.init(hp, params, layout)
    for _ in range(3):
        params, state = opt.update(hp, params + rng.standard_normal(20), state, params)
    assert state.scalars["switched"] is True
    assert state.scalars["switch_step"] == 2
    assert isinstance(state.scalars["sgd_lr"], float)
    decoded = OptState.from_bytes(state.to_bytes())
    assert decoded.equals(state)
    g = rng.standard_normal(20)
    a, sa = opt.update(hp, g, state, params)
    b, sb = opt.update(hp, g, decoded, params)
    np.testing.assert_array_equal(a, b)
    assert sa.equals(sb)
