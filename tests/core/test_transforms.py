"""Gradient transforms against torch.nn.utils.clip_grad_norm_ / clip_grad_value_."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.core.errors import CoreError
from service.core.layout import FlatLayout
from service.core.transforms import (
    GradientTransforms,
    apply_transforms,
    clip_by_global_norm,
    clip_by_tensor_norm,
    clip_by_value,
    find_nonfinite,
    global_norm,
    tensor_norms,
)

SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("w1", (7, 5)),
    ("b1", (5,)),
    ("empty", (0, 3)),
    ("w2", (3, 4, 2)),
    ("scale", ()),
]
SCALES = {"w1": 1.0, "b1": 1e-3, "empty": 1.0, "w2": 10.0, "scale": 0.5}
LAYOUT = FlatLayout.from_shapes(SHAPES)
DTYPES = [np.float32, np.float64]
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
#: relative tolerance against torch: rounding of sums in a different order
RTOL = {np.float32: 2e-6, np.float64: 1e-12}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def make_grads(dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tensors = {n: SCALES[n] * rng.standard_normal(s) for n, s in SHAPES}
    return LAYOUT.flatten(tensors, dtype)


def torch_params(flat: np.ndarray, layout: FlatLayout = LAYOUT) -> list[torch.nn.Parameter]:
    """One torch parameter per non-empty tensor of `layout`, its `.grad` a copy of it.

    Empty tensors are left out: torch refuses the inf norm of an empty tensor (no
    identity for max), where ours counts it as 0; they hold nothing to clip either way.
    """
    params = []
    for value in layout.unflatten(flat).values():
        if value.size:
            p = torch.nn.Parameter(torch.zeros(value.shape, dtype=TORCH_DTYPE[value.dtype.type]))
            p.grad = torch.from_numpy(value.copy())
            params.append(p)
    return params


def torch_grads(flat: np.ndarray) -> list[torch.Tensor]:
    return [p.grad for p in torch_params(flat) if p.grad is not None]


def torch_flat(params: list[torch.nn.Parameter]) -> np.ndarray:
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    return np.concatenate([g.numpy().reshape(-1) for g in grads if g is not None])


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only copy: any write into it raises, and its bytes are kept to compare."""
    a = a.copy()
    a.flags.writeable = False
    return a


def assert_close(ours: np.ndarray, ref: np.ndarray, dtype: Any) -> None:
    assert ours.dtype == ref.dtype == np.dtype(dtype)
    np.testing.assert_allclose(ours, ref, rtol=RTOL[dtype], atol=0)


# --- clip by global norm ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("factor", [0.3, 2.0], ids=["above", "below"])
def test_clip_by_global_norm_matches_torch(dtype: Any, norm_type: float, factor: float) -> None:
    grads = readonly(make_grads(dtype))
    norm = torch.nn.utils.get_total_norm(torch_grads(grads), norm_type)
    max_norm = factor * float(norm)  # threshold below (factor < 1) or above the norm

    params = torch_params(grads)
    ref_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    ours, total = clip_by_global_norm(grads, max_norm, norm_type, LAYOUT)

    assert isinstance(total, float)
    assert total == pytest.approx(float(ref_norm), rel=RTOL[dtype], abs=0)
    assert_close(ours, torch_flat(params), dtype)
    if factor > 1:
        # coefficient exactly 1: the gradient comes back bit for bit
        assert ours.tobytes() == grads.tobytes()
    else:
        np.testing.assert_allclose(global_norm(ours, LAYOUT, norm_type), max_norm, rtol=1e-5)
    assert ours is not grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_matches_torch_and_whole_vector(dtype: Any, norm_type: float) -> None:
    grads = make_grads(dtype, seed=3)
    ref = torch.nn.utils.get_total_norm(torch_grads(grads), norm_type)
    ours = global_norm(grads, LAYOUT, norm_type)
    assert ours == pytest.approx(float(ref), rel=RTOL[dtype], abs=0)
    # the norm of the norms is the norm of the whole vector
    whole = float(np.linalg.norm(grads.astype(np.float64), ord=norm_type))
    assert ours == pytest.approx(whole, rel=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensor_norms_match_torch_vector_norm(dtype: Any, norm_type: float) -> None:
    grads = make_grads(dtype, seed=4)
    norms = tensor_norms(grads, LAYOUT, norm_type)
    assert norms.dtype == np.dtype(dtype)
    assert norms.shape == (len(LAYOUT),)
    for value, (name, tensor) in zip(norms, LAYOUT.unflatten(grads).items(), strict=True):
        if tensor.size == 0:
            continue
        ref = float(torch.linalg.vector_norm(torch.from_numpy(tensor.copy()), norm_type))
        assert float(value) == pytest.approx(ref, rel=RTOL[dtype], abs=0), name
    assert norms[LAYOUT.names.index("empty")] == 0


def test_clip_by_global_norm_single_tensor_default_layout() -> None:
    grads = readonly(np.array([3.0, 4.0]))
    ours, total = clip_by_global_norm(grads, 1.0)
    assert total == 5.0
    np.testing.assert_allclose(ours, [0.6, 0.8], rtol=1e-6)
    ref = torch.from_numpy(grads.copy())
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = ref
    torch.nn.utils.clip_grad_norm_(p, 1.0)
    assert ours.tobytes() == ref.numpy().tobytes()


def test_clip_by_global_norm_empty() -> None:
    grads = np.zeros(0, dtype=np.float32)
    ours, total = clip_by_global_norm(grads, 1.0, layout=FlatLayout.from_shapes([]))
    assert total == 0.0
    assert ours.shape == (0,)
    assert ours.dtype == np.float32


# --- per-tensor norm clipping ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_by_tensor_norm_matches_per_tensor_loop(dtype: Any, norm_type: float) -> None:
    grads = readonly(make_grads(dtype, seed=1))
    norms = tensor_norms(grads, LAYOUT, norm_type)
    max_norm = float(np.median(norms[norms > 0]))  # some tensors clipped, some not
    ours, total = clip_by_tensor_norm(grads, max_norm, norm_type, LAYOUT)

    assert total == global_norm(grads, LAYOUT, norm_type)
    clipped_some = unclipped_some = False
    for name, tensor in LAYOUT.unflatten(grads).items():
        spec = LAYOUT[name]
        segment = ours[spec.offset : spec.stop]
        # torch, one tensor at a time
        if tensor.size:
            p = torch.nn.Parameter(torch.zeros(tensor.shape, dtype=TORCH_DTYPE[dtype]))
            p.grad = torch.from_numpy(tensor.copy())
            torch.nn.utils.clip_grad_norm_(p, max_norm, norm_type)
            assert_close(segment, p.grad.numpy().reshape(-1), dtype)
        # ours, one tensor at a time
        alone, _ = clip_by_global_norm(tensor.reshape(-1), max_norm, norm_type)
        assert_close(segment, alone, dtype)
        if segment.size and tensor.reshape(-1).tobytes() == segment.tobytes():
            unclipped_some = True
        elif segment.size:
            clipped_some = True
            own = tensor_norms(segment, FlatLayout.single(segment.size), norm_type)[0]
            assert float(own) == pytest.approx(max_norm, rel=1e-5)
    assert clipped_some
    assert unclipped_some


# --- clip by value ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [0.01, 0.5, 100.0])
def test_clip_by_value_matches_torch(dtype: Any, clip_value: float) -> None:
    grads = make_grads(dtype, seed=2)
    grads[:3] = [0.0, -0.0, clip_value]
    grads = readonly(grads)
    params = torch_params(grads)
    torch.nn.utils.clip_grad_value_(params, clip_value)
    ours = clip_by_value(grads, clip_value)
    assert ours.dtype == np.dtype(dtype)
    assert ours.tobytes() == torch_flat(params).tobytes()  # bit for bit, -0.0 kept


def test_clip_by_value_keeps_nan_like_torch() -> None:
    grads = readonly(np.array([np.nan, np.inf, -np.inf, 2.0, -0.5]))
    ours = clip_by_value(grads, 1.0)
    ref = torch.from_numpy(grads.copy()).clamp_(-1.0, 1.0).numpy()
    assert ours.tobytes() == ref.tobytes()


# --- non-finite detection --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_find_nonfinite_names_tensors(dtype: Any) -> None:
    grads = make_grads(dtype)
    assert find_nonfinite(grads, LAYOUT) == (0, [])
    views = LAYOUT.unflatten(grads)
    views["w2"][1, 2, 0] = np.nan
    views["w2"][0, 0, 1] = -np.inf
    views["scale"][...] = np.inf
    grads = readonly(grads)
    assert find_nonfinite(grads, LAYOUT) == (3, ["w2", "scale"])
    assert find_nonfinite(grads) == (3, ["params"])


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_apply_transforms_nonfinite_returns_input_unchanged(nonfinite: str) -> None:
    grads = make_grads(np.float32)
    views = LAYOUT.unflatten(grads)
    views["w1"][0, 0] = np.nan
    views["b1"][4] = np.inf
    grads = readonly(grads)
    config = GradientTransforms(clip_norm=1e-3, clip_value=1e-3, nonfinite=nonfinite)
    result = apply_transforms(config, grads, LAYOUT)
    assert result.nonfinite == 2
    assert result.nonfinite_tensors == ["w1", "b1"]
    assert not result.clipped
    assert result.grads is not grads
    assert result.grads.tobytes() == grads.tobytes()
    assert math.isnan(result.grad_norm)


def test_apply_transforms_inf_norm_of_nonfinite() -> None:
    grads = readonly(np.array([1.0, -np.inf, 2.0]))
    result = apply_transforms(GradientTransforms(norm_type=math.inf), grads)
    assert result.grad_norm == math.inf
    assert (result.nonfinite, result.nonfinite_tensors) == (1, ["params"])


# --- apply_transforms ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_apply_transforms_value_then_norm_like_torch(dtype: Any, norm_type: float) -> None:
    grads = readonly(make_grads(dtype, seed=5))
    raw_norm = global_norm(grads, LAYOUT, norm_type)
    config = GradientTransforms(clip_value=1.0, clip_norm=0.5, norm_type=norm_type)
    result = apply_transforms(config, grads, LAYOUT)

    params = torch_params(grads)
    torch.nn.utils.clip_grad_value_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(params, 0.5, norm_type)
    assert_close(result.grads, torch_flat(params), dtype)
    assert result.grad_norm == raw_norm  # the incoming gradient's norm, before clipping
    assert result.clipped
    assert (result.nonfinite, result.nonfinite_tensors) == (0, [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_transforms_per_tensor(dtype: Any) -> None:
    grads = readonly(make_grads(dtype, seed=6))
    config = GradientTransforms(clip_norm=0.5, per_tensor=True)
    result = apply_transforms(config, grads, LAYOUT)
    expected, total = clip_by_tensor_norm(grads, 0.5, 2.0, LAYOUT)
    assert result.grads.tobytes() == expected.tobytes()
    assert result.grad_norm == total
    assert result.clipped


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_transforms_nothing_to_do(dtype: Any) -> None:
    grads = readonly(make_grads(dtype, seed=7))
    for config in (
        GradientTransforms(),
        GradientTransforms(clip_norm=1e6),
        GradientTransforms(clip_norm=1e6, per_tensor=True, norm_type=3.5),
        GradientTransforms(clip_value=1e6),
    ):
        result = apply_transforms(config, grads, LAYOUT)
        assert result.grads is not grads
        assert result.grads.dtype == grads.dtype
        assert result.grads.tobytes() == grads.tobytes()
        assert not result.clipped
        assert result.grad_norm == global_norm(grads, LAYOUT, config.norm_type)
        assert result.grad_norm > 0


def test_apply_transforms_clipped_by_value_only() -> None:
    grads = readonly(np.array([0.5, -3.0, 0.25]))
    result = apply_transforms(GradientTransforms(clip_value=1.0, clip_norm=10.0), grads)
    assert result.clipped
    assert result.grads.tolist() == [0.5, -1.0, 0.25]
    assert result.grad_norm == pytest.approx(math.sqrt(0.25 + 9.0 + 0.0625))


def test_input_never_modified() -> None:
    """Every function leaves a (read-only, so a write would raise) input as it was."""
    for dtype in DTYPES:
        grads = make_grads(dtype, seed=8)
        grads[0] = 1e3
        before = grads.tobytes()
        grads.flags.writeable = False
        for norm_type in NORM_TYPES:
            clip_by_global_norm(grads, 0.1, norm_type, LAYOUT)
            clip_by_tensor_norm(grads, 0.1, norm_type, LAYOUT)
            tensor_norms(grads, LAYOUT, norm_type)
            for per_tensor in (False, True):
                config = GradientTransforms(
                    clip_norm=0.1, clip_value=0.2, norm_type=norm_type, per_tensor=per_tensor
                )
                out = apply_transforms(config, grads, LAYOUT).grads
                assert not np.shares_memory(out, grads)
        clip_by_value(grads, 0.1)
        find_nonfinite(grads, LAYOUT)
        assert grads.tobytes() == before

        writable = make_grads(dtype, seed=8)
        writable[0] = 1e3
        out = apply_transforms(GradientTransforms(clip_norm=0.1), writable, LAYOUT).grads
        out[...] = 0  # writing the result does not touch the input
        assert writable.tobytes() == before


# --- configuration and bad input -------------------------------------------------------


def test_config_validation() -> None:
    config = GradientTransforms()
    assert config == GradientTransforms(
        clip_norm=None, norm_type=2.0, per_tensor=False, clip_value=None, nonfinite="error"
    )
    assert GradientTransforms(norm_type=math.inf).norm_type == math.inf
    assert GradientTransforms.model_validate({"clip_norm": 1, "norm_type": "inf"}).norm_type == (
        math.inf
    )
    with pytest.raises(ValidationError):
        config.clip_norm = 1.0  # type: ignore[misc]  # frozen
    bad: list[dict[str, Any]] = [
        {"clip_norm": 0.0},
        {"clip_norm": -1.0},
        {"clip_norm": math.nan},
        {"clip_norm": math.inf},
        {"clip_value": 0.0},
        {"clip_value": math.nan},
        {"norm_type": 0.0},
        {"norm_type": -2.0},
        {"norm_type": math.nan},
        {"nonfinite": "ignore"},
        {"per_tensor": "maybe"},
        {"clip": 1.0},  # unknown key
    ]
    for data in bad:
        with pytest.raises(ValidationError) as info:
            GradientTransforms.model_validate(data)
        assert next(iter(data)) in str(info.value)


def test_bad_input() -> None:
    with pytest.raises(CoreError, match="flat"):
        apply_transforms(GradientTransforms(), np.zeros((2, 2)))
    with pytest.raises(CoreError, match="float"):
        apply_transforms(GradientTransforms(), np.zeros(3, dtype=np.int64))
    with pytest.raises(CoreError, match="layout holds 3 elements, grads 4"):
        apply_transforms(GradientTransforms(), np.zeros(4), FlatLayout.single(3))
    with pytest.raises(CoreError, match="max_norm"):
        clip_by_global_norm(np.zeros(3), 0.0)
    with pytest.raises(CoreError, match="norm_type"):
        global_norm(np.zeros(3), norm_type=-1.0)
    with pytest.raises(CoreError, match="clip_value"):
        clip_by_value(np.zeros(3), -1.0)
