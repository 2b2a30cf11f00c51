"""Consistency modes (service.core.consistency): parsing, staleness, damping, reduction."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core.consistency import (
    AsyncConsistency,
    ConsistencyError,
    SyncConsistency,
    damped_lr,
    parse_consistency,
    reduce_grads,
    requires_base_version,
    staleness,
    too_stale,
)
from service.core.errors import CoreError

# ---------------------------------------------------------------- damping


@pytest.mark.parametrize(
    ("s", "expected"), [(0, 0.3), (1, 0.15), (3, 0.075), (9, 0.03), (None, 0.3)]
)
def test_inverse_damping(s: int | None, expected: float) -> None:
    # Zhang et al. 2016: alpha / tau, with tau = 1 + staleness
    assert damped_lr(0.3, s, "inverse") == pytest.approx(expected, rel=1e-15)


def test_inverse_damping_is_one_division() -> None:
    assert damped_lr(0.1, 2, "inverse") == 0.1 / 3
    assert damped_lr(0.1, 0, "inverse") == 0.1


@pytest.mark.parametrize("s", [0, 1, 3, 100, None])
def test_no_damping(s: int | None) -> None:
    assert damped_lr(0.3, s, "none") == 0.3


def test_negative_staleness_refused() -> None:
    with pytest.raises(CoreError):
        damped_lr(0.1, -1, "inverse")


# ---------------------------------------------------------------- staleness


def test_staleness() -> None:
    assert staleness(10, 10) == 0
    assert staleness(10, 7) == 3
    assert staleness(10, 0) == 10
    assert staleness(0, 0) == 0
    assert staleness(5, None) is None


@pytest.mark.parametrize(("version", "base"), [(3, 4), (0, 1), (3, -1)])
def test_impossible_base_version(version: int, base: int) -> None:
    with pytest.raises(ConsistencyError) as info:
        staleness(version, base)
    assert info.value.errors[0]["loc"] == ("base_version",)
    message = str(info.value)
    assert str(version) in message
    assert str(base) in message


def test_too_stale_boundaries() -> None:
    config = AsyncConsistency(max_staleness=2)
    assert not too_stale(config, 0)
    assert not too_stale(config, 2)  # == max passes
    assert too_stale(config, 3)  # max + 1 refused
    assert not too_stale(config, None)
    zero = AsyncConsistency(max_staleness=0)
    assert not too_stale(zero, 0)
    assert too_stale(zero, 1)


def test_unlimited_staleness() -> None:
    config = AsyncConsistency()
    assert not too_stale(config, 0)
    assert not too_stale(config, 10**9)


def test_sync_accepts_only_the_current_version() -> None:
    config = SyncConsistency(mode="sync")
    assert not too_stale(config, 0)
    assert too_stale(config, 1)
    assert not too_stale(config, None)


def test_requires_base_version() -> None:
    assert not requires_base_version(AsyncConsistency())
    assert requires_base_version(AsyncConsistency(max_staleness=0))
    assert requires_base_version(SyncConsistency(mode="sync"))


# ---------------------------------------------------------------- parsing


def test_defaults() -> None:
    assert parse_consistency(None) == AsyncConsistency(
        mode="async", max_staleness=None, staleness_damping="none"
    )
    assert parse_consistency({}) == AsyncConsistency()
    assert parse_consistency({"mode": "sync"}) == SyncConsistency(
        mode="sync", accumulate=2, reduce="mean"
    )


def test_shorthand_strings() -> None:
    assert parse_consistency("async") == AsyncConsistency()
    assert parse_consistency("sync") == SyncConsistency(mode="sync")


def test_full_specs() -> None:
    config = parse_consistency(
        {"mode": "async", "max_staleness": 2, "staleness_damping": "inverse"}
    )
    assert config == AsyncConsistency(max_staleness=2, staleness_damping="inverse")
    assert parse_consistency({"max_staleness": 0}) == AsyncConsistency(max_staleness=0)
    config = parse_consistency({"mode": "sync", "accumulate": 1, "reduce": "sum"})
    assert config == SyncConsistency(mode="sync", accumulate=1, reduce="sum")
    assert parse_consistency(config) is config


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"mode": "eventual"}, ("mode",)),
        ({"mode": 1}, ("mode",)),
        ({"mode": None}, ("mode",)),
        ({"max_staleness": -1}, ("max_staleness",)),
        ({"max_staleness": 1.0}, ("max_staleness",)),
        ({"max_staleness": "2"}, ("max_staleness",)),
        ({"max_staleness": True}, ("max_staleness",)),
        ({"staleness_damping": "sqrt"}, ("staleness_damping",)),
        ({"accumulate": 2}, ("accumulate",)),  # async takes no accumulate
        ({"mode": "sync", "accumulate": 0}, ("accumulate",)),
        ({"mode": "sync", "accumulate": 2.0}, ("accumulate",)),
        ({"mode": "sync", "reduce": "max"}, ("reduce",)),
        ({"mode": "sync", "max_staleness": 1}, ("max_staleness",)),
        ("eventual", ()),
        ("", ()),
        (3, ()),
        (["sync"], ()),
    ],
)
def test_invalid_specs_name_the_field(data: Any, loc: tuple[str, ...]) -> None:
    with pytest.raises(ConsistencyError) as info:
        parse_consistency(data)
    assert [e["loc"] for e in info.value.errors] == [loc]


def test_messages() -> None:
    with pytest.raises(ConsistencyError, match="accumulate must be >= 1: got 0"):
        parse_consistency({"mode": "sync", "accumulate": 0})
    with pytest.raises(ConsistencyError, match="mode must be 'async' or 'sync': got 'x'"):
        parse_consistency({"mode": "x"})


def test_configs_are_frozen() -> None:
    config = AsyncConsistency()
    with pytest.raises(ValueError, match="frozen"):
        config.max_staleness = 3  # type: ignore[misc]


# ---------------------------------------------------------------- reduction


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reduce_mean(dtype: type[np.floating[Any]]) -> None:
    total = np.array([3.0, -6.0, 1.0], dtype=dtype)
    mean = reduce_grads(total, 3, "mean")
    assert mean.dtype == dtype
    np.testing.assert_array_equal(mean, total / 3)  # one division, not * (1/3)
    np.testing.assert_array_equal(total, np.array([3.0, -6.0, 1.0], dtype=dtype))
    assert not np.shares_memory(mean, total)


def test_reduce_sum() -> None:
    total = np.array([3.0, -6.0, 1.0])
    assert reduce_grads(total, 3, "sum") is total
    np.testing.assert_array_equal(reduce_grads(total, 1, "mean"), total)


def test_reduce_needs_a_count() -> None:
    with pytest.raises(CoreError):
        reduce_grads(np.zeros(2), 0, "mean")
