"""The safetensors codec under hostile input: whatever the bytes, `decode` returns arrays
whose byte sizes match their offsets, or raises `TensorFileError`, never anything else
(the server answers 400 for the one and 500 for the other).

Property tests (hypothesis) over arbitrary bytes and over well-framed files with
arbitrary JSON headers, plus the cases an attacker found, one by one."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients import tensorfile as client_codec
from service.core import tensorfile
from service.core.tensorfile import TensorFileError, decode, encode

DTYPE_CODES = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]
ITEMSIZE = {code: dt.itemsize for code, dt in tensorfile._DTYPES.items()}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(header: Any = None, data: bytes = b"", *, raw: bytes | str | None = None) -> bytes:
    """A safetensors buffer: a correct 8-byte length, the header (JSON of `header`, or
    `raw`), then `data`."""
    if raw is None:
        head = json.dumps(header).encode()
    else:
        head = raw.encode() if isinstance(raw, str) else raw
    return struct.pack("<Q", len(head)) + head + data


def entry(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    info.update(overrides)
    return info


def check_decode(buffer: bytes, **limits: Any) -> None:
    """The property: `decode` returns consistent arrays or raises TensorFileError, both
    in the clients' codec and the server's (which raises its own subclass)."""
    for codec, error in (
        (client_codec, client_codec.TensorFileError),
        (tensorfile, TensorFileError),
    ):
        message = None
        try:
            tensors, metadata = codec.decode(buffer, **limits)
        except error as exc:
            message = str(exc)
        if message is not None:  # refused: it must say what is wrong
            assert message
            continue
        assert isinstance(metadata, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        (n,) = struct.unpack("<Q", buffer[:8])
        header = json.loads(buffer[8 : 8 + n])
        for name, array in tensors.items():
            begin, end = header[name]["data_offsets"]
            assert array.nbytes == end - begin, name
            assert list(array.shape) == header[name]["shape"], name
            assert not array.flags.writeable, name


# --- strategies ----------------------------------------------------------------------------

#: integers of every size: small, around 2**63 and 2**64, and far beyond 64 bits
huge_ints = st.one_of(
    st.integers(-(2**8), 2**8),
    st.integers(2**62, 2**65),
    st.integers(10**29, 10**31),
    st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**60]),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e30, -1e30, 0.0, 2.0, 1e308, float("inf"), float("nan")]),
)
#: text, with lone surrogates (not Unicode text; json.dumps writes them as escapes)
texts = st.one_of(
    st.text(max_size=8),
    st.lists(st.sampled_from(["a", "\ud800", "\udfff", "\ud83d", "\ude00"]), max_size=3).map(
        "".join
    ),
)
scalars = st.one_of(st.none(), st.booleans(), huge_ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
dims = st.one_of(st.integers(0, 4), huge_ints, floats, st.booleans(), st.text(max_size=2))
shapes = st.one_of(
    st.lists(st.integers(0, 3), max_size=4),
    st.lists(dims, max_size=100),
    st.lists(st.integers(0, 1), min_size=60, max_size=100),
    json_values,
)
offsets = st.one_of(
    st.lists(st.integers(0, 64), min_size=2, max_size=2),
    st.lists(huge_ints, min_size=2, max_size=2),
    st.lists(st.one_of(huge_ints, floats, st.booleans()), max_size=3),
    json_values,
)
entries = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(DTYPE_CODES), json_values),
            "shape": shapes,
            "data_offsets": offsets,
        }
    ),
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), json_values),
    json_values,
)
metadata_values = st.one_of(st.dictionaries(texts, texts, max_size=3), json_values)
headers = st.one_of(
    st.dictionaries(texts, entries, max_size=5),
    st.dictionaries(texts, entries, max_size=3).flatmap(
        lambda h: metadata_values.map(lambda m: {**h, "__metadata__": m})
    ),
    json_values,
)


@st.composite
def consistent_files(draw: st.DrawFn) -> bytes:
    """Files whose entries mostly agree with their data (so decoding gets far), with
    shapes that may have zeros and huge dims next to them."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        code = draw(st.sampled_from(DTYPE_CODES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        kind = draw(st.sampled_from(["plain", "zero", "many"]))
        if kind == "zero":  # a zero-size tensor with big dims
            shape = [0, *draw(st.lists(st.one_of(st.integers(0, 3), huge_ints), max_size=4))]
        elif kind == "many":  # around NumPy's 64 dimensions
            shape = [1] * draw(st.integers(60, 100))
        count = int(np.prod(shape, dtype=object)) if shape else 1
        size = count * ITEMSIZE[code]
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = draw(st.binary(min_size=offset, max_size=offset + 8))
    return build(header, data)


# --- properties ----------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes(buffer: bytes) -> None:
    check_decode(buffer)


@FAST
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_arbitrary_header_bytes_behind_a_valid_length(head: bytes, data: bytes) -> None:
    check_decode(build(raw=head, data=data))


@FAST
@given(headers, st.binary(max_size=64), st.sampled_from([None, 0, 1, 3]))
def test_arbitrary_json_headers(header: Any, data: bytes, max_tensors: int | None) -> None:
    try:
        raw = json.dumps(header)
    except ValueError:  # json.dumps refuses nothing generated here but be safe
        return
    check_decode(build(raw=raw, data=data))
    check_decode(build(raw=raw, data=data), max_tensors=max_tensors, max_header_bytes=64)


@FAST
@given(consistent_files())
def test_consistent_files_decode_or_are_refused(buffer: bytes) -> None:
    check_decode(buffer)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.sampled_from(["[", '{"a":', "[1,", '{"w":{"shape":[']))
def test_deep_nesting(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", "[1,": "]", '{"w":{"shape":[': "]}}"}[opener]
    check_decode(build(raw=opener * depth + "0" + closer * depth))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6000), st.booleans())
def test_long_integers_anywhere(digits: int, negative: bool) -> None:
    number = ("-" if negative else "") + "9" * digits
    for raw in (
        f'{{"w":{{"dtype":"F32","shape":[{number}],"data_offsets":[0,0]}}}}',
        f'{{"w":{{"dtype":"F32","shape":[0],"data_offsets":[0,{number}]}}}}',
        f'{{"w":{{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":{number}}}}}',
        f'{{"__metadata__":{{"k":{number}}}}}',
    ):
        check_decode(build(raw=raw))


# --- the attacker's cases ------------------------------------------------------------------


def refused(buffer: bytes, match: str, **limits: Any) -> None:
    with pytest.raises(client_codec.TensorFileError, match=match):
        client_codec.decode(buffer, **limits)
    with pytest.raises(TensorFileError, match=match):
        decode(buffer, **limits)


def test_shape_with_a_float_dimension() -> None:
    buffer = build({"w": entry(shape=[0, 1e30], data_offsets=[0, 0])})
    refused(buffer, r"tensor 'w': shape must be a list of non-negative integers: found 1e\+30")


def test_shape_with_a_dimension_beyond_64_bits() -> None:
    buffer = build({"w": entry(shape=[0, 10**30], data_offsets=[0, 0])})
    refused(buffer, rf"tensor 'w': dimension {10**30} of shape .* is not below 2\*\*63")
    refused(build({"w": entry(shape=[2**63], data_offsets=[0, 0])}), "not below 2\\*\\*63")


def test_zero_size_shape_numpy_cannot_make() -> None:
    # no bytes, but NumPy addresses the non-zero dims: 2**62 * 2 * 4 bytes is too many
    buffer = build({"w": entry(shape=[0, 2**62, 2], data_offsets=[0, 0])})
    refused(buffer, r"tensor 'w': shape \[0, 4611686018427387904, 2\] of F32 is too large")
    ok, _ = decode(build({"w": entry(shape=[0, 2**40, 3], data_offsets=[0, 0])}))
    assert ok["w"].shape == (0, 2**40, 3)


def test_more_than_64_dimensions() -> None:
    buffer = build({"w": entry(shape=[1] * 70, data_offsets=[0, 4])}, b"\x00" * 4)
    refused(buffer, r"tensor 'w': shape has 70 dimensions, more than the 64 NumPy allows")
    got, _ = decode(build({"w": entry(shape=[1] * 64, data_offsets=[0, 4])}, b"\x00" * 4))
    assert got["w"].ndim == 64


def test_a_5000_digit_integer_anywhere() -> None:
    number = "7" * 5000
    for raw in (
        f'{{"w":{{"dtype":"F32","shape":[{number}],"data_offsets":[0,0]}}}}',
        f'{{"w":{{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":[{number}]}}}}',
        f'{{"__metadata__":{{"a":"b"}},"x":{number}}}',
    ):
        refused(build(raw=raw), "header holds an integer of 5000 digits")


def test_nesting_100000_deep() -> None:
    for raw in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        refused(build(raw=raw), "header is not valid JSON: nested too deeply")


def test_a_tensor_named_twice() -> None:
    one = json.dumps(entry(shape=[0], data_offsets=[0, 0]))
    refused(build(raw=f'{{"w":{one},"w":{one}}}'), "header names 'w' twice")
    refused(build(raw='{"__metadata__":{"k":"a","k":"b"}}'), "header names 'k' twice")
    refused(
        build(raw='{"w":{"dtype":"F32","dtype":"F64","shape":[0],"data_offsets":[0,0]}}'),
        "header names 'dtype' twice",
    )


def test_more_tensors_than_allowed() -> None:
    tensors = {f"t{i}": np.zeros(1, np.float32) for i in range(5)}
    buffer = encode(tensors, {"k": "v"})
    refused(buffer, "header has 5 tensors, over the limit of 4", max_tensors=4)
    got, metadata = decode(buffer, max_tensors=5)  # __metadata__ is not a tensor
    assert len(got) == 5
    assert metadata == {"k": "v"}


def test_header_over_the_limit() -> None:
    buffer = encode({"w": np.zeros(3, np.float32)}, {"note": "x" * 1000})
    (n,) = struct.unpack("<Q", buffer[:8])
    refused(buffer, rf"header of {n} bytes is over the limit of 100 bytes", max_header_bytes=100)
    got, _ = decode(buffer, max_header_bytes=n)
    assert got["w"].shape == (3,)


def test_header_length_that_does_not_fit_is_still_said_so() -> None:
    refused(struct.pack("<Q", 2**64 - 1) + b"{}", "does not fit a buffer of 10 bytes")


def test_wrong_types_name_the_value_briefly() -> None:
    deep: Any = 0
    for _ in range(500):
        deep = [deep]
    buffer = build({"w": entry(dtype=deep, shape=[0], data_offsets=[0, 0])})
    refused(buffer, r"tensor 'w': unsupported dtype a list of 1 items")
    long_name = "n" * 10_000
    buffer = build({long_name: 3})
    with pytest.raises(TensorFileError) as info:
        decode(buffer)
    assert len(str(info.value)) < 300
    assert "entry is not an object" in str(info.value)


def test_lone_surrogates() -> None:
    for raw in (
        '{"\\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
        '{"__metadata__": {"k": "x\\udfff"}}',
        '{"__metadata__": {"\\uDBFF": "v"}}',
        '{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": ["\\ud800"]}}',
    ):
        refused(build(raw=raw), "lone surrogate: not Unicode text")
    # a pair is one character
    _, metadata = decode(build(raw='{"__metadata__": {"k": "\\ud83d\\ude00"}}'))
    assert metadata == {"k": "\U0001f600"}


def test_not_utf8_and_not_contiguous() -> None:
    refused(build(raw=b'{"\xff": 1}'), "header is not valid JSON")
    strided = memoryview(encode({"w": np.zeros(2, np.float32)}))[::2]
    refused(strided, "not a contiguous byte buffer")  # type: ignore[arg-type]


def test_valid_files_still_decode_as_views() -> None:
    array = np.arange(6, dtype=np.float64).reshape(2, 3)
    buffer = bytearray(encode({"a": array, "empty": np.zeros((0, 4), np.int8)}, {"k": "v"}))
    got, metadata = decode(buffer, max_tensors=2, max_header_bytes=4096)
    assert metadata == {"k": "v"}
    np.testing.assert_array_equal(got["a"], array)
    assert np.shares_memory(got["a"], np.frombuffer(buffer, dtype=np.uint8))
    assert not got["a"].flags.writeable
    assert got["empty"].shape == (0, 4)


@pytest.mark.parametrize(
    ("entries", "data", "match"),
    [
        # two tensors over the same bytes: a polyglot file safetensors refuses
        ({"a": entry(), "b": entry()}, bytes(8), "overlap"),
        ({"a": entry(), "b": entry(shape=[1], data_offsets=[4, 8])}, bytes(8), "overlap"),
        ({"a": entry(data_offsets=[8, 16])}, bytes(16), "gap"),  # bytes 0..8 unindexed
        ({"a": entry(), "b": entry(data_offsets=[12, 20])}, bytes(20), "gap"),
        ({"a": entry()}, bytes(12), "4 bytes after the last tensor"),
    ],
)
def test_data_must_be_tiled_by_the_tensors(
    entries: dict[str, Any], data: bytes, match: str
) -> None:
    """safetensors: the byte buffer is entirely indexed and has no holes; offsets that
    overlap, skip bytes or leave bytes at the end are refused (both codecs)."""
    buffer = build(entries, data)
    for codec in (client_codec, tensorfile):
        with pytest.raises(codec.TensorFileError, match=match):
            codec.decode(buffer)
    check_decode(buffer)


def test_tiled_files_in_any_header_order_decode() -> None:
    """Tiling is checked on the spans sorted by offset: the header's order is free, and
    empty tensors may sit anywhere (their span is empty)."""
    entries = {
        "b": entry(data_offsets=[8, 16]),
        "empty": entry(shape=[0], data_offsets=[8, 8]),
        "a": entry(),
    }
    tensors, _ = decode(build(entries, np.arange(4, dtype=np.float32).tobytes()))
    assert tensors["a"].tolist() == [0.0, 1.0]
    assert tensors["b"].tolist() == [2.0, 3.0]
    assert tensors["empty"].shape == (0,)
