"""Parameter averaging over a session's steps: an exponential moving average (EMA) and a
stochastic weight average (SWA), as plain data and pure functions.

The server keeps the averages in an `OptState` (flat arrays in the params' dtype, int
counts) under the names `ema.avg`, `ema.n`, `swa.avg`, `swa.n`; `update_averages` is called
after every APPLIED step with the params that step produced and returns a new state (its
input is never changed); `read_average` gives the averaged params.

EMA (`EMAConfig`: `decay` in [0, 1), default 0.999; `bias_correction`, default True):

* `bias_correction=True`: Adam's first-moment estimate and its bias correction (Kingma &
  Ba 2015, "Adam: A Method for Stochastic Optimization", section 3), applied to the
  params instead of the gradients::

      e_0 = 0
      e_t = decay * e_{t-1} + (1 - decay) * p_t    as e += (1 - decay) * (p_t - e)  (lerp)
      read: e_t / (1 - decay ** t)

  so the average read after one step is `p_1` (up to rounding), and `p_k`'s weight in the
  read average is `(1 - decay) * decay ** (t - k) / (1 - decay ** t)` (the weights sum to 1).
* `bias_correction=False`: PyTorch's `torch.optim.swa_utils.AveragedModel(model,
  multi_avg_fn=get_ema_multi_avg_fn(decay))`: the first update copies `p_1` (AveragedModel
  copies the params while `n_averaged == 0`), then each update is
  `torch._foreach_lerp_(ema, p, 1 - decay)`, i.e. `e_t = e_{t-1} + (1 - decay) * (p_t -
  e_{t-1})`; read as it is.

SWA (`SWAConfig`: `start` >= 0, default 0; `every` >= 1, default 1): Izmailov,
Podoprikhin, Garipov, Vetrov, Wilson 2018, "Averaging Weights Leads to Wider Optima and
Better Generalization" (UAI), the equal-weight running mean of the params after the
applied steps `s` (1-based count) with `s >= start` and `(s - start) % every == 0`::

    a_1 = p                               (a copy)
    a_n = a_{n-1} + (p - a_{n-1}) / n

This is `AveragedModel(model)` with neither `avg_fn` nor `multi_avg_fn`, on the CPU:
torch 2.13's `update_parameters` then takes its last default branch (the CPU is not one
of `_get_foreach_kernels_supported_devices()`), `get_swa_avg_fn()`:
`averaged + (current - averaged) / (n_averaged + 1)`, with `n_averaged` counted before the
update. (On CUDA the same default uses `get_swa_multi_avg_fn()`, `torch._foreach_lerp_(avg,
p, 1 / (n + 1))`: the same mean, rounded differently, and with its weight computed from the
long tensor `n_averaged` in torch's default dtype, float32, so a float64 mean there is off
by ~1e-8 relative; the tests check both, that one to 1e-7 in float64.) Calling
`update_parameters` only at the steps chosen by `start`/`every` is how torch's SWA examples
use it (`if epoch > swa_start: swa_model.update_parameters(model)`).

Storage and allocation: `init_averages` stores only the counts (`ema.n`, `swa.n` = 0); the
arrays are allocated on the first update that needs them (`ema.avg` on the first step,
`swa.avg` on the first averaged step), so a state's arrays exist exactly when its count is
above 0. `read_average` returns None while the count is 0 (no step yet, or SWA before
`start`).

Arithmetic and rounding: params are float32 or float64 and every array is kept in that
dtype; the lerps and the SWA division compute in that dtype, as torch's CPU kernels do
(the Python-float weights `1 - decay`, `1 / (n + 1)` are rounded to the dtype; lerp uses
torch's two formulas, switching at weight 0.5, see `ops.lerp_`). torch's vectorized lerp
uses a fused multiply-add, NumPy does not, so results agree to rounding, not bit for bit.
The bias correction `1 - decay ** t` is computed in float64 (as Adam's `1 - beta1 ** step`),
and the read average is `e_t / (1 - decay ** t)` divided in float64 and rounded once to
the params' dtype (float32: one rounding of the exact float64 quotient).

Tested (tests/core/test_averaging.py) against `torch.optim.swa_utils.AveragedModel` over
200 steps of seeded random params on tensors of several shapes, after every step: the
uncorrected EMA (`get_ema_multi_avg_fn`), default SWA and `get_swa_multi_avg_fn` SWA, with
and without `start`/`every`, relative error <= 1e-12 in float64 (1e-7 against
`get_swa_multi_avg_fn`, see above) and <= 1e-6 in float32; the bias-corrected EMA against
its closed form `sum_k (1-d) d^(t-k) p_k / (1 - d^t)` (float64 1e-12, float32 1e-6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from service.core.errors import CoreError, SpecError, StateError
from service.core.optim.ops import lerp_
from service.core.state import OptState
from service.core.validators import interval

#: state names: the EMA and its count of updates, the SWA mean and its count of steps
EMA_AVG = "ema.avg"
EMA_N = "ema.n"
SWA_AVG = "swa.avg"
SWA_N = "swa.n"

AverageKind = Literal["ema", "swa"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class AveragingError(SpecError):
    """An invalid `ema` or `swa` spec, or an average the session does not keep."""


class EMAConfig(BaseModel):
    """An exponential moving average of the params.

    * `decay` (0.999) in [0, 1): the weight of the previous average (torch's
      `get_ema_multi_avg_fn(decay)` also takes 1, which would never move; we refuse it);
    * `bias_correction` (True): start from 0 and divide by `1 - decay ** t` when read
      (Adam's correction); False: start from a copy of the first params (torch's
      `AveragedModel` with `get_ema_multi_avg_fn`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    decay: Annotated[float, interval(0.0, 1.0, hi_open=True)] = 0.999
    bias_correction: bool = True


class SWAConfig(BaseModel):
    """A stochastic weight average: the equal-weight mean of the params after the applied
    steps `s` (1-based) with `s >= start` and `(s - start) % every == 0`.

    * `start` (0) >= 0: the first step that may be averaged (0 and 1 both mean the first);
    * `every` (1) >= 1: average one step in `every`, counted from `start`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    start: Annotated[int, interval(0)] = 0
    every: Annotated[int, interval(1)] = 1


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(dict(data) if isinstance(data, Mapping) else data)
    except ValidationError as exc:
        raise AveragingError(
            [{"loc": tuple(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        ) from None


def parse_ema(data: Mapping[str, Any]) -> EMAConfig:
    """Validate an `ema` spec; raises AveragingError naming each field at fault, e.g.
    `decay must be in [0, 1): got 1.0`."""
    config: EMAConfig = _parse(EMAConfig, data)
    return config


def parse_swa(data: Mapping[str, Any]) -> SWAConfig:
    """Validate an `swa` spec; raises AveragingError naming each field at fault, e.g.
    `every must be >= 1: got 0`."""
    config: SWAConfig = _parse(SWAConfig, data)
    return config


def _check_params(params: np.ndarray) -> None:
    if not isinstance(params, np.ndarray) or params.ndim != 1 or params.dtype not in _DTYPES:
        raise CoreError("params must be a flat float32 or float64 array")


def _count(averages: OptState, count_name: str, array_name: str, params: np.ndarray) -> int:
    """The count stored under `count_name` (0 when absent), checking that its array exists
    exactly when the count is above 0 and fits `params`."""
    n = averages.scalars.get(count_name, 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StateError(f"{count_name!r} must be an int >= 0: got {n!r}")
    array = averages.arrays.get(array_name)
    if n == 0:
        if array is not None:
            raise StateError(f"{array_name!r} is stored while {count_name!r} is 0")
        return 0
    if array is None:
        raise StateError(f"{array_name!r} is missing while {count_name!r} is {n}")
    if array.shape != params.shape or array.dtype != params.dtype:
        raise StateError(
            f"{array_name!r} has shape {list(array.shape)} and dtype {array.dtype}, "
            f"the params {list(params.shape)} and {params.dtype}"
        )
    return n


def swa_due(swa: SWAConfig, step: int) -> bool:
    """Whether the params after applied step `step` (1-based) join the SWA mean."""
    return step >= swa.start and (step - swa.start) % swa.every == 0


def init_averages(ema: EMAConfig | None, swa: SWAConfig | None, params: np.ndarray) -> OptState:
    """The averages of a new session: the counts of the configured ones, at 0, and no array
    (each is allocated by its first update). `params` (flat float32/float64) is checked."""
    _check_params(params)
    state = OptState()
    if ema is not None:
        state.scalars[EMA_N] = 0
    if swa is not None:
        state.scalars[SWA_N] = 0
    return state


def update_averages(
    ema: EMAConfig | None,
    swa: SWAConfig | None,
    averages: OptState,
    params: np.ndarray,
    step: int,
) -> OptState:
    """Fold in the params an applied step produced; `step` is the session's count of
    applied steps after it (1-based). Returns a new state that shares no array with
    `averages` or `params`; neither is changed. Entries of averages not configured are
    carried over as they are (copied).

    EMA: every call; SWA: when `step >= start` and `(step - start) % every == 0`. See the
    module docstring for the rules and the torch code they mirror.
    """
    _check_params(params)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CoreError(f"step must be an int >= 1: got {step!r}")
    out = OptState(
        {k: v.copy() for k, v in averages.arrays.items()},
        dict(averages.scalars),
    )
    if ema is not None:
        n = _count(averages, EMA_N, EMA_AVG, params)
        if n == 0:
            # bias-corrected: e_0 = 0; torch's AveragedModel: a copy of p_1
            avg = np.zeros_like(params) if ema.bias_correction else params.copy()
        else:
            avg = out.arrays[EMA_AVG]
        if n > 0 or ema.bias_correction:
            lerp_(avg, params, 1.0 - ema.decay)  # torch._foreach_lerp_(ema, p, 1 - decay)
        out.arrays[EMA_AVG] = avg
        out.scalars[EMA_N] = n + 1
    if swa is not None and swa_due(swa, step):
        n = _count(averages, SWA_N, SWA_AVG, params)
        if n == 0:
            avg = params.copy()
        else:
            prev = averages.arrays[SWA_AVG]
            # get_swa_avg_fn: averaged + (current - averaged) / (n_averaged + 1)
            avg = prev + (params - prev) / (n + 1)
        out.arrays[SWA_AVG] = avg
        out.scalars[SWA_N] = n + 1
    return out


def read_average(
    kind: AverageKind,
    ema: EMAConfig | None,
    swa: SWAConfig | None,
    averages: OptState,
) -> tuple[np.ndarray, int] | None:
    """The averaged flat params (a new array, in the params' dtype) and the number of steps
    in the average; None when no step has been averaged yet.

    The EMA is bias-corrected when configured (`e_t / (1 - decay ** t)`, divided in float64
    and rounded once to the dtype). Raises AveragingError (loc `average`) for an unknown
    kind or one the session does not keep.
    """
    if kind == "ema" and ema is not None:
        count_name, array_name = EMA_N, EMA_AVG
    elif kind == "swa" and swa is not None:
        count_name, array_name = SWA_N, SWA_AVG
    else:
        msg = (
            f"the session keeps no {kind} average"
            if kind in ("ema", "swa")
            else f"must be 'ema' or 'swa': got {kind!r}"
        )
        raise AveragingError([{"loc": ("average",), "msg": msg}])
    array = averages.arrays.get(array_name)
    n = _count(averages, count_name, array_name, array if array is not None else np.empty(0))
    if n == 0 or array is None:
        return None
    if kind == "ema" and ema is not None and ema.bias_correction:
        correction = 1.0 - ema.decay**n
        return np.divide(array, correction, dtype=np.float64).astype(array.dtype, copy=False), n
    return array.copy(), n
