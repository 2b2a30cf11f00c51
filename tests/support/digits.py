"""A small MLP on scikit-learn's digits, in NumPy, for tests that train for real
(tests/core/test_lr_range_digits.py, and over HTTP tests/e2e/test_training_*.py).

* data (`load_data`): `sklearn.datasets.load_digits` (bundled, no download): 1,797 8x8
  images, 10 classes; a stratified 75/25 split (random_state 0), standardized with the
  training set's mean and standard deviation;
* model: 64 -> 64 (ReLU) -> 10, softmax cross-entropy, gradients written by hand; its four
  tensors `w1`, `b1`, `w2`, `b2` live in one flat float64 vector laid out by `LAYOUT`
  (`LAYOUT.unflatten(flat)` gives the named tensors a session is created with).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from service.core import FlatLayout

HIDDEN = 64
BATCH = 64
LAYOUT = FlatLayout.from_shapes(
    [("w1", (64, HIDDEN)), ("b1", (HIDDEN,)), ("w2", (HIDDEN, 10)), ("b2", (10,))]
)


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.cache
def load_data() -> Data:
    """The standardized split (computed once per process; treat the arrays as read-only)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank
    return Data((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def init_params(seed: int) -> np.ndarray:
    """He-initialised weights, zero biases, as one flat float64 vector."""
    rng = np.random.default_rng(seed)
    return LAYOUT.flatten(
        {
            "w1": rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64),
            "b1": np.zeros(HIDDEN),
            "w2": rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN),
            "b2": np.zeros(10),
        },
        np.float64,
    )


def logits(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    p = LAYOUT.unflatten(params)
    return np.asarray(np.maximum(x @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"])


def accuracy(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of `x` whose largest logit is its label."""
    return float(np.mean(logits(params, x).argmax(axis=1) == y))


def loss_and_grad(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient (flat, float64), by hand."""
    p = LAYOUT.unflatten(params)
    h = x @ p["w1"] + p["b1"]
    a = np.maximum(h, 0.0)
    z = a @ p["w2"] + p["b2"]
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = float(-log_probs[np.arange(n), y].mean())
    dz = np.exp(log_probs)
    dz[np.arange(n), y] -= 1.0
    dz /= n
    da = dz @ p["w2"].T
    dh = da * (h > 0)
    grads = {"w1": x.T @ dh, "b1": dh.sum(axis=0), "w2": a.T @ dz, "b2": dz.sum(axis=0)}
    return loss, LAYOUT.flatten(grads, np.float64)


def minibatches(n: int, seed: int, batch: int = BATCH) -> Iterator[np.ndarray]:
    """Endless shuffled minibatches of `batch` indices (the last partial batch dropped)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield perm[start : start + batch]
