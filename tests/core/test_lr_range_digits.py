"""The LR range test run for real: a small MLP on scikit-learn's digits, trained by our SGD.

* data and model: tests/support/digits.py (`load_digits`, bundled, a stratified 75/25
  split, standardized; a 64 -> 64 (ReLU) -> 10 MLP, softmax cross-entropy, gradients
  written by hand, its four tensors in one flat vector laid out by a `FlatLayout`);
* optimizer: our `sgd` (momentum 0.9) through `get_optimizer("sgd").update(...)`, with
  `impl="numpy"` (the NumPy reference: no numba compile time in this test; the fused
  kernel has its own parity tests);
* range test: `LRFinderConfig()` defaults (1e-7 -> 10 over 100 steps, exp ramp, smooth_f
  0.05, diverge_th 5), minibatches of 64, `observe` after every loss;
* we take the `steepest` suggestion (pytorch-lr-finder's, the reference's only one), train
  a fresh model at that rate for a fixed budget (10 epochs of 21 minibatches, fixed seeds)
  and require test accuracy >= 0.90;
* at 100 times that rate, on the same budget, training must diverge: a non-finite loss at
  some step, or a final training-set loss above the initial one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.core import get_optimizer, parse_hyper
from service.core.lr_finder import LRFinderConfig, LRFinderState, next_lr, observe, suggest
from service.core.lr_finder import Suggestion as LRSuggestion
from service.core.schedules import parse_schedule
from tests.support.digits import (
    BATCH,
    LAYOUT,
    Data,
    accuracy,
    init_params,
    load_data,
    loss_and_grad,
    minibatches,
)

EPOCHS = 10
HYPER = parse_hyper({"name": "sgd", "lr": 0.01, "momentum": 0.9})
OPT = get_optimizer("sgd")


@dataclass(frozen=True)
class RangeTest:
    config: LRFinderConfig
    state: LRFinderState
    suggestions: dict[str, LRSuggestion]


@dataclass(frozen=True)
class Trained:
    accuracy: float
    initial_loss: float  # on the whole training set, before the first step
    final_loss: float  # likewise after the last step (inf or nan if it blew up)
    nonfinite_at: int | None  # the first step whose minibatch loss was not finite


@pytest.fixture(scope="module")
def data() -> Data:
    return load_data()


def check_gradient(data: Data) -> None:
    params = init_params(3)
    x, y = data.x_train[:16], data.y_train[:16]
    _, grad = loss_and_grad(params, x, y)
    rng = np.random.default_rng(4)
    for k in rng.choice(params.size, 20, replace=False):
        e = np.zeros_like(params)
        e[k] = 1e-6
        numeric = (loss_and_grad(params + e, x, y)[0] - loss_and_grad(params - e, x, y)[0]) / 2e-6
        assert numeric == pytest.approx(grad[k], rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def range_test(data: Data) -> RangeTest:
    check_gradient(data)
    config = LRFinderConfig()
    params = init_params(0)
    opt_state = OPT.init(HYPER, params, LAYOUT)
    state = LRFinderState()
    batches = minibatches(len(data.y_train), seed=1)
    while not state.done:
        lr = next_lr(config, state)
        assert lr is not None
        idx = next(batches)
        loss, grads = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
        state = observe(config, state, loss)  # the loss of the batch trained at `lr`
        with np.errstate(all="ignore"):  # the last steps run at rates that blow up
            params, opt_state = OPT.update(
                HYPER, grads, opt_state, params, lr=lr, layout=LAYOUT, impl="numpy"
            )
    return RangeTest(config, state, suggest(config, state))


def train(data: Data, lr: float, seed: int = 0) -> Trained:
    params = init_params(seed)
    opt_state = OPT.init(HYPER, params, LAYOUT)
    batches = minibatches(len(data.y_train), seed=seed + 1)
    steps = EPOCHS * (len(data.y_train) // BATCH)
    nonfinite_at = None
    with np.errstate(all="ignore"):  # 100x the rate overflows on purpose
        initial_loss = loss_and_grad(params, data.x_train, data.y_train)[0]
        for step in range(steps):
            idx = next(batches)
            loss, grads = loss_and_grad(params, data.x_train[idx], data.y_train[idx])
            if not np.isfinite(loss):
                nonfinite_at = step
                break
            params, opt_state = OPT.update(
                HYPER, grads, opt_state, params, lr=lr, layout=LAYOUT, impl="numpy"
            )
        final_loss = loss_and_grad(params, data.x_train, data.y_train)[0]
        test_accuracy = accuracy(params, data.x_test, data.y_test)
    return Trained(test_accuracy, initial_loss, final_loss, nonfinite_at)


def test_suggested_rate_trains_and_100x_diverges(data: Data, range_test: RangeTest) -> None:
    state = range_test.state
    assert state.done
    suggestion = range_test.suggestions["steepest"]
    assert suggestion.lr is not None
    lr = suggestion.lr
    assert range_test.config.start_lr < lr < range_test.config.end_lr

    good = train(data, lr)
    bad = train(data, 100 * lr)
    others = ", ".join(
        f"{k} {s.lr:.3g}" for k, s in range_test.suggestions.items() if s.lr is not None
    )
    print(
        f"\nrange test: {len(state.lrs)} steps, {state.stop_reason}; suggestions: {others}"
        f"\nsteepest lr {lr:.4g}: test accuracy {good.accuracy:.4f} "
        f"(train loss {good.initial_loss:.3f} -> {good.final_loss:.4f})"
        f"\n100x lr {100 * lr:.4g}: test accuracy {bad.accuracy:.4f} "
        f"(train loss {bad.initial_loss:.3f} -> {bad.final_loss:.4g}, "
        f"non-finite minibatch loss at step {bad.nonfinite_at})"
    )
    assert good.nonfinite_at is None
    assert good.accuracy >= 0.90
    assert good.final_loss < good.initial_loss
    # diverged: a non-finite loss, or ended above where it started
    assert bad.nonfinite_at is not None or bad.final_loss > bad.initial_loss
    assert bad.accuracy < good.accuracy


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _check_png(path: Path) -> None:
    png = path.read_bytes()
    width, height = _png_size(png)
    assert width >= 300
    assert height >= 300
    assert 5_000 <= len(png) <= 2_000_000


def test_plots(data: Data, range_test: RangeTest, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from service.core.plots import lr_finder_png, schedule_png

    finder = tmp_path / "lr_finder.png"
    finder.write_bytes(lr_finder_png(range_test.config, range_test.state, range_test.suggestions))
    _check_png(finder)

    lr = range_test.suggestions["steepest"].lr
    assert lr is not None
    steps = EPOCHS * (len(data.y_train) // BATCH)  # the training budget
    schedule = parse_schedule({"name": "step", "step_size": 70, "warmup": {"steps": 10}})
    sched = tmp_path / "schedule.png"
    sched.write_bytes(schedule_png(schedule, lr, steps, current_step=100))
    _check_png(sched)
    # the same input draws the same picture
    assert lr_finder_png(range_test.config, range_test.state, range_test.suggestions) == (
        finder.read_bytes()
    )
