"""The `federated` spec (service.core.federated.config): defaults, strictness, and errors
that name the field at fault."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.core.errors import SpecError
from service.core.federated import (
    FederatedConfig,
    FederatedError,
    KrumAggregator,
    MeanAggregator,
    TrimmedMeanAggregator,
    krum_min_clients,
    parse_federated,
)


def test_defaults() -> None:
    config = parse_federated({})
    assert config.model_dump() == {
        "min_clients": 2,
        "expected_clients": None,
        "round_timeout": 60.0,
        "aggregator": {"name": "mean"},
        "update": "delta",
    }
    assert config == FederatedConfig()
    assert isinstance(config.aggregator, MeanAggregator)


def test_the_contract_example() -> None:
    config = parse_federated(
        {
            "min_clients": 8,
            "expected_clients": 10,
            "round_timeout": 30,
            "aggregator": {"name": "mean"},
        }
    )
    assert config.round_timeout == 30.0
    assert config.expected_clients == 10


@pytest.mark.parametrize(
    ("aggregator", "dumped"),
    [
        ({"name": "median"}, {"name": "median"}),
        ({"name": "trimmed_mean"}, {"name": "trimmed_mean", "beta": 0.2}),
        ({"name": "trimmed_mean", "beta": 0}, {"name": "trimmed_mean", "beta": 0.0}),
        ({"name": "krum"}, {"name": "krum", "num_malicious": 0, "num_to_keep": 0}),
        (
            {"name": "krum", "num_malicious": 1, "num_to_keep": 4},
            {"name": "krum", "num_malicious": 1, "num_to_keep": 4},
        ),
    ],
)
def test_aggregators(aggregator: dict[str, Any], dumped: dict[str, Any]) -> None:
    config = parse_federated({"min_clients": 5, "aggregator": aggregator})
    assert config.aggregator.model_dump() == dumped
    # the dump parses back to the same config
    assert parse_federated(config.model_dump()) == config


@pytest.mark.parametrize(
    ("spec", "loc", "msg"),
    [
        ({"min_clients": 0}, ("min_clients",), "must be >= 1: got 0"),
        ({"min_clients": 1.0}, ("min_clients",), "valid integer"),
        ({"min_clients": "2"}, ("min_clients",), "valid integer"),
        ({"min_clients": True}, ("min_clients",), "valid integer"),
        (
            {"min_clients": 8, "expected_clients": 4},
            ("expected_clients",),
            "must be >= min_clients (8): got 4",
        ),
        ({"expected_clients": 0}, ("expected_clients",), "must be >= 1: got 0"),
        ({"round_timeout": 0}, ("round_timeout",), "must be > 0: got 0"),
        ({"round_timeout": -5.0}, ("round_timeout",), "must be > 0"),
        ({"round_timeout": float("inf")}, ("round_timeout",), "finite"),
        ({"update": "gradient"}, ("update",), "'delta' or 'weights'"),
        ({"aggregator": {"name": "fedavg"}}, ("aggregator", "name"), "unknown aggregator 'fedavg'"),
        ({"aggregator": {}}, ("aggregator", "name"), "needs a name, one of: mean, median"),
        ({"aggregator": "mean"}, ("aggregator",), "dictionary"),
        (
            {"aggregator": {"name": "trimmed_mean", "beta": 0.5}},
            ("aggregator", "beta"),
            "must be in [0, 0.5): got 0.5",
        ),
        (
            {"aggregator": {"name": "trimmed_mean", "beta": -0.1}},
            ("aggregator", "beta"),
            "must be in [0, 0.5)",
        ),
        (
            {"aggregator": {"name": "krum", "num_malicious": -1}},
            ("aggregator", "num_malicious"),
            "must be >= 0",
        ),
        (
            {"aggregator": {"name": "krum", "num_to_keep": 1.5}},
            ("aggregator", "num_to_keep"),
            "valid integer",
        ),
        ({"aggregator": {"name": "mean", "beta": 0.1}}, ("aggregator", "beta"), "Extra inputs"),
        ({"aggregator": {"name": "krum"}}, ("aggregator",), "needs min_clients >= 3"),
        (
            {"min_clients": 4, "aggregator": {"name": "krum", "num_malicious": 1}},
            ("aggregator",),
            "krum with num_malicious 1 and num_to_keep 0 needs min_clients >= 5",
        ),
        (
            {"min_clients": 5, "aggregator": {"name": "krum", "num_to_keep": 6}},
            ("aggregator",),
            "needs min_clients >= 6",
        ),
        ({"clients": 3}, ("clients",), "Extra inputs"),
    ],
)
def test_errors_name_the_field(spec: dict[str, Any], loc: tuple[Any, ...], msg: str) -> None:
    with pytest.raises(FederatedError) as info:
        parse_federated(spec)
    assert isinstance(info.value, SpecError)
    first = info.value.errors[0]
    assert first["loc"] == loc, info.value.errors
    assert msg in str(first["msg"]), info.value.errors


def test_all_errors_are_reported() -> None:
    with pytest.raises(FederatedError) as info:
        parse_federated({"min_clients": 0, "round_timeout": 0, "update": "x"})
    assert [e["loc"] for e in info.value.errors] == [
        ("min_clients",),
        ("round_timeout",),
        ("update",),
    ]
    assert str(info.value).startswith("min_clients must be >= 1: got 0; round_timeout")


def test_not_a_mapping() -> None:
    with pytest.raises(FederatedError, match="federated must be an object"):
        parse_federated([1, 2])  # type: ignore[arg-type]


def test_frozen_and_krum_min_clients() -> None:
    config = parse_federated({})
    with pytest.raises(ValidationError):
        config.min_clients = 3
    assert krum_min_clients(KrumAggregator()) == 3
    assert krum_min_clients(KrumAggregator(num_malicious=2)) == 7
    assert krum_min_clients(KrumAggregator(num_malicious=1, num_to_keep=9)) == 9
    assert TrimmedMeanAggregator().beta == 0.2
