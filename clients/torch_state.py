"""A session state file (docs/state.md) to and from a PyTorch optimizer's `state_dict`.

For the optimizers PyTorch has (`sgd`, `adam`, `adamw`, `adagrad`, `rmsprop`,
`adadelta`, `adamax`, `nadam`, `radam`), whose hyperparameter and state names the
server already shares with `torch.optim`::

    # a session, continued in torch
    params, state_dict = to_torch_state_dict(client.export_state(sid), names)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    opt = torch.optim.Adam(model.parameters())
    opt.load_state_dict(state_dict)  # the session's hyperparameters, state and rate

    # a torch run, continued as a session
    session = client.import_state(from_torch_state_dict(opt, model.named_parameters()))

**To torch** (`to_torch_state_dict`): the params by name (tensors in the session's
dtype), and `{"state": {i: {...}}, "param_groups": [{...}]}` as
`torch.optim.Optimizer.state_dict()` gives it, the parameters numbered in the order of
`names` (default: the session's layout order; it must name every tensor of the
session). Per parameter: the session's state arrays under the same names (`exp_avg`,
`exp_avg_sq`, `max_exp_avg_sq`, `sum`, `square_avg`, `acc_delta`, `exp_inf`,
`momentum_buffer`, `grad_avg`), `step` as a 0-d tensor of torch's scalar dtype (float32,
or float64 when that is torch's default dtype; SGD keeps none), NAdam's `mu_product` as
a 0-d tensor. One param group: every key torch's optimizer has (its defaults for
`foreach`, `fused`, ...), the session's hyperparameters, and as `lr` the rate of the
session's next step (the schedule's; torch's own scheduler, if any, is yours to
attach). A session counts steps per session where torch counts them per parameter: each
parameter gets the session's `step`. The session's own entries (averages, a pending
sync accumulation, a federated round's updates) have no place in torch's state and are
left out.

**From torch** (`from_torch_state_dict`): a state file of the optimizer's single param
group for a session of `named_params` (names and parameters, in the order that becomes
the session's layout; each a parameter of the optimizer; leave out only parameters with
no state). Every parameter must have the same `step` (a session steps its tensors
together), or all none (a fresh optimizer). torch's SGD counts no steps: give `step`
(the session's count, which places a schedule; 0 when not given and nothing has a
momentum buffer). The session's `dtype` is the parameters' (float32 or float64).

This module and clients/torch.py are the only ones of `clients` that import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from clients.state_file import StateFile

__all__ = ["TORCH_OPTIMIZERS", "from_torch_state_dict", "to_torch_state_dict"]

#: the optimizers both sides have: the session's name -> torch's class
TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}
#: the hyperparameters of each (the same names on both sides)
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "adam": (
        *("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
        "decoupled_weight_decay",
    ),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"),
    "adadelta": ("lr", "rho", "eps", "weight_decay", "maximize"),
    "adamax": ("lr", "betas", "eps", "weight_decay", "maximize"),
    "nadam": (
        *("lr", "betas", "eps", "weight_decay", "momentum_decay"),
        *("decoupled_weight_decay", "maximize"),
    ),
    "radam": ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize"),
}
_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_NAMES = {torch.float32: "float32", torch.float64: "float64"}


# --- to torch ----------------------------------------------------------------------------


def to_torch_state_dict(
    state_file: bytes | bytearray | memoryview | StateFile, names: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(params, state_dict)` of a session state file (see the module docstring);
    parameter `i` of the state dict is `names[i]`."""
    file = state_file if isinstance(state_file, StateFile) else StateFile.from_bytes(state_file)
    optimizer = file.optimizer
    name = str(optimizer["name"])
    if name not in TORCH_OPTIMIZERS:
        known = ", ".join(sorted(TORCH_OPTIMIZERS))
        raise ValueError(f"torch.optim has no {name!r} optimizer (it has {known})")
    order = list(file.names if names is None else names)
    if sorted(order) != sorted(file.names) or len(set(order)) != len(order):
        raise ValueError(f"names must name each tensor of the session once: {file.names}")
    dtype = _DTYPES[file.dtype]
    params = {n: torch.from_numpy(np.array(file.params[n], dtype=file.dtype)) for n in order}
    step = int(file.scalars.get("step", file.step))
    state: dict[int, dict[str, Any]] = {}
    for i, tensor in enumerate(order):
        entry: dict[str, Any] = {}
        if name != "sgd":  # torch's SGD counts no steps
            entry["step"] = torch.tensor(float(step), dtype=_scalar_dtype())
        for key, arrays in file.arrays.items():
            if "." not in key:  # the optimizer's (the session's own hold a dot)
                entry[key] = torch.from_numpy(np.array(arrays[tensor], dtype=file.dtype))
        if "mu_product" in file.scalars:
            entry["mu_product"] = torch.tensor(float(file.scalars["mu_product"]), dtype=dtype)
        if entry:
            state[i] = entry
    group = _torch_group(name, optimizer, len(order))
    group["lr"] = file.lr
    return params, {"state": state, "param_groups": [group]}


def _torch_group(name: str, optimizer: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The param group torch's optimizer makes of these hyperparameters (every key it
    has, its own defaults for the rest), for parameters `0 .. count-1`."""
    kwargs = {k: _torch_value(optimizer[k]) for k in HYPERPARAMETERS[name] if k in optimizer}
    probe = TORCH_OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], **kwargs)
    group = {k: v for k, v in probe.param_groups[0].items() if k != "params"}
    group["params"] = list(range(count))
    return group


def _torch_value(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list) else value


def _scalar_dtype() -> torch.dtype:
    """The dtype torch keeps `step` in (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# --- from torch --------------------------------------------------------------------------


def from_torch_state_dict(
    optimizer: torch.optim.Optimizer,
    named_params: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    step: int | None = None,
    schedule: Mapping[str, Any] | None = None,
    transforms: Mapping[str, Any] | None = None,
    nonfinite: str | None = None,
    ema: Mapping[str, Any] | None = None,
    swa: Mapping[str, Any] | None = None,
    consistency: str | Mapping[str, Any] | None = None,
    history: int | None = None,
) -> bytes:
    """A state file of a session that continues `optimizer`'s run on `named_params`
    (see the module docstring); the other arguments are the session's features, as
    `create_session` takes them (`ema` / `swa` start empty). Import it with
    `client.import_state`."""
    name = _session_name(optimizer)
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            f"a session has one set of hyperparameters: the optimizer has "
            f"{len(optimizer.param_groups)} param groups"
        )
    group = optimizer.param_groups[0]
    pairs = list(named_params.items() if isinstance(named_params, Mapping) else named_params)
    if not pairs:
        raise ValueError("named_params is empty")
    ids = [id(p) for p in group["params"]]
    for tensor_name, param in pairs:
        if id(param) not in ids:
            raise ValueError(f"parameter {tensor_name!r} is not one of the optimizer's")
    named = {id(p) for _, p in pairs}
    for i, param in enumerate(group["params"]):
        if id(param) not in named and optimizer.state.get(param):
            raise ValueError(f"parameter {i} of the optimizer has state but is not in named_params")
    dtypes = {p.dtype for _, p in pairs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _NAMES:
        raise ValueError(
            f"the parameters must all be float32 or all float64: {sorted(map(str, dtypes))}"
        )
    dtype = next(iter(dtypes))
    np_dtype = np.dtype(_NAMES[dtype])
    hyper = {"name": name}
    hyper.update((key, _spec_value(group[key])) for key in HYPERPARAMETERS[name] if key in group)
    states = [optimizer.state.get(p) or {} for _, p in pairs]
    count = _step_of(name, pairs, states, step)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for key in _array_names(name, group, states):
        arrays[key] = {}
        for (tensor_name, param), entry in zip(pairs, states, strict=True):
            value = entry.get(key)
            if value is None:
                if any(states):
                    raise ValueError(f"parameter {tensor_name!r} has no {key!r}")
                value = _initial(name, key, group, param)
            arrays[key][tensor_name] = _numpy(value, np_dtype, tuple(param.shape), tensor_name, key)
    scalars: dict[str, int | float | bool] = {"step": count}
    if name == "nadam":
        scalars["mu_product"] = _mu_product(pairs, states)
    features = {
        k: v
        for k, v in (
            ("schedule", schedule),
            ("transforms", transforms),
            ("nonfinite", nonfinite),
            ("ema", ema),
            ("swa", swa),
            ("consistency", {"mode": consistency} if isinstance(consistency, str) else consistency),
            ("history", history),
        )
        if v is not None
    }
    for average in ("ema", "swa"):
        if average in features:
            scalars[f"{average}.n"] = 0  # no step averaged yet
    spec = {"optimizer": hyper, "dtype": _NAMES[dtype], **features}
    params = {n: _numpy(p.detach(), np_dtype, tuple(p.shape), n, "params") for n, p in pairs}
    lr = group["lr"]
    return StateFile.build(
        spec, params, arrays, scalars, step=count, lr=float(lr) if lr is not None else None
    ).to_bytes()


def _session_name(optimizer: torch.optim.Optimizer) -> str:
    for name, cls in TORCH_OPTIMIZERS.items():
        if type(optimizer) is cls:
            return name
    known = ", ".join(c.__name__ for c in TORCH_OPTIMIZERS.values())
    raise ValueError(f"a session continues {known}; not {type(optimizer).__name__}")


def _spec_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    if isinstance(value, tuple | list):
        return [float(_spec_value(v)) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def _step_of(
    name: str,
    pairs: Sequence[tuple[str, torch.Tensor]],
    states: Sequence[Mapping[str, Any]],
    given: int | None,
) -> int:
    """The session's step count: the parameters' (all the same), or `given` (SGD)."""
    if name == "sgd":
        if given is None:
            if any(states):
                raise ValueError("torch's SGD counts no steps: give step=, the steps taken")
            return 0
        return int(given)
    counts = {int(_number(entry["step"])) for entry in states if entry}
    if any(states) and not all(states):
        missing = next(n for (n, _), entry in zip(pairs, states, strict=True) if not entry)
        raise ValueError(
            f"parameter {missing!r} has no optimizer state while others do (it never had a "
            "gradient): a session steps all its tensors together; leave it out"
        )
    if len(counts) > 1:
        raise ValueError(
            f"the parameters have taken different numbers of steps ({sorted(counts)}); a "
            "session steps all its tensors together"
        )
    found = counts.pop() if counts else 0
    if given is not None and int(given) != found:
        raise ValueError(f"step={given}, but the optimizer's state says {found}")
    return found


def _array_names(
    name: str, group: Mapping[str, Any], states: Sequence[Mapping[str, Any]]
) -> tuple[str, ...]:
    """The state arrays the session keeps for this configuration (SGD's momentum
    buffer once it exists)."""
    if name == "sgd":
        has = any(entry.get("momentum_buffer") is not None for entry in states)
        return ("momentum_buffer",) if has else ()
    if name in ("adam", "adamw"):
        base = ("exp_avg", "exp_avg_sq")
        return (*base, "max_exp_avg_sq") if group["amsgrad"] else base
    if name == "rmsprop":
        names: tuple[str, ...] = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names
    return {
        "adagrad": ("sum",),
        "adadelta": ("square_avg", "acc_delta"),
        "adamax": ("exp_avg", "exp_inf"),
        "nadam": ("exp_avg", "exp_avg_sq"),
        "radam": ("exp_avg", "exp_avg_sq"),
    }[name]


def _initial(name: str, key: str, group: Mapping[str, Any], param: torch.Tensor) -> torch.Tensor:
    """A state array before the first step (a fresh optimizer has none yet)."""
    if name == "adagrad" and key == "sum":
        return torch.full_like(param, float(group["initial_accumulator_value"]))
    return torch.zeros_like(param)


def _mu_product(
    pairs: Sequence[tuple[str, torch.Tensor]], states: Sequence[Mapping[str, Any]]
) -> float:
    values = {float(_number(entry["mu_product"])) for entry in states if entry}
    if len(values) > 1:
        raise ValueError(f"the parameters' mu_product differ: {sorted(values)}")
    return values.pop() if values else 1.0


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _numpy(
    value: torch.Tensor, dtype: np.dtype[Any], shape: tuple[int, ...], tensor: str, key: str
) -> np.ndarray:
    array = value.detach().cpu().numpy()
    if array.shape != shape:
        raise ValueError(f"{key} of {tensor!r} has shape {list(array.shape)}, not {list(shape)}")
    return np.array(array, dtype=dtype)
