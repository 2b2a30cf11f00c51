"""Fused single-pass optimizer kernels (numba, nopython, parallel).

Placeholder until the kernels land: AVAILABLE is False so every optimizer runs its
NumPy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.state import OptState

AVAILABLE = False


def adam_step(hp: Any, grads: np.ndarray, state: OptState, params: np.ndarray, lr: float) -> None:
    raise NotImplementedError


def sgd_step(hp: Any, grads: np.ndarray, state: OptState, params: np.ndarray, lr: float) -> None:
    raise NotImplementedError
