"""Drive a torch.optim.lr_scheduler step by step and read back what the optimizer used.

The rate (and momentum / beta1) recorded for step t is the one in the optimizer's first
param group when step t runs, exactly what our `Schedule.lr(t)` / `momentum(t)` promise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from service.core.schedules.base import Schedule


def torch_schedule(
    make: Callable[[torch.optim.Optimizer], Any],
    steps: int,
    *,
    base_lr: float = 0.1,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    optimizer_kwargs: dict[str, Any] | None = None,
    losses: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rates (and momenta, when the group has momentum or betas) for steps 0..steps-1."""
    param = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = optimizer([param], lr=base_lr, **(optimizer_kwargs or {}))
    sched = make(opt)
    lrs: list[float] = []
    momenta: list[float] = []
    for t in range(steps):
        group = opt.param_groups[0]
        lrs.append(float(group["lr"]))
        if "betas" in group:
            momenta.append(float(group["betas"][0]))
        elif "momentum" in group:
            momenta.append(float(group["momentum"]))
        param.grad = torch.ones_like(param)
        opt.step()
        if losses is None:
            sched.step()
        else:
            sched.step(losses[t])
    return np.array(lrs), (np.array(momenta) if momenta else None)


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the error relative to the schedule's scale."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shapes differ: {ours.shape} vs {ref.shape}"
    scale = float(np.max(np.abs(ref)))
    diff = float(np.max(np.abs(ours - ref)))
    return diff / scale if scale > 0 else diff


def ours_schedule(
    schedule: Schedule,
    steps: int,
    base_lr: float = 0.1,
    losses: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Our rates (and momenta) for steps 0..steps-1, feeding losses to a stateful one."""
    state = schedule.initial_state(base_lr)
    lrs: list[float] = []
    momenta: list[float | None] = []
    for t in range(steps):
        lrs.append(schedule.lr(t, base_lr, state))
        momenta.append(schedule.momentum(t))
        if losses is not None:
            assert state is not None, "losses given to a stateless schedule"
            state = schedule.observe(state, losses[t])
    if all(m is None for m in momenta):
        return np.array(lrs), None
    return np.array(lrs), np.array(momenta, dtype=np.float64)
