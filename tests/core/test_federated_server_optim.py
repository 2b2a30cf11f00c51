"""Server optimizers (service.core.federated.server_optim) against the paper's equations.

Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2) and the FedAvg/FedAvgM
server steps are written here again, per element with Python floats (`math.sqrt`), on the
tensors of a model of shapes (7, 5), (5,), (3, 4, 2) and (), independently of the code
under test. 30 rounds of seeded random aggregates (`delta`, of changing scale) go through
both, the server rate changing from round to round; after every round the params and the
moments are compared, relative to their largest magnitude: <= 1e-12 in float64.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pytest

from service.core.errors import CoreError, HyperparameterError, StateError
from service.core.federated import (
    SERVER_OPTIMIZERS,
    FedAdamHyper,
    FedAvgHyper,
    FedYogiHyper,
    get_server_optimizer,
    parse_server_hyper,
)
from service.core.layout import FlatLayout
from service.core.state import OptState

SHAPES: list[tuple[int, ...]] = [(7, 5), (5,), (3, 4, 2), ()]
LAYOUT = FlatLayout.from_shapes([(f"t{i}", s) for i, s in enumerate(SHAPES)])
ROUNDS = 30
TOL = 1e-12
FEDOPT = ("fedadagrad", "fedadam", "fedyogi")


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(ours - ref))) / (scale if scale > 0 else 1.0)


def rounds_data(seed: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Initial flat params, one aggregate per round and a server rate per round."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(LAYOUT.total)
    deltas = []
    for r in range(ROUNDS):
        scale = 10.0 ** rng.uniform(-4, 0)  # the aggregates shrink and grow
        d = scale * rng.standard_normal(LAYOUT.total)
        if r % 7 == 3:
            d[: LAYOUT.total // 3] = 0.0  # coordinates nobody moved this round
        deltas.append(d)
    lrs = [float(lr) for lr in rng.uniform(0.001, 0.2, ROUNDS)]
    return x0, deltas, lrs


def per_tensor(flat: np.ndarray) -> list[list[float]]:
    return [flat[s.offset : s.stop].tolist() for s in LAYOUT.specs]


def sign(a: float) -> float:
    return float((a > 0) - (a < 0))


def reference_fedopt(
    kind: str,
    cfg: dict[str, Any],
    x0: np.ndarray,
    deltas: list[np.ndarray],
    lrs: list[float],
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Algorithm 2 of Reddi et al., per tensor and per element: `(x, m, v)` after each round."""
    b1, b2 = cfg.get("betas", (0.9, 0.99))
    tau = cfg.get("tau", 1e-3)
    v0 = cfg.get("initial_accumulator")
    v0 = tau * tau if v0 is None else v0
    corrected = cfg.get("bias_correction", False)
    xs = per_tensor(x0)
    ms = [[0.0] * len(t) for t in xs]
    vs = [[v0] * len(t) for t in xs]
    out = []
    for r, (delta_flat, eta) in enumerate(zip(deltas, lrs, strict=True), start=1):
        eta_r = eta * math.sqrt(1 - b2**r) / (1 - b1**r) if corrected else eta
        for x, m, v, d in zip(xs, ms, vs, per_tensor(delta_flat), strict=True):
            for k in range(len(x)):
                m[k] = b1 * m[k] + (1 - b1) * d[k]
                d2 = d[k] * d[k]
                if kind == "fedadagrad":
                    v[k] = v[k] + d2
                elif kind == "fedadam":
                    v[k] = b2 * v[k] + (1 - b2) * d2
                else:
                    v[k] = v[k] - (1 - b2) * d2 * sign(v[k] - d2)
                x[k] = x[k] + eta_r * m[k] / (math.sqrt(v[k]) + tau)
        out.append(tuple(np.array([e for t in ts for e in t]) for ts in (xs, ms, vs)))
    return out  # type: ignore[return-value]


def reference_fedavgm(
    momentum: float, x0: np.ndarray, deltas: list[np.ndarray], lrs: list[float]
) -> list[np.ndarray]:
    """Hsu et al.'s server momentum on `g = -delta`: `v_1 = g`, `v = mu v + g`, `x -= lr v`."""
    x = x0.tolist()
    buf: list[float] | None = None
    out = []
    for delta, eta in zip(deltas, lrs, strict=True):
        g = [-d for d in delta.tolist()]
        buf = g if buf is None else [momentum * b + gi for b, gi in zip(buf, g, strict=True)]
        x = [xi - eta * b for xi, b in zip(x, buf, strict=True)]
        out.append(np.array(x))
    return out


def run(
    hp: Any,
    x0: np.ndarray,
    deltas: list[np.ndarray],
    lrs: list[float],
    *,
    resume_at: int | None = None,
    layout: FlatLayout | None = LAYOUT,
    impl: Any = "auto",
) -> list[tuple[np.ndarray, OptState]]:
    opt = get_server_optimizer(hp.name)
    x = x0.copy()
    state = opt.init(hp, x, layout)
    out = []
    for r, (delta, lr) in enumerate(zip(deltas, lrs, strict=True), start=1):
        if r == resume_at:
            state = OptState.from_bytes(state.to_bytes())
            x = x.copy()
        x, state = opt.update(hp, -delta, state, x, lr, layout, impl=impl)
        out.append((x, state))
    return out


FEDOPT_OPTIONS: list[dict[str, Any]] = [
    {},
    {"bias_correction": True},
    {"initial_accumulator": 0.0},
    {"initial_accumulator": 0.0, "bias_correction": True},
    {"initial_accumulator": 0.25},
    {"betas": [0.0, 0.99], "initial_accumulator": 0.0},  # Flower's FedAdagrad
    {"betas": [0.5, 0.9], "tau": 1e-1},
    {"betas": [0.9, 0.999], "tau": 1e-5, "bias_correction": True},
]


@pytest.mark.parametrize("options", FEDOPT_OPTIONS, ids=lambda o: repr(o))
@pytest.mark.parametrize("kind", FEDOPT)
def test_fedopt_matches_algorithm_2(kind: str, options: dict[str, Any]) -> None:
    hp = parse_server_hyper({"name": kind, **options})
    x0, deltas, lrs = rounds_data(seed=zlib.crc32(f"{kind}{options!r}".encode()))
    ref = reference_fedopt(kind, options, x0, deltas, lrs)
    ours = run(hp, x0, deltas, lrs)
    worst = 0.0
    for r, ((x, state), (rx, rm, rv)) in enumerate(zip(ours, ref, strict=True), start=1):
        assert state.scalars["step"] == r
        for a, b in ((x, rx), (state.arrays["exp_avg"], rm), (state.arrays["exp_avg_sq"], rv)):
            worst = max(worst, rel_err(a, b))
    assert worst <= TOL, worst


@pytest.mark.parametrize("kind", FEDOPT)
def test_fedopt_defaults_and_state(kind: str) -> None:
    hp = parse_server_hyper({"name": kind})
    assert hp.model_dump() == {
        "name": kind,
        "lr": 0.01,
        "betas": (0.9, 0.99),
        "tau": 1e-3,
        "bias_correction": False,
        "initial_accumulator": None,
    }
    opt = get_server_optimizer(kind)
    state = opt.init(hp, np.zeros(LAYOUT.total))
    assert sorted(state.arrays) == ["exp_avg", "exp_avg_sq"]
    assert state.scalars == {"step": 0}
    np.testing.assert_array_equal(state.arrays["exp_avg"], 0.0)
    np.testing.assert_array_equal(state.arrays["exp_avg_sq"], 1e-3**2)
    assert all("." not in name for name in state.arrays)


def test_first_fedadam_round_by_hand() -> None:
    """One round with v from 0: m = 0.1 d, v = 0.01 d^2, x = x + lr * 0.1 d / (0.1 |d| + tau);
    corrected: times sqrt(1 - 0.99) / (1 - 0.9) = 1."""
    d = np.array([0.5, -2.0, 0.0])
    x0 = np.array([1.0, 2.0, 3.0])
    for corrected in (False, True):
        hp = FedAdamHyper(lr=0.1, initial_accumulator=0.0, bias_correction=corrected, tau=1e-3)
        opt = get_server_optimizer("fedadam")
        x, _ = opt.update(hp, -d, opt.init(hp, x0), x0)
        factor = math.sqrt(1 - 0.99) / (1 - 0.9) if corrected else 1.0
        expected = x0 + 0.1 * factor * (0.1 * d) / (0.1 * np.abs(d) + 1e-3)
        np.testing.assert_allclose(x, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", FEDOPT)
def test_yogi_adam_adagrad_second_moments_differ(kind: str) -> None:
    """The same first round through each rule gives the paper's v_1."""
    d = np.array([0.5, -2.0, 1e-4])
    hp = parse_server_hyper({"name": kind, "initial_accumulator": 0.1})
    opt = get_server_optimizer(kind)
    _, state = opt.update(hp, -d, opt.init(hp, np.zeros(3)), np.zeros(3))
    v = state.arrays["exp_avg_sq"]
    expected = {
        "fedadagrad": 0.1 + d * d,
        "fedadam": 0.99 * 0.1 + 0.01 * d * d,
        "fedyogi": 0.1 - 0.01 * d * d * np.sign(0.1 - d * d),
    }[kind]
    np.testing.assert_allclose(v, expected, rtol=1e-15)


def test_fedavg_is_x_minus_lr_g() -> None:
    x0, deltas, lrs = rounds_data(seed=11)
    for lr_default in (1.0, 0.3):
        hp = parse_server_hyper({"name": "fedavg", "lr": lr_default})
        ours = run(hp, x0, deltas, lrs)
        x = x0.copy()
        for (got, state), delta, lr in zip(ours, deltas, lrs, strict=True):
            x = x - lr * (-delta)
            assert rel_err(got, x) <= TOL
            assert state.arrays == {}
    # the default rate (lr=None): 1.0, the aggregate itself
    hp = parse_server_hyper({"name": "fedavg"})
    opt = get_server_optimizer("fedavg")
    x, state = opt.update(hp, -deltas[0], opt.init(hp, x0), x0)
    np.testing.assert_array_equal(x, x0 + deltas[0])
    assert state.scalars == {"step": 1}


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_fedavgm_matches_momentum_recursion(momentum: float) -> None:
    x0, deltas, lrs = rounds_data(seed=12)
    hp = parse_server_hyper({"name": "fedavgm", "momentum": momentum})
    ref = reference_fedavgm(momentum, x0, deltas, lrs)
    ours = run(hp, x0, deltas, lrs)
    worst = max(rel_err(x, rx) for (x, _), rx in zip(ours, ref, strict=True))
    assert worst <= TOL, worst
    state = ours[-1][1]
    assert state.scalars["step"] == ROUNDS
    assert sorted(state.arrays) == (["momentum_buffer"] if momentum else [])


def test_fedavgm_defaults() -> None:
    hp = parse_server_hyper({"name": "fedavgm"})
    assert hp.model_dump() == {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}
    assert parse_server_hyper({"name": "fedavg"}).model_dump() == {"name": "fedavg", "lr": 1.0}


SPECS: list[dict[str, Any]] = [
    {"name": "fedavg", "lr": 0.7},
    {"name": "fedavgm", "momentum": 0.8},
    *({"name": k, "bias_correction": True} for k in FEDOPT),
    *({"name": k, "initial_accumulator": 0.0} for k in FEDOPT),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: repr(s))
def test_resume_from_bytes_is_identical(spec: dict[str, Any]) -> None:
    hp = parse_server_hyper(spec)
    x0, deltas, lrs = rounds_data(seed=13)
    straight = run(hp, x0, deltas, lrs)
    resumed = run(hp, x0, deltas, lrs, resume_at=ROUNDS // 2)
    for (a, sa), (b, sb) in zip(straight, resumed, strict=True):
        assert a.tobytes() == b.tobytes()
        assert sa.equals(sb)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: repr(s))
def test_impl_auto_numpy_inplace_and_layout_agree(spec: dict[str, Any]) -> None:
    hp = parse_server_hyper(spec)
    x0, deltas, lrs = rounds_data(seed=14)
    auto = run(hp, x0, deltas, lrs, impl="auto")
    numpy = run(hp, x0, deltas, lrs, impl="numpy", layout=None)
    for (a, sa), (b, sb) in zip(auto, numpy, strict=True):
        assert a.tobytes() == b.tobytes()
        assert sa.equals(sb)
    opt = get_server_optimizer(hp.name)
    state = opt.init(hp, x0)
    g = -deltas[0]
    g_before, x_before = g.copy(), x0.copy()
    out, new_state = opt.update(hp, g, state, x0)
    np.testing.assert_array_equal(g, g_before)
    np.testing.assert_array_equal(x0, x_before)
    x = x0.copy()
    same, same_state = opt.update(hp, g, state, x, inplace=True)
    assert same is x
    assert same_state is state
    assert x.tobytes() == out.tobytes()
    assert state.equals(new_state)
    np.testing.assert_array_equal(g, g_before)
    with pytest.raises(CoreError, match="no fused kernel"):
        opt.update(hp, g, opt.init(hp, x0), x0, impl="fused")


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", *FEDOPT])
def test_float32_keeps_dtype_and_tracks_float64(kind: str) -> None:
    hp = parse_server_hyper(
        {"name": kind, "initial_accumulator": 0.01} if kind in FEDOPT else {"name": kind}
    )
    x0, deltas, lrs = rounds_data(seed=15)
    ref = run(hp, x0, deltas, lrs)
    ours = run(
        hp,
        x0.astype(np.float32),
        [d.astype(np.float32) for d in deltas],
        lrs,
    )
    for (x, state), (rx, _) in zip(ours, ref, strict=True):
        assert x.dtype == np.float32
        assert all(a.dtype == np.float32 for a in state.arrays.values())
        assert rel_err(x.astype(np.float64), rx) <= 1e-4


def test_registry_and_parsing_errors() -> None:
    assert sorted(SERVER_OPTIMIZERS) == ["fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"]
    for name, opt in SERVER_OPTIMIZERS.items():
        assert opt.name == name
        assert parse_server_hyper({"name": name}).name == name
        assert opt.__doc__
        assert opt.reference
    cases: list[tuple[dict[str, Any], tuple[Any, ...], str]] = [
        ({"name": "adam"}, ("name",), "known: fedadagrad, fedadam, fedavg, fedavgm, fedyogi"),
        ({}, ("name",), "required"),
        ({"name": "fedadam", "tau": 0.0}, ("tau",), "must be > 0"),
        ({"name": "fedyogi", "betas": [0.9, 1.0]}, ("betas", 1), "must be in [0, 1)"),
        ({"name": "fedavgm", "momentum": 1.0}, ("momentum",), "must be in [0, 1)"),
        ({"name": "fedavg", "lr": -1.0}, ("lr",), "must be >= 0"),
        ({"name": "fedadagrad", "initial_accumulator": -0.1}, ("initial_accumulator",), ">= 0"),
        ({"name": "fedadam", "bias_correction": 1}, ("bias_correction",), "boolean"),
        ({"name": "fedadam", "lr": "0.1"}, ("lr",), "number"),
        ({"name": "fedavg", "momentum": 0.9}, ("momentum",), "Extra inputs"),
        ({"name": "fedadam", "eps": 1e-8}, ("eps",), "Extra inputs"),
    ]
    for spec, loc, msg in cases:
        with pytest.raises(HyperparameterError) as info:
            parse_server_hyper(spec)
        assert info.value.errors[0]["loc"] == loc, (spec, info.value.errors)
        assert msg in str(info.value.errors[0]["msg"]), (spec, info.value.errors)
    with pytest.raises(HyperparameterError, match="unknown server optimizer 'sgd'"):
        get_server_optimizer("sgd")


def test_hyper_of_another_optimizer_and_bad_state_are_refused() -> None:
    opt = get_server_optimizer("fedadam")
    x = np.zeros(4)
    with pytest.raises(CoreError, match="takes FedAdamHyper"):
        opt.init(FedYogiHyper(), x)
    with pytest.raises(CoreError, match="takes FedAdamHyper"):
        opt.update(FedAvgHyper(), x, opt.init(FedAdamHyper(), x), x)
    with pytest.raises(StateError):
        opt.update(FedAdamHyper(), x, OptState({"exp_avg": x.copy()}, {"step": 0}), x)
