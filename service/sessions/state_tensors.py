"""Reading a state file's tensors (docs/state.md): params, the optimizer's state arrays
and scalars and the session's own (`ema.avg`, `acc.sum`, `fed.u.<i>`, ...), each
checked against the session's layout, dtype and configuration. Used by
`state_io.decode_session`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.core import find_nonfinite
from service.core.averaging import EMA_AVG, EMA_N, SWA_AVG, SWA_N
from service.core.state import OptState
from service.sessions.errors import (
    Invalid,
    Loc,
    field_error,
    invalid,
)
from service.sessions.federation import UPDATE_PREFIX
from service.sessions.model import MAX_SAFE_INT
from service.sessions.spec import (
    Spec,
)
from service.sessions.state_format import KIND_NAMES, PARAMS, SCALAR, SCALAR_TYPES, STATE
from service.sessions.state_metadata import short
from service.sessions.stepping import ACC_SUM, split_state


def read_tensors(spec: Spec, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, OptState]:
    """The flat params and the state, each tensor checked against layout and dtype."""
    params: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    scalars: dict[str, float | int | bool] = {}
    for name, value in tensors.items():
        at = ["body", name]
        if name.startswith(PARAMS):
            params[name[len(PARAMS) :]] = _array(spec, name[len(PARAMS) :], value, at)
        elif name.startswith(STATE):
            key, sep, tensor = name[len(STATE) :].partition("/")
            if not key or not sep:
                raise invalid(at, "a state array is named state/<key>/<tensor>")
            arrays.setdefault(key, {})[tensor] = _array(spec, tensor, value, at)
        elif name.startswith(SCALAR) and name[len(SCALAR) :] and "/" not in name[len(SCALAR) :]:
            kind = SCALAR_TYPES.get(value.dtype) if value.ndim == 0 else None
            if kind is None:
                raise invalid(
                    at, f"a scalar is 0-d, I64, F64 or BOOL: got {value.dtype}{list(value.shape)}"
                )
            scalars[name[len(SCALAR) :]] = kind(value.item())
        else:
            raise invalid(
                at,
                "is not a state file's tensor (params/<tensor>, state/<key>/<tensor>, "
                "scalar/<key>)",
            )
    flat = _flatten(spec, params, PARAMS)
    state = OptState({k: _flatten(spec, v, f"{STATE}{k}/") for k, v in arrays.items()}, scalars)
    clash = sorted(set(state.arrays) & set(state.scalars))
    if clash:
        raise invalid(
            ["body", SCALAR + clash[0]], f"{short(clash[0])} is both an array and a scalar"
        )
    return flat, state


def _array(spec: Spec, tensor: str, value: np.ndarray, at: Loc) -> np.ndarray:
    if tensor not in spec.layout:
        raise invalid(at, f"the session's layout has no tensor {short(tensor)}")
    shape = spec.layout[tensor].shape
    if value.dtype != spec.dtype:
        raise invalid(at, f"must be {spec.dtype.name} (the session's dtype), not {value.dtype}")
    if value.shape != shape:
        raise invalid(at, f"has shape {list(value.shape)}, expected {list(shape)}")
    return value


def _flatten(spec: Spec, parts: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """The tensors `prefix<name>` of every layout tensor, end to end (a new array)."""
    out = np.empty(spec.layout.total, dtype=spec.dtype)
    for segment in spec.layout.specs:
        if segment.name not in parts:
            raise invalid(
                ["body", prefix + segment.name], f"missing tensor {prefix + segment.name!r}"
            )
        out[segment.offset : segment.stop] = parts[segment.name].reshape(-1)
    return out


def _check_finite(spec: Spec, values: np.ndarray, prefix: str, what: str) -> None:
    if np.isfinite(values).all():
        return
    count, names = find_nonfinite(values, spec.layout)
    msg = f"{what} must be finite (holds NaN or inf)"
    raise Invalid(
        f"{count} non-finite values in {', '.join(repr(prefix + n) for n in names)}",
        [field_error(["body", prefix + n], msg) for n in names],
    )


def check_params(spec: Spec, params: np.ndarray) -> None:
    _check_finite(spec, params, PARAMS, "params")


def _first(spec: Spec, key: str) -> Loc:
    """The loc of a state array's first tensor (where a whole array is at fault)."""
    return ["body", f"{STATE}{key}/{spec.layout.names[0]}"]


def check_optimizer_state(spec: Spec, state: OptState) -> None:
    """The optimizer's entries (names without a dot): the arrays and scalars it keeps
    for this configuration, of their types, finite."""
    opt, _ = split_state(state)
    optimizer, hp = spec.optimizer, spec.hp
    required = optimizer.state_arrays(hp)
    allowed = {*required, *optimizer.lazy_arrays}
    for key in required:
        if key not in opt.arrays:
            raise invalid(_first(spec, key), f"missing: {optimizer.name} keeps {key!r} here")
    for key in sorted(opt.arrays):
        if key not in allowed:
            raise invalid(
                _first(spec, key),
                f"{optimizer.name} keeps no {short(key)} (it keeps {sorted(allowed)})",
            )
        _check_finite(spec, opt.arrays[key], f"{STATE}{key}/", "optimizer state")
    expected = optimizer.initial_scalars(hp)
    for key, want in expected.items():
        if key not in opt.scalars:
            raise invalid(["body", SCALAR + key], f"missing: {optimizer.name} keeps {key!r}")
        _check_scalar(key, opt.scalars[key], type(want))
    for key in sorted(set(opt.scalars) - set(expected)):
        raise invalid(["body", SCALAR + key], f"{optimizer.name} keeps no scalar {short(key)}")


def _check_scalar(key: str, value: float | int | bool, kind: type) -> None:
    at = ["body", SCALAR + key]
    if type(value) is not kind:
        raise invalid(at, f"must be {KIND_NAMES[kind]}: got {value!r}")
    if kind is int and not 0 <= int(value) <= MAX_SAFE_INT:
        raise invalid(at, f"must be in [0, 2**53 - 1 = {MAX_SAFE_INT}]: got {value}")
    if kind is float and not math.isfinite(value):
        raise invalid(at, f"must be finite: got {value}")


def check_own_state(
    spec: Spec, state: OptState, extra: Mapping[str, Any], step: int, version: int
) -> None:
    """The session's own entries: exactly those its features keep now."""
    _, own = split_state(state)
    arrays, scalars = dict(own.arrays), dict(own.scalars)
    for config, count_key, avg_key in ((spec.ema, EMA_N, EMA_AVG), (spec.swa, SWA_N, SWA_AVG)):
        if config is None:
            continue
        if count_key not in scalars:
            raise invalid(["body", SCALAR + count_key], "missing: the session keeps this average")
        count = scalars.pop(count_key)
        _check_scalar(count_key, count, int)
        average = arrays.pop(avg_key, None)
        if (average is not None) != (count > 0):
            raise invalid(
                _first(spec, avg_key),
                f"{avg_key!r} is there exactly when {count_key} > 0 ({count_key} is {count})",
            )
        if average is not None:
            _check_finite(spec, average, f"{STATE}{avg_key}/", "an average")
    pending = extra.get("pending")
    active = (
        spec.sync is not None
        and pending is not None
        and pending["base_version"] == version
        and pending["count"] > 0
    )
    accumulated = arrays.pop(ACC_SUM, None)
    if (accumulated is not None) != active:
        raise invalid(
            _first(spec, ACC_SUM),
            f"{ACC_SUM!r} is there exactly when a sync session's extra.pending holds "
            f"gradients on its version ({version})",
        )
    if accumulated is not None and spec.transforms.nonfinite != "skip":
        _check_finite(spec, accumulated, f"{STATE}{ACC_SUM}/", "the accumulated gradient")
    record = extra.get("round")
    clients = len(record["clients"]) if record is not None and record["round"] == step else 0
    for i in range(clients if spec.federated is not None else 0):
        update = arrays.pop(f"{UPDATE_PREFIX}{i}", None)
        if update is None:
            raise invalid(_first(spec, f"{UPDATE_PREFIX}{i}"), "missing: a client's update")
        _check_finite(spec, update, f"{STATE}{UPDATE_PREFIX}{i}/", "an update")
    for key in sorted(arrays):
        raise invalid(
            _first(spec, key), f"{short(key)} is not kept by a session of this configuration"
        )
    for key in sorted(scalars):
        raise invalid(["body", SCALAR + key], f"{short(key)} is not kept by this configuration")
