"""Aggregators (service.core.federated.aggregators) against implementations written here.

The references work per coordinate on Python floats (`math.fsum` for sums, sorted lists
for medians and trimmed means) and compute Krum by brute force (every pairwise squared
distance with `math.fsum`, scores from sorted lists, ties to the earliest update); the
results are compared in float64 relative to their largest magnitude, <= 1e-12. Crafted
cases check answers worked out by hand (Krum's pick and Multi-Krum's tie-breaking).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from service.core.federated import (
    AggregationError,
    KrumAggregator,
    MeanAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    aggregate,
    krum_scores,
)
from service.core.federated import aggregators as agg_module

TOL = 1e-12


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(ours - ref))) / (scale if scale > 0 else 1.0)


def random_updates(seed: int, n: int, size: int = 57) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    deltas = [rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 1) for _ in range(n)]
    num_examples = [int(k) for k in rng.integers(1, 500, n)]
    return deltas, num_examples


def columns(deltas: list[np.ndarray]) -> list[list[float]]:
    return [[float(d[k]) for d in deltas] for k in range(deltas[0].size)]


def ref_mean(deltas: list[np.ndarray], num_examples: list[int]) -> np.ndarray:
    total = sum(num_examples)
    return np.array(
        [
            math.fsum(n * v for n, v in zip(num_examples, col, strict=True)) / total
            for col in columns(deltas)
        ]
    )


def ref_median(deltas: list[np.ndarray]) -> np.ndarray:
    out = []
    for col in columns(deltas):
        s = sorted(col)
        n = len(s)
        out.append(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    return np.array(out)


def ref_trimmed(deltas: list[np.ndarray], beta: float) -> np.ndarray:
    n = len(deltas)
    cut = math.floor(beta * n)
    out = []
    for col in columns(deltas):
        kept = sorted(col)[cut : n - cut]
        out.append(math.fsum(kept) / len(kept))
    return np.array(out)


def ref_krum_scores(deltas: list[np.ndarray], f: int) -> list[float]:
    n = len(deltas)
    dist = [
        [
            math.fsum((a - b) ** 2 for a, b in zip(deltas[i], deltas[j], strict=True))
            for j in range(n)
        ]
        for i in range(n)
    ]
    k = max(1, n - f - 2)
    return [math.fsum(sorted(dist[i][j] for j in range(n) if j != i)[:k]) for i in range(n)]


def ref_krum(deltas: list[np.ndarray], num_examples: list[int], f: int, m: int) -> np.ndarray:
    scores = ref_krum_scores(deltas, f)
    order = sorted(range(len(deltas)), key=lambda i: (scores[i], i))
    if m == 0:
        return deltas[order[0]].copy()
    keep = order[:m]
    return ref_mean([deltas[i] for i in keep], [num_examples[i] for i in keep])


# -- mean, median, trimmed mean ------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 6, 11])
def test_mean_is_weighted_by_num_examples(n: int) -> None:
    deltas, num_examples = random_updates(100 + n, n)
    out = aggregate(MeanAggregator(), deltas, num_examples)
    assert out.dtype == np.float64
    assert rel_err(out, ref_mean(deltas, num_examples)) <= TOL


def test_mean_by_hand() -> None:
    deltas = [np.array([1.0, 0.0]), np.array([4.0, -3.0])]
    np.testing.assert_array_equal(aggregate(MeanAggregator(), deltas, [2, 1]), [2.0, -1.0])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_median_odd_and_even(n: int) -> None:
    deltas, num_examples = random_updates(200 + n, n)
    out = aggregate(MedianAggregator(), deltas, num_examples)
    assert rel_err(out, ref_median(deltas)) <= TOL


def test_median_by_hand_is_unweighted() -> None:
    deltas = [np.array([v]) for v in (5.0, 1.0, 100.0, 2.0)]
    # even count: mean of the two middle values (2, 5); num_examples do not matter
    np.testing.assert_array_equal(aggregate(MedianAggregator(), deltas, [1, 1000, 1, 1]), [3.5])
    np.testing.assert_array_equal(aggregate(MedianAggregator(), deltas[:3], [1, 1, 1]), [5.0])


@pytest.mark.parametrize(
    ("beta", "n", "cut"),
    [
        (0.0, 5, 0),
        (0.1, 5, 0),
        (0.2, 5, 1),
        (0.2, 10, 2),
        (0.3, 10, 3),
        (0.49, 10, 4),
        (0.1, 30, 3),
    ],
)
def test_trimmed_mean(beta: float, n: int, cut: int) -> None:
    assert int(beta * n) == cut
    deltas, num_examples = random_updates(300 + n, n)
    out = aggregate(TrimmedMeanAggregator(beta=beta), deltas, num_examples)
    assert rel_err(out, ref_trimmed(deltas, beta)) <= TOL
    if cut == 0:  # nothing dropped: the unweighted mean
        assert rel_err(out, ref_mean(deltas, [1] * n)) <= TOL


def test_trimmed_mean_by_hand() -> None:
    deltas = [np.array([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = aggregate(TrimmedMeanAggregator(beta=0.2), deltas, [1] * 5)
    np.testing.assert_array_equal(out, [3.0, -3.0])  # drops 1 and 1000: mean of 2, 3, 4


# -- Krum ----------------------------------------------------------------------------------


def test_krum_crafted() -> None:
    """1-D updates 0, 1, 2, 3, 100 with f = 1: k = n - f - 2 = 2 nearest others;
    scores 0: 1 + 4 = 5, 1: 1 + 1 = 2, 2: 1 + 1 = 2, 3: 1 + 4 = 5, 100: 97^2 + 98^2."""
    deltas = [np.array([v]) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    num_examples = [1, 1, 3, 1, 1]
    np.testing.assert_array_equal(krum_scores(deltas, 1), [5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2])
    # Krum: the lowest score, tie (1 and 2) to the earliest
    out = aggregate(KrumAggregator(num_malicious=1), deltas, num_examples)
    np.testing.assert_array_equal(out, [1.0])
    # Multi-Krum m = 2: updates 1 and 2 weighted 1 and 3: (1 + 6) / 4
    out = aggregate(KrumAggregator(num_malicious=1, num_to_keep=2), deltas, num_examples)
    np.testing.assert_array_equal(out, [1.75])
    # m = 3: then the tie at 5 (updates 0 and 3) goes to update 0: (1 + 6 + 0) / 5
    out = aggregate(KrumAggregator(num_malicious=1, num_to_keep=3), deltas, num_examples)
    np.testing.assert_array_equal(out, [1.4])
    # m = n: every update, the weighted mean
    out = aggregate(KrumAggregator(num_malicious=1, num_to_keep=5), deltas, num_examples)
    np.testing.assert_array_equal(out, [(1 + 6 + 3 + 100) / 7])


def test_krum_rejects_the_outlier_a_mean_would_follow() -> None:
    rng = np.random.default_rng(7)
    honest = [rng.normal(0.0, 0.01, 20) for _ in range(6)]
    attack = [np.full(20, 50.0), np.full(20, -50.0)]
    deltas = [*honest[:3], attack[0], *honest[3:], attack[1]]
    out = aggregate(KrumAggregator(num_malicious=2), deltas, [1] * 8)
    assert any(out.tobytes() == h.tobytes() for h in honest)
    multi = aggregate(KrumAggregator(num_malicious=2, num_to_keep=4), deltas, [1] * 8)
    assert np.max(np.abs(multi)) < 0.1


@pytest.mark.parametrize(
    ("n", "f", "m"), [(3, 0, 0), (5, 1, 0), (9, 2, 0), (9, 2, 4), (12, 3, 12), (7, 0, 3)]
)
def test_krum_random_against_brute_force(n: int, f: int, m: int) -> None:
    deltas, num_examples = random_updates(400 + 10 * n + f + m, n)
    out = aggregate(KrumAggregator(num_malicious=f, num_to_keep=m), deltas, num_examples)
    assert rel_err(krum_scores(deltas, f), np.array(ref_krum_scores(deltas, f))) <= TOL
    ref = ref_krum(deltas, num_examples, f, m)
    assert rel_err(out, ref) <= TOL
    if m == 0:
        assert out.tobytes() == ref.tobytes()  # a copy of the chosen update, exactly
        assert all(out is not d for d in deltas)


def test_krum_ties_go_to_the_earliest() -> None:
    same = np.array([1.0, 2.0])
    deltas = [same + 5.0, same.copy(), same.copy(), same.copy(), same - 5.0]
    out = aggregate(KrumAggregator(num_to_keep=2), deltas, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out, same)  # updates 1 and 2
    scores = krum_scores(deltas, 0)
    assert scores[1] == scores[2] == scores[3]


@pytest.mark.parametrize(
    ("n", "f", "m", "need"), [(2, 0, 0, 3), (4, 1, 0, 5), (6, 2, 0, 7), (5, 0, 6, 6), (4, 1, 2, 5)]
)
def test_krum_too_few_updates(n: int, f: int, m: int, need: int) -> None:
    deltas, num_examples = random_updates(1, n)
    with pytest.raises(AggregationError, match=rf"needs at least {need} updates .*: got {n}"):
        aggregate(KrumAggregator(num_malicious=f, num_to_keep=m), deltas, num_examples)


# -- dtypes, blocks, inputs ------------------------------------------------------------------

AGGREGATORS: list[Any] = [
    MeanAggregator(),
    MedianAggregator(),
    TrimmedMeanAggregator(beta=0.2),
    KrumAggregator(num_malicious=1),
    KrumAggregator(num_malicious=1, num_to_keep=3),
]


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=repr)
def test_float32_in_float32_out(aggregator: Any) -> None:
    deltas, num_examples = random_updates(500, 7)
    ours = aggregate(aggregator, [d.astype(np.float32) for d in deltas], num_examples)
    ref = aggregate(
        aggregator, [d.astype(np.float32).astype(np.float64) for d in deltas], num_examples
    )
    assert ours.dtype == np.float32
    # float64 arithmetic, one rounding at the end
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=repr)
def test_blocks_do_not_change_the_result(aggregator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    deltas, num_examples = random_updates(600, 7, size=1001)
    whole = aggregate(aggregator, deltas, num_examples)
    monkeypatch.setattr(agg_module, "_BLOCK_BYTES", 8 * 7 * 64)  # 64 columns a block
    blocked = aggregate(aggregator, deltas, num_examples)
    assert rel_err(blocked, whole) <= TOL
    if not isinstance(aggregator, KrumAggregator):
        assert blocked.tobytes() == whole.tobytes()


@pytest.mark.parametrize("aggregator", AGGREGATORS, ids=repr)
def test_inputs_untouched_and_output_new(aggregator: Any) -> None:
    deltas, num_examples = random_updates(700, 6)
    before = [d.copy() for d in deltas]
    out = aggregate(aggregator, deltas, num_examples)
    for d, b in zip(deltas, before, strict=True):
        assert d.tobytes() == b.tobytes()
        assert not np.shares_memory(out, d)


def test_empty_params() -> None:
    deltas = [np.empty(0), np.empty(0), np.empty(0)]
    for aggregator in AGGREGATORS[:3]:
        assert aggregate(aggregator, deltas, [1, 1, 1]).shape == (0,)


@pytest.mark.parametrize(
    ("deltas", "num_examples", "match"),
    [
        ([], [], "no updates"),
        ([np.zeros(3)], [1, 2], "1 updates but 2 num_examples"),
        ([np.zeros(3), np.zeros(4)], [1, 1], r"update 1 is float64\[4\], update 0 float64\[3\]"),
        ([np.zeros(3), np.zeros(3, np.float32)], [1, 1], "update 1 is float32"),
        ([np.zeros((2, 2))], [1], "flat float32 or float64"),
        ([np.zeros(3, np.int64)], [1], "flat float32 or float64"),
        ([np.zeros(3), [0.0, 0.0, 0.0]], [1, 1], "update 1 is not a flat array"),
        ([np.zeros(2), np.array([0.0, np.nan])], [1, 1], "update 1 holds a value that is not"),
        ([np.zeros(2), np.array([np.inf, 0.0])], [1, 1], "not finite"),
        ([np.zeros(2)], [0], r"num_examples\[0\] must be an int from 1 to 1000000000000: got 0"),
        (
            [np.zeros(2)],
            [True],
            r"num_examples\[0\] must be an int from 1 to 1000000000000: got True",
        ),
        (
            [np.zeros(2)],
            [1.0],
            r"num_examples\[0\] must be an int from 1 to 1000000000000: got 1.0",
        ),
    ],
)
def test_bad_input_is_refused(deltas: Any, num_examples: Any, match: str) -> None:
    for aggregator in AGGREGATORS[:3]:
        with pytest.raises(AggregationError, match=match):
            aggregate(aggregator, deltas, num_examples)
