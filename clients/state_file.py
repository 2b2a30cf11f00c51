"""A session state file (docs/state.md) as NumPy arrays: `StateFile`.

`OptimizerClient.export_state` answers a session's whole state as safetensors bytes;
`StateFile.from_bytes` reads them into the params, the state arrays (each split per
parameter tensor, as in the file) and scalars, by name in the session's layout order,
with the metadata as it came; `to_bytes` writes them back (the same bytes for a file
read and not changed). `StateFile.build` makes one from parts, for converters
(clients/torch_state.py) and tools; the server validates what it is sent
(`import_state`, `replace_state`).

NumPy only: no torch, no httpx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients import tensorfile

#: the `format` of a state file
FORMAT = "optserve.session/1"
#: the `format` of the spec it holds
SPEC_FORMAT = 1

Scalar = int | float | bool


@dataclass
class StateFile:
    """A state file: tensors by role and name, metadata as strings (docs/state.md).

    `params[name]`: each parameter tensor; `arrays[key][name]`: each state array
    (`exp_avg`, ..., and the session's own: `ema.avg`, `acc.sum`, ...) of each tensor;
    `scalars[key]`: each state scalar (`step`, `mu_product`, `ema.n`, ...), an int,
    float or bool; `metadata`: the file's `__metadata__` (the spec, counters, schedule
    state and `extra` as JSON strings; see the properties).
    """

    metadata: dict[str, str]
    params: dict[str, np.ndarray]
    arrays: dict[str, dict[str, np.ndarray]]
    scalars: dict[str, Scalar]

    # reading and writing -------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> StateFile:
        """Read a state file (ValueError if it is not one)."""
        tensors, metadata = tensorfile.decode(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not a session state file (format {metadata.get('format')!r})")
        try:
            names = [str(entry[0]) for entry in json.loads(metadata["spec"])["layout"]]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"the state file's spec has no readable layout: {exc}") from None
        params: dict[str, np.ndarray] = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        scalars: dict[str, Scalar] = {}
        for key, value in tensors.items():
            role, _, rest = key.partition("/")
            if role == "params" and rest:
                params[rest] = np.array(value)
            elif role == "state" and "/" in rest:
                array_key, _, name = rest.partition("/")
                arrays.setdefault(array_key, {})[name] = np.array(value)
            elif role == "scalar" and rest and value.ndim == 0:
                scalars[rest] = value.item()
            else:
                raise ValueError(f"not a state file's tensor: {key!r}")
        for where, parts in (("params", params), *((f"state/{k}", v) for k, v in arrays.items())):
            if set(parts) != set(names):
                raise ValueError(f"{where}: tensors {sorted(parts)}, the layout {sorted(names)}")
        ordered = {k: {n: v[n] for n in names} for k, v in arrays.items()}
        return cls(dict(metadata), {n: params[n] for n in names}, ordered, scalars)

    def to_bytes(self) -> bytes:
        """The file: params (layout order), state arrays and scalars (keys sorted), and
        the metadata, as the server writes them."""
        tensors: dict[str, np.ndarray] = {
            f"params/{n}": np.asarray(v) for n, v in self.params.items()
        }
        for key in sorted(self.arrays):
            for name, value in self.arrays[key].items():
                tensors[f"state/{key}/{name}"] = np.asarray(value)
        for key in sorted(self.scalars):
            tensors[f"scalar/{key}"] = _scalar_array(self.scalars[key])
        return tensorfile.encode(tensors, self.metadata)

    @classmethod
    def build(
        cls,
        spec: Mapping[str, Any],
        params: Mapping[str, np.ndarray],
        arrays: Mapping[str, Mapping[str, np.ndarray]],
        scalars: Mapping[str, Scalar],
        *,
        step: int,
        version: int | None = None,
        skipped: int = 0,
        schedule_state: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        lr: float | None = None,
    ) -> StateFile:
        """A state file from its parts. `spec` needs `optimizer` and `dtype` (its
        `layout` is made from `params`, in their order, when absent); `version`
        defaults to `step`; `lr` (the rate of the next step) is informational."""
        layout = [[name, list(np.shape(value))] for name, value in params.items()]
        full = {"format": SPEC_FORMAT, **spec}
        full.setdefault("layout", layout)
        metadata = {
            "format": FORMAT,
            "spec": _dumps(full),
            "step": str(_count("step", step)),
            "version": str(_count("version", step if version is None else version)),
            "skipped": str(_count("skipped", skipped)),
            "schedule_state": _dumps(None if schedule_state is None else dict(schedule_state)),
            "extra": _dumps(dict(extra or {})),
        }
        if lr is not None:
            metadata["lr"] = repr(float(lr))
        return cls(
            metadata,
            {n: np.asarray(v) for n, v in params.items()},
            {k: {n: np.asarray(a) for n, a in v.items()} for k, v in arrays.items()},
            dict(scalars),
        )

    # what the metadata says ----------------------------------------------------------------

    @property
    def spec(self) -> dict[str, Any]:
        """The session's configuration (`optimizer`, `schedule`, `dtype`, `layout`, ...)."""
        spec: dict[str, Any] = json.loads(self.metadata["spec"])
        return spec

    @property
    def optimizer(self) -> dict[str, Any]:
        """The optimizer spec: `name` and hyperparameters (torch.optim's names)."""
        optimizer: dict[str, Any] = self.spec["optimizer"]
        return optimizer

    @property
    def names(self) -> list[str]:
        """The tensor names, in the layout's order."""
        return list(self.params)

    @property
    def dtype(self) -> np.dtype[Any]:
        dtype: np.dtype[Any] = np.dtype(str(self.spec["dtype"]))
        return dtype

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def version(self) -> int:
        return int(self.metadata["version"])

    @property
    def lr(self) -> float:
        """The rate of the session's next step (the file's `lr`; without one, the
        optimizer's `lr`)."""
        if "lr" in self.metadata:
            return float(self.metadata["lr"])
        return float(self.optimizer["lr"])

    @property
    def schedule_state(self) -> Any:
        return json.loads(self.metadata.get("schedule_state", "null"))

    @property
    def extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = json.loads(self.metadata.get("extra", "{}"))
        return extra


def _scalar_array(value: Scalar) -> np.ndarray:
    if isinstance(value, bool | np.bool_):
        return np.array(bool(value), dtype=np.bool_)
    if isinstance(value, int | np.integer):
        return np.array(int(value), dtype="<i8")
    return np.array(float(value), dtype="<f8")


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be an int >= 0: got {value!r}")
    return int(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


__all__ = ["FORMAT", "StateFile"]
