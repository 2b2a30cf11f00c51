"""Every PyTorch schedule we serve, against torch.optim.lr_scheduler driven step by step.

1,000+ steps each, relative error <= 1e-12 (max |ours - torch| / max |torch|, float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as tls

from service.core.errors import ScheduleError
from service.core.optim import get_optimizer, parse_hyper
from service.core.schedules import SCHEDULES, parse_schedule
from service.core.schedules.momentum import with_momentum
from service.core.state import OptState
from tests.core.schedule_oracle import ours_schedule, rel_error, torch_schedule

STEPS = 1000
RTOL = 1e-12

# (our spec, torch factory, base lr)
CASES: list[tuple[dict[str, Any], Callable[[torch.optim.Optimizer], Any], float]] = [
    ({"name": "step", "step_size": 30}, lambda o: tls.StepLR(o, step_size=30), 0.1),
    (
        {"name": "step", "step_size": 7, "gamma": 0.97},
        lambda o: tls.StepLR(o, step_size=7, gamma=0.97),
        0.5,
    ),
    (
        {"name": "multistep", "milestones": [100, 300, 300, 800]},
        lambda o: tls.MultiStepLR(o, milestones=[100, 300, 300, 800]),
        0.1,
    ),
    (
        {"name": "multistep", "milestones": [50, 10], "gamma": 0.5},
        lambda o: tls.MultiStepLR(o, milestones=[50, 10], gamma=0.5),
        1.0,
    ),
    ({"name": "exponential", "gamma": 0.995}, lambda o: tls.ExponentialLR(o, gamma=0.995), 0.1),
    ({"name": "constant"}, lambda o: tls.ConstantLR(o), 0.1),
    (
        {"name": "constant", "factor": 0.5, "total_iters": 400},
        lambda o: tls.ConstantLR(o, factor=0.5, total_iters=400),
        0.03,
    ),
    # --- cosine (T_max below the run: torch's recursion rises again after T_max) ---
    ({"name": "cosine", "T_max": 100}, lambda o: tls.CosineAnnealingLR(o, T_max=100), 0.1),
    (
        {"name": "cosine", "T_max": 300, "eta_min": 0.001},
        lambda o: tls.CosineAnnealingLR(o, T_max=300, eta_min=0.001),
        0.1,
    ),
    (
        {"name": "cosine", "T_max": 7, "eta_min": 0.05},
        lambda o: tls.CosineAnnealingLR(o, T_max=7, eta_min=0.05),
        0.1,
    ),
    ({"name": "cosine", "T_max": 1}, lambda o: tls.CosineAnnealingLR(o, T_max=1), 0.3),
    (
        {"name": "cosine", "T_max": 5000, "eta_min": 1e-4},
        lambda o: tls.CosineAnnealingLR(o, T_max=5000, eta_min=1e-4),
        0.1,
    ),
    # --- cosine_restarts ---
    (
        {"name": "cosine_restarts", "T_0": 50},
        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=50),
        0.1,
    ),
    (
        {"name": "cosine_restarts", "T_0": 10, "T_mult": 2, "eta_min": 0.001},
        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=0.001),
        0.1,
    ),
    (
        {"name": "cosine_restarts", "T_0": 3, "T_mult": 3, "eta_min": 0.01},
        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=3, eta_min=0.01),
        0.5,
    ),
    (
        {"name": "cosine_restarts", "T_0": 1, "eta_min": 0.01},
        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=1, eta_min=0.01),
        0.1,
    ),
    # --- linear ---
    ({"name": "linear"}, lambda o: tls.LinearLR(o), 0.1),
    (
        {"name": "linear", "start_factor": 0.001, "total_iters": 800},
        lambda o: tls.LinearLR(o, start_factor=0.001, total_iters=800),
        0.1,
    ),
    (
        {"name": "linear", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 1000},
        lambda o: tls.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=1000),
        0.2,
    ),
    (
        {"name": "linear", "start_factor": 0.5, "end_factor": 0.1, "total_iters": 300},
        lambda o: tls.LinearLR(o, start_factor=0.5, end_factor=0.1, total_iters=300),
        1.0,
    ),
    # --- polynomial ---
    ({"name": "polynomial"}, lambda o: tls.PolynomialLR(o), 0.1),
    (
        {"name": "polynomial", "total_iters": 800, "power": 2.0},
        lambda o: tls.PolynomialLR(o, total_iters=800, power=2.0),
        0.1,
    ),
    (
        {"name": "polynomial", "total_iters": 1000, "power": 0.5},
        lambda o: tls.PolynomialLR(o, total_iters=1000, power=0.5),
        0.1,
    ),
    (
        {"name": "polynomial", "total_iters": 300, "power": 1.7},
        lambda o: tls.PolynomialLR(o, total_iters=300, power=1.7),
        0.05,
    ),
    (
        {"name": "polynomial", "total_iters": 300, "power": 0.0},
        lambda o: tls.PolynomialLR(o, total_iters=300, power=0.0),
        0.05,
    ),
    # --- cyclic (explicit rates: the optimizer lr is ignored) ---
    (
        {"name": "cyclic", "base_lr": 0.001, "max_lr": 0.1, "step_size_up": 100},
        lambda o: tls.CyclicLR(o, base_lr=0.001, max_lr=0.1, step_size_up=100),
        0.5,
    ),
    (
        {
            "name": "cyclic",
            "base_lr": 0.01,
            "max_lr": 0.1,
            "step_size_up": 50,
            "step_size_down": 150,
            "mode": "triangular2",
        },
        lambda o: tls.CyclicLR(
            o, base_lr=0.01, max_lr=0.1, step_size_up=50, step_size_down=150, mode="triangular2"
        ),
        0.5,
    ),
    (
        {
            "name": "cyclic",
            "base_lr": 0.001,
            "max_lr": 0.01,
            "step_size_up": 64,
            "mode": "exp_range",
            "gamma": 0.999,
            "cycle_momentum": False,
        },
        lambda o: tls.CyclicLR(
            o,
            base_lr=0.001,
            max_lr=0.01,
            step_size_up=64,
            mode="exp_range",
            gamma=0.999,
            cycle_momentum=False,
        ),
        0.5,
    ),
    (
        {"name": "cyclic", "base_lr": 0.0, "max_lr": 0.3, "step_size_up": 7, "step_size_down": 0},
        lambda o: tls.CyclicLR(o, base_lr=0.0, max_lr=0.3, step_size_up=7, step_size_down=0),
        0.5,
    ),
    # --- one_cycle (explicit rates; tested within total_steps, where torch is defined: with
    # pct_start 1 torch even divides by zero on the step after the last, hence 1001 steps) ---
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1000},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1000),
        0.5,
    ),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1200, "anneal_strategy": "linear"},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1200, anneal_strategy="linear"),
        0.5,
    ),
    (
        {"name": "one_cycle", "max_lr": 1.0, "total_steps": 1000, "three_phase": True},
        lambda o: tls.OneCycleLR(o, max_lr=1.0, total_steps=1000, three_phase=True),
        0.5,
    ),
    (
        {
            "name": "one_cycle",
            "max_lr": 0.05,
            "epochs": 10,
            "steps_per_epoch": 100,
            "pct_start": 0.25,
            "anneal_strategy": "linear",
            "three_phase": True,
            "div_factor": 10.0,
            "final_div_factor": 100.0,
        },
        lambda o: tls.OneCycleLR(
            o,
            max_lr=0.05,
            epochs=10,
            steps_per_epoch=100,
            pct_start=0.25,
            anneal_strategy="linear",
            three_phase=True,
            div_factor=10.0,
            final_div_factor=100.0,
        ),
        0.5,
    ),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1000, "pct_start": 0.0},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1000, pct_start=0.0),
        0.5,
    ),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1001, "pct_start": 1.0},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1001, pct_start=1.0),
        0.5,
    ),
    # --- sequential (each schedule restarts from its own step 0 at its milestone) ---
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "linear", "start_factor": 0.1, "total_iters": 100},
                {"name": "cosine", "T_max": 200, "eta_min": 0.001},
            ],
            "milestones": [100],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.LinearLR(o, start_factor=0.1, total_iters=100),
                tls.CosineAnnealingLR(o, T_max=200, eta_min=0.001),
            ],
            milestones=[100],
        ),
        0.1,
    ),
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "constant", "factor": 0.5, "total_iters": 50},
                {"name": "exponential", "gamma": 0.99},
                {"name": "step", "step_size": 30, "gamma": 0.5},
            ],
            "milestones": [100, 400],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.ConstantLR(o, factor=0.5, total_iters=50),
                tls.ExponentialLR(o, gamma=0.99),
                tls.StepLR(o, step_size=30, gamma=0.5),
            ],
            milestones=[100, 400],
        ),
        0.1,
    ),
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "cosine_restarts", "T_0": 50, "T_mult": 2},
                {"name": "polynomial", "total_iters": 300, "power": 2.0},
                {"name": "linear", "start_factor": 1.0, "end_factor": 0.1, "total_iters": 200},
                {"name": "multistep", "milestones": [10, 20]},
            ],
            "milestones": [350, 700, 900],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.CosineAnnealingWarmRestarts(o, T_0=50, T_mult=2),
                tls.PolynomialLR(o, total_iters=300, power=2.0),
                tls.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=200),
                tls.MultiStepLR(o, milestones=[10, 20]),
            ],
            milestones=[350, 700, 900],
        ),
        0.1,
    ),
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "exponential", "gamma": 0.9},
                {"name": "step", "step_size": 10},
                {"name": "cosine", "T_max": 60},
                {"name": "cosine_restarts", "T_0": 40},
            ],
            "milestones": [0, 200, 200],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.ExponentialLR(o, gamma=0.9),
                tls.StepLR(o, step_size=10),
                tls.CosineAnnealingLR(o, T_max=60),
                tls.CosineAnnealingWarmRestarts(o, T_0=40),
            ],
            milestones=[0, 200, 200],
        ),
        0.1,
    ),
]


@pytest.mark.parametrize(
    ("spec", "make", "base_lr"),
    CASES,
    ids=[f"{c[0]['name']}-{i}" for i, c in enumerate(CASES)],
)
def test_matches_torch(spec: dict[str, Any], make: Any, base_lr: float) -> None:
    ref, _ = torch_schedule(make, STEPS, base_lr=base_lr)
    ours, _ = ours_schedule(parse_schedule(spec), STEPS, base_lr=base_lr)
    err = rel_error(ours, ref)
    assert err <= RTOL, f"{spec}: rel error {err:.3g}"


def test_warmup_is_linear_lr_then_schedule() -> None:
    """warmup = torch LinearLR(start_factor=f, end_factor=1, total_iters=N), then the
    schedule on t - N: checked against torch's SequentialLR of exactly those two."""
    spec = {
        "name": "step",
        "step_size": 10,
        "gamma": 0.5,
        "warmup": {"steps": 20, "start_factor": 0.1},
    }

    def make(o: torch.optim.Optimizer) -> Any:
        return tls.SequentialLR(
            o,
            [
                tls.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=20),
                tls.StepLR(o, step_size=10, gamma=0.5),
            ],
            milestones=[20],
        )

    ref, _ = torch_schedule(make, 200, base_lr=0.2)
    ours, _ = ours_schedule(parse_schedule(spec), 200, base_lr=0.2)
    assert rel_error(ours, ref) <= RTOL


def test_every_torch_schedule_has_a_case() -> None:
    torch_backed = {
        n for n, cls in SCHEDULES.items() if cls.reference.startswith("torch.optim.lr_scheduler")
    }
    covered = {spec["name"] for spec, _, _ in CASES} | {spec["name"] for spec in LOSS_CASES}
    assert torch_backed <= covered, sorted(torch_backed - covered)


# --- cosine over long runs: torch's recursion restarts a segment at every trough --------


@pytest.mark.parametrize("t_max", [2, 7, 50, 100, 250, 300, 333])
@pytest.mark.parametrize("eta_min", [0.0, 0.001, 0.01])
def test_cosine_long_run_follows_torch_recursion(t_max: int, eta_min: float) -> None:
    """3,000 steps: 4 to 1,500 half-periods of torch's rising-and-falling recursion."""
    spec = {"name": "cosine", "T_max": t_max, "eta_min": eta_min}
    ref, _ = torch_schedule(
        lambda o: tls.CosineAnnealingLR(o, T_max=t_max, eta_min=eta_min), 3000, base_lr=0.1
    )
    ours, _ = ours_schedule(parse_schedule(spec), 3000, base_lr=0.1)
    err = rel_error(ours, ref)
    assert err <= RTOL, f"{spec}: rel error {err:.3g}"
    assert ours.max() == pytest.approx(0.1)
    assert ours.min() == pytest.approx(eta_min)


def test_cosine_rises_after_t_max() -> None:
    """torch does not hold eta_min after T_max: the rate is periodic with period 2 T_max."""
    s = parse_schedule({"name": "cosine", "T_max": 10})
    assert s.lr(10, 1.0) == 0.0
    assert s.lr(15, 1.0) == pytest.approx(0.5)
    assert s.lr(20, 1.0) == pytest.approx(1.0)
    assert s.lr(35, 1.0) == pytest.approx(s.lr(15, 1.0))


# --- momentum cycled into the param group ------------------------------------------------

SGD = torch.optim.SGD
ADAM = torch.optim.Adam

# (our spec, torch factory, torch optimizer, its kwargs)
MOMENTUM_CASES: list[tuple[dict[str, Any], Callable[[torch.optim.Optimizer], Any], Any, Any]] = [
    (
        {"name": "cyclic", "base_lr": 0.001, "max_lr": 0.1, "step_size_up": 100},
        lambda o: tls.CyclicLR(o, base_lr=0.001, max_lr=0.1, step_size_up=100),
        SGD,
        {"momentum": 0.9},
    ),
    (
        {
            "name": "cyclic",
            "base_lr": 0.01,
            "max_lr": 0.1,
            "step_size_up": 30,
            "step_size_down": 70,
            "mode": "triangular2",
            "base_momentum": 0.85,
            "max_momentum": 0.99,
        },
        lambda o: tls.CyclicLR(
            o,
            base_lr=0.01,
            max_lr=0.1,
            step_size_up=30,
            step_size_down=70,
            mode="triangular2",
            base_momentum=0.85,
            max_momentum=0.99,
        ),
        SGD,
        {"momentum": 0.9},
    ),
    (
        {
            "name": "cyclic",
            "base_lr": 0.001,
            "max_lr": 0.006,
            "step_size_up": 64,
            "mode": "exp_range",
            "gamma": 0.998,
        },
        lambda o: tls.CyclicLR(
            o, base_lr=0.001, max_lr=0.006, step_size_up=64, mode="exp_range", gamma=0.998
        ),
        ADAM,
        {},
    ),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1000},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1000),
        SGD,
        {"momentum": 0.9},
    ),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 1000, "anneal_strategy": "linear"},
        lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=1000, anneal_strategy="linear"),
        SGD,
        {"momentum": 0.9},
    ),
    (
        {"name": "one_cycle", "max_lr": 0.01, "total_steps": 1000},
        lambda o: tls.OneCycleLR(o, max_lr=0.01, total_steps=1000),
        ADAM,
        {},
    ),
    (
        {
            "name": "one_cycle",
            "max_lr": 0.01,
            "total_steps": 1500,
            "three_phase": True,
            "pct_start": 0.4,
            "base_momentum": 0.8,
            "max_momentum": 0.9,
        },
        lambda o: tls.OneCycleLR(
            o,
            max_lr=0.01,
            total_steps=1500,
            three_phase=True,
            pct_start=0.4,
            base_momentum=0.8,
            max_momentum=0.9,
        ),
        ADAM,
        {},
    ),
    (
        {
            "name": "one_cycle",
            "max_lr": 0.01,
            "total_steps": 1000,
            "three_phase": True,
            "anneal_strategy": "linear",
        },
        lambda o: tls.OneCycleLR(
            o, max_lr=0.01, total_steps=1000, three_phase=True, anneal_strategy="linear"
        ),
        ADAM,
        {},
    ),
    # sequential: the momentum torch leaves in the group before, during and after a cycling
    # schedule (cyclic / one_cycle after a base-relative schedule, where torch's rates agree)
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "cosine", "T_max": 100},
                {"name": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 50},
                {"name": "exponential", "gamma": 0.999},
            ],
            "milestones": [200, 700],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.CosineAnnealingLR(o, T_max=100),
                tls.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=50),
                tls.ExponentialLR(o, gamma=0.999),
            ],
            milestones=[200, 700],
        ),
        SGD,
        {"momentum": 0.9},
    ),
    (
        {
            "name": "sequential",
            "schedulers": [
                {"name": "linear", "start_factor": 0.5, "total_iters": 100},
                {"name": "one_cycle", "max_lr": 0.01, "total_steps": 900},
            ],
            "milestones": [100],
        },
        lambda o: tls.SequentialLR(
            o,
            [
                tls.LinearLR(o, start_factor=0.5, total_iters=100),
                tls.OneCycleLR(o, max_lr=0.01, total_steps=900),
            ],
            milestones=[100],
        ),
        ADAM,
        {},
    ),
]


@pytest.mark.parametrize(
    ("spec", "make", "optimizer", "kwargs"),
    MOMENTUM_CASES,
    ids=[f"{c[0]['name']}-{c[2].__name__}-{i}" for i, c in enumerate(MOMENTUM_CASES)],
)
def test_momentum_matches_torch_param_group(
    spec: dict[str, Any], make: Any, optimizer: Any, kwargs: dict[str, Any]
) -> None:
    steps = max(STEPS, spec.get("total_steps", 0))
    # torch's OneCycleLR rebases the group's initial_lr to max_lr / div_factor; start there
    base_lr = 0.01 / 25.0
    ref_lr, ref_m = torch_schedule(
        make, steps, base_lr=base_lr, optimizer=optimizer, optimizer_kwargs=kwargs
    )
    ours_lr, ours_m = ours_schedule(parse_schedule(spec), steps, base_lr=base_lr)
    assert ref_m is not None
    assert ours_m is not None
    assert rel_error(ours_lr, ref_lr) <= RTOL
    err = rel_error(ours_m, ref_m)
    assert err <= RTOL, f"{spec}: momentum rel error {err:.3g}"
    assert ref_m.max() - ref_m.min() > 0.05  # the momentum really cycled


def test_no_momentum_without_cycle_momentum() -> None:
    for spec in (
        {"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "cycle_momentum": False},
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "cycle_momentum": False},
        {"name": "sequential", "schedulers": [{"name": "step", "step_size": 3}], "milestones": []},
    ):
        s = parse_schedule(spec)
        assert s.momentum(0) is None
        assert s.momenta(10) is None


def test_one_cycle_holds_the_final_values_past_the_end() -> None:
    """torch raises past total_steps; we hold the value of the last step of the cycle."""
    for strategy in ("cos", "linear"):
        s = parse_schedule(
            {"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "anneal_strategy": strategy}
        )
        last = s.lr(99, 0.0)
        assert last == pytest.approx(0.1 / 25 / 1e4)
        assert [s.lr(t, 0.0) for t in (100, 101, 10_000)] == [last] * 3
        assert [s.momentum(t) for t in (100, 10_000)] == [s.momentum(99)] * 2
        assert s.momentum(99) == pytest.approx(0.95)


def test_explicit_rate_schedules_ignore_base_lr() -> None:
    for spec in (
        {"name": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 10},
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 100},
    ):
        s = parse_schedule(spec)
        assert list(s.lrs(50, 0.5)) == list(s.lrs(50, 123.0))


# --- plateau: fed the same losses ---------------------------------------------------------


def plateau_losses(n: int = 1000, seed: int = 0) -> list[float]:
    """A noisy decreasing curve with flat stretches (where the rate should drop)."""
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    level = 2.0
    for t in range(n):
        flat = (t // 100) % 2 == 1  # every other stretch of 100 steps is a plateau
        if not flat:
            level *= 0.995
        losses.append(level * (1.0 + 0.02 * rng.standard_normal()))
    return losses


def plateau_torch(kw: dict[str, Any], losses: list[float], base_lr: float) -> Any:
    return torch_schedule(
        lambda o: tls.ReduceLROnPlateau(o, **kw), len(losses), base_lr=base_lr, losses=losses
    )[0]


# (our spec without the name, as torch kwargs too; whether the losses are negated for "max")
PLATEAU_CASES: list[dict[str, Any]] = [
    {},
    {"patience": 5, "factor": 0.5},
    {"mode": "max", "patience": 3, "factor": 0.7},
    {"threshold_mode": "abs", "threshold": 1e-3, "patience": 4, "factor": 0.5},
    {"mode": "max", "threshold_mode": "abs", "threshold": 1e-3, "patience": 2, "cooldown": 5},
    {"patience": 2, "factor": 0.3, "cooldown": 10, "min_lr": 1e-3},
    {"patience": 0, "factor": 0.5, "min_lr": 0.01, "eps": 3e-3},
    {"threshold": 0.0, "patience": 1, "factor": 0.9, "cooldown": 1},
]
LOSS_CASES = [{"name": "plateau", **kw} for kw in PLATEAU_CASES]


@pytest.mark.parametrize("kw", PLATEAU_CASES, ids=[str(i) for i in range(len(PLATEAU_CASES))])
def test_plateau_matches_torch(kw: dict[str, Any]) -> None:
    losses = plateau_losses()
    if kw.get("mode") == "max":
        losses = [-x for x in losses]  # an accuracy-like metric that rises with plateaus
    ref = plateau_torch(kw, losses, base_lr=0.1)
    ours, _ = ours_schedule(parse_schedule({"name": "plateau", **kw}), len(losses), 0.1, losses)
    err = rel_error(ours, ref)
    assert err <= RTOL, f"{kw}: rel error {err:.3g}"
    assert len(set(ref.tolist())) >= 3, "the loss curve should make torch reduce the rate"


def test_plateau_reaches_min_lr_and_stops() -> None:
    kw = {"patience": 0, "factor": 0.5, "min_lr": 0.01, "eps": 3e-3}
    losses = plateau_losses()
    ours, _ = ours_schedule(parse_schedule({"name": "plateau", **kw}), 1000, 0.1, losses)
    assert ours.min() == pytest.approx(0.0125)  # the last halving within eps of min_lr is skipped
    assert list(ours) == list(plateau_torch(kw, losses, 0.1))


def test_plateau_state_round_trips_and_is_not_mutated() -> None:
    kw = {"patience": 3, "factor": 0.5, "cooldown": 4, "min_lr": 1e-4}
    schedule = parse_schedule({"name": "plateau", **kw})
    losses = plateau_losses(seed=1)
    ref = plateau_torch(kw, losses, base_lr=0.1)

    state = schedule.initial_state(0.1)
    assert state is not None
    assert state["best"] == math.inf
    lrs: list[float] = []
    for t, loss in enumerate(losses):
        if t % 97 == 0:  # park and reload the state, as a session between requests does
            blob = OptState(scalars=dict(state)).to_bytes()
            decoded = OptState.from_bytes(blob).scalars
            assert decoded == state
            assert {k: type(v) for k, v in decoded.items()} == {
                k: type(v) for k, v in state.items()
            }
            state = decoded
        lrs.append(schedule.lr(t, 0.1, state))
        before = dict(state)
        new = schedule.observe(state, loss)
        assert state == before
        assert new is not state
        state = new
    assert lrs == list(ref)
    assert state["last_epoch"] == len(losses)
    for value in state.values():
        assert type(value) in (float, int, bool)


def test_plateau_max_mode_starts_at_minus_inf() -> None:
    state = parse_schedule({"name": "plateau", "mode": "max"}).initial_state(0.2)
    assert state == {
        "lr": 0.2,
        "best": -math.inf,
        "num_bad_epochs": 0,
        "cooldown_counter": 0,
        "last_epoch": 0,
    }
    assert OptState.from_bytes(OptState(scalars=dict(state)).to_bytes()).scalars == state


def test_plateau_refuses_a_broken_state() -> None:
    schedule = parse_schedule({"name": "plateau"})
    with pytest.raises(ScheduleError) as info:
        schedule.observe({"lr": 0.1}, 1.0)
    assert info.value.errors[0]["loc"] == ("state",)


# --- end to end: one_cycle driving our optimizers against torch's -----------------------


@pytest.mark.parametrize(
    ("hyper", "torch_opt", "torch_kwargs"),
    [
        ({"name": "adam", "lr": 0.004}, torch.optim.Adam, {}),
        (
            {"name": "adam", "lr": 0.004, "weight_decay": 0.01},
            torch.optim.Adam,
            {"weight_decay": 0.01},
        ),
        ({"name": "adamw", "lr": 0.004}, torch.optim.AdamW, {}),
        ({"name": "sgd", "lr": 0.004, "momentum": 0.9}, torch.optim.SGD, {"momentum": 0.9}),
        (
            {"name": "sgd", "lr": 0.004, "momentum": 0.9, "nesterov": True},
            torch.optim.SGD,
            {"momentum": 0.9, "nesterov": True},
        ),
    ],
    ids=["adam", "adam-l2", "adamw", "sgd-momentum", "sgd-nesterov"],
)
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_drives_optimizer_like_torch(
    hyper: dict[str, Any], torch_opt: Any, torch_kwargs: dict[str, Any], three_phase: bool
) -> None:
    steps, n = 300, 64
    rng = np.random.default_rng(7)
    init = rng.standard_normal(n)
    grads = [rng.standard_normal(n) * (1.0 + t / 100) for t in range(steps)]
    spec = {"name": "one_cycle", "max_lr": 0.1, "total_steps": steps, "three_phase": three_phase}

    param = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    topt = torch_opt([param], lr=hyper["lr"], **torch_kwargs)
    sched = tls.OneCycleLR(topt, max_lr=0.1, total_steps=steps, three_phase=three_phase)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
        sched.step()
    ref = param.detach().numpy()

    hp = parse_hyper(hyper)
    opt = get_optimizer(hp.name)
    schedule = parse_schedule(spec)
    params = init.copy()
    state = opt.init(hp, params)
    for t, g in enumerate(grads):
        hp_t = with_momentum(hp, schedule.momentum(t))
        params, state = opt.update(hp_t, g, state, params, lr=schedule.lr(t, hp.lr))
    err = float(np.max(np.abs(params - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-10, f"{hyper}: rel error {err:.3g}"
    assert float(np.max(np.abs(params - init))) > 0.1  # the run really moved


# --- validation: a bad value is refused, naming the field --------------------------------

BAD_SPECS: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
    ({"name": "cosine", "T_max": 0}, ("T_max",)),
    ({"name": "cosine", "T_max": 10, "eta_min": -0.1}, ("eta_min",)),
    ({"name": "cosine"}, ("T_max",)),
    ({"name": "cosine_restarts", "T_0": 0}, ("T_0",)),
    ({"name": "cosine_restarts", "T_0": 10, "T_mult": 0}, ("T_mult",)),
    ({"name": "cosine_restarts", "T_0": 10, "T_mult": 1.5}, ("T_mult",)),
    ({"name": "linear", "start_factor": 0.0}, ("start_factor",)),
    ({"name": "linear", "end_factor": 1.5}, ("end_factor",)),
    ({"name": "linear", "total_iters": 0}, ("total_iters",)),
    ({"name": "polynomial", "power": -1.0}, ("power",)),
    ({"name": "polynomial", "total_iters": 0}, ("total_iters",)),
    ({"name": "cyclic", "base_lr": 0.1}, ("max_lr",)),
    ({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "mode": "sine"}, ("mode",)),
    ({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "step_size_up": 0}, ("step_size_up",)),
    ({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "gamma": 1.5}, ("gamma",)),
    ({"name": "cyclic", "base_lr": -0.1, "max_lr": 1.0}, ("base_lr",)),
    ({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "max_momentum": 1.0}, ("max_momentum",)),
    (
        {
            "name": "cyclic",
            "base_lr": 0.1,
            "max_lr": 1.0,
            "mode": "exp_range",
            "scale_mode": "cycle",
        },
        ("scale_mode",),
    ),
    ({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0, "scale_fn": "x"}, ("scale_fn",)),
    ({"name": "one_cycle", "max_lr": 0.1}, ("steps_per_epoch",)),
    ({"name": "one_cycle", "max_lr": 0.1, "epochs": 3}, ("steps_per_epoch",)),
    ({"name": "one_cycle", "max_lr": 0.1, "total_steps": 0}, ("total_steps",)),
    ({"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.5}, ("pct_start",)),
    ({"name": "one_cycle", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1}, ("pct_start",)),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "anneal_strategy": "exp"},
        ("anneal_strategy",),
    ),
    ({"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "div_factor": 0.0}, ("div_factor",)),
    (
        {"name": "one_cycle", "max_lr": 0.1, "total_steps": 100, "base_momentum": -0.1},
        ("base_momentum",),
    ),
    ({"name": "plateau", "factor": 1.0}, ("factor",)),
    ({"name": "plateau", "mode": "avg"}, ("mode",)),
    ({"name": "plateau", "threshold_mode": "pct"}, ("threshold_mode",)),
    ({"name": "plateau", "patience": -1}, ("patience",)),
    ({"name": "plateau", "min_lr": -1e-3}, ("min_lr",)),
    ({"name": "plateau", "min_lr": [0.1, 0.2]}, ("min_lr",)),
    (
        {
            "name": "sequential",
            "schedulers": [{"name": "linear"}, {"name": "plateau"}],
            "milestones": [5],
        },
        ("schedulers",),
    ),
    (
        {
            "name": "sequential",
            "schedulers": [{"name": "linear"}, {"name": "cosine", "T_max": 5}],
            "milestones": [5, 10],
        },
        ("milestones",),
    ),
    (
        {
            "name": "sequential",
            "schedulers": [{"name": "linear"}, {"name": "linear"}, {"name": "cosine", "T_max": 5}],
            "milestones": [10, 5],
        },
        ("milestones",),
    ),
    (
        {
            "name": "sequential",
            "schedulers": [{"name": "linear"}, {"name": "cosine", "T_max": 0}],
            "milestones": [5],
        },
        ("schedulers", 1, "T_max"),
    ),
    ({"name": "sequential", "schedulers": [], "milestones": []}, ("schedulers",)),
    (
        {"name": "sequential", "schedulers": [{"name": "warp"}], "milestones": []},
        ("schedulers", 0),
    ),
]


@pytest.mark.parametrize(
    ("spec", "loc"), BAD_SPECS, ids=[f"{s['name']}-{i}" for i, (s, _) in enumerate(BAD_SPECS)]
)
def test_bad_spec_is_refused_naming_the_field(spec: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(spec)
    assert info.value.errors[0]["loc"] == loc, info.value.errors
    assert str(info.value)


def test_every_new_schedule_has_a_bad_spec_case() -> None:
    new = {
        "cosine",
        "cosine_restarts",
        "linear",
        "polynomial",
        "cyclic",
        "one_cycle",
        "plateau",
        "sequential",
    }
    assert new <= set(SCHEDULES)
    assert new <= {spec["name"] for spec, _ in BAD_SPECS}


def test_defaults_are_torch_defaults() -> None:
    assert parse_schedule({"name": "cosine", "T_max": 5}).eta_min == 0.0
    r = parse_schedule({"name": "cosine_restarts", "T_0": 5})
    assert (r.T_mult, r.eta_min) == (1, 0.0)
    lin = parse_schedule({"name": "linear"})
    assert (lin.start_factor, lin.end_factor, lin.total_iters) == (1.0 / 3, 1.0, 5)
    poly = parse_schedule({"name": "polynomial"})
    assert (poly.total_iters, poly.power) == (5, 1.0)
    c = parse_schedule({"name": "cyclic", "base_lr": 0.1, "max_lr": 1.0})
    assert (c.step_size_up, c.step_size_down, c.mode, c.gamma, c.scale_mode) == (
        2000,
        None,
        "triangular",
        1.0,
        "cycle",
    )
    assert (c.cycle_momentum, c.base_momentum, c.max_momentum) == (True, 0.8, 0.9)
    oc = parse_schedule({"name": "one_cycle", "max_lr": 0.1, "epochs": 2, "steps_per_epoch": 50})
    assert oc.steps == 100
    assert (oc.pct_start, oc.anneal_strategy, oc.cycle_momentum) == (0.3, "cos", True)
    assert (oc.base_momentum, oc.max_momentum, oc.div_factor, oc.final_div_factor) == (
        0.85,
        0.95,
        25.0,
        1e4,
    )
    assert oc.three_phase is False
    p = parse_schedule({"name": "plateau"})
    assert (p.mode, p.factor, p.patience, p.threshold, p.threshold_mode) == (
        "min",
        0.1,
        10,
        1e-4,
        "rel",
    )
    assert (p.cooldown, p.min_lr, p.eps) == (0, 0.0, 1e-8)
    assert p.stateful
    assert not lin.stateful


def test_sequential_nests_and_round_trips_its_spec() -> None:
    spec = {
        "name": "sequential",
        "schedulers": [
            {"name": "linear", "start_factor": 0.1, "total_iters": 10},
            {
                "name": "sequential",
                "schedulers": [{"name": "constant"}, {"name": "cosine", "T_max": 20}],
                "milestones": [5],
            },
        ],
        "milestones": [10],
    }
    s = parse_schedule(spec)
    again = parse_schedule(s.model_dump())
    assert again == s
    inner = parse_schedule(spec["schedulers"][1])
    assert [s.lr(t, 0.1) for t in range(10, 60)] == [inner.lr(t, 0.1) for t in range(50)]
