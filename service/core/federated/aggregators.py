"""How a round's client updates combine into one delta: `aggregate(aggregator, deltas,
num_examples)`.

Each update is a flat delta (the client's new weights minus the round's global weights),
all of one dtype (float32 or float64) and length; `num_examples[i]` (an int >= 1) is the
weight of `deltas[i]` where the rule is weighted. The result is a new array in the deltas'
dtype; the arithmetic is done in float64 (sums, medians, means and distances) and the
result rounded once to the dtype. Neither input is changed.

The rules mirror Flower's `flwr.server.strategy.aggregate` (flwr 1.41.0), which combines
WEIGHTS rather than deltas. Every rule below is translation-equivariant (combining
`w_i = x + d_i` gives `x` plus the combination of the `d_i`; Krum's distances do not
change), so in exact arithmetic aggregating the deltas and adding them to `x` is what
Flower computes; in floating point the two agree to rounding (deltas are smaller than
weights, so ours rounds less).

* `mean` (FedAvg): `sum_i n_i d_i / sum_i n_i`, accumulated in float64. Flower's
  `aggregate` (aggregate.py:28-43) sums `n_i w_i` and divides by the total; its
  `aggregate_inplace` (aggregate.py:46, FedAvg's default `inplace=True`) sums
  `(n_i / N) w_i` in the weights' dtype: the same mean, rounded differently.
* `median` (FedMedian): `np.median` over the clients, per coordinate, unweighted
  (aggregate_median, aggregate.py:86-94); with an even count, the mean of the two middle
  values.
* `trimmed_mean` (FedTrimmedAvg): `cut = int(beta * n)`; per coordinate, sort the `n`
  values and average the middle `n - 2 cut`, unweighted (`_trim_mean`, aggregate.py:259-280,
  scipy.stats.trim_mean's rule; `beta < 0.5` leaves at least one value). Flower partitions
  instead of sorting: the same values are averaged, in another order.
* `krum` (Krum / Multi-Krum, Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS), as Flower's `aggregate_krum`
  (aggregate.py:97-131): `D[i, j] = ||d_i - d_j||^2` (unweighted);
  `k = max(1, n - f - 2)`; `score_i` = the sum of the `k` smallest `D[i, j]`, `j != i`
  (Flower takes `argsort(D[i])[1 : k + 1]`, i.e. drops the smallest entry, the zero
  distance to itself: the same sum); `m = 0`: the update with the lowest score (a copy);
  `m > 0` (Multi-Krum): the `num_examples`-weighted mean of the `m` updates with the
  lowest scores. Ties go to the earliest update: Flower's Krum takes `np.argmin` (the
  first minimum); its Multi-Krum keeps `np.argsort(scores)[::-1][n - m:]`, which keeps the
  earliest of tied updates when the argsort is stable (NumPy's default kind does not
  promise it); we sort stably.

  Differences from Flower, both refusals rather than other values: Flower takes any `n`
  (with `n <= f + 2` every score sums one distance; with `n = 1` it is 0), we ask
  `n >= 2 f + 3`, Blanchard et al.'s assumption `n > 2 f + 2` (FederatedConfig asks it of
  `min_clients`, so a round always satisfies it); Flower's Multi-Krum with `m > n` slices
  `[n - m:]` from a negative start and so keeps the `min(n, m - n)` lowest (`n = 3, m = 4`
  keeps one); we refuse `m > n`. Flower computes `D` as `np.linalg.norm(d)**2`, we as the
  float64 sum of squares: equal to rounding.

Tested (tests/core/test_federated_aggregators.py) against implementations written in the
test (per-coordinate Python loops with `math.fsum`, a brute-force Krum), float64, relative
error <= 1e-12, on crafted cases with known answers and on seeded random ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from service.core.errors import CoreError
from service.core.federated.config import (
    Aggregator,
    KrumAggregator,
    MeanAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    krum_min_clients,
)

__all__ = ["AggregationError", "aggregate", "krum_scores"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: the float64 block `(n, columns)` the coordinate-wise rules stack at a time
_BLOCK_BYTES = 1 << 25


class AggregationError(CoreError):
    """Updates that cannot be aggregated: none, of different lengths or dtypes, not
    finite, bad `num_examples`, or too few for Krum."""


MAX_EXAMPLES = 10**12
"""The largest `num_examples` an update may carry: weights stay exact in float64 and a
round's total cannot overflow."""


def aggregate(
    aggregator: Aggregator,
    deltas: Sequence[np.ndarray],
    num_examples: Sequence[int],
) -> np.ndarray:
    """Combine the flat `deltas` (one per client, same dtype and length, finite) with the
    rule `aggregator` names; `num_examples[i]` weighs `deltas[i]` in `mean` and Multi-Krum.

    Returns a new flat array in the deltas' dtype. Raises AggregationError for bad input
    (see the module docstring for the rules).
    """
    dtype, size = _check(deltas, num_examples)
    if isinstance(aggregator, MeanAggregator):
        return _weighted_mean(deltas, num_examples, dtype)
    if isinstance(aggregator, MedianAggregator):
        return _columnwise(deltas, size, dtype, lambda block: np.median(block, axis=0))
    if isinstance(aggregator, TrimmedMeanAggregator):
        n = len(deltas)
        cut = int(aggregator.beta * n)  # Flower's and scipy's `int(proportiontocut * nobs)`
        return _columnwise(
            deltas, size, dtype, lambda block: np.sort(block, axis=0)[cut : n - cut].mean(axis=0)
        )
    if isinstance(aggregator, KrumAggregator):
        return _krum(aggregator, deltas, num_examples, dtype, size)
    raise AggregationError(f"unknown aggregator {aggregator!r}")


def krum_scores(deltas: Sequence[np.ndarray], num_malicious: int) -> np.ndarray:
    """Krum's score of each update (float64): the sum of the squared distances to its
    `max(1, n - num_malicious - 2)` nearest other updates. Checks only the deltas."""
    _check(deltas, [1] * len(deltas))
    n = len(deltas)
    size = deltas[0].size
    dist = np.zeros((n, n))
    for lo, hi in _blocks(n, size):
        block = _stack(deltas, lo, hi)
        for i in range(n):
            diff = block - block[i]
            dist[i] += np.einsum("ij,ij->i", diff, diff)
    closest = max(1, n - num_malicious - 2)
    scores = np.empty(n)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = others[:closest].sum()
    return scores


def _krum(
    aggregator: KrumAggregator,
    deltas: Sequence[np.ndarray],
    num_examples: Sequence[int],
    dtype: np.dtype[np.floating],
    size: int,
) -> np.ndarray:
    n = len(deltas)
    need = krum_min_clients(aggregator)
    if n < need:
        f, m = aggregator.num_malicious, aggregator.num_to_keep
        raise AggregationError(
            f"krum with num_malicious {f} and num_to_keep {m} needs at least {need} updates "
            f"(n > 2 * num_malicious + 2 and n >= num_to_keep): got {n}"
        )
    scores = krum_scores(deltas, aggregator.num_malicious)
    if aggregator.num_to_keep == 0:
        return deltas[int(np.argmin(scores))].astype(dtype, copy=True)
    keep = np.argsort(scores, kind="stable")[: aggregator.num_to_keep]
    return _weighted_mean([deltas[i] for i in keep], [num_examples[i] for i in keep], dtype)


def _weighted_mean(
    deltas: Sequence[np.ndarray], num_examples: Sequence[int], dtype: np.dtype[np.floating]
) -> np.ndarray:
    total = np.zeros(deltas[0].size)
    for delta, n in zip(deltas, num_examples, strict=True):
        total += float(n) * delta.astype(np.float64, copy=False)
    total /= float(sum(num_examples))
    return total.astype(dtype, copy=False)


def _columnwise(
    deltas: Sequence[np.ndarray],
    size: int,
    dtype: np.dtype[np.floating],
    rule: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Apply `rule` (a float64 `(n, c)` block -> its `(c,)` result) block by block."""
    out = np.empty(size, dtype=dtype)
    for lo, hi in _blocks(len(deltas), size):
        out[lo:hi] = rule(_stack(deltas, lo, hi))
    return out


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    width = max(1, _BLOCK_BYTES // (8 * n))
    return [(lo, min(size, lo + width)) for lo in range(0, size, width)] or [(0, 0)]


def _stack(deltas: Sequence[np.ndarray], lo: int, hi: int) -> np.ndarray:
    block = np.empty((len(deltas), hi - lo))
    for i, delta in enumerate(deltas):
        block[i] = delta[lo:hi]
    return block


def _check(
    deltas: Sequence[np.ndarray], num_examples: Sequence[int]
) -> tuple[np.dtype[np.floating], int]:
    if len(deltas) == 0:
        raise AggregationError("no updates to aggregate")
    if len(num_examples) != len(deltas):
        raise AggregationError(
            f"{len(deltas)} updates but {len(num_examples)} num_examples: one per update"
        )
    first = deltas[0]
    if not isinstance(first, np.ndarray) or first.ndim != 1 or first.dtype not in _DTYPES:
        raise AggregationError("each update must be a flat float32 or float64 array")
    for i, delta in enumerate(deltas):
        if not isinstance(delta, np.ndarray) or delta.ndim != 1:
            raise AggregationError(f"update {i} is not a flat array")
        if delta.dtype != first.dtype or delta.size != first.size:
            raise AggregationError(
                f"update {i} is {delta.dtype}[{delta.size}], update 0 {first.dtype}[{first.size}]"
            )
        if not np.isfinite(delta).all():
            raise AggregationError(f"update {i} holds a value that is not finite")
    for i, n in enumerate(num_examples):
        if (
            isinstance(n, bool)
            or not isinstance(n, (int, np.integer))
            or not 1 <= n <= MAX_EXAMPLES
        ):
            raise AggregationError(
                f"num_examples[{i}] must be an int from 1 to {MAX_EXAMPLES}: got {n!r}"
            )
    dtype: np.dtype[np.floating] = first.dtype
    return dtype, first.size
