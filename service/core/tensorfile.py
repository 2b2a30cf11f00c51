"""The safetensors file format, read and written with NumPy alone.

The codec lives in `wire/tensorfile.py`, which the clients import too (they speak the
same wire format; neither side imports the other); this module re-exports it for the
server, with one
difference: its `TensorFileError` is also a `CoreError`, so the API's error handlers
map a bad body to a problem like every other refusal of the core. `encode` and `decode`
here raise that error (the clients' `TensorFileError` is a base class of it).

Layout: 8-byte little-endian header length N, N bytes of JSON header mapping each tensor
name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of
the header), an optional `"__metadata__"` map of strings, then the raw little-endian
data. This is the binary wire format of docs/api.md and the form optimizer state is stored
in. Nothing here unpickles; decoding returns read-only views of the input buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from service.core.errors import CoreError
from wire import tensorfile as _codec
from wire.tensorfile import _CODES as _CODES  # the dtype tables, for tests and tools
from wire.tensorfile import _DTYPES as _DTYPES
from wire.tensorfile import MAX_DIMS, MAX_HEADER_BYTES, MAX_INT_DIGITS


class TensorFileError(CoreError, _codec.TensorFileError):
    """A buffer that is not a valid safetensors file (a `CoreError` of the server)."""


def encode(
    tensors: Mapping[str, npt.NDArray[np.generic]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize named arrays (and string metadata) to safetensors bytes."""
    try:
        return _codec.encode(tensors, metadata)
    except _codec.TensorFileError as exc:
        raise TensorFileError(*exc.args) from exc


def decode(
    buffer: bytes | bytearray | memoryview,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into `(tensors, metadata)`.

    Arrays are read-only views of `buffer` where alignment allows (no copy). Any input
    either decodes or raises `TensorFileError` (a header over `max_header_bytes`, more
    tensors than `max_tensors` when given, and every malformation `wire.tensorfile`
    refuses).
    """
    try:
        return _codec.decode(buffer, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    except _codec.TensorFileError as exc:
        raise TensorFileError(*exc.args) from exc


__all__ = ["MAX_DIMS", "MAX_HEADER_BYTES", "MAX_INT_DIGITS", "TensorFileError", "decode", "encode"]
