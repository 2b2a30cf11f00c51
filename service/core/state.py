"""Optimizer state: named flat arrays plus scalars, serialized exactly.

`OptState.to_bytes()` writes a safetensors file (service.core.tensorfile): each array as
itself, each scalar as a 0-d tensor (float64, int64 or bool), so a round trip through
bytes is bit for bit, NaN payloads and signed zeros included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.core import tensorfile
from service.core.errors import StateError

Scalar = float | int | bool
_SCALAR_DTYPES: dict[type, np.dtype[np.generic]] = {
    bool: np.dtype("?"),
    int: np.dtype("<i8"),
    float: np.dtype("<f8"),
}
_FORMAT = "optserve.state/1"


@dataclass
class OptState:
    """State of one optimizer over a flat parameter vector.

    `arrays` are flat vectors of the session's length and dtype (`exp_avg`, ...);
    `scalars` are plain Python numbers (`step`, `mu_product`, ...).
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.scalars.get("step", 0))

    def advance(self) -> int:
        """Count one more step (`scalars["step"] += 1`) and return the new count."""
        step = self.step + 1
        self.scalars["step"] = step
        return step

    def copy(self) -> OptState:
        """A deep copy: new arrays, same scalars."""
        return OptState({k: v.copy() for k, v in self.arrays.items()}, dict(self.scalars))

    def to_bytes(self) -> bytes:
        tensors: dict[str, np.ndarray] = {}
        for name, array in self.arrays.items():
            if array.ndim != 1:
                raise StateError(f"state array {name!r} must be flat, has shape {array.shape}")
            tensors[name] = array
        for name, value in self.scalars.items():
            if name in tensors:
                raise StateError(f"{name!r} is both an array and a scalar")
            dtype = _SCALAR_DTYPES.get(type(value))
            if dtype is None:
                raise StateError(f"scalar {name!r} has unsupported type {type(value).__name__}")
            tensors[name] = np.array(value, dtype=dtype)
        return tensorfile.encode(tensors, {"format": _FORMAT})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> OptState:
        tensors, metadata = tensorfile.decode(data)
        if metadata.get("format") != _FORMAT:
            raise StateError(f"not an optimizer state (format {metadata.get('format')!r})")
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Scalar] = {}
        for name, value in tensors.items():
            if value.ndim == 0:
                scalars[name] = value.item()
            else:
                arrays[name] = value.copy()  # writable, owned
        return cls(arrays, scalars)

    def equals(self, other: OptState) -> bool:
        """Bit-for-bit equality (NaNs compare by their bytes)."""
        if self.arrays.keys() != other.arrays.keys() or self.scalars.keys() != other.scalars.keys():
            return False
        for k, a in self.arrays.items():
            b = other.arrays[k]
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                return False
        for k, x in self.scalars.items():
            y = other.scalars[k]
            if type(x) is not type(y):
                return False
            if np.array(x).tobytes() != np.array(y).tobytes():
                return False
        return True
