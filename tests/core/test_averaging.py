"""Parameter averaging (service.core.averaging) against torch.optim.swa_utils.AveragedModel.

A module holding parameters of shapes (7, 5), (5,), (3, 4, 2) and () drifts for 200 steps
of seeded random updates; after each step torch's `AveragedModel.update_parameters` and
our `update_averages` take the same params (flattened end to end), and the averages are
compared after every step, relative to their largest magnitude: <= 1e-12 in float64,
<= 1e-6 in float32.

* uncorrected EMA: `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`;
* SWA: `AveragedModel(model)` (its default running mean; on the CPU `get_swa_avg_fn`), and
  `AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())` (the CUDA default, a lerp;
  its weight `1 / (n + 1)` is a float32 tensor, so in float64 it agrees to 1e-7 only),
  with `start`/`every` emulated by calling `update_parameters` only at those steps;
* bias-corrected EMA: against the closed form `sum_k (1-d) d^(t-k) p_k / (1 - d^t)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from service.core.averaging import (
    EMA_AVG,
    EMA_N,
    SWA_AVG,
    SWA_N,
    AveragingError,
    EMAConfig,
    SWAConfig,
    init_averages,
    parse_ema,
    parse_swa,
    read_average,
    update_averages,
)
from service.core.errors import CoreError, StateError
from service.core.state import OptState

SHAPES: list[tuple[int, ...]] = [(7, 5), (5,), (3, 4, 2), ()]
STEPS = 200
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
DTYPES = [torch.float64, torch.float32]


class Holder(torch.nn.Module):
    """Parameters only: what AveragedModel averages (no buffers)."""

    def __init__(self, dtype: torch.dtype, gen: torch.Generator) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
        )


def flat(module: torch.nn.Module) -> np.ndarray:
    """The module's parameters end to end, as a new NumPy array."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy().copy()


def drift(model: torch.nn.Module, gen: torch.Generator) -> None:
    """One seeded random update: a slow pull towards 1 plus noise."""
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.mul_(0.98).add_(0.02).add_(0.1 * noise)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def swa_due(start: int, every: int, step: int) -> bool:
    return step >= start and (step - start) % every == 0


def run_parity(
    dtype: torch.dtype,
    *,
    ema: EMAConfig | None,
    swa: SWAConfig | None,
    swa_multi: bool = False,
    seed: int = 0,
    tol: float | None = None,
) -> dict[str, float]:
    """Drive torch's AveragedModel and our averages side by side; check every step;
    return the worst relative error of each average."""
    gen = torch.Generator().manual_seed(seed)
    model = Holder(dtype, gen)
    ema_model = swa_model = None
    if ema is not None:
        assert not ema.bias_correction
        ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema.decay))
    if swa is not None:
        swa_model = (
            AveragedModel(model, multi_avg_fn=get_swa_multi_avg_fn())
            if swa_multi
            else AveragedModel(model)
        )
    averages = init_averages(ema, swa, flat(model))
    worst = {"ema": 0.0, "swa": 0.0}
    for step in range(1, STEPS + 1):
        drift(model, gen)
        params = flat(model)
        averages = update_averages(ema, swa, averages, params, step)
        if ema_model is not None:
            ema_model.update_parameters(model)
            got = read_average("ema", ema, swa, averages)
            assert got is not None
            avg, n = got
            assert n == step == int(ema_model.n_averaged)
            worst["ema"] = max(worst["ema"], rel_err(avg, flat(ema_model.module)))
        if swa is not None and swa_model is not None:
            if swa_due(swa.start, swa.every, step):
                swa_model.update_parameters(model)
            got = read_average("swa", ema, swa, averages)
            expected_n = int(swa_model.n_averaged)
            if expected_n == 0:
                assert got is None
            else:
                assert got is not None
                avg, n = got
                assert n == expected_n
                worst["swa"] = max(worst["swa"], rel_err(avg, flat(swa_model.module)))
    for err in worst.values():
        assert err <= (TOL[dtype] if tol is None else tol)
    return worst


def closed_form_ema(history: list[np.ndarray], decay: float) -> np.ndarray:
    """`sum_k (1-d) d^(t-k) p_k / (1 - d^t)` in float64, k = 1..t."""
    t = len(history)
    weights = np.array([(1 - decay) * decay ** (t - k) for k in range(1, t + 1)])
    stacked = np.stack([p.astype(np.float64) for p in history])
    result: np.ndarray = weights @ stacked / (1 - decay**t)
    return result


def run_corrected(dtype: torch.dtype, decay: float, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    model = Holder(dtype, gen)
    ema = EMAConfig(decay=decay, bias_correction=True)
    averages = init_averages(ema, None, flat(model))
    history: list[np.ndarray] = []
    worst = 0.0
    for step in range(1, STEPS + 1):
        drift(model, gen)
        params = flat(model)
        history.append(params)
        averages = update_averages(ema, None, averages, params, step)
        got = read_average("ema", ema, None, averages)
        assert got is not None
        avg, n = got
        assert n == step
        assert avg.dtype == params.dtype
        worst = max(worst, rel_err(avg, closed_form_ema(history, decay).astype(params.dtype)))
    return worst


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.999, 0.9, 0.3, 0.0])
def test_uncorrected_ema_matches_averaged_model(dtype: torch.dtype, decay: float) -> None:
    run_parity(dtype, ema=EMAConfig(decay=decay, bias_correction=False), swa=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swa_multi", [False, True])
@pytest.mark.parametrize(("start", "every"), [(0, 1), (0, 3), (1, 1), (5, 1), (17, 4), (199, 7)])
def test_swa_matches_averaged_model(
    dtype: torch.dtype, swa_multi: bool, start: int, every: int
) -> None:
    # get_swa_multi_avg_fn computes its lerp weight `1 / (n_averaged + 1)` from the long
    # tensor n_averaged, so in torch's default dtype, float32: in float64 its mean is off
    # by float32's rounding of 1/n (~6e-8 relative), ours and get_swa_avg_fn's are not
    tol = 1e-7 if swa_multi and dtype == torch.float64 else None
    run_parity(
        dtype, ema=None, swa=SWAConfig(start=start, every=every), swa_multi=swa_multi, tol=tol
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_and_swa_together(dtype: torch.dtype) -> None:
    run_parity(
        dtype,
        ema=EMAConfig(decay=0.95, bias_correction=False),
        swa=SWAConfig(start=10, every=2),
        seed=3,
    )


def test_swa_never_started() -> None:
    run_parity(torch.float64, ema=None, swa=SWAConfig(start=STEPS + 1))


@pytest.mark.parametrize("decay", [0.999, 0.9, 0.3, 0.0])
def test_bias_corrected_ema_closed_form_float64(decay: float) -> None:
    assert run_corrected(torch.float64, decay) <= 1e-12


@pytest.mark.parametrize("decay", [0.999, 0.9, 0.3])
def test_bias_corrected_ema_closed_form_float32(decay: float) -> None:
    assert run_corrected(torch.float32, decay) <= 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bias_corrected_first_read_is_the_params(dtype: type[np.floating[Any]]) -> None:
    params = np.random.default_rng(1).standard_normal(17).astype(dtype)
    ema = EMAConfig(decay=0.999)
    averages = update_averages(ema, None, init_averages(ema, None, params), params, 1)
    got = read_average("ema", ema, None, averages)
    assert got is not None
    np.testing.assert_allclose(got[0], params, rtol=4 * float(np.finfo(dtype).eps))
    assert got[1] == 1


# ---------------------------------------------------------------- state handling


def test_init_allocates_lazily() -> None:
    params = np.zeros(4)
    state = init_averages(EMAConfig(), SWAConfig(), params)
    assert state.arrays == {}
    assert state.scalars == {EMA_N: 0, SWA_N: 0}
    assert init_averages(None, SWAConfig(), params).scalars == {SWA_N: 0}
    assert init_averages(None, None, params).scalars == {}


@pytest.mark.parametrize("bias_correction", [True, False])
def test_update_never_mutates_inputs(bias_correction: bool) -> None:
    rng = np.random.default_rng(2)
    ema = EMAConfig(decay=0.9, bias_correction=bias_correction)
    swa = SWAConfig(start=2)
    averages = init_averages(ema, swa, np.zeros(6))
    for step in range(1, 6):
        params = rng.standard_normal(6)
        params_before = params.copy()
        before = averages.copy()
        new = update_averages(ema, swa, averages, params, step)
        assert averages.equals(before)
        np.testing.assert_array_equal(params, params_before)
        for array in new.arrays.values():
            assert not np.shares_memory(array, params)
            assert all(not np.shares_memory(array, old) for old in averages.arrays.values())
        # reading never hands out the stored array
        for kind in ("ema", "swa"):
            got = read_average(kind, ema, swa, new)
            if got is not None:
                assert all(not np.shares_memory(got[0], a) for a in new.arrays.values())
        averages = new
    assert averages.scalars == {EMA_N: 5, SWA_N: 4}


def test_read_before_first_average() -> None:
    ema, swa = EMAConfig(), SWAConfig(start=3, every=2)
    params = np.ones(3, dtype=np.float32)
    averages = init_averages(ema, swa, params)
    assert read_average("ema", ema, swa, averages) is None
    assert read_average("swa", ema, swa, averages) is None
    for step in (1, 2):
        averages = update_averages(ema, swa, averages, params * step, step)
        assert read_average("swa", ema, swa, averages) is None
        assert SWA_AVG not in averages.arrays
    averages = update_averages(ema, swa, averages, params * 3, 3)
    got = read_average("swa", ema, swa, averages)
    assert got is not None
    np.testing.assert_array_equal(got[0], params * 3)
    assert got[0].dtype == np.float32
    assert got[1] == 1
    averages = update_averages(ema, swa, averages, params * 4, 4)  # not due: 4 - 3 odd
    got = read_average("swa", ema, swa, averages)
    assert got is not None
    assert got[1] == 1


def test_state_round_trips_through_bytes() -> None:
    ema, swa = EMAConfig(decay=0.5), SWAConfig()
    averages = init_averages(ema, swa, np.zeros(5, dtype=np.float32))
    for step in range(1, 4):
        averages = update_averages(ema, swa, averages, np.full(5, step, np.float32), step)
    restored = OptState.from_bytes(averages.to_bytes())
    assert restored.equals(averages)
    assert restored.arrays[EMA_AVG].dtype == np.float32


def test_read_unkept_average_is_refused() -> None:
    averages = init_averages(EMAConfig(), None, np.zeros(2))
    with pytest.raises(AveragingError) as info:
        read_average("swa", EMAConfig(), None, averages)
    assert info.value.errors[0]["loc"] == ("average",)
    with pytest.raises(AveragingError):
        read_average("mean", EMAConfig(), None, averages)  # type: ignore[arg-type]


def test_bad_params_and_state() -> None:
    ema = EMAConfig()
    with pytest.raises(CoreError):
        init_averages(ema, None, np.zeros((2, 2)))
    with pytest.raises(CoreError):
        init_averages(ema, None, np.zeros(2, dtype=np.int64))
    averages = update_averages(ema, None, init_averages(ema, None, np.zeros(2)), np.ones(2), 1)
    with pytest.raises(CoreError):
        update_averages(ema, None, averages, np.ones(2), 0)
    with pytest.raises(StateError):
        update_averages(ema, None, averages, np.ones(3), 2)
    with pytest.raises(StateError):
        update_averages(ema, None, averages, np.ones(2, dtype=np.float32), 2)
    broken = OptState({}, {EMA_N: 3})
    with pytest.raises(StateError):
        update_averages(ema, None, broken, np.ones(2), 4)


# ---------------------------------------------------------------- validation


def test_defaults() -> None:
    assert parse_ema({}) == EMAConfig(decay=0.999, bias_correction=True)
    assert parse_swa({}) == SWAConfig(start=0, every=1)
    assert parse_ema({"decay": 0}).decay == 0.0


@pytest.mark.parametrize(
    ("parse", "data", "field"),
    [
        (parse_ema, {"decay": 1.0}, "decay"),
        (parse_ema, {"decay": -0.1}, "decay"),
        (parse_ema, {"decay": "0.9"}, "decay"),
        (parse_ema, {"decay": float("nan")}, "decay"),
        (parse_ema, {"bias_correction": 1}, "bias_correction"),
        (parse_ema, {"decay": 0.9, "beta": 0.1}, "beta"),
        (parse_swa, {"start": -1}, "start"),
        (parse_swa, {"every": 0}, "every"),
        (parse_swa, {"every": 2.0}, "every"),
        (parse_swa, {"start": True}, "start"),
        (parse_swa, {"begin": 3}, "begin"),
    ],
)
def test_invalid_specs_name_the_field(parse: Any, data: dict[str, Any], field: str) -> None:
    with pytest.raises(AveragingError) as info:
        parse(data)
    assert [e["loc"] for e in info.value.errors] == [(field,)]
    assert str(info.value).startswith(field)


def test_range_messages() -> None:
    with pytest.raises(AveragingError, match=r"decay must be in \[0, 1\): got 1.0"):
        parse_ema({"decay": 1.0})
    with pytest.raises(AveragingError, match="every must be >= 1: got 0"):
        parse_swa({"every": 0})
