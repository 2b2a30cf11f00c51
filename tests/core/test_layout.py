"""FlatLayout: flatten/unflatten, views, errors naming the tensor, segment reductions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core.errors import CoreError, LayoutError
from service.core.layout import FlatLayout, TensorSpec

SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("w1", (7, 5)),
    ("b1", (5,)),
    ("empty", (0, 3)),
    ("w2", (3, 4, 2)),
    ("scale", ()),
]
LAYOUT = FlatLayout.from_shapes(SHAPES)
DTYPES = [np.float32, np.float64]


def tensors(dtype: Any = np.float64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES}


def test_specs_offsets_and_sizes() -> None:
    assert LAYOUT.names == ("w1", "b1", "empty", "w2", "scale")
    assert len(LAYOUT) == 5
    assert LAYOUT.total == 35 + 5 + 0 + 24 + 1
    assert LAYOUT.offsets.tolist() == [0, 35, 40, 40, 64, 65]
    assert LAYOUT.offsets.dtype == np.int64
    assert LAYOUT["w2"] == TensorSpec("w2", (3, 4, 2), 40)
    assert LAYOUT["w2"].size == 24
    assert LAYOUT["w2"].stop == 64
    assert LAYOUT["scale"].size == 1  # 0-d: one element
    assert LAYOUT["empty"].size == 0
    assert "b1" in LAYOUT
    assert "nope" not in LAYOUT
    assert 3 not in LAYOUT


def test_single_and_empty_layouts() -> None:
    single = FlatLayout.single(6)
    assert single.names == ("params",)
    assert single["params"].shape == (6,)
    assert FlatLayout.single(4, name="x").names == ("x",)
    empty = FlatLayout.from_shapes([])
    assert empty.total == 0
    assert empty.offsets.tolist() == [0]
    assert empty.flatten({}, np.float32).shape == (0,)
    assert empty.unflatten(np.zeros(0)) == {}
    assert empty.segment_sum(np.zeros(0)).shape == (0,)
    assert empty.per_element(np.zeros(0)).shape == (0,)


def test_from_shapes_accepts_any_iterables() -> None:
    layout = FlatLayout.from_shapes(iter([("a", [2, np.int64(3)]), ("b", iter(()))]))
    assert layout["a"].shape == (2, 3)
    assert all(type(d) is int for d in layout["a"].shape)
    assert layout["b"].shape == ()
    assert layout == FlatLayout.from_shapes([("a", (2, 3)), ("b", ())])


@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten_unflatten_round_trip(dtype: Any) -> None:
    named = tensors(dtype)
    flat = LAYOUT.flatten(named, dtype)
    assert flat.shape == (LAYOUT.total,)
    assert flat.dtype == np.dtype(dtype)
    # laid end to end in layout order
    expected = np.concatenate([named[n].reshape(-1) for n, _ in SHAPES])
    assert flat.tobytes() == expected.tobytes()
    back = LAYOUT.unflatten(flat)
    assert list(back) == list(LAYOUT.names)
    for name, value in named.items():
        assert back[name].shape == value.shape
        assert back[name].dtype == value.dtype
        assert back[name].tobytes() == value.tobytes()
    assert LAYOUT.flatten(back, dtype).tobytes() == flat.tobytes()


def test_flatten_casts_and_copies() -> None:
    named = tensors(np.float64)
    flat = LAYOUT.flatten(named, np.float32)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat[:35], named["w1"].reshape(-1).astype(np.float32))
    # a new array: changing it leaves the inputs alone, and the other way round
    before = {k: v.copy() for k, v in named.items()}
    flat[...] = 0
    for k in named:
        np.testing.assert_array_equal(named[k], before[k])
    named["w1"][...] = 7
    assert not np.shares_memory(flat, named["w1"])
    # lists and scalars are accepted as array-likes
    small = FlatLayout.from_shapes([("v", (2,)), ("s", ())])
    assert small.flatten({"v": [1, 2], "s": 3.5}, np.float64).tolist() == [1.0, 2.0, 3.5]


def test_unflatten_gives_views_not_copies() -> None:
    flat = LAYOUT.flatten(tensors(), np.float64)
    views = LAYOUT.unflatten(flat)
    for name, view in views.items():
        if view.size:
            assert np.shares_memory(view, flat), name
        assert view.base is flat or (view.base is not None and view.base.base is flat)
    views["w2"][1, 2, 0] = 123.0
    assert flat[LAYOUT["w2"].offset + 1 * 8 + 2 * 2 + 0] == 123.0
    views["scale"][...] = -1.0
    assert flat[-1] == -1.0
    flat[35:40] = 9.0
    np.testing.assert_array_equal(views["b1"], np.full(5, 9.0))


def test_flatten_unknown_tensor_is_named() -> None:
    named = tensors()
    named["bias_9"] = np.zeros(3)
    with pytest.raises(LayoutError, match="unknown tensor 'bias_9'") as info:
        LAYOUT.flatten(named, np.float64)
    assert info.value.name == "bias_9"


def test_flatten_missing_tensor_is_named() -> None:
    named = tensors()
    del named["w2"]
    with pytest.raises(LayoutError, match="missing tensor 'w2'") as info:
        LAYOUT.flatten(named, np.float64)
    assert info.value.name == "w2"


@pytest.mark.parametrize(
    ("name", "shape"),
    [("w1", (5, 7)), ("w1", (35,)), ("b1", (5, 1)), ("scale", (1,)), ("empty", (3, 0))],
)
def test_flatten_wrong_shape_is_named(name: str, shape: tuple[int, ...]) -> None:
    named = tensors()
    named[name] = np.zeros(shape)
    expected = list(LAYOUT[name].shape)
    with pytest.raises(
        LayoutError,
        match=rf"tensor '{name}' has shape \[{', '.join(map(str, shape))}\], expected "
        + rf"\[{', '.join(map(str, expected))}\]",
    ) as info:
        LAYOUT.flatten(named, np.float64)
    assert info.value.name == name


def test_getitem_unknown_is_named() -> None:
    with pytest.raises(LayoutError, match="unknown tensor 'nope'") as info:
        LAYOUT["nope"]
    assert info.value.name == "nope"


@pytest.mark.parametrize("shape", [(64,), (66,), (65, 1), ()])
def test_unflatten_wrong_length(shape: tuple[int, ...]) -> None:
    with pytest.raises(LayoutError, match=r"flat vector has shape .*, expected \[65\]"):
        LAYOUT.unflatten(np.zeros(shape))


def test_bad_layouts() -> None:
    with pytest.raises(LayoutError, match="duplicate tensor name 'a'"):
        FlatLayout.from_shapes([("a", (2,)), ("a", (3,))])
    with pytest.raises(LayoutError, match="tensor 'b' starts at 3, not 2"):
        FlatLayout((TensorSpec("a", (2,), 0), TensorSpec("b", (2,), 3)))
    with pytest.raises(LayoutError, match="tensor 'a' starts at 1, not 0"):
        FlatLayout((TensorSpec("a", (2,), 1),))
    with pytest.raises(LayoutError, match=r"tensor 'n' has a negative dimension \(2, -1\)"):
        FlatLayout.from_shapes([("n", (2, -1))])
    assert issubclass(LayoutError, CoreError)


# --- segment reductions ------------------------------------------------------------------


def layouts() -> list[FlatLayout]:
    rng = np.random.default_rng(42)
    out = [LAYOUT, FlatLayout.single(10), FlatLayout.from_shapes([("e", (0,)), ("f", (0, 2))])]
    for _ in range(20):
        k = int(rng.integers(1, 6))
        shapes = [
            (f"t{i}", tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 4)))))
            for i in range(k)
        ]
        out.append(FlatLayout.from_shapes(shapes))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_segment_sum_against_loop(dtype: Any) -> None:
    rng = np.random.default_rng(0)
    for layout in layouts():
        values = (rng.standard_normal(layout.total) * 10).astype(dtype)
        got = layout.segment_sum(values)
        expected = [values[s.offset : s.stop].sum() for s in layout.specs]
        assert got.shape == (len(layout),)
        assert got.dtype == np.sum(values).dtype  # bools are counted, as np.sum counts them
        if np.issubdtype(got.dtype, np.floating):
            np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 0)
        else:
            assert got.tolist() == [int(e) for e in expected]
        for i, spec in enumerate(layout.specs):
            if spec.size == 0:
                assert got[i] == 0


def test_segment_sum_single_tensor_is_the_sum() -> None:
    values = np.random.default_rng(1).standard_normal(1000)
    assert FlatLayout.single(1000).segment_sum(values).tolist() == [values.sum()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_per_element_against_loop(dtype: Any) -> None:
    rng = np.random.default_rng(1)
    for layout in layouts():
        per_tensor = (rng.standard_normal(len(layout)) * 10).astype(dtype)
        got = layout.per_element(per_tensor)
        expected = np.zeros(layout.total, dtype=dtype)
        for value, spec in zip(per_tensor, layout.specs, strict=True):
            expected[spec.offset : spec.stop] = value
        assert got.dtype == np.dtype(dtype)
        assert got.tobytes() == expected.tobytes()
        # per_element then segment_sum multiplies each value by its tensor's size
        sizes = np.array([s.size for s in layout.specs])
        np.testing.assert_allclose(
            layout.segment_sum(got.astype(np.float64)), per_tensor * sizes, rtol=1e-12
        )
