"""The safetensors file format, read and written with NumPy alone.

Layout: 8-byte little-endian header length N, N bytes of JSON header mapping each tensor
name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of
the header), an optional `"__metadata__"` map of strings, then the raw little-endian
data. This is the binary wire format of docs/api.md and the form optimizer state is stored
in. Nothing here unpickles; decoding returns read-only views of the input buffer.

This module is shared by the clients (`clients.tensorfile` re-exports it) and the server
(`service.core.tensorfile` wraps it): it imports NumPy and the standard library only.
"""

from __future__ import annotations

import json
import re
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
#: the most dimensions a shape may have (NumPy's maximum)
MAX_DIMS = 64
#: the most digits an integer of the header may have (2**64 has 20)
MAX_INT_DIGITS = 40
#: dimensions (and the bytes NumPy addresses) are below this (NumPy's signed 64-bit sizes)
_DIM_LIMIT = 2**63
#: a JSON escape of a UTF-16 surrogate (paired ones make one character; lone ones are
#: not Unicode text, which UTF-8 encoders, orjson's included, refuse)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


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


def decode(
    buffer: bytes | bytearray | memoryview,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into `(tensors, metadata)`.

    Arrays are read-only views of `buffer` where alignment allows (no copy).

    Whatever the bytes, this returns or raises `TensorFileError` (never another
    exception): a header over `max_header_bytes`, with more than `max_tensors` tensors
    (when given), not UTF-8 or holding a lone surrogate (`"\\ud800"`), a tensor or key
    named twice, an integer of more than `MAX_INT_DIGITS` digits, nesting too deep to
    parse, a shape of more than `MAX_DIMS` dimensions, a dimension of 2**63 or more, or
    a shape NumPy cannot address are refused like any malformed file. Element counts are
    Python integers, compared exactly with each tensor's byte span.
    """
    try:
        view = memoryview(buffer).cast("B")
    except (TypeError, ValueError) as exc:
        raise TensorFileError(f"not a contiguous byte buffer: {exc}") from None
    if len(view) < 8:
        raise TensorFileError("buffer is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", view[:8])
    if 8 + n > len(view):
        raise TensorFileError(f"header length {n} does not fit a buffer of {len(view)} bytes")
    if n > max_header_bytes:
        raise TensorFileError(f"header of {n} bytes is over the limit of {max_header_bytes} bytes")
    header = _load_header(bytes(view[8 : 8 + n]))
    count = len(header) - ("__metadata__" in header)
    if max_tensors is not None and count > max_tensors:
        raise TensorFileError(f"header has {count} tensors, over the limit of {max_tensors}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TensorFileError("__metadata__ must map strings to strings")
    data = view[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        tensors[name], begin, end = _tensor(name, info, data)
        spans.append((begin, end, name))
    _check_tiling(spans, len(data))
    return tensors, dict(metadata)


def _check_tiling(spans: list[tuple[int, int, str]], size: int) -> None:
    """The tensors' byte spans tile the data exactly, as safetensors requires ("entirely
    indexed, no holes": it prevents polyglot files): no two overlap, none leaves a gap
    before the next, and the last ends where the buffer does."""
    at = 0
    for begin, end, name in sorted(spans):
        if begin < at:
            raise _refused(name, f"data_offsets [{begin}, {end}] overlap another tensor's")
        if begin > at:
            raise _refused(name, f"data_offsets [{begin}, {end}] leave a gap after byte {at}")
        at = end
    if at != size:
        raise TensorFileError(f"{size - at} bytes after the last tensor's data: not indexed")


def _load_header(raw: bytes) -> dict[str, object]:
    """The header's JSON object (UTF-8); any failure of the parser is a `TensorFileError`."""
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except TensorFileError:
        raise
    except RecursionError:
        raise TensorFileError("header is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not valid JSON: {exc}") from None
    except (ValueError, OverflowError, TypeError) as exc:  # what else json may raise
        raise TensorFileError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(header)
    return header


def _check_unicode(header: dict[str, object]) -> None:
    """Every string of the header (keys included) is Unicode text: a lone surrogate
    (`"\\ud800"`) is refused, as safetensors refuses it. Iterative: any depth."""
    stack: list[object] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise TensorFileError(
                    f"header holds {_short(item)}, with a lone surrogate: not Unicode text"
                ) from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object; a key given twice (a tensor named twice) is refused, not overwritten."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise TensorFileError(f"header names {_short(key)} twice (a duplicate key)")
            seen.add(key)
    return out


def _bounded_int(text: str) -> int:
    """A JSON integer, refused before conversion when it has too many digits (int() of a
    long digit string is slow, and refused by Python past its conversion limit)."""
    if len(text) > MAX_INT_DIGITS:
        digits = len(text) - text.startswith("-")
        if digits > MAX_INT_DIGITS:
            raise TensorFileError(
                f"header holds an integer of {digits} digits (at most {MAX_INT_DIGITS} are read)"
            )
    return int(text)


def _tensor(name: str, info: object, data: memoryview) -> tuple[np.ndarray, int, int]:
    """The tensor `info` describes, and its byte span in `data`."""
    if not isinstance(info, dict):
        raise _refused(name, "entry is not an object")
    code = info.get("dtype")
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise _refused(name, f"unsupported dtype {_short(code)}")
    shape = info.get("shape")
    if not isinstance(shape, list):
        raise _refused(name, f"shape must be a list of non-negative integers, not {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise _refused(
            name, f"shape has {len(shape)} dimensions, more than the {MAX_DIMS} NumPy allows"
        )
    count = 1  # elements, a Python int: exact whatever the dims
    extent = dtype.itemsize  # bytes NumPy must be able to address: the non-zero dims
    for d in shape:
        if type(d) is not int or d < 0:  # bool is not a size; floats, strings, ... neither
            raise _refused(
                name, f"shape must be a list of non-negative integers: found {_short(d)}"
            )
        if d >= _DIM_LIMIT:
            raise _refused(name, f"dimension {d} of shape {shape} is not below 2**63")
        count *= d
        extent *= d or 1
    offsets = info.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and type(offsets[0]) is int  # JSON integers (`true` loads as bool: not an offset)
        and type(offsets[1]) is int
        and 0 <= offsets[0] <= offsets[1] <= len(data)
    ):
        raise _refused(name, "data_offsets out of range")
    begin, end = offsets
    if end - begin != count * dtype.itemsize:
        raise _refused(name, f"{end - begin} bytes do not hold shape {shape} of {code}")
    if extent >= _DIM_LIMIT:
        raise _refused(
            name,
            f"shape {shape} of {code} is too large for NumPy (its non-zero dimensions must "
            "span fewer than 2**63 bytes)",
        )
    try:
        array = np.frombuffer(data[begin:end], dtype=dtype, count=count).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:  # checked above; a safety net
        raise _refused(name, f"shape {shape} cannot be made: {exc}") from None
    array.flags.writeable = False  # a writable buffer (bytearray) must not be written through
    return array, begin, end


def _refused(name: str, problem: str) -> TensorFileError:
    return TensorFileError(f"tensor {_short(name)}: {problem}")


def _short(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message, shortened (a name or a value may be megabytes long;
    a list or an object is named by its kind, not printed)."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f" (+{len(value) - limit} characters)"
    return repr(value)


__all__ = ["MAX_DIMS", "MAX_HEADER_BYTES", "MAX_INT_DIGITS", "TensorFileError", "decode", "encode"]
