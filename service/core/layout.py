"""Flat layout of a session's tensors (docs/design.md, decision 1).

All tensors of a session are laid end to end in one flat vector; a `FlatLayout` keeps
name -> (offset, shape) so the vector can be split back into named views, and gives the
segment boundaries that per-tensor reductions (LAMB's trust ratio, per-tensor clipping)
need.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.core.errors import LayoutError

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the layout: its name, shape and place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class FlatLayout:
    """Ordered tensors laid end to end; `total` is the flat length."""

    specs: tuple[TensorSpec, ...]
    _index: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, TensorSpec] = {}
        expected = 0
        for spec in self.specs:
            if spec.name in index:
                raise LayoutError(f"duplicate tensor name {spec.name!r}")
            if spec.offset != expected:
                raise LayoutError(f"tensor {spec.name!r} starts at {spec.offset}, not {expected}")
            if any(d < 0 for d in spec.shape):
                raise LayoutError(f"tensor {spec.name!r} has a negative dimension {spec.shape}")
            index[spec.name] = spec
            expected = spec.stop
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_shapes(cls, shapes: Iterable[tuple[str, Iterable[int]]]) -> FlatLayout:
        """Build a layout from `(name, shape)` pairs, in the order given."""
        specs: list[TensorSpec] = []
        offset = 0
        for name, shape in shapes:
            spec = TensorSpec(name, tuple(int(d) for d in shape), offset)
            specs.append(spec)
            offset = spec.stop
        return cls(tuple(specs))

    @classmethod
    def single(cls, size: int, name: str = "params") -> FlatLayout:
        """A layout of one 1-D tensor: the default when no layout is given."""
        return cls.from_shapes([(name, (size,))])

    @property
    def total(self) -> int:
        return self.specs[-1].stop if self.specs else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """Segment boundaries: `len(specs) + 1` offsets, first 0, last `total`."""
        return np.array([0, *(s.stop for s in self.specs)], dtype=np.int64)

    def __getitem__(self, name: str) -> TensorSpec:
        try:
            return self._index[name]
        except KeyError:
            raise LayoutError(f"unknown tensor {name!r}", name=name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.specs)

    def flatten(self, tensors: Mapping[str, npt.ArrayLike], dtype: npt.DTypeLike) -> FloatArray:
        """Lay named tensors end to end in a new flat array of `dtype`.

        Every tensor of the layout must be given, with its registered shape, and no other.
        """
        extra = sorted(set(tensors) - set(self._index))
        if extra:
            raise LayoutError(f"unknown tensor {extra[0]!r}", name=extra[0])
        out = np.empty(self.total, dtype=dtype)
        for spec in self.specs:
            if spec.name not in tensors:
                raise LayoutError(f"missing tensor {spec.name!r}", name=spec.name)
            value = np.asarray(tensors[spec.name])
            if value.shape != spec.shape:
                raise LayoutError(
                    f"tensor {spec.name!r} has shape {list(value.shape)}, "
                    f"expected {list(spec.shape)}",
                    name=spec.name,
                )
            out[spec.offset : spec.stop] = value.reshape(-1)
        return out

    def unflatten(self, flat: FloatArray) -> dict[str, FloatArray]:
        """Named views (no copies) of a flat array laid out by this layout."""
        if flat.shape != (self.total,):
            raise LayoutError(f"flat vector has shape {list(flat.shape)}, expected [{self.total}]")
        return {s.name: flat[s.offset : s.stop].reshape(s.shape) for s in self.specs}

    def segment_sum(self, values: FloatArray) -> FloatArray:
        """Sum of `values` over each tensor's segment (one number per tensor).

        The result has the dtype `np.sum` gives (bools are counted as int64, not or-ed).
        """
        out = np.zeros(len(self.specs), dtype=values[:0].sum().dtype)
        for i, spec in enumerate(self.specs):
            out[i] = values[spec.offset : spec.stop].sum()
        return out

    def per_element(self, per_tensor: FloatArray) -> FloatArray:
        """Broadcast one number per tensor back to every element of its segment."""
        sizes = np.array([s.size for s in self.specs], dtype=np.int64)
        return np.repeat(per_tensor, sizes)
