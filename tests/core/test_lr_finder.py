"""The LR range test (service.core.lr_finder) against transcriptions of its references.

* `_pytorch_lr_finder_loop`: the loop of davidtvs/pytorch-lr-finder's
  `LRFinder.range_test` (its `ExponentialLR`/`LinearLR` rate, smoothing, best loss and
  divergence break), with the model's loss replaced by a given sequence;
* `_pytorch_lr_finder_suggestion`: the suggestion of its `LRFinder.plot`;
* `_fastai_*`: fastai's `lr_find` slice and its `minimum`, `steep` and `valley` functions
  (fastai.callback.schedule), with NumPy float64 arrays in place of torch tensors.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from service.core.errors import CoreError, StateError
from service.core.lr_finder import (
    MIN_STEPS,
    LRFinderConfig,
    LRFinderError,
    LRFinderState,
    minimum,
    next_lr,
    observe,
    parse_lr_finder_config,
    ramp_lr,
    steep,
    steepest,
    suggest,
    valley,
)

# ---------------------------------------------------------------- reference transcriptions


def _pytorch_lr_finder_loop(
    losses: list[float],
    start_lr: float,
    end_lr: float,
    num_iter: int,
    step_mode: str,
    smooth_f: float,
    diverge_th: float,
) -> dict[str, list[float]]:
    """`LRFinder.range_test`'s loop; `losses[i]` stands for `self._train_batch(...)`."""
    history: dict[str, list[float]] = {"lr": [], "loss": []}
    best_loss = math.inf
    for iteration in range(num_iter):
        loss = losses[iteration]
        # lr_schedule.get_lr()[0] with last_epoch == iteration (torch >= 1.1)
        r = iteration / (num_iter - 1)
        if step_mode == "exp":
            lr = start_lr * (end_lr / start_lr) ** r
        else:
            lr = start_lr + r * (end_lr - start_lr)
        history["lr"].append(lr)
        if iteration == 0:
            best_loss = loss
        else:
            if smooth_f > 0:
                loss = smooth_f * loss + (1 - smooth_f) * history["loss"][-1]
            if loss < best_loss:
                best_loss = loss
        history["loss"].append(loss)
        if loss > diverge_th * best_loss:
            break  # "Stopping early, the loss has diverged"
    return history


def _pytorch_lr_finder_suggestion(
    history: dict[str, list[float]], skip_start: int = 10, skip_end: int = 5
) -> float | None:
    """`LRFinder.plot(skip_start, skip_end, suggest_lr=True)`'s suggested rate."""
    lrs = history["lr"]
    losses = history["loss"]
    if skip_end == 0:
        lrs = lrs[skip_start:]
        losses = losses[skip_start:]
    else:
        lrs = lrs[skip_start:-skip_end]
        losses = losses[skip_start:-skip_end]
    try:
        min_grad_idx = (np.gradient(np.array(losses))).argmin()
    except ValueError:
        return None  # "Failed to compute the gradients, there might not be enough points."
    return float(lrs[min_grad_idx])


def _fastai_slice(
    lrs: list[float], losses: list[float], num_it: int
) -> tuple[np.ndarray, np.ndarray]:
    """`Learner.lr_find`: `recorder.lrs[num_it//10:-5]` and the losses likewise."""
    return np.array(lrs[num_it // 10 : -5]), np.array(losses[num_it // 10 : -5])


def _fastai_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    lr_min = lrs[losses.argmin()].item()
    return float(lr_min / 10)


def _fastai_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    return float(lrs[grads.argmin()].item())


def _fastai_valley_index(losses: np.ndarray) -> int:
    """fastai's `valley`, verbatim but returning the index it takes the rate at."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


# ------------------------------------------------------------------------- helpers


def _run(config: LRFinderConfig, losses: list[float]) -> LRFinderState:
    state = LRFinderState()
    for loss in losses:
        if state.done:
            break
        state = observe(config, state, loss)
    return state


def _curve(seed: int, n: int, *, diverge: bool = True, noise: float = 0.05) -> list[float]:
    """A range-test-like loss curve over an exp ramp: flat, a descent, then (optionally)
    an explosion, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-7.0, 1.0, n)  # log10 of the rate
    centre = rng.uniform(-3.5, -1.5)
    loss = 2.3 - 1.8 / (1.0 + np.exp(-(x - centre) * rng.uniform(1.5, 4.0)))
    if diverge:
        loss = loss + np.exp(np.clip((x - centre - rng.uniform(0.5, 1.5)) * 6.0, None, 30.0))
    loss = loss * np.exp(noise * rng.standard_normal(n))
    return [float(v) for v in loss]


CONFIGS = [
    LRFinderConfig(),
    LRFinderConfig(start_lr=1e-5, end_lr=1.0, num_steps=300, smooth_f=0.1, diverge_th=4.0),
    LRFinderConfig(start_lr=1e-4, end_lr=0.5, num_steps=60, mode="linear", smooth_f=0.0),
    LRFinderConfig(num_steps=MIN_STEPS, smooth_f=0.3),
]


# --------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    c = LRFinderConfig()
    assert (c.start_lr, c.end_lr, c.num_steps, c.mode, c.smooth_f, c.diverge_th) == (
        1e-7,
        10.0,
        100,
        "exp",
        0.05,
        5.0,
    )


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"start_lr": 0.0}, "start_lr", "> 0"),
        ({"start_lr": -1e-3}, "start_lr", "> 0"),
        ({"start_lr": float("nan")}, "start_lr", "finite"),
        ({"start_lr": 0.1, "end_lr": 0.01}, "end_lr", "> start_lr"),
        ({"start_lr": 0.1, "end_lr": 0.1}, "end_lr", "> start_lr"),
        ({"end_lr": float("inf")}, "end_lr", "finite"),
        ({"num_steps": MIN_STEPS - 1}, "num_steps", f"[{MIN_STEPS}, "),
        ({"num_steps": 10_001}, "num_steps", "10000]"),
        ({"mode": "cosine"}, "mode", "exp"),
        ({"smooth_f": 1.0}, "smooth_f", "[0, 1)"),
        ({"smooth_f": -0.1}, "smooth_f", "[0, 1)"),
        ({"diverge_th": 1.0}, "diverge_th", "> 1"),
        ({"unknown": 1}, "unknown", "not permitted"),
    ],
)
def test_config_errors_name_the_field(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(LRFinderError) as info:
        parse_lr_finder_config(data)
    assert [e["loc"] for e in info.value.errors] == [(field,)]
    assert words in str(info.value)
    assert str(info.value).startswith(field)


def test_config_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        LRFinderConfig().start_lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------- ramp


@pytest.mark.parametrize("config", CONFIGS)
def test_ramp_follows_the_formulas(config: LRFinderConfig) -> None:
    n, s, e = config.num_steps, config.start_lr, config.end_lr
    for i in range(n):
        if config.mode == "exp":
            expected = s * (e / s) ** (i / (n - 1))  # pytorch-lr-finder ExponentialLR
        else:
            expected = s + i / (n - 1) * (e - s)  # pytorch-lr-finder LinearLR
        assert ramp_lr(config, i) == expected
    assert ramp_lr(config, 0) == s
    assert ramp_lr(config, n - 1) == pytest.approx(e, rel=1e-14)
    space = np.geomspace if config.mode == "exp" else np.linspace
    np.testing.assert_allclose([ramp_lr(config, i) for i in range(n)], space(s, e, n), rtol=1e-12)


def test_ramp_refuses_steps_outside_the_test() -> None:
    with pytest.raises(CoreError, match=r"\[0, 100\)"):
        ramp_lr(LRFinderConfig(), 100)
    with pytest.raises(CoreError):
        ramp_lr(LRFinderConfig(), -1)


# ------------------------------------------------------------------------- observe


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("diverge", [True, False])
def test_observe_matches_pytorch_lr_finder(
    config: LRFinderConfig, seed: int, diverge: bool
) -> None:
    losses = _curve(seed, config.num_steps, diverge=diverge)
    history = _pytorch_lr_finder_loop(
        losses,
        config.start_lr,
        config.end_lr,
        config.num_steps,
        config.mode,
        config.smooth_f,
        config.diverge_th,
    )
    state = _run(config, losses)
    assert state.done
    assert list(state.lrs) == history["lr"]  # bit for bit
    assert list(state.smoothed) == history["loss"]
    assert list(state.losses) == losses[: len(state.lrs)]
    assert state.best_loss == min(history["loss"])
    broke_early = len(history["lr"]) < config.num_steps
    last, best = history["loss"][-1], min(history["loss"])
    diverged = broke_early or last > config.diverge_th * best
    assert state.stop_reason == ("diverged" if diverged else "completed")
    if diverge and config.num_steps >= 60:
        assert state.stop_reason == "diverged"  # the curves explode well before the end
    if not diverge:
        assert state.stop_reason == "completed"
        assert len(state.lrs) == config.num_steps


def test_observe_smoothing_by_hand() -> None:
    config = LRFinderConfig(smooth_f=0.25, diverge_th=3.0)
    state = _run(config, [4.0, 2.0, 2.0, 10.0])
    assert state.smoothed == (4.0, 3.5, 3.125, 4.84375)  # 0.25 * loss + 0.75 * previous
    assert state.best_loss == 3.125
    assert not state.done
    state = observe(config, state, 40.0)  # 0.25 * 40 + 0.75 * 4.84375 = 13.6328125 > 9.375
    assert state.smoothed[-1] == 13.6328125
    assert (state.done, state.stop_reason) == (True, "diverged")
    assert len(state.lrs) == 5  # the diverging point is recorded, as pytorch-lr-finder does
    assert next_lr(config, state) is None


def test_smooth_f_zero_disables_smoothing() -> None:
    config = LRFinderConfig(smooth_f=0.0)
    losses = [3.0, 2.0, 2.5, 1.0]
    assert _run(config, losses).smoothed == tuple(losses)


def test_completes_after_num_steps() -> None:
    config = LRFinderConfig(num_steps=MIN_STEPS)
    state = _run(config, [1.0] * (MIN_STEPS - 1))
    assert not state.done
    assert next_lr(config, state) == ramp_lr(config, MIN_STEPS - 1)
    state = observe(config, state, 1.0)
    assert (state.done, state.stop_reason, len(state.lrs)) == (True, "completed", MIN_STEPS)
    with pytest.raises(LRFinderError, match="over"):
        observe(config, state, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_diverges_without_being_recorded(bad: float) -> None:
    config = LRFinderConfig()
    state = _run(config, [2.0, 1.9, 1.8])
    after = observe(config, state, bad)
    assert (after.done, after.stop_reason) == (True, "diverged")
    assert after.nonfinite_lr == ramp_lr(config, 3)
    assert (after.lrs, after.losses, after.smoothed) == (state.lrs, state.losses, state.smoothed)
    assert LRFinderState.from_json(after.to_json()) == after  # still strict JSON


def test_first_loss_nonfinite() -> None:
    after = observe(LRFinderConfig(), LRFinderState(), math.nan)
    assert after.stop_reason == "diverged"
    assert after.lrs == ()
    assert all(s.lr is None for s in suggest(LRFinderConfig(), after).values())


def test_negative_loss_is_refused() -> None:
    with pytest.raises(LRFinderError, match="loss must be >= 0"):
        observe(LRFinderConfig(), LRFinderState(), -0.5)


def test_observe_is_pure() -> None:
    config = LRFinderConfig(num_steps=MIN_STEPS)
    state = _run(config, [2.0, 1.5])
    before = state.to_json()
    new = observe(config, state, 1.0)
    assert new is not state
    assert state.to_json() == before
    assert len(state.lrs) == 2
    assert len(new.lrs) == 3
    with pytest.raises(ValueError, match="frozen"):
        state.done = True  # type: ignore[misc]
    assert isinstance(state.lrs, tuple)


# ------------------------------------------------------------------------ serialization


def test_state_round_trips_through_json_and_bytes() -> None:
    config = LRFinderConfig(start_lr=1e-7, end_lr=10.0, num_steps=40)
    state = _run(config, [0.1 + 0.2, 1 / 3, 2.0 / 7.0, 5e-324, 0.0])
    assert LRFinderState.from_json(state.to_json()) == state
    back = LRFinderState.from_bytes(state.to_bytes())
    assert back == state
    assert [x.hex() for x in back.lrs] == [x.hex() for x in state.lrs]
    assert [x.hex() for x in back.smoothed] == [x.hex() for x in state.smoothed]
    # and the restored state carries on exactly as the original would
    assert observe(config, back, 0.5) == observe(config, state, 0.5)


def test_state_from_bad_json() -> None:
    with pytest.raises(StateError):
        LRFinderState.from_json("{not json")
    with pytest.raises(StateError):
        LRFinderState.from_json('{"lrs": [1.0], "losses": [], "smoothed": []}')
    with pytest.raises(StateError):
        LRFinderState.from_json('{"done": true}')


# ------------------------------------------------------------------------ suggestions


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", range(8))
def test_suggestions_match_their_references(config: LRFinderConfig, seed: int) -> None:
    losses = _curve(seed, config.num_steps)
    history = _pytorch_lr_finder_loop(
        losses,
        config.start_lr,
        config.end_lr,
        config.num_steps,
        config.mode,
        config.smooth_f,
        config.diverge_th,
    )
    state = _run(config, losses)
    got = suggest(config, state)
    assert set(got) == {"steepest", "minimum", "steep", "valley"}

    expected = _pytorch_lr_finder_suggestion(history)
    assert got["steepest"].lr == expected
    if expected is not None:
        k = got["steepest"].index
        assert k is not None
        assert state.lrs[k] == expected

    lrs, sm = _fastai_slice(history["lr"], history["loss"], config.num_steps)
    if len(sm) >= 1:
        assert got["minimum"].lr == _fastai_minimum(lrs, sm)
        idx = _fastai_valley_index(sm)
        if idx >= 0:  # see test_valley_short_run_at_the_start for idx == -1
            assert got["valley"].lr == float(lrs[idx])
            assert got["valley"].index == config.num_steps // 10 + idx
    if len(sm) >= 2:
        assert got["steep"].lr == _fastai_steep(lrs, sm)
    for s in got.values():
        if s.lr is not None:
            assert s.index is not None
            assert s.loss == state.smoothed[s.index]
            assert s.reason is None


@pytest.mark.parametrize("seed", range(200))
def test_valley_matches_fastai_on_rough_curves(seed: int) -> None:
    """Short integer-valued curves: ties, many equal-length subsequences, the edge cases of
    fastai's O(n^2) table against our O(n log n) one."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    sm = rng.integers(0, 6, size=n).astype(float)
    config = LRFinderConfig(num_steps=MIN_STEPS)  # fastai slice starts at 1
    lrs = tuple(np.geomspace(1e-6, 1.0, n + 6).tolist())
    smoothed = (9.0, *sm.tolist(), 9.0, 9.0, 9.0, 9.0, 9.0)
    state = LRFinderState(lrs=lrs, losses=smoothed, smoothed=smoothed, best_loss=min(smoothed))
    got = valley(config, state)
    idx = _fastai_valley_index(sm)
    assert got.index == 1 + max(idx, 0)
    assert got.lr == lrs[1 + max(idx, 0)]


def test_valley_short_run_at_the_start() -> None:
    """fastai's `max_start = max_end - lds[max_end]` is -1 when the slice's two first points
    decrease and no longer decreasing subsequence exists; its index is then -1 and fastai
    suggests the LAST rate of the slice. We take the first point instead."""
    sm = np.array([3.0, 2.0, 4.0, 5.0, 6.0, 7.0])
    assert _fastai_valley_index(sm) == -1
    config = LRFinderConfig(num_steps=MIN_STEPS)
    lrs = tuple(np.geomspace(1e-6, 1.0, len(sm) + 6).tolist())
    smoothed = (9.0, *sm.tolist(), 8.0, 8.0, 8.0, 8.0, 8.0)
    state = LRFinderState(lrs=lrs, losses=smoothed, smoothed=smoothed, best_loss=2.0)
    got = valley(config, state)
    assert got.index == 1  # fastai: lrs[-1] of the slice, index 6 here
    assert got.lr == lrs[1]


def test_minimum_marks_the_minimum_and_suggests_a_tenth() -> None:
    config = LRFinderConfig(num_steps=MIN_STEPS, smooth_f=0.0)
    losses = [3.0] * 8 + [1.0] + [3.0] * 8
    state = _run(config, losses)
    got = minimum(config, state)
    assert got.index == 8
    assert got.lr == state.lrs[8] / 10
    assert got.loss == 1.0


def test_steep_uses_log_rate_differences() -> None:
    # on a linear ramp (0.1, 0.2, ..., 1.7), equal loss drops are steeper in log(lr) where
    # the rate is larger: the steepest segment is the last of fastai's slice [1:-5]
    # (points 1 .. 11), and steep takes its left point, 10
    config = LRFinderConfig(start_lr=0.1, end_lr=1.7, num_steps=MIN_STEPS, mode="linear")
    lrs = tuple(ramp_lr(config, i) for i in range(MIN_STEPS))
    sm = tuple(20.0 - i for i in range(MIN_STEPS))
    state = LRFinderState(lrs=lrs, losses=sm, smoothed=sm, best_loss=min(sm))
    got = steep(config, state)
    assert got.index == 10
    assert got.lr == lrs[10]


@pytest.mark.parametrize(
    ("recorded", "none"),
    [
        (0, {"steepest", "minimum", "steep", "valley"}),
        (1, {"steepest", "minimum", "steep", "valley"}),
        (15, {"steepest", "minimum", "steep", "valley"}),
        (16, {"steepest", "steep"}),
        (17, set()),
    ],
)
def test_too_few_points(recorded: int, none: set[str]) -> None:
    """With the default 100 steps: steepest trims 10 + 5 and needs 2 points (17 recorded);
    fastai's slice [10:-5] needs 1 point for minimum and valley (16), 2 for steep (17)."""
    config = LRFinderConfig()
    state = _run(config, [2.0 - 0.01 * i for i in range(recorded)])
    got = suggest(config, state)
    assert {k for k, s in got.items() if s.lr is None} == none
    for name in none:
        s = got[name]
        assert s.index is None
        assert s.loss is None
        assert s.reason is not None
        assert f"of {recorded} recorded" in s.reason
        assert "needs at least" in s.reason


def test_steepest_alone_is_the_plot_suggestion() -> None:
    config = LRFinderConfig(num_steps=MIN_STEPS, smooth_f=0.0, diverge_th=100.0)
    losses = [5.0] * 10 + [4.0, 1.0] + [9.0] * 5
    state = _run(config, losses)
    s = steepest(config, state)
    # trimmed to [4.0, 1.0]: np.gradient is [-3, -3], argmin 0
    assert (s.index, s.lr) == (10, state.lrs[10])


# --------------------------------------------------------------------------- plots


def test_importing_plots_does_not_import_matplotlib() -> None:
    code = (
        "import sys, service.core.lr_finder, service.core.plots; "
        "assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "case", ["empty", "one point", "nonfinite", "linear", "too few", "completed"]
)
def test_lr_finder_png_edge_states(case: str) -> None:
    pytest.importorskip("matplotlib")
    from service.core.plots import lr_finder_png

    config = LRFinderConfig(mode="linear" if case == "linear" else "exp")
    n = {"empty": 0, "one point": 1, "nonfinite": 30, "linear": 100, "too few": 12}.get(case, 100)
    losses = _curve(0, config.num_steps, diverge=False)[:n]
    state = _run(config, losses)
    if case == "nonfinite":
        state = observe(config, state, math.nan)
    if case == "completed":
        assert state.stop_reason == "completed"
    png = lr_finder_png(config, state, suggest(config, state))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (800, 500)
    assert lr_finder_png(config, state) == lr_finder_png(config, state)  # no suggestions
