"""The `federated` object of a session: how many clients a round waits for, its deadline,
how the clients' updates combine (the aggregator) and what clients send by default.

Plain data, validated strictly like every spec of the core (frozen, no unknown keys, a
number must be a JSON number); `parse_federated` raises `FederatedError` naming each field
at fault, e.g. `expected_clients must be >= min_clients (8): got 4` or
`aggregator.beta must be in [0, 0.5): got 0.5`.

The aggregators (see `aggregators.py` for their rules and the Flower code they mirror):

* `{"name": "mean"}` (default): the `num_examples`-weighted mean (FedAvg);
* `{"name": "median"}`: the coordinate-wise median (unweighted; Flower's FedMedian);
* `{"name": "trimmed_mean", "beta": 0.2}`: per coordinate, drop the `int(beta * n)`
  smallest and largest values and average the rest (unweighted; Flower's FedTrimmedAvg,
  scipy's `trim_mean`), `beta` in [0, 0.5);
* `{"name": "krum", "num_malicious": f, "num_to_keep": m}`: Krum (`m = 0`) or Multi-Krum
  (Blanchard et al. 2017; Flower's Krum). A round aggregates at least `min_clients`
  updates, so the config asks `min_clients >= 2 f + 3` (Blanchard et al.'s `n > 2 f + 2`)
  and `min_clients >= m`, and a round can always be aggregated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from service.core.errors import SpecError
from service.core.validators import interval

__all__ = [
    "Aggregator",
    "FederatedConfig",
    "FederatedError",
    "KrumAggregator",
    "MeanAggregator",
    "MedianAggregator",
    "TrimmedMeanAggregator",
    "UpdateKind",
    "krum_min_clients",
    "parse_federated",
]

_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

UpdateKind = Literal["delta", "weights"]


class FederatedError(SpecError):
    """An invalid `federated` spec (each error names its field)."""


class MeanAggregator(BaseModel):
    """`{"name": "mean"}`: the mean of the updates weighted by `num_examples` (FedAvg)."""

    model_config = _CONFIG

    name: Literal["mean"] = "mean"


class MedianAggregator(BaseModel):
    """`{"name": "median"}`: the coordinate-wise median, unweighted (Flower's FedMedian)."""

    model_config = _CONFIG

    name: Literal["median"] = "median"


class TrimmedMeanAggregator(BaseModel):
    """`{"name": "trimmed_mean", "beta": 0.2}`: per coordinate, the mean of the values left
    after dropping the `int(beta * n)` smallest and largest (unweighted; Flower's
    FedTrimmedAvg, whose `beta` is also in [0, 0.5) with default 0.2)."""

    model_config = _CONFIG

    name: Literal["trimmed_mean"] = "trimmed_mean"
    beta: Annotated[float, interval(0.0, 0.5, hi_open=True)] = 0.2


class KrumAggregator(BaseModel):
    """`{"name": "krum", "num_malicious": 0, "num_to_keep": 0}`: Krum / Multi-Krum
    (Blanchard et al. 2017) with Flower's `Krum` names (`num_malicious_clients`,
    `num_clients_to_keep`) and defaults (0, 0). `num_to_keep = 0` picks one update."""

    model_config = _CONFIG

    name: Literal["krum"] = "krum"
    num_malicious: Annotated[int, interval(0)] = 0
    num_to_keep: Annotated[int, interval(0)] = 0


Aggregator = Annotated[
    MeanAggregator | MedianAggregator | TrimmedMeanAggregator | KrumAggregator,
    Field(discriminator="name"),
]


def krum_min_clients(aggregator: KrumAggregator) -> int:
    """The fewest updates Krum takes: `2 f + 3` (Blanchard et al. assume `n > 2 f + 2`),
    and at least `num_to_keep` for Multi-Krum."""
    return max(2 * aggregator.num_malicious + 3, aggregator.num_to_keep)


class FederatedConfig(BaseModel):
    """A federated session's settings.

    * `min_clients` (2) >= 1: a round never closes with fewer updates;
    * `expected_clients` (None) >= `min_clients`: a round closes as soon as this many
      distinct clients reported; None: only the deadline closes a round;
    * `round_timeout` (60) > 0: seconds from a round's opening to its deadline;
    * `aggregator` (`{"name": "mean"}`): how the updates combine (discriminated on `name`);
      Krum needs `min_clients >= max(2 num_malicious + 3, num_to_keep)`;
    * `update` ("delta"): what clients send when they do not say, `"delta"` (new weights
      minus the round's global weights) or `"weights"`.
    """

    model_config = _CONFIG

    min_clients: Annotated[int, interval(1)] = 2
    expected_clients: Annotated[int, interval(1)] | None = None
    round_timeout: Annotated[float, interval(0.0, lo_open=True)] = 60.0
    aggregator: Aggregator = Field(default_factory=MeanAggregator)
    update: UpdateKind = "delta"

    @field_validator("expected_clients")
    @classmethod
    def _at_least_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_clients")
        if value is not None and low is not None and value < low:
            raise PydanticCustomError(
                "expected_clients",
                "must be >= min_clients ({min_clients}): got {value}",
                {"min_clients": low, "value": value},
            )
        return value

    @field_validator("aggregator")
    @classmethod
    def _krum_fits(cls, value: Any, info: ValidationInfo) -> Any:
        low = info.data.get("min_clients")
        if isinstance(value, KrumAggregator) and low is not None:
            need = krum_min_clients(value)
            if low < need:
                raise PydanticCustomError(
                    "krum_clients",
                    "krum with num_malicious {f} and num_to_keep {m} needs min_clients >= "
                    "{need} (n > 2 * num_malicious + 2 and n >= num_to_keep): "
                    "min_clients is {low}",
                    {"f": value.num_malicious, "m": value.num_to_keep, "need": need, "low": low},
                )
        return value


_TAGS = ("mean", "median", "trimmed_mean", "krum")


def _loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # a discriminated union reports ('aggregator', 'trimmed_mean', 'beta'); the field is
    # ('aggregator', 'beta')
    if len(loc) >= 2 and loc[0] == "aggregator" and loc[1] in _TAGS:
        return (loc[0], *loc[2:])
    return loc


def parse_federated(data: Mapping[str, Any]) -> FederatedConfig:
    """Validate a `federated` spec, defaults filled; raises FederatedError naming each field
    at fault, e.g. `aggregator.beta must be in [0, 0.5): got 0.5`."""
    if not isinstance(data, Mapping):
        raise FederatedError([{"loc": (), "msg": "federated must be an object"}])
    try:
        return FederatedConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise FederatedError([_error(e) for e in exc.errors()]) from None


def _error(e: Any) -> dict[str, object]:
    loc = _loc(tuple(e["loc"]))
    msg = e["msg"]
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = (*loc, "name")
    if e["type"] == "union_tag_invalid":
        msg = f"unknown aggregator {e['ctx']['tag']!r}; known: {', '.join(_TAGS)}"
    elif e["type"] == "union_tag_not_found":
        msg = f"an aggregator needs a name, one of: {', '.join(_TAGS)}"
    return {"loc": loc, "msg": msg}
