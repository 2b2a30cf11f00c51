"""Property tests over every registered optimizer (hypothesis).

The registry is read at collection time, so an optimizer added to OPTIMIZERS is covered
without touching this file. For random layouts (1 to 4 tensors, 0-d and empty ones
included), float32/float64, random finite params and gradients and a few option
variants of each optimizer's hyperparameters:

(a) `update(..., inplace=False)` leaves params, grads and the state bit for bit as they
    were, and returns arrays that share no memory with its inputs;
(b) `update(..., inplace=True)` never writes the gradient and returns the very params
    and state objects it was given;
(c) `inplace=True` and `inplace=False` give bit-identical params and state;
(d) the state after several steps round-trips `OptState.from_bytes(state.to_bytes())`
    bit for bit, with NaN (payloads, signalling), +/-inf and -0.0 planted in its arrays
    and float/int/bool scalars added, and a step from the restored state is identical;
(e) the fused kernel agrees with the NumPy reference to 1e-6 relative in float32.

The fused implementation is checked only where `kernels.AVAILABLE` is True.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from service.core.errors import HyperparameterError
from service.core.layout import FlatLayout
from service.core.optim import OPTIMIZERS, Hyper, Optimizer, kernels, parse_hyper
from service.core.optim.base import Impl
from service.core.state import OptState

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NAMES = sorted(OPTIMIZERS)
DTYPES = (np.float32, np.float64)
FUSED_RTOL = 1e-6

#: option values drawn for each optimizer whose hyperparameters have the field
VARIANTS: dict[str, list[Any]] = {
    "lr": [0.01, 0.1],
    "weight_decay": [0.0, 0.1],
    "maximize": [False, True],
    "amsgrad": [False, True],
    "amsbound": [False, True],
    "momentum": [0.0, 0.9],
    "dampening": [0.0, 0.3],
    "nesterov": [False, True],
    "centered": [False, True],
    "decoupled_weight_decay": [False, True],
    "lr_decay": [0.0, 0.01],
    "initial_accumulator_value": [0.0, 0.1],
}


def impls(opt: Optimizer[Any]) -> list[Impl]:
    """The implementations to check: NumPy always, the fused kernel where it can run."""
    return ["numpy", "fused"] if opt.has_fused and kernels.AVAILABLE else ["numpy"]


def fused_params() -> list[Any]:
    """The optimizers with a fused kernel (skipped, saying so, where numba cannot run)."""
    return [
        pytest.param(
            name, marks=pytest.mark.skipif(not kernels.AVAILABLE, reason="numba unavailable")
        )
        for name in NAMES
        if OPTIMIZERS[name].has_fused
    ]


def build_hyper(name: str, options: dict[str, Any]) -> Hyper:
    """`parse_hyper` of the drawn options, dropping any that this combination refuses.

    (E.g. SGD's nesterov without momentum, AdamW's decoupled_weight_decay=False.)
    """
    options = dict(options)
    while True:
        try:
            return parse_hyper({"name": name, **options})
        except HyperparameterError as exc:
            bad = {loc[0] for e in exc.errors if (loc := e.get("loc"))} & set(options)
            if not bad:
                if not options:
                    raise
                options = {}  # a rule over several fields: fall back to the defaults
            for key in bad:
                del options[key]


@st.composite
def hypers(draw: st.DrawFn, name: str) -> Hyper:
    fields = OPTIMIZERS[name].hyper.model_fields
    options = draw(
        st.fixed_dictionaries({k: st.sampled_from(v) for k, v in VARIANTS.items() if k in fields})
    )
    return build_hyper(name, options)


@dataclass
class Problem:
    opt: Optimizer[Any]
    hp: Hyper
    layout: FlatLayout
    params: np.ndarray
    grads: list[np.ndarray]

    def state(self) -> OptState:
        return self.opt.init(self.hp, self.params, self.layout)


@st.composite
def problems(draw: st.DrawFn, name: str, dtypes: tuple[Any, ...] = DTYPES) -> Problem:
    dtype = draw(st.sampled_from(dtypes))
    width = 32 if dtype == np.float32 else 64
    shapes = draw(
        st.lists(
            array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), min_size=1, max_size=4
        )
    )
    layout = FlatLayout.from_shapes([(f"t{i}", s) for i, s in enumerate(shapes)])
    n = layout.total
    params = draw(arrays(dtype, n, elements=st.floats(-10, 10, width=width)))
    steps = draw(st.integers(1, 4))
    grads = [
        draw(arrays(dtype, n, elements=st.floats(-100, 100, width=width))) for _ in range(steps)
    ]
    return Problem(OPTIMIZERS[name], draw(hypers(name)), layout, params, grads)


def warm_up(prob: Problem, impl: Impl) -> tuple[np.ndarray, OptState]:
    """Params and state after all but the last of the problem's gradients."""
    params, state = prob.params.copy(), prob.state()
    for g in prob.grads[:-1]:
        params, state = prob.opt.update(prob.hp, g, state, params, layout=prob.layout, impl=impl)
    return params, state


def assert_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.tobytes() != b.tobytes():
        bits = a.view(f"u{a.itemsize}") != b.view(f"u{b.itemsize}")
        i = int(np.flatnonzero(bits.reshape(-1))[0])
        raise AssertionError(
            f"{what}: {int(bits.sum())} of {a.size} values differ, first at [{i}]: "
            f"{a.reshape(-1)[i]!r} vs {b.reshape(-1)[i]!r}"
        )


def assert_state_bits(a: OptState, b: OptState, what: str) -> None:
    if a.equals(b):
        return
    assert a.arrays.keys() == b.arrays.keys(), (
        f"{what}: arrays {sorted(a.arrays)} != {sorted(b.arrays)}"
    )
    assert a.scalars.keys() == b.scalars.keys(), (
        f"{what}: scalars {sorted(a.scalars)} != {sorted(b.scalars)}"
    )
    for k in a.arrays:
        assert_bits(a.arrays[k], b.arrays[k], f"{what}: state array {k!r}")
    for k, x in a.scalars.items():
        y = b.scalars[k]
        assert type(x) is type(y), (
            f"{what}: scalar {k!r} is {type(x).__name__} vs {type(y).__name__}"
        )
        assert np.array(x).tobytes() == np.array(y).tobytes(), (
            f"{what}: scalar {k!r} {x!r} != {y!r}"
        )
    raise AssertionError(f"{what}: states differ")


def memory_of(params: np.ndarray, state: OptState) -> list[tuple[str, np.ndarray]]:
    return [("params", params), *((f"state array {k!r}", v) for k, v in state.arrays.items())]


# --- (a) inplace=False modifies nothing --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
@SETTINGS
def test_update_copy_leaves_inputs_untouched(name: str, data: st.DataObject) -> None:
    prob = data.draw(problems(name))
    for impl in impls(prob.opt):
        params, state = warm_up(prob, impl)
        grads = prob.grads[-1]
        params_before, grads_before, state_before = params.copy(), grads.copy(), state.copy()
        new_params, new_state = prob.opt.update(
            prob.hp, grads, state, params, layout=prob.layout, impl=impl
        )
        assert_bits(params, params_before, f"{impl}: params")
        assert_bits(grads, grads_before, f"{impl}: grads")
        assert_state_bits(state, state_before, f"{impl}: state")
        assert new_params is not params
        assert new_state is not state
        inputs = [("grads", grads), *memory_of(params, state)]
        for out_name, out in memory_of(new_params, new_state):
            for in_name, array in inputs:
                assert not np.shares_memory(out, array), (
                    f"{impl}: returned {out_name} shares memory with input {in_name}"
                )


# --- (b) inplace=True never writes the gradient ------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
@SETTINGS
def test_update_inplace_keeps_grads_and_returns_its_inputs(name: str, data: st.DataObject) -> None:
    prob = data.draw(problems(name))
    for impl in impls(prob.opt):
        params, state = prob.params.copy(), prob.state()
        for grads in prob.grads:
            grads_before = grads.copy()
            new_params, new_state = prob.opt.update(
                prob.hp,
                grads,
                state,
                params,
                layout=prob.layout,
                inplace=True,
                impl=impl,
            )
            assert_bits(grads, grads_before, f"{impl}: grads")
            assert new_params is params
            assert new_state is state
            for out_name, out in memory_of(params, state):
                assert not np.shares_memory(out, grads), f"{impl}: {out_name} aliases grads"


# --- (c) inplace and copying updates agree ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
@SETTINGS
def test_inplace_and_copy_agree_bitwise(name: str, data: st.DataObject) -> None:
    prob = data.draw(problems(name))
    for impl in impls(prob.opt):
        p_copy, s_copy = prob.params.copy(), prob.state()
        p_in, s_in = prob.params.copy(), prob.state()
        for t, grads in enumerate(prob.grads, start=1):
            p_copy, s_copy = prob.opt.update(
                prob.hp, grads, s_copy, p_copy, layout=prob.layout, impl=impl
            )
            prob.opt.update(
                prob.hp,
                grads,
                s_in,
                p_in,
                layout=prob.layout,
                inplace=True,
                impl=impl,
            )
            assert_bits(p_in, p_copy, f"{impl} step {t}: params")
            assert_state_bits(s_in, s_copy, f"{impl} step {t}: state")


# --- (d) state round-trips through bytes -------------------------------------------------


def _f64(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def specials(dtype: Any) -> np.ndarray:
    """NaN with a payload, a signalling NaN, +/-inf, -0.0 and the extremes of `dtype`."""
    if np.dtype(dtype) == np.float32:
        nans = np.array([0x7FC01234, 0xFFC00001, 0x7F800001], dtype=np.uint32).view(np.float32)
    else:
        nans = np.array(
            [0x7FF8000000001234, 0xFFF8000000000001, 0x7FF0000000000001], dtype=np.uint64
        ).view(np.float64)
    info = np.finfo(dtype)
    extra = np.array([np.inf, -np.inf, -0.0, info.max, info.smallest_subnormal], dtype=dtype)
    return np.concatenate([nans, extra])


PLANTED_SCALARS: dict[str, float | int | bool] = {
    "planted_nan": _f64(0x7FF8000000005678),
    "planted_neg_nan": _f64(0xFFF8000000000000),
    "planted_inf": float("inf"),
    "planted_neg_inf": float("-inf"),
    "planted_neg_zero": -0.0,
    "planted_tiny": 5e-324,
    "planted_int": -(2**62),
    "planted_zero_int": 0,
    "planted_true": True,
    "planted_false": False,
}


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data(), where=st.integers(0, 1000))
@SETTINGS
def test_state_round_trips_through_bytes(name: str, data: st.DataObject, where: int) -> None:
    prob = data.draw(problems(name))
    for impl in impls(prob.opt):
        params, state = warm_up(prob, impl)
        params, state = prob.opt.update(
            prob.hp, prob.grads[-1], state, params, layout=prob.layout, impl=impl
        )
        restored = OptState.from_bytes(state.to_bytes())
        assert_state_bits(restored, state, f"{impl}: round trip")

        # a step from the restored state (in place: its arrays are writable) is the same
        grads = prob.grads[0]
        expected = prob.opt.update(prob.hp, grads, state, params, layout=prob.layout, impl=impl)
        got = prob.opt.update(
            prob.hp,
            grads,
            restored,
            params.copy(),
            layout=prob.layout,
            inplace=True,
            impl=impl,
        )
        assert_bits(got[0], expected[0], f"{impl}: params after a step from restored state")
        assert_state_bits(got[1], expected[1], f"{impl}: state after a step from restored state")

        planted = state.copy()
        for k, array in planted.arrays.items():
            if array.size:
                values = specials(array.dtype)
                idx = (where + np.arange(values.size)) % array.size
                array[idx] = values
                assert array[idx[-1]].tobytes() == values[-1].tobytes(), k
        planted.scalars.update(PLANTED_SCALARS)
        restored = OptState.from_bytes(planted.to_bytes())
        assert_state_bits(restored, planted, f"{impl}: round trip with planted values")


# --- (e) fused kernel against the NumPy reference ----------------------------------------


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    scale = float(np.max(np.abs(ref.astype(np.float64))))
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("name", fused_params())
@given(data=st.data())
@SETTINGS
def test_fused_matches_numpy_float32(name: str, data: st.DataObject) -> None:
    prob = data.draw(problems(name, dtypes=(np.float32,)))
    p_np, s_np = prob.params.copy(), prob.state()
    p_fu, s_fu = prob.params.copy(), prob.state()
    for t, grads in enumerate(prob.grads, start=1):
        p_np, s_np = prob.opt.update(prob.hp, grads, s_np, p_np, layout=prob.layout, impl="numpy")
        p_fu, s_fu = prob.opt.update(prob.hp, grads, s_fu, p_fu, layout=prob.layout, impl="fused")
        assert p_fu.dtype == p_np.dtype
        err = rel_error(p_fu, p_np)
        assert err <= FUSED_RTOL, f"step {t}: params rel error {err:.3g}"
        assert s_fu.arrays.keys() == s_np.arrays.keys()
        for k, ref in s_np.arrays.items():
            assert s_fu.arrays[k].dtype == ref.dtype
            err = rel_error(s_fu.arrays[k], ref)
            assert err <= FUSED_RTOL, f"step {t}: state array {k!r} rel error {err:.3g}"
        assert s_fu.scalars.keys() == s_np.scalars.keys()
        for k, x in s_np.scalars.items():
            assert type(s_fu.scalars[k]) is type(x), k
            assert s_fu.scalars[k] == pytest.approx(x, rel=FUSED_RTOL, nan_ok=True), k
