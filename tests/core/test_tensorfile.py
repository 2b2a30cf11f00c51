"""The pure-NumPy safetensors codec: round trips, interop with `safetensors`, bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core import tensorfile
from service.core.tensorfile import TensorFileError, decode, encode

safetensors = pytest.importorskip("safetensors")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

#: every dtype of the format we support, by its safetensors code
DTYPES: dict[str, np.dtype[Any]] = {
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
SHAPES: list[tuple[int, ...]] = [(), (0,), (2, 0, 3), (5,), (3, 4), (2, 1, 3)]
METADATA = {"format": "optserve.state/1", "note": 'ünïcödé, "quotes" and\nnewlines', "": ""}


def sample(dtype: np.dtype[Any], shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that use the dtype's range: extremes, signs, NaN/inf/-0.0 for floats."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    else:
        flat = rng.standard_normal(n).astype(dtype) * dtype.type(100)
        special = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).max], dtype=dtype)
        flat[: min(n, special.size)] = special[: min(n, special.size)]
    return flat.reshape(shape)


def all_tensors() -> dict[str, np.ndarray]:
    return {
        f"{code.lower()}/{'x'.join(map(str, shape)) or 'scalar'}": sample(dt, shape, i)
        for i, (code, dt) in enumerate(DTYPES.items())
        for shape in SHAPES
    }


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert have.tobytes() == np.ascontiguousarray(want).tobytes(), name  # bit for bit


def header_of(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header


def build(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """A safetensors buffer from a header (or raw header bytes) and data."""
    head = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


# --- round trips -------------------------------------------------------------------------


def test_dtype_table_matches_the_codec() -> None:
    assert {k: np.dtype(v) for k, v in tensorfile._DTYPES.items()} == DTYPES


@pytest.mark.parametrize("code", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_each_dtype_and_shape(code: str, shape: tuple[int, ...]) -> None:
    array = sample(DTYPES[code], shape)
    data = encode({"t": array})
    assert header_of(data)["t"]["dtype"] == code
    assert header_of(data)["t"]["shape"] == list(shape)
    tensors, metadata = decode(data)
    assert metadata == {}
    assert_same(tensors, {"t": array})


def test_round_trip_everything_with_metadata() -> None:
    tensors = all_tensors()
    data = encode(tensors, METADATA)
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 8 == 0  # data starts 8-byte aligned
    got, metadata = decode(data)
    assert metadata == METADATA
    assert list(got) == list(tensors)  # order kept
    assert_same(got, tensors)
    for view in (bytearray(data), memoryview(data)):
        again, meta = decode(view)
        assert_same(again, tensors)
        assert meta == METADATA


def test_round_trip_empty_file() -> None:
    assert decode(encode({})) == ({}, {})
    assert decode(encode({}, {"k": "v"})) == ({}, {"k": "v"})


def test_encode_normalizes_layout_and_byte_order() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    tensors = {
        "transposed": base.T,  # not C-contiguous
        "strided": base[:, ::2],
        "big_endian": base.astype(">f8"),
        "big_endian_int": np.arange(5, dtype=">i4"),
    }
    got, _ = decode(encode(tensors))
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got[name], array)
    assert header_of(encode(tensors))["big_endian"]["dtype"] == "F64"


def test_encode_metadata_values_become_strings() -> None:
    _, metadata = decode(encode({}, {"n": 3, "f": 0.5}))  # type: ignore[dict-item]
    assert metadata == {"n": "3", "f": "0.5"}


def test_decode_gives_read_only_views_without_copying() -> None:
    array = np.arange(16, dtype=np.float32)
    for buffer in (encode({"a": array}), bytearray(encode({"a": array}))):
        got, _ = decode(buffer)
        assert not got["a"].flags.writeable, type(buffer).__name__
        with pytest.raises(ValueError, match="read-only"):
            got["a"][0] = 1.0
        assert np.shares_memory(got["a"], np.frombuffer(buffer, dtype=np.uint8))


def test_encode_refusals() -> None:
    with pytest.raises(TensorFileError, match="'__metadata__' is reserved"):
        encode({"__metadata__": np.zeros(1)})
    with pytest.raises(TensorFileError, match=r"tensor 'c': dtype complex128 is not supported"):
        encode({"c": np.zeros(2, dtype=np.complex128)})
    with pytest.raises(TensorFileError, match="tensor 's': dtype <U1 is not supported"):
        encode({"s": np.array(["a"])})


# --- interop with the safetensors package ------------------------------------------------


def test_our_bytes_load_in_safetensors(tmp_path: Path) -> None:
    tensors = all_tensors()
    data = encode(tensors, METADATA)
    assert_same(safetensors_numpy.load(data), tensors)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(data)
    assert_same(safetensors_numpy.load_file(path), tensors)
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == METADATA
        assert set(f.keys()) == set(tensors)


def test_safetensors_bytes_decode_here() -> None:
    tensors = all_tensors()
    data = safetensors_numpy.save(tensors, metadata=METADATA)
    got, metadata = decode(data)
    assert metadata == METADATA
    assert_same(got, tensors)
    got, metadata = decode(safetensors_numpy.save(tensors))
    assert metadata == {}
    assert_same(got, tensors)


# --- corrupt input -----------------------------------------------------------------------


def test_short_buffer() -> None:
    for data in (b"", b"\x00" * 7):
        with pytest.raises(TensorFileError, match="shorter than the 8-byte header length"):
            decode(data)


def test_header_length_too_large() -> None:
    good = encode({"a": np.zeros(3)})
    with pytest.raises(TensorFileError, match=r"header length 1000 does not fit a buffer of 10"):
        decode(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(TensorFileError, match="does not fit"):
        decode(struct.pack("<Q", 2**64 - 1) + good[8:])
    with pytest.raises(TensorFileError, match="does not fit"):
        decode(struct.pack("<Q", tensorfile.MAX_HEADER_BYTES + 1) + b" " * 16)
    with pytest.raises(TensorFileError, match="does not fit"):
        decode(good[:-30])  # truncated inside the header


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b'{"a": 1', b"\xff\xfe{}", b"{}}"], ids=lambda r: repr(r)
)
def test_bad_json(raw: bytes) -> None:
    with pytest.raises(TensorFileError, match="header is not valid JSON"):
        decode(build(None, raw=raw))


@pytest.mark.parametrize("raw", [b"[]", b"3", b'"text"', b"null"])
def test_header_not_an_object(raw: bytes) -> None:
    with pytest.raises(TensorFileError, match="header is not a JSON object"):
        decode(build(None, raw=raw))


@pytest.mark.parametrize("metadata", [[], {"k": 1}, {"k": None}, "text", 0])
def test_bad_metadata(metadata: Any) -> None:
    with pytest.raises(TensorFileError, match="__metadata__ must map strings to strings"):
        decode(build({"__metadata__": metadata}))


def entry(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    info.update(overrides)
    return info


@pytest.mark.parametrize(
    "offsets",
    [[0, 12], [4, 2], [-4, 4], [0], [0, 8, 8], "0-8", [0.0, 8.0], None, [True, 8]],
    ids=str,
)
def test_offsets_out_of_range(offsets: Any) -> None:
    with pytest.raises(TensorFileError, match=r"tensor 'w': data_offsets out of range"):
        decode(build({"w": entry(data_offsets=offsets)}, b"\x00" * 8))


@pytest.mark.parametrize(
    ("info", "data"),
    [
        (entry(shape=[3]), 8),  # 8 bytes, 12 needed
        (entry(shape=[1]), 8),
        (entry(shape=[2, 2], data_offsets=[0, 12]), 16),
        (entry(dtype="F64", shape=[2]), 8),
        (entry(shape=[], data_offsets=[0, 0]), 8),  # a 0-d tensor holds one element
    ],
)
def test_size_mismatch(info: dict[str, Any], data: int) -> None:
    with pytest.raises(TensorFileError, match=r"tensor 'w': \d+ bytes do not hold shape"):
        decode(build({"w": info}, b"\x00" * data))


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "f32", "C64", "", None, 32])
def test_unknown_dtype(dtype: Any) -> None:
    with pytest.raises(TensorFileError, match=r"tensor 'w': unsupported dtype"):
        decode(build({"w": entry(dtype=dtype)}, b"\x00" * 8))


@pytest.mark.parametrize("shape", [[-2], "2", None, [2.0], [[2]], [True, True]], ids=str)
def test_bad_shape(shape: Any) -> None:
    with pytest.raises(TensorFileError, match=r"tensor 'w': shape must be a list of non-neg"):
        decode(build({"w": entry(shape=shape)}, b"\x00" * 8))


@pytest.mark.parametrize("info", [[1, 2], "F32", None, 3])
def test_entry_not_an_object(info: Any) -> None:
    with pytest.raises(TensorFileError, match=r"tensor 'w': entry is not an object"):
        decode(build({"w": info}))


def test_corrupt_tensor_named_among_good_ones() -> None:
    good = encode({"a": np.zeros(2, dtype=np.float32), "b": np.ones(3, dtype=np.int8)})
    header = header_of(good)
    header["b"]["data_offsets"][1] += 1
    data = good[8 + struct.unpack("<Q", good[:8])[0] :]
    with pytest.raises(TensorFileError, match="tensor 'b'"):
        decode(build(header, data))


def test_tensor_file_error_is_a_core_error() -> None:
    from service.core.errors import CoreError

    assert issubclass(TensorFileError, CoreError)
    assert issubclass(TensorFileError, ValueError)
