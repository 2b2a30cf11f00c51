"""TensorFlow/Keras cosine schedules PyTorch lacks: cosine decay (clamped, not periodic
like torch's CosineAnnealingLR), cosine decay with restarts (TF's SGDR), and the linear
cosine decays of Bello et al. 2017, plain and noisy.

`t` is TF's `global_step` (the schedule's own step: after any warm-up, see base.py) and
`base_lr` is TF's `initial_learning_rate` (`learning_rate` in TF1). TF computes in the
dtype of the initial rate (float32 for a Python float); we compute in float64. Fields
are named and defaulted as in TF.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np

from service.core.schedules.base import Schedule, ScheduleState, StepCount, safe_pow, scaled
from service.core.validators import NonNeg, NonNegInt, UnitInterval, interval

#: TF's t_mul: each period is t_mul times the previous one (< 1 would run out of periods)
PeriodFactor = Annotated[float, interval(1.0)]

#: the noise draw of noisy_linear_cosine_decay is clipped to +- this many deviations
NOISE_CLIP = 40.0


class CosineDecaySchedule(Schedule):
    """``lr(t) = base_lr * ((1 - alpha) * 0.5 * (1 + cos(pi * t' / decay_steps)) + alpha)``
    with ``t' = min(t, decay_steps)``: it stays at ``alpha * base_lr`` after decay_steps.

    Defaults as TF: alpha 0.0 (decay_steps is required); alpha in [0, 1]. Keras 3's
    ``CosineDecay`` also takes ``warmup_target`` / ``warmup_steps``; those are not fields
    here: use the generic ``warmup`` field, which gives the same rates (Keras with
    ``initial_learning_rate = f * lr``, ``warmup_target = lr``, ``warmup_steps = N`` is ours
    with ``lr`` and ``warmup: {"steps": N, "start_factor": f}``; checked in the tests).
    Reference: TF ``cosine_decay`` (tensorflow/python/training/learning_rate_decay_v2.py;
    ``CosineDecay`` in keras/src/optimizers/schedules/learning_rate_schedule.py). Tested
    against the formula written out independently in tests/core/test_schedule_formulas.py
    over 2,000 steps, relative error <= 1e-12.
    """

    name: Literal["cosine_decay"] = "cosine_decay"
    decay_steps: StepCount
    alpha: UnitInterval = 0.0
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.CosineDecay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        decay_steps = float(self.decay_steps)
        completed_fraction = min(float(t), decay_steps) / decay_steps
        cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * completed_fraction))
        return base_lr * ((1.0 - self.alpha) * cosine_decayed + self.alpha)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        return self.value(0, base_lr, None)  # the cosine part is at most 1 = its value at 0


class CosineDecayRestartsSchedule(Schedule):
    """SGDR: ``lr(t) = base_lr * ((1 - alpha) * m_mul ** i * 0.5 * (1 + cos(pi * f_i)) + alpha)``.

    With ``f = t / first_decay_steps``, the restart index ``i`` and the fraction ``f_i`` of
    period ``i`` done are, as TF computes them: for ``t_mul == 1``, ``i = floor(f)``,
    ``f_i = f - i``; otherwise ``i = floor(log(1 - f * (1 - t_mul)) / log(t_mul))``,
    ``f_i = (f - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i``. Period ``i`` lasts
    ``first_decay_steps * t_mul ** i`` steps and starts at ``m_mul ** i * base_lr``. Like
    TF's, the geometric index is computed in floating point, so at a few exact restart
    steps it lands in the previous period (``f_i = 1``: the rate is ``alpha * base_lr``
    for that one step instead of the restart's peak); we keep TF's numbers.

    Defaults as TF: t_mul 2.0, m_mul 1.0, alpha 0.0 (first_decay_steps is required).
    t_mul must be >= 1 (below 1 the periods sum to a finite horizon and TF returns NaN
    after it), m_mul in [0, 1], alpha in [0, 1]. Peak: the rate at step 0, ``base_lr``.
    Guarded where TF's arithmetic breaks down far out: a ``t_mul`` so large that
    ``1 - f * (1 - t_mul)`` overflows takes its logarithm as ``log(f) + log(t_mul - 1)``,
    and ``f_i`` is kept in [0, 1] (rounding can take it out by ulps). Reference: TF
    ``cosine_decay_restarts`` (tensorflow/python/training/learning_rate_decay_v2.py;
    ``CosineDecayRestarts`` in
    keras/src/optimizers/schedules/learning_rate_schedule.py, same formula). Tested against
    the formula written out independently in tests/core/test_schedule_formulas.py over
    2,000 steps, relative error <= 1e-12.
    """

    name: Literal["cosine_decay_restarts"] = "cosine_decay_restarts"
    first_decay_steps: StepCount
    t_mul: PeriodFactor = 2.0
    m_mul: UnitInterval = 1.0
    alpha: UnitInterval = 0.0
    reference: ClassVar[str] = "tf.keras.optimizers.schedules.CosineDecayRestarts"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        t_mul = self.t_mul
        completed_fraction = float(t) / float(self.first_decay_steps)
        if t_mul == 1.0:
            i_restart = math.floor(completed_fraction)
            completed_fraction -= i_restart
        else:
            arg = 1.0 - completed_fraction * (1.0 - t_mul)
            # with a huge t_mul the argument overflows: log(1 + f (t_mul - 1)) then is
            # log(f) + log(t_mul - 1) to the last bit
            log_arg = (
                math.log(arg)
                if arg != math.inf
                else math.log(completed_fraction) + math.log(t_mul - 1.0)
            )
            i_restart = math.floor(log_arg / math.log(t_mul))
            t_mul_i = safe_pow(t_mul, i_restart)
            sum_r = (1.0 - t_mul_i) / (1.0 - t_mul)
            completed_fraction = (completed_fraction - sum_r) / t_mul_i
        # f_i is in [0, 1]; keep rounding (or a period past the float range) from
        # taking it out, where the cosine would rise again
        if not completed_fraction >= 0.0:
            completed_fraction = 0.0
        elif completed_fraction > 1.0:
            completed_fraction = 1.0
        m_fac = safe_pow(self.m_mul, i_restart)
        cosine_decayed = 0.5 * m_fac * (1.0 + math.cos(math.pi * completed_fraction))
        return base_lr * ((1.0 - self.alpha) * cosine_decayed + self.alpha)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        return self.value(0, base_lr, None)  # m_mul ** i and the cosine part are <= 1


class LinearCosineDecaySchedule(Schedule):
    """``lr(t) = base_lr * ((alpha + (T - t') / T) * 0.5 * (1 + cos(2 pi num_periods t' / T))
    + beta)`` with ``T = decay_steps``, ``t' = min(t, T)``.

    Defaults as TF: num_periods 0.5, alpha 0.0, beta 0.001 (decay_steps is required); all
    three >= 0. Keras 3 dropped this schedule (TF2 kept it as
    ``tf.keras.experimental.LinearCosineDecay`` and ``tf.compat.v1.train``). Reference: TF
    ``linear_cosine_decay`` (tensorflow/python/training/learning_rate_decay_v2.py;
    ``LinearCosineDecay`` in tensorflow/python/keras/optimizer_v2/learning_rate_schedule.py,
    same formula). Tested against the formula written out independently in
    tests/core/test_schedule_formulas.py over 2,000 steps, relative error <= 1e-12.
    """

    name: Literal["linear_cosine_decay"] = "linear_cosine_decay"
    decay_steps: StepCount
    num_periods: NonNeg = 0.5
    alpha: NonNeg = 0.0
    beta: NonNeg = 0.001
    reference: ClassVar[str] = "tf.keras.experimental.LinearCosineDecay"

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        decay_steps = float(self.decay_steps)
        step = min(float(t), decay_steps)
        linear_decayed = (decay_steps - step) / decay_steps
        fraction = 2.0 * self.num_periods * (step / decay_steps)
        cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return scaled(base_lr, (self.alpha + linear_decayed) * cosine_decayed + self.beta)

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # the linear and the cosine parts are both at most 1 = their values at step 0
        return self.value(0, base_lr, None)


class NoisyLinearCosineDecaySchedule(Schedule):
    """``lr(t) = base_lr * ((alpha + (T - t') / T + eps_t) * 0.5 * (1 + cos(2 pi num_periods
    t' / T)) + beta)`` with ``T = decay_steps``, ``t' = min(t, T)`` and Gaussian noise
    ``eps_t ~ N(0, initial_variance / (1 + t') ** variance_decay)``.

    TF draws ``eps_t`` afresh at every call; ours is a pure function of ``(seed, t)``
    (``sqrt(variance) * np.random.default_rng([seed, t]).standard_normal()``), so every
    replica, retry or preview gives the same rate for the same step, and steps draw
    independent noise. As in TF the variance uses the clamped ``t'`` (constant after
    decay_steps). Without noise it is ``linear_cosine_decay``.

    Where we differ, deliberately: the rate is clamped at 0, ``lr(t) = max(0, TF's
    rate)``. TF's rate can be negative with large noise (the default initial_variance
    1.0 early on: any draw below ``-(alpha + (T - t') / T) - beta / cos``), and a negative
    rate would step uphill. The standard-normal draw is also clipped to +-40 (never
    reached: numpy's generator does not draw that far), which bounds the peak at
    ``base_lr * (alpha + 1 + 40 sqrt(initial_variance) + beta)``.

    Defaults as TF: initial_variance 1.0, variance_decay 0.55, num_periods 0.5, alpha 0.0,
    beta 0.001 (decay_steps is required), all >= 0; seed 0 (ours: TF has none), an integer
    >= 0. Keras 3 dropped this schedule. Reference: TF ``noisy_linear_cosine_decay``
    (tensorflow/python/training/learning_rate_decay_v2.py; ``NoisyLinearCosineDecay`` in
    tensorflow/python/keras/optimizer_v2/learning_rate_schedule.py, same formula). Tested
    against the formula written out independently in tests/core/test_schedule_formulas.py
    over 2,000 steps, relative error <= 1e-12 (with the same noise draws), and the noise's
    mean and variance over many seeds.
    """

    name: Literal["noisy_linear_cosine_decay"] = "noisy_linear_cosine_decay"
    decay_steps: StepCount
    initial_variance: NonNeg = 1.0
    variance_decay: NonNeg = 0.55
    num_periods: NonNeg = 0.5
    alpha: NonNeg = 0.0
    beta: NonNeg = 0.001
    seed: NonNegInt = 0
    reference: ClassVar[str] = "tf.keras.experimental.NoisyLinearCosineDecay"

    def noise(self, t: int) -> float:
        """``eps_t``: the noise added to the linear part at the schedule's step `t`."""
        step = min(float(t), float(self.decay_steps))
        variance = self.initial_variance / safe_pow(1.0 + step, self.variance_decay)
        z = float(np.random.default_rng([self.seed, t]).standard_normal())
        return math.sqrt(variance) * min(max(z, -NOISE_CLIP), NOISE_CLIP)

    def value(self, t: int, base_lr: float, state: ScheduleState | None) -> float:
        decay_steps = float(self.decay_steps)
        step = min(float(t), decay_steps)
        linear_decayed = (decay_steps - step) / decay_steps
        noisy_linear_decayed = linear_decayed + self.noise(t)
        fraction = 2.0 * self.num_periods * (step / decay_steps)
        cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * fraction))
        rate = scaled(base_lr, (self.alpha + noisy_linear_decayed) * cosine_decayed + self.beta)
        return max(0.0, rate)  # deliberately not TF: a negative rate would step uphill

    def value_peak(self, base_lr: float, steps: int | None) -> float:
        # the noise is at most sqrt(initial_variance) * NOISE_CLIP (the variance only
        # decays), the linear and cosine parts at most 1; with a negative sum the cosine
        # part can only bring it up to 0
        largest_noise = math.sqrt(self.initial_variance) * NOISE_CLIP
        factor = max(self.alpha + (1.0 + largest_noise), 0.0) + self.beta
        return max(0.0, scaled(base_lr, factor))
