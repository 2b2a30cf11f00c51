"""What every optimizer is: validated hyperparameters and a pure init/update pair.

An optimizer (docs/design.md, decision 1) works on the flat vector of all of a session's
tensors. `init(hp, params)` makes its state; `update(hp, grads, state, params, lr)`
returns `(new_params, new_state)` and leaves its inputs untouched, unless the caller
passes `inplace=True` (the server's hot path, which owns its buffers), in which case the
params and the state arrays are updated in place and the gradients are still never
written. Hyperparameters are plain data (a frozen pydantic model), never closures, so
they serialize with the session.

Each optimizer has a readable NumPy implementation (`step_numpy`, the reference and
fallback) and may have a fused single-pass kernel (`step_fused`, numba) that is tested
against the same oracle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from service.core.errors import CoreError, StateError
from service.core.layout import FlatLayout
from service.core.state import OptState
from service.core.validators import interval

__all__ = ["FLOAT_DTYPES", "Hyper", "Impl", "Optimizer", "interval", "kernels_available"]

Impl = Literal["auto", "numpy", "fused"]
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Hyper(BaseModel):
    """Base of every optimizer's hyperparameters: frozen, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    name: str
    lr: float


H = TypeVar("H", bound=Hyper)


class Optimizer(ABC, Generic[H]):
    """A stateless optimizer definition; instances hold no training state."""

    name: ClassVar[str]
    hyper: type[H]
    #: the implementation the parity tests compare against
    reference: ClassVar[str]

    #: state arrays made on first use rather than by `init` (torch's `None` buffers,
    #: such as SGD's momentum buffer, which starts as a copy of the first gradient)
    lazy_arrays: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def state_arrays(self, hp: H) -> tuple[str, ...]:
        """Names of the flat state arrays `init` makes for this configuration."""

    def initial_scalars(self, hp: H) -> dict[str, float | int | bool]:
        return {"step": 0}

    def initial_array(self, hp: H, name: str, params: np.ndarray) -> np.ndarray:
        """The starting value of state array `name` (zeros unless overridden)."""
        return np.zeros_like(params)

    @abstractmethod
    def step_numpy(
        self,
        hp: H,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        """Apply one step in place to `params` and `state`; never write `grads`."""

    #: whether `step_fused` is implemented (a numba kernel, see kernels.py)
    has_fused: ClassVar[bool] = False

    def step_fused(
        self,
        hp: H,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float,
        layout: FlatLayout,
    ) -> None:
        """The same step as `step_numpy` in one compiled pass over memory."""
        raise CoreError(f"optimizer {self.name!r} has no fused kernel")

    def init(self, hp: H, params: np.ndarray, layout: FlatLayout | None = None) -> OptState:
        """The state before the first step, in the dtype of `params`."""
        params = _check_params(params)
        self._check_hyper(hp)
        if layout is not None and layout.total != params.size:
            raise CoreError(f"layout holds {layout.total} elements, params {params.size}")
        arrays = {k: self.initial_array(hp, k, params) for k in self.state_arrays(hp)}
        return OptState(arrays, self.initial_scalars(hp))

    def update(
        self,
        hp: H,
        grads: np.ndarray,
        state: OptState,
        params: np.ndarray,
        lr: float | None = None,
        layout: FlatLayout | None = None,
        *,
        inplace: bool = False,
        impl: Impl = "auto",
    ) -> tuple[np.ndarray, OptState]:
        """One optimizer step. Returns `(new_params, new_state)`.

        `lr` is the rate for this step (a schedule's value); `None` uses `hp.lr`.
        With `inplace=False` (default) nothing passed in is modified. With
        `inplace=True`, `params` and `state` are updated in place and returned.
        `impl` picks the fused kernel (`"fused"`), the NumPy reference (`"numpy"`) or
        the fused one when available (`"auto"`).
        """
        self._check_hyper(hp)
        params = _check_params(params)
        grads = np.asarray(grads)
        if grads.shape != params.shape:
            raise CoreError(f"grads have shape {list(grads.shape)}, params {list(params.shape)}")
        if grads.dtype != params.dtype:
            grads = grads.astype(params.dtype)
        self._check_state(hp, state, params)
        rate = float(hp.lr if lr is None else lr)
        if not (rate >= 0.0 and np.isfinite(rate)):
            raise CoreError(f"lr must be a finite number >= 0: got {rate}")
        if layout is None:
            layout = FlatLayout.single(params.size)
        elif layout.total != params.size:
            raise CoreError(f"layout holds {layout.total} elements, params {params.size}")
        if not inplace:
            params = params.copy()
            state = state.copy()
        if impl == "fused" or (impl == "auto" and self.has_fused and kernels_available()):
            self.step_fused(hp, grads, state, params, rate, layout)
        else:
            self.step_numpy(hp, grads, state, params, rate, layout)
        return params, state

    def _check_hyper(self, hp: Hyper) -> None:
        if not isinstance(hp, self.hyper):
            raise CoreError(f"{self.name} takes {self.hyper.__name__}, got {type(hp).__name__}")

    def _check_state(self, hp: H, state: OptState, params: np.ndarray) -> None:
        required = set(self.state_arrays(hp))
        allowed = required | set(self.lazy_arrays)
        if not required <= set(state.arrays) <= allowed:
            raise StateError(
                f"{self.name} state holds {sorted(state.arrays)}, expected {sorted(required)}"
                + (f" and optionally {sorted(self.lazy_arrays)}" if self.lazy_arrays else "")
            )
        for name, array in state.arrays.items():
            if array.shape != params.shape or array.dtype != params.dtype:
                raise StateError(
                    f"state array {name!r} is {array.dtype}{list(array.shape)}, "
                    f"params are {params.dtype}{list(params.shape)}"
                )


def _check_params(params: np.ndarray) -> np.ndarray:
    if not isinstance(params, np.ndarray) or params.ndim != 1:
        raise CoreError("params must be a flat (1-D) NumPy array")
    if params.dtype not in FLOAT_DTYPES:
        raise CoreError(f"params must be float32 or float64, not {params.dtype}")
    return params


def kernels_available() -> bool:
    """Whether the numba kernels can run here (numba imports and compiles)."""
    from service.core.optim import kernels

    return kernels.AVAILABLE


def scalar(dtype: np.dtype[Any], value: float) -> Any:
    """`value` as a NumPy scalar of `dtype`, so arithmetic stays in the session's dtype."""
    return dtype.type(value)
