"""The TensorFlow/Keras schedules PyTorch lacks, against TF's code written out by hand.

Each `tf_*` function below is a line-by-line transcription of TF's `decayed_lr` /
`__call__` (tensorflow/python/training/learning_rate_decay_v2.py,
tensorflow/python/keras/optimizer_v2/learning_rate_schedule.py and, where Keras 3 still
has the schedule, keras/src/optimizers/schedules/learning_rate_schedule.py) in plain
Python `math`, float64, without calling anything from `service`. TensorFlow itself is
not a dependency. 2,000 steps each, relative error <= 1e-12 (max |ours - ref| / max |ref|).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import ScheduleError
from service.core.schedules import SCHEDULES, Schedule, parse_schedule
from service.core.schedules.tf_cosine import NoisyLinearCosineDecaySchedule

STEPS = 2000
RTOL = 1e-12

Ref = Callable[[float, int], float]  # (initial learning rate, global_step) -> rate


# --- TF's code, written out -------------------------------------------------------------


def tf_exponential_decay(
    learning_rate: float, global_step: int, decay_steps: int, decay_rate: float, staircase: bool
) -> float:
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    p = global_step_recomp / decay_steps_f
    if staircase:
        p = math.floor(p)
    return learning_rate * math.pow(decay_rate, p)


def tf2_natural_exp_decay(
    learning_rate: float, global_step: int, decay_steps: int, decay_rate: float, staircase: bool
) -> float:
    """learning_rate_decay_v2.natural_exp_decay: exp(-decay_rate * p)."""
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    p = global_step_recomp / decay_steps_f
    if staircase:
        p = math.floor(p)
    exponent = math.exp(-decay_rate * p)
    return learning_rate * exponent


def tf1_natural_exp_decay(
    learning_rate: float, global_step: int, decay_steps: int, decay_rate: float, staircase: bool
) -> float:
    """tf.compat.v1.train.natural_exp_decay: ExponentialDecay with rate exp(-decay_rate)."""
    natural_exp_rate = math.exp(-decay_rate)
    return tf_exponential_decay(
        learning_rate, global_step, decay_steps, natural_exp_rate, staircase
    )


def tf_inverse_time_decay(
    learning_rate: float, global_step: int, decay_steps: int, decay_rate: float, staircase: bool
) -> float:
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    p = global_step_recomp / decay_steps_f
    if staircase:
        p = math.floor(p)
    const = 1.0
    denom = const + decay_rate * p
    return learning_rate / denom


def tf_polynomial_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: int,
    end_learning_rate: float = 0.0001,
    power: float = 1.0,
    cycle: bool = False,
) -> float:
    global_step_recomp = float(global_step)
    decay_steps_recomp = float(decay_steps)
    if cycle:
        # the first multiple of decay_steps that is bigger than global_step; 1 at step 0
        multiplier = 1.0 if global_step_recomp == 0 else math.ceil(global_step_recomp / decay_steps)
        decay_steps_recomp = decay_steps_recomp * multiplier
    else:
        global_step_recomp = min(global_step_recomp, decay_steps_recomp)
    p = global_step_recomp / decay_steps_recomp
    return (learning_rate - end_learning_rate) * math.pow(1 - p, power) + end_learning_rate


def tf_piecewise_constant(x: int, boundaries: list[int], values: list[float]) -> float:
    # tf.case over mutually exclusive predicates
    pred_fn_pairs: list[tuple[bool, float]] = []
    pred_fn_pairs.append((x <= boundaries[0], values[0]))
    pred_fn_pairs.append((x > boundaries[-1], values[-1]))
    for low, high, v in zip(boundaries[:-1], boundaries[1:], values[1:-1], strict=True):
        pred_fn_pairs.append(((x > low) and (x <= high), v))
    chosen = [v for pred, v in pred_fn_pairs if pred]
    assert len(chosen) == 1
    return chosen[0]


def tf_cosine_decay(
    learning_rate: float, global_step: int, decay_steps: int, alpha: float = 0.0
) -> float:
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    global_step_recomp = min(global_step_recomp, decay_steps_f)
    completed_fraction = global_step_recomp / decay_steps_f
    cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * completed_fraction))
    decayed = (1 - alpha) * cosine_decayed + alpha
    return learning_rate * decayed


def keras3_cosine_decay(
    initial_learning_rate: float,
    step: int,
    decay_steps: int,
    alpha: float = 0.0,
    warmup_target: float | None = None,
    warmup_steps: int = 0,
) -> float:
    """Keras 3 CosineDecay, with its own warm-up (warmup_target / warmup_steps)."""

    def decay_function(step: float, decay_steps: float, decay_from_lr: float) -> float:
        completed_fraction = step / decay_steps
        cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * completed_fraction))
        decayed = (1 - alpha) * cosine_decayed + alpha
        return decay_from_lr * decayed

    def warmup_function(step: float, warmup_steps: float, warmup_target: float) -> float:
        completed_fraction = step / warmup_steps
        total_step_delta = warmup_target - initial_learning_rate
        return total_step_delta * completed_fraction + initial_learning_rate

    decay_steps_f = float(decay_steps)
    global_step_recomp = float(step)
    if warmup_target is None:
        global_step_recomp = min(global_step_recomp, decay_steps_f)
        return decay_function(global_step_recomp, decay_steps_f, initial_learning_rate)
    warmup_steps_f = float(warmup_steps)
    global_step_recomp = min(global_step_recomp, decay_steps_f + warmup_steps_f)
    if global_step_recomp < warmup_steps_f:
        return warmup_function(global_step_recomp, warmup_steps_f, warmup_target)
    return decay_function(global_step_recomp - warmup_steps_f, decay_steps_f, warmup_target)


def tf_cosine_decay_restarts(
    learning_rate: float,
    global_step: int,
    first_decay_steps: int,
    t_mul: float = 2.0,
    m_mul: float = 1.0,
    alpha: float = 0.0,
) -> float:
    first_decay_steps_f = float(first_decay_steps)
    global_step_recomp = float(global_step)
    completed_fraction = global_step_recomp / first_decay_steps_f

    def compute_step(completed_fraction: float, geometric: bool = False) -> tuple[float, float]:
        if geometric:
            i_restart = math.floor(
                math.log(1.0 - completed_fraction * (1.0 - t_mul)) / math.log(t_mul)
            )
            sum_r = (1.0 - t_mul**i_restart) / (1.0 - t_mul)
            completed_fraction = (completed_fraction - sum_r) / t_mul**i_restart
        else:
            i_restart = math.floor(completed_fraction)
            completed_fraction -= i_restart
        return i_restart, completed_fraction

    if t_mul == 1.0:
        i_restart, completed_fraction = compute_step(completed_fraction, geometric=False)
    else:
        i_restart, completed_fraction = compute_step(completed_fraction, geometric=True)

    m_fac = m_mul**i_restart
    cosine_decayed = 0.5 * m_fac * (1.0 + math.cos(math.pi * completed_fraction))
    decayed = (1 - alpha) * cosine_decayed + alpha
    return learning_rate * decayed


def tf_linear_cosine_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: int,
    num_periods: float = 0.5,
    alpha: float = 0.0,
    beta: float = 0.001,
) -> float:
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    global_step_recomp = min(global_step_recomp, decay_steps_f)
    linear_decayed = (decay_steps_f - global_step_recomp) / decay_steps_f
    completed_fraction = global_step_recomp / decay_steps_f
    fraction = 2.0 * num_periods * completed_fraction
    cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * fraction))
    linear_cosine_decayed = (alpha + linear_decayed) * cosine_decayed + beta
    return learning_rate * linear_cosine_decayed


def standard_normal(seed: int, t: int) -> float:
    """The documented noise draw: N(0, 1) from a generator keyed by (seed, t)."""
    return float(np.random.default_rng([seed, t]).standard_normal())


def tf_noisy_linear_cosine_decay(
    learning_rate: float,
    global_step: int,
    decay_steps: int,
    initial_variance: float = 1.0,
    variance_decay: float = 0.55,
    num_periods: float = 0.5,
    alpha: float = 0.0,
    beta: float = 0.001,
    seed: int = 0,
) -> float:
    """TF's code with `random_normal(shape, stddev=std)` as `std * N(0, 1)[seed, step]`."""
    decay_steps_f = float(decay_steps)
    global_step_recomp = float(global_step)
    global_step_recomp = min(global_step_recomp, decay_steps_f)
    linear_decayed = (decay_steps_f - global_step_recomp) / decay_steps_f
    variance = initial_variance / math.pow(1.0 + global_step_recomp, variance_decay)
    std = math.sqrt(variance)
    noisy_linear_decayed = linear_decayed + std * standard_normal(seed, global_step)
    completed_fraction = global_step_recomp / decay_steps_f
    fraction = 2.0 * num_periods * completed_fraction
    cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * fraction))
    noisy_linear_cosine_decayed = (alpha + noisy_linear_decayed) * cosine_decayed + beta
    return learning_rate * noisy_linear_cosine_decayed


def clamped_noisy_linear_cosine_decay(learning_rate: float, global_step: int, *args: Any) -> float:
    """Ours: TF's rate clamped at 0 (a deliberate deviation: a negative rate steps uphill)."""
    return max(0.0, tf_noisy_linear_cosine_decay(learning_rate, global_step, *args))


# --- the cases ------------------------------------------------------------------------

# (our spec, TF reference as a function of (initial rate, step), base lr)
CASES: list[tuple[dict[str, Any], Ref, float]] = [
    # exponential_decay
    (
        {"name": "exponential_decay", "decay_steps": 100, "decay_rate": 0.96},
        lambda lr, t: tf_exponential_decay(lr, t, 100, 0.96, False),
        0.1,
    ),
    (
        {"name": "exponential_decay", "decay_steps": 37, "decay_rate": 0.5, "staircase": True},
        lambda lr, t: tf_exponential_decay(lr, t, 37, 0.5, True),
        1.0,
    ),
    (
        {"name": "exponential_decay", "decay_steps": 1, "decay_rate": 0.999},
        lambda lr, t: tf_exponential_decay(lr, t, 1, 0.999, False),
        3e-4,
    ),
    (
        {"name": "exponential_decay", "decay_steps": 500, "decay_rate": 0.0, "staircase": True},
        lambda lr, t: tf_exponential_decay(lr, t, 500, 0.0, True),
        0.1,
    ),
    # natural_exp_decay
    (
        {"name": "natural_exp_decay", "decay_steps": 100, "decay_rate": 0.5},
        lambda lr, t: tf2_natural_exp_decay(lr, t, 100, 0.5, False),
        0.1,
    ),
    (
        {"name": "natural_exp_decay", "decay_steps": 64, "decay_rate": 0.3, "staircase": True},
        lambda lr, t: tf2_natural_exp_decay(lr, t, 64, 0.3, True),
        0.5,
    ),
    (
        {"name": "natural_exp_decay", "decay_steps": 1, "decay_rate": 0.002},
        lambda lr, t: tf2_natural_exp_decay(lr, t, 1, 0.002, False),
        1e-3,
    ),
    # inverse_time_decay
    (
        {"name": "inverse_time_decay", "decay_steps": 1, "decay_rate": 0.5},
        lambda lr, t: tf_inverse_time_decay(lr, t, 1, 0.5, False),
        0.1,
    ),
    (
        {"name": "inverse_time_decay", "decay_steps": 250, "decay_rate": 2.0, "staircase": True},
        lambda lr, t: tf_inverse_time_decay(lr, t, 250, 2.0, True),
        0.3,
    ),
    (
        {"name": "inverse_time_decay", "decay_steps": 33, "decay_rate": 0.1},
        lambda lr, t: tf_inverse_time_decay(lr, t, 33, 0.1, False),
        1.0,
    ),
    # polynomial_decay
    (
        {"name": "polynomial_decay", "decay_steps": 1500},
        lambda lr, t: tf_polynomial_decay(lr, t, 1500),
        0.1,
    ),
    (
        {
            "name": "polynomial_decay",
            "decay_steps": 700,
            "end_learning_rate": 0.01,
            "power": 0.5,
        },
        lambda lr, t: tf_polynomial_decay(lr, t, 700, 0.01, 0.5),
        0.1,
    ),
    (
        {
            "name": "polynomial_decay",
            "decay_steps": 300,
            "end_learning_rate": 0.001,
            "power": 2.0,
            "cycle": True,
        },
        lambda lr, t: tf_polynomial_decay(lr, t, 300, 0.001, 2.0, True),
        0.1,
    ),
    (
        {"name": "polynomial_decay", "decay_steps": 7, "power": 3.0, "cycle": True},
        lambda lr, t: tf_polynomial_decay(lr, t, 7, 0.0001, 3.0, True),
        0.05,
    ),
    (
        # end above the start: TF rises; so do we
        {"name": "polynomial_decay", "decay_steps": 1000, "end_learning_rate": 0.2},
        lambda lr, t: tf_polynomial_decay(lr, t, 1000, 0.2),
        0.1,
    ),
    # piecewise_constant (absolute values: the base lr is ignored)
    (
        {"name": "piecewise_constant", "boundaries": [100, 1100], "values": [1.0, 0.5, 0.1]},
        lambda lr, t: tf_piecewise_constant(t, [100, 1100], [1.0, 0.5, 0.1]),
        0.1,
    ),
    (
        {
            "name": "piecewise_constant",
            "boundaries": [0, 1, 2, 500, 1999],
            "values": [0.3, 0.2, 0.1, 0.05, 0.01, 0.0],
        },
        lambda lr, t: tf_piecewise_constant(
            t, [0, 1, 2, 500, 1999], [0.3, 0.2, 0.1, 0.05, 0.01, 0.0]
        ),
        7.0,
    ),
    (
        {"name": "piecewise_constant", "boundaries": [5000], "values": [0.02, 0.002]},
        lambda lr, t: tf_piecewise_constant(t, [5000], [0.02, 0.002]),
        0.1,
    ),
    # cosine_decay
    (
        {"name": "cosine_decay", "decay_steps": 1000},
        lambda lr, t: tf_cosine_decay(lr, t, 1000),
        0.1,
    ),
    (
        {"name": "cosine_decay", "decay_steps": 1234, "alpha": 0.1},
        lambda lr, t: tf_cosine_decay(lr, t, 1234, 0.1),
        0.5,
    ),
    (
        {"name": "cosine_decay", "decay_steps": 5000, "alpha": 1.0},
        lambda lr, t: tf_cosine_decay(lr, t, 5000, 1.0),
        0.01,
    ),
    # cosine_decay_restarts
    (
        {"name": "cosine_decay_restarts", "first_decay_steps": 100},
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 100),
        0.1,
    ),
    (
        {"name": "cosine_decay_restarts", "first_decay_steps": 150, "t_mul": 1.0},
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 150, 1.0),
        0.1,
    ),
    (
        {
            "name": "cosine_decay_restarts",
            "first_decay_steps": 90,
            "t_mul": 1.0,
            "m_mul": 0.8,
            "alpha": 0.05,
        },
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 90, 1.0, 0.8, 0.05),
        0.2,
    ),
    (
        {
            "name": "cosine_decay_restarts",
            "first_decay_steps": 50,
            "t_mul": 1.5,
            "m_mul": 0.5,
            "alpha": 0.01,
        },
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 50, 1.5, 0.5, 0.01),
        0.1,
    ),
    (
        {"name": "cosine_decay_restarts", "first_decay_steps": 10, "t_mul": 3.0, "m_mul": 0.9},
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 10, 3.0, 0.9),
        1.0,
    ),
    (
        {"name": "cosine_decay_restarts", "first_decay_steps": 1, "t_mul": 1.25, "alpha": 0.3},
        lambda lr, t: tf_cosine_decay_restarts(lr, t, 1, 1.25, 1.0, 0.3),
        0.1,
    ),
    # linear_cosine_decay
    (
        {"name": "linear_cosine_decay", "decay_steps": 1000},
        lambda lr, t: tf_linear_cosine_decay(lr, t, 1000),
        0.1,
    ),
    (
        {
            "name": "linear_cosine_decay",
            "decay_steps": 1800,
            "num_periods": 3.0,
            "alpha": 0.2,
            "beta": 0.05,
        },
        lambda lr, t: tf_linear_cosine_decay(lr, t, 1800, 3.0, 0.2, 0.05),
        0.3,
    ),
    (
        {"name": "linear_cosine_decay", "decay_steps": 333, "num_periods": 1.75, "beta": 0.0},
        lambda lr, t: tf_linear_cosine_decay(lr, t, 333, 1.75, 0.0, 0.0),
        1.0,
    ),
    # noisy_linear_cosine_decay (the same documented noise draws on both sides)
    (
        {"name": "noisy_linear_cosine_decay", "decay_steps": 1000},
        lambda lr, t: clamped_noisy_linear_cosine_decay(lr, t, 1000),
        0.1,
    ),
    (
        {
            "name": "noisy_linear_cosine_decay",
            "decay_steps": 1500,
            "initial_variance": 0.01,
            "variance_decay": 1.0,
            "num_periods": 2.5,
            "alpha": 0.1,
            "beta": 0.01,
            "seed": 12345,
        },
        lambda lr, t: clamped_noisy_linear_cosine_decay(
            lr, t, 1500, 0.01, 1.0, 2.5, 0.1, 0.01, 12345
        ),
        0.2,
    ),
    (
        {"name": "noisy_linear_cosine_decay", "decay_steps": 600, "num_periods": 1.0, "seed": 7},
        lambda lr, t: clamped_noisy_linear_cosine_decay(lr, t, 600, 1.0, 0.55, 1.0, 0.0, 0.001, 7),
        0.05,
    ),
]

TF_NAMES = {n for n, cls in SCHEDULES.items() if cls.reference.startswith("tf.")}


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the error relative to the schedule's scale."""
    assert ours.shape == ref.shape
    scale = float(np.max(np.abs(ref)))
    diff = float(np.max(np.abs(ours - ref)))
    return diff / scale if scale > 0 else diff


def ours_schedule(schedule: Schedule, steps: int, base_lr: float) -> tuple[np.ndarray, Any]:
    """Our rates for steps 0..steps-1 (and the momenta, which these never cycle)."""
    momenta = [schedule.momentum(t) for t in range(steps)]
    return np.array([schedule.lr(t, base_lr) for t in range(steps)]), (
        None if all(m is None for m in momenta) else momenta
    )


def noisy(spec: dict[str, Any]) -> NoisyLinearCosineDecaySchedule:
    s = parse_schedule(spec)
    assert isinstance(s, NoisyLinearCosineDecaySchedule)
    return s


def _ids(cases: list[tuple[dict[str, Any], Ref, float]]) -> list[str]:
    return [f"{c[0]['name']}-{i}" for i, c in enumerate(cases)]


def _ref_values(ref: Ref, base_lr: float, steps: int = STEPS) -> np.ndarray:
    return np.array([ref(base_lr, t) for t in range(steps)])


@pytest.mark.parametrize(("spec", "ref", "base_lr"), CASES, ids=_ids(CASES))
def test_matches_tf_formula(spec: dict[str, Any], ref: Ref, base_lr: float) -> None:
    expected = _ref_values(ref, base_lr)
    ours, momenta = ours_schedule(parse_schedule(spec), STEPS, base_lr=base_lr)
    assert momenta is None
    err = rel_error(ours, expected)
    assert err <= RTOL, f"{spec}: rel error {err:.3g}"


def test_every_tf_schedule_has_cases() -> None:
    expected = {
        "exponential_decay",
        "natural_exp_decay",
        "inverse_time_decay",
        "polynomial_decay",
        "piecewise_constant",
        "cosine_decay",
        "cosine_decay_restarts",
        "linear_cosine_decay",
        "noisy_linear_cosine_decay",
    }
    assert expected <= TF_NAMES
    counts = {n: sum(spec["name"] == n for spec, _, _ in CASES) for n in TF_NAMES}
    assert all(c >= 3 for c in counts.values()), counts
    for name in TF_NAMES:
        assert not SCHEDULES[name].reference.startswith("torch.optim")
        doc = SCHEDULES[name].__doc__ or ""
        assert "tests/core/test_schedule_formulas.py" in doc, name
        assert "relative error <= 1e-12" in doc, name


@pytest.mark.parametrize(
    ("decay_steps", "decay_rate", "staircase"),
    [(100, 0.5, False), (64, 0.3, True), (1, 0.002, False), (7, 1.5, False)],
)
def test_natural_exp_decay_tf1_form_agrees(
    decay_steps: int, decay_rate: float, staircase: bool
) -> None:
    """TF1 (compat.v1) computes exp(-rate) ** p, TF2 exp(-rate * p): equal up to rounding."""
    spec = {
        "name": "natural_exp_decay",
        "decay_steps": decay_steps,
        "decay_rate": decay_rate,
        "staircase": staircase,
    }
    ours, _ = ours_schedule(parse_schedule(spec), STEPS, base_lr=0.1)
    tf1 = _ref_values(
        lambda lr, t: tf1_natural_exp_decay(lr, t, decay_steps, decay_rate, staircase), 0.1
    )
    assert rel_error(ours, tf1) <= RTOL


@pytest.mark.parametrize(
    ("warmup_steps", "start_factor", "decay_steps", "alpha"),
    [(100, 0.0, 1000, 0.0), (250, 0.1, 1200, 0.05), (1, 0.5, 1500, 0.0)],
)
def test_cosine_decay_warmup_equals_keras3_warmup_target(
    warmup_steps: int, start_factor: float, decay_steps: int, alpha: float
) -> None:
    """Keras 3's CosineDecay(f*lr, T, alpha, warmup_target=lr, warmup_steps=N) is ours with
    lr and the generic warmup {steps: N, start_factor: f}."""
    base_lr = 0.1
    spec = {
        "name": "cosine_decay",
        "decay_steps": decay_steps,
        "alpha": alpha,
        "warmup": {"steps": warmup_steps, "start_factor": start_factor},
    }
    ours, _ = ours_schedule(parse_schedule(spec), STEPS, base_lr=base_lr)
    keras = _ref_values(
        lambda lr, t: keras3_cosine_decay(
            start_factor * lr, t, decay_steps, alpha, warmup_target=lr, warmup_steps=warmup_steps
        ),
        base_lr,
    )
    assert rel_error(ours, keras) <= RTOL


def test_cosine_decay_without_warmup_equals_keras3() -> None:
    ours, _ = ours_schedule(
        parse_schedule({"name": "cosine_decay", "decay_steps": 900, "alpha": 0.2}), STEPS, 0.3
    )
    keras = _ref_values(lambda lr, t: keras3_cosine_decay(lr, t, 900, 0.2), 0.3)
    assert rel_error(ours, keras) <= RTOL


def test_cosine_decay_is_clamped_not_periodic() -> None:
    s = parse_schedule({"name": "cosine_decay", "decay_steps": 100, "alpha": 0.1})
    assert s.lr(0, 1.0) == 1.0
    assert s.lr(100, 1.0) == pytest.approx(0.1, rel=1e-15)
    assert all(s.lr(t, 1.0) == s.lr(100, 1.0) for t in (101, 150, 200, 10_000))


def test_cosine_decay_restarts_peaks_at_restarts() -> None:
    """Periods of 100, 200, 400, 800 steps; each restart starts at m_mul**i * lr."""
    s = parse_schedule(
        {"name": "cosine_decay_restarts", "first_decay_steps": 100, "m_mul": 0.5, "alpha": 0.1}
    )
    for i, start in enumerate([0, 100, 300, 700, 1500]):
        assert s.lr(start, 1.0) == pytest.approx(0.9 * 0.5**i + 0.1, rel=1e-12)
        # just before a restart the rate is (almost) at its floor alpha * lr
        if start > 0:
            assert s.lr(start - 1, 1.0) < 0.1 + 1e-3


@settings(max_examples=200, deadline=None)
@given(
    first=st.integers(1, 10_000),
    t_mul=st.floats(1.0, 4.0),
    m_mul=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
    t=st.integers(0, 10**7),
)
def test_cosine_decay_restarts_stays_in_bounds(
    first: int, t_mul: float, m_mul: float, alpha: float, t: int
) -> None:
    s = parse_schedule(
        {
            "name": "cosine_decay_restarts",
            "first_decay_steps": first,
            "t_mul": t_mul,
            "m_mul": m_mul,
            "alpha": alpha,
        }
    )
    lr = s.lr(t, 1.0)
    assert math.isfinite(lr)
    assert alpha - 1e-12 <= lr <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["exponential_decay", "natural_exp_decay", "inverse_time_decay"]),
    decay_steps=st.integers(1, 10**6),
    decay_rate=st.floats(0.0, 1.0),
    staircase=st.booleans(),
    t=st.integers(0, 10**8),
)
def test_decays_are_finite_and_never_grow(
    name: str, decay_steps: int, decay_rate: float, staircase: bool, t: int
) -> None:
    s = parse_schedule(
        {"name": name, "decay_steps": decay_steps, "decay_rate": decay_rate, "staircase": staircase}
    )
    lr = s.lr(t, 0.1)
    assert math.isfinite(lr)
    assert 0.0 <= lr <= 0.1
    assert s.lr(t + 1, 0.1) <= lr


def test_piecewise_constant_ignores_base_lr() -> None:
    s = parse_schedule({"name": "piecewise_constant", "boundaries": [10, 20], "values": [3, 2, 1]})
    for t in range(40):
        assert s.lr(t, 0.1) == s.lr(t, 100.0)
    assert [s.lr(t, 0.1) for t in (0, 10, 11, 20, 21)] == [3.0, 3.0, 2.0, 2.0, 1.0]


def test_polynomial_decay_cycle_restarts_after_each_period() -> None:
    s = parse_schedule(
        {"name": "polynomial_decay", "decay_steps": 10, "end_learning_rate": 0.0, "cycle": True}
    )
    assert s.lr(0, 1.0) == 1.0
    assert s.lr(10, 1.0) == 0.0  # the end at every multiple of decay_steps
    assert s.lr(11, 1.0) == pytest.approx(1 - 11 / 20)  # then the horizon doubles
    assert s.lr(20, 1.0) == 0.0
    s2 = parse_schedule({"name": "polynomial_decay", "decay_steps": 10})
    assert s2.lr(10, 1.0) == s2.lr(1000, 1.0) == pytest.approx(1e-4)


# --- noisy_linear_cosine_decay: determinism and the noise's law --------------------------

NOISY = {
    "name": "noisy_linear_cosine_decay",
    "decay_steps": 1000,
    "initial_variance": 0.5,
    "variance_decay": 0.55,
    "alpha": 0.1,
    "beta": 0.01,
}


def test_noisy_is_deterministic_across_specs_and_call_order() -> None:
    a = parse_schedule({**NOISY, "seed": 42})
    b = parse_schedule(dict({**NOISY, "seed": 42}))
    steps = list(range(1500))
    forward = [a.lr(t, 0.1) for t in steps]
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    by_t = {t: b.lr(t, 0.1) for t in shuffled}
    backward = [a.lr(t, 0.1) for t in reversed(steps)][::-1]
    assert forward == [by_t[t] for t in steps]
    assert forward == backward
    assert forward == [a.lr(t, 0.1) for t in steps]  # and again


def test_noisy_different_seeds_differ() -> None:
    a = parse_schedule({**NOISY, "seed": 0})
    b = parse_schedule({**NOISY, "seed": 1})
    # num_periods 0.5: the cosine part vanishes only at t >= decay_steps
    assert all(a.lr(t, 0.1) != b.lr(t, 0.1) for t in range(999))
    assert a.model_dump()["seed"] == 0  # the default seed is filled in
    assert parse_schedule({k: v for k, v in NOISY.items()}).lr(5, 0.1) == a.lr(5, 0.1)


def test_noisy_noiseless_part_is_linear_cosine_decay() -> None:
    base_lr = 0.1
    keys = ("decay_steps", "alpha", "beta")
    linear = _ref_values(
        lambda lr, t: tf_linear_cosine_decay(lr, t, 1000, 0.5, NOISY["alpha"], NOISY["beta"]),
        base_lr,
    )
    # with no noise it is linear_cosine_decay
    quiet = parse_schedule({**NOISY, "initial_variance": 0.0})
    ours_quiet, _ = ours_schedule(quiet, STEPS, base_lr)
    assert rel_error(ours_quiet, linear) <= RTOL
    plain = parse_schedule({"name": "linear_cosine_decay", **{k: NOISY[k] for k in keys}})
    assert rel_error(ours_quiet, ours_schedule(plain, STEPS, base_lr)[0]) <= RTOL
    # with noise: the rate minus its noise term is linear_cosine_decay
    s = noisy(NOISY)
    ours = np.array(
        [
            s.lr(t, base_lr)
            - base_lr * s.noise(t) * 0.5 * (1 + math.cos(math.pi * min(t, 1000) / 1000))
            for t in range(STEPS)
        ]
    )
    assert rel_error(ours, linear) <= RTOL
    # num_periods 0.5: the cosine part, and so the noise, is 0 from t = decay_steps on
    assert np.array_equal([s.lr(t, base_lr) for t in range(1000, STEPS)], linear[1000:])


N_SEEDS = 20_000
Z = 5.0  # sigmas: a correct implementation fails with probability ~6e-7 per check


@pytest.mark.parametrize("t", [0, 10, 100, 500])
def test_noisy_noise_has_mean_zero_and_tf_variance(t: int) -> None:
    """Over many seeds at a fixed t, eps_t ~ N(0, initial_variance / (1 + t)**variance_decay).

    eps_t is read back from the rate itself: eps = (lr/base - beta)/cos - alpha - linear.
    Mean: |mean| <= Z * sigma / sqrt(N). Variance (mean 0 known): E[eps^2] = sigma^2 with
    standard error sigma^2 * sqrt(2 / N) for a Gaussian. alpha 10 keeps every rate above
    the clamp at 0 (a draw would need to be 15 sigma below), so the rate carries the draw.
    """
    base_lr = 0.1
    spec = {**NOISY, "alpha": 10.0}
    alpha, beta, t_max = spec["alpha"], spec["beta"], spec["decay_steps"]
    linear = (t_max - t) / t_max
    cos_part = 0.5 * (1 + math.cos(math.pi * t / t_max))
    eps = np.empty(N_SEEDS)
    for seed in range(N_SEEDS):
        s = noisy({**spec, "seed": seed})
        eps[seed] = (s.lr(t, base_lr) / base_lr - beta) / cos_part - alpha - linear
        if seed < 50:
            assert eps[seed] == pytest.approx(s.noise(t), abs=1e-9)
    var = NOISY["initial_variance"] / (1 + t) ** NOISY["variance_decay"]
    sigma = math.sqrt(var)
    assert abs(eps.mean()) <= Z * sigma / math.sqrt(N_SEEDS), (eps.mean(), sigma)
    assert abs(np.mean(eps**2) - var) <= Z * var * math.sqrt(2 / N_SEEDS), (np.mean(eps**2), var)


def test_noisy_rate_is_clamped_at_zero() -> None:
    """Where TF's rate is negative (a large negative draw), ours is exactly 0."""
    spec = {"name": "noisy_linear_cosine_decay", "decay_steps": 1000}  # TF's defaults
    seed = next(s for s in range(1000) if standard_normal(s, 0) < -2.0)
    assert tf_noisy_linear_cosine_decay(0.1, 0, 1000, seed=seed) < -0.09  # TF: uphill
    s = noisy({**spec, "seed": seed})
    assert s.lr(0, 0.1) == 0.0
    assert math.copysign(1.0, s.lr(0, 0.1)) == 1.0  # +0.0, not -0.0
    # and where TF's rate is positive, ours is TF's
    up = next(s for s in range(1000) if standard_normal(s, 0) > 0.5)
    ours = noisy({**spec, "seed": up}).lr(0, 0.1)
    assert ours == pytest.approx(tf_noisy_linear_cosine_decay(0.1, 0, 1000, seed=up), rel=1e-15)
    # over many seeds and steps: never negative, and 0 exactly where TF is <= 0
    for seed in range(50):
        s = noisy({**spec, "seed": seed})
        for t in range(0, 1200, 37):
            tf = tf_noisy_linear_cosine_decay(0.1, t, 1000, seed=seed)
            assert s.lr(t, 0.1) >= 0.0
            if tf <= 0.0:
                assert s.lr(t, 0.1) == 0.0


def test_noisy_noise_is_independent_across_steps() -> None:
    """Correlation of eps_t1 and eps_t2 over seeds: |r| <= Z / sqrt(N) (r's s.e. ~ 1/sqrt(N))."""
    specs = [noisy({**NOISY, "seed": k}) for k in range(N_SEEDS)]
    e1 = np.array([s.noise(3) for s in specs])
    e2 = np.array([s.noise(4) for s in specs])
    r = float(np.corrcoef(e1, e2)[0, 1])
    assert abs(r) <= Z / math.sqrt(N_SEEDS), r


# --- validation ----------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], tuple[str | int, ...]]] = [
    ({"name": "exponential_decay", "decay_steps": 0, "decay_rate": 0.9}, ("decay_steps",)),
    ({"name": "exponential_decay", "decay_steps": 10, "decay_rate": 1.5}, ("decay_rate",)),
    ({"name": "exponential_decay", "decay_steps": 10, "decay_rate": -0.1}, ("decay_rate",)),
    ({"name": "exponential_decay", "decay_steps": 10}, ("decay_rate",)),
    (
        {"name": "exponential_decay", "decay_steps": 10, "decay_rate": 0.9, "staircase": "x"},
        ("staircase",),
    ),
    ({"name": "natural_exp_decay", "decay_steps": 10, "decay_rate": -1.0}, ("decay_rate",)),
    ({"name": "natural_exp_decay", "decay_steps": -3, "decay_rate": 0.5}, ("decay_steps",)),
    ({"name": "inverse_time_decay", "decay_steps": 10, "decay_rate": -0.5}, ("decay_rate",)),
    ({"name": "inverse_time_decay", "decay_steps": 2.5, "decay_rate": 0.5}, ("decay_steps",)),
    ({"name": "polynomial_decay", "decay_steps": 0}, ("decay_steps",)),
    (
        {"name": "polynomial_decay", "decay_steps": 10, "end_learning_rate": -1e-3},
        ("end_learning_rate",),
    ),
    ({"name": "polynomial_decay", "decay_steps": 10, "power": -1.0}, ("power",)),
    ({"name": "polynomial_decay", "decay_steps": 10, "power": float("nan")}, ("power",)),
    (
        {"name": "piecewise_constant", "boundaries": [10, 10], "values": [1, 2, 3]},
        ("boundaries",),
    ),
    ({"name": "piecewise_constant", "boundaries": [10, 5], "values": [1, 2, 3]}, ("boundaries",)),
    ({"name": "piecewise_constant", "boundaries": [-1], "values": [1, 2]}, ("boundaries", 0)),
    ({"name": "piecewise_constant", "boundaries": [], "values": [1]}, ("boundaries",)),
    ({"name": "piecewise_constant", "boundaries": [10, 20], "values": [1, 2]}, ("values",)),
    ({"name": "piecewise_constant", "boundaries": [10], "values": [1, 2, 3]}, ("values",)),
    ({"name": "piecewise_constant", "boundaries": [10], "values": [1, -2]}, ("values", 1)),
    ({"name": "cosine_decay", "decay_steps": 0}, ("decay_steps",)),
    ({"name": "cosine_decay", "decay_steps": 100, "alpha": 1.5}, ("alpha",)),
    (
        {"name": "cosine_decay", "decay_steps": 100, "warmup_target": 0.1, "warmup_steps": 10},
        ("warmup_target",),
    ),
    ({"name": "cosine_decay", "decay_steps": 100, "warmup": {"steps": 0}}, ("warmup", "steps")),
    ({"name": "cosine_decay_restarts", "first_decay_steps": 0}, ("first_decay_steps",)),
    ({"name": "cosine_decay_restarts", "first_decay_steps": 10, "t_mul": 0.5}, ("t_mul",)),
    ({"name": "cosine_decay_restarts", "first_decay_steps": 10, "m_mul": 1.5}, ("m_mul",)),
    ({"name": "cosine_decay_restarts", "first_decay_steps": 10, "alpha": -0.1}, ("alpha",)),
    ({"name": "linear_cosine_decay", "decay_steps": 10, "num_periods": -1.0}, ("num_periods",)),
    ({"name": "linear_cosine_decay", "decay_steps": 10, "alpha": -0.5}, ("alpha",)),
    ({"name": "linear_cosine_decay", "decay_steps": 10, "beta": -0.001}, ("beta",)),
    ({"name": "linear_cosine_decay"}, ("decay_steps",)),
    (
        {"name": "noisy_linear_cosine_decay", "decay_steps": 10, "initial_variance": -1.0},
        ("initial_variance",),
    ),
    (
        {"name": "noisy_linear_cosine_decay", "decay_steps": 10, "initial_variance": math.inf},
        ("initial_variance",),
    ),
    (
        {"name": "noisy_linear_cosine_decay", "decay_steps": 10, "variance_decay": -0.5},
        ("variance_decay",),
    ),
    ({"name": "noisy_linear_cosine_decay", "decay_steps": 10, "seed": -1}, ("seed",)),
    ({"name": "noisy_linear_cosine_decay", "decay_steps": 10, "seed": 1.5}, ("seed",)),
    ({"name": "noisy_linear_cosine_decay", "decay_steps": 10, "beta": -1.0}, ("beta",)),
]


@pytest.mark.parametrize(
    ("spec", "loc"), BAD, ids=[f"{s['name']}-{i}" for i, (s, _) in enumerate(BAD)]
)
def test_refuses_bad_values_naming_the_field(
    spec: dict[str, Any], loc: tuple[str | int, ...]
) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(spec)
    errors = info.value.errors
    assert tuple(errors[0]["loc"]) == loc, errors
    assert errors[0]["msg"], errors
    assert str(info.value).startswith(str(loc[0])), str(info.value)


def test_every_tf_schedule_has_a_refusal() -> None:
    assert {spec["name"] for spec, _ in BAD} >= TF_NAMES


def test_defaults_are_tfs() -> None:
    def dump(spec: dict[str, Any]) -> dict[str, Any]:
        return parse_schedule(spec).model_dump(exclude={"name", "warmup"})

    assert dump({"name": "exponential_decay", "decay_steps": 5, "decay_rate": 0.9}) == {
        "decay_steps": 5,
        "decay_rate": 0.9,
        "staircase": False,
    }
    assert dump({"name": "polynomial_decay", "decay_steps": 5}) == {
        "decay_steps": 5,
        "end_learning_rate": 1e-4,
        "power": 1.0,
        "cycle": False,
    }
    assert dump({"name": "cosine_decay", "decay_steps": 5}) == {"decay_steps": 5, "alpha": 0.0}
    assert dump({"name": "cosine_decay_restarts", "first_decay_steps": 5}) == {
        "first_decay_steps": 5,
        "t_mul": 2.0,
        "m_mul": 1.0,
        "alpha": 0.0,
    }
    assert dump({"name": "linear_cosine_decay", "decay_steps": 5}) == {
        "decay_steps": 5,
        "num_periods": 0.5,
        "alpha": 0.0,
        "beta": 0.001,
    }
    assert dump({"name": "noisy_linear_cosine_decay", "decay_steps": 5}) == {
        "decay_steps": 5,
        "initial_variance": 1.0,
        "variance_decay": 0.55,
        "num_periods": 0.5,
        "alpha": 0.0,
        "beta": 0.001,
        "seed": 0,
    }
