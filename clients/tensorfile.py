"""The safetensors file format, read and written with NumPy alone.

Layout: 8-byte little-endian header length N, N bytes of JSON header mapping each tensor
name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of
the header), an optional `"__metadata__"` map of strings, then the raw little-endian
data. This is the binary wire format of API.md and the form optimizer state is stored
in. Nothing here unpickles; decoding returns read-only views of the input buffer.

This module is shared by the clients and the server (`service.core.tensorfile`
re-exports it): it imports NumPy and the standard library only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

_DTYPES: dict[str, np.dtype[np.generic]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorFileError(ValueError):
    """A buffer that is not a valid safetensors file, or tensors that cannot be written.

    (`service.core.tensorfile.TensorFileError`, what the server raises, subclasses this
    and the core's `CoreError`.)
    """


def encode(
    tensors: Mapping[str, npt.NDArray[np.generic]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize named arrays (and string metadata) to safetensors bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        if name == "__metadata__":
            raise TensorFileError("'__metadata__' is reserved and cannot name a tensor")
        arr = np.asarray(array)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        code = _CODES.get(np.dtype(dtype))
        if code is None:
            raise TensorFileError(f"tensor {name!r}: dtype {arr.dtype} is not supported")
        data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return b"".join([struct.pack("<Q", len(raw)), raw, *chunks])


def decode(buffer: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into `(tensors, metadata)`.

    Arrays are read-only views of `buffer` where alignment allows (no copy).
    """
    view = memoryview(buffer).cast("B")
    if len(view) < 8:
        raise TensorFileError("buffer is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(view):
        raise TensorFileError(f"header length {n} does not fit a buffer of {len(view)} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TensorFileError("__metadata__ must map strings to strings")
    data = view[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        tensors[name] = _tensor(name, info, data)
    return tensors, dict(metadata)


def _tensor(name: str, info: object, data: memoryview) -> np.ndarray:
    if not isinstance(info, dict):
        raise TensorFileError(f"tensor {name!r}: entry is not an object")
    dtype = _DTYPES.get(str(info.get("dtype")))
    if dtype is None:
        raise TensorFileError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise TensorFileError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= len(data)
    ):
        raise TensorFileError(f"tensor {name!r}: data_offsets out of range")
    count = 1
    for d in shape:
        count *= d
    begin, end = offsets
    if end - begin != count * dtype.itemsize:
        raise TensorFileError(
            f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {info['dtype']}"
        )
    array = np.frombuffer(data[begin:end], dtype=dtype, count=count).reshape(shape)
    array.flags.writeable = False  # a writable buffer (bytearray) must not be written through
    return array


def _is_int(value: object) -> bool:
    """A JSON integer (`true`/`false` load as bool, a subclass of int: not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["MAX_HEADER_BYTES", "TensorFileError", "decode", "encode"]
