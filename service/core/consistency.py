"""How the gradients of concurrent workers are combined into steps.

A worker reads the params at version `v` (the session's count of steps, applied or
skipped) and pushes a gradient computed on them, with `base_version = v`. By the time it
arrives the session may be at version `V >= v`; its staleness is `V - v`.

* `async` (`AsyncConsistency`, the default): each push is applied on arrival.

  - `max_staleness` (None = unlimited, or an int >= 0): a push with staleness above it is
    refused (`too_stale`); staleness == `max_staleness` is still applied. A session with
    `max_staleness` needs `base_version` on every push (`requires_base_version`).
  - `staleness_damping`: "none" (default) keeps the rate; "inverse" divides it by
    `1 + staleness` (`damped_lr`). Zhang, Gupta, Lian, Liu 2016, "Staleness-aware
    Async-SGD for Distributed Deep Learning" (IJCAI), section 3: the rate of a gradient
    with staleness `tau` is `alpha / tau` (alpha the base rate). Their `tau` counts a
    fresh gradient as 1 (they divide by it, and a gradient computed on the current params
    must keep the full rate); our staleness counts it as 0, so `lr / (1 + staleness)` is
    their rule with `tau = 1 + staleness`. A push without `base_version` keeps the full
    rate (staleness unknown, damped as 0).

* `sync` (`SyncConsistency`): `accumulate` (default 2, >= 1) gradients, all computed on
  the session's current version (staleness 0, anything else is too stale), are combined
  with `reduce` ("mean", the default: their sum divided by their count, as data-parallel
  all-reduce averaging; or "sum") and applied as one step (`reduce_grads`).

  An accumulation has a deadline: `timeout` seconds (default 60, in (0, 86400]) after
  its first push (`accumulation_deadline`). Once it passed (`accumulation_expired`) the
  accumulation is resolved as `on_timeout` says: "flush" (the default) applies what
  arrived as one step, as if `accumulate` were reached; "drop" discards it as a skipped
  step (params, state and rate stay, the version moves on, so whoever waits for it is
  answered). A worker that never pushes can then not hold the session forever.

`parse_consistency` takes the spec of a session: None (async with defaults), the strings
"async" / "sync" (short for `{"mode": ...}`), or a mapping discriminated by `mode` (a
mapping without `mode` is async, its default). Errors are `ConsistencyError` with field
locations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from service.core.errors import CoreError, SpecError
from service.core.validators import interval

Damping = Literal["none", "inverse"]
Reduce = Literal["mean", "sum"]
OnTimeout = Literal["flush", "drop"]
MODES = ("async", "sync")
#: seconds a sync accumulation may stay open after its first push: default and most
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 86400.0


class ConsistencyError(SpecError):
    """An invalid `consistency` spec, or a `base_version` that cannot be."""


class AsyncConsistency(BaseModel):
    """Apply each push on arrival.

    * `max_staleness` (None: unlimited) >= 0: refuse pushes more versions behind;
    * `staleness_damping` ("none"): "inverse" runs a push at `lr / (1 + staleness)`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    mode: Literal["async"] = "async"
    max_staleness: Annotated[int, interval(0)] | None = None
    staleness_damping: Damping = "none"


class SyncConsistency(BaseModel):
    """Combine `accumulate` (2) pushes on the same version with `reduce` ("mean" or "sum")
    into one step; an accumulation still open `timeout` (60) seconds after its first push
    is resolved as `on_timeout` ("flush" or "drop") says."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    mode: Literal["sync"]
    accumulate: Annotated[int, interval(1)] = 2
    reduce: Reduce = "mean"
    timeout: Annotated[float, interval(0.0, MAX_TIMEOUT, lo_open=True)] = DEFAULT_TIMEOUT
    on_timeout: OnTimeout = "flush"


Consistency = Annotated[AsyncConsistency | SyncConsistency, Field(discriminator="mode")]

_ADAPTER: TypeAdapter[AsyncConsistency | SyncConsistency] = TypeAdapter(Consistency)


def parse_consistency(
    data: Mapping[str, Any] | str | AsyncConsistency | SyncConsistency | None,
) -> AsyncConsistency | SyncConsistency:
    """Validate a `consistency` spec (None, "async", "sync", or a mapping on `mode`);
    raises ConsistencyError naming each field at fault, e.g.
    `accumulate must be >= 1: got 0` or `mode must be 'async' or 'sync': got 'x'`."""
    if data is None:
        return AsyncConsistency()
    if isinstance(data, AsyncConsistency | SyncConsistency):
        return data
    if isinstance(data, str):
        if data not in MODES:
            raise ConsistencyError(
                [{"loc": (), "msg": f"must be 'async', 'sync' or an object: got {data!r}"}]
            )
        body: dict[str, Any] = {"mode": data}
    elif isinstance(data, Mapping):
        body = {"mode": "async", **data}
    else:
        raise ConsistencyError(
            [{"loc": (), "msg": f"must be 'async', 'sync' or an object: got {data!r}"}]
        )
    mode = body["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise ConsistencyError(
            [{"loc": ("mode",), "msg": f"must be 'async' or 'sync': got {mode!r}"}]
        )
    try:
        return _ADAPTER.validate_python(body)
    except ValidationError as exc:
        # the union puts the tag first in each loc (`("sync", "accumulate")`): drop it
        raise ConsistencyError(
            [
                {
                    "loc": tuple(e["loc"][1:] if e["loc"][:1] == (mode,) else e["loc"]),
                    "msg": e["msg"],
                }
                for e in exc.errors()
            ]
        ) from None


def requires_base_version(config: AsyncConsistency | SyncConsistency) -> bool:
    """Whether every push must carry `base_version`: sync sessions, and async ones with
    `max_staleness` set."""
    return isinstance(config, SyncConsistency) or config.max_staleness is not None


def staleness(version: int, base_version: int | None) -> int | None:
    """`version - base_version`: how many versions the params moved on since the gradient's
    params were read; None without `base_version`. Raises ConsistencyError (loc
    `base_version`) when `base_version` is negative or above `version`."""
    if base_version is None:
        return None
    if base_version < 0 or base_version > version:
        raise ConsistencyError(
            [
                {
                    "loc": ("base_version",),
                    "msg": f"must be in [0, {version}] (the session's version): got {base_version}",
                }
            ]
        )
    return version - base_version


def damped_lr(lr: float, staleness: int | None, damping: Damping) -> float:
    """The rate a push runs at: `lr / (1 + staleness)` with "inverse" damping (Zhang et al.
    2016's `alpha / tau` with `tau = 1 + staleness`), `lr` with "none" or without a
    staleness."""
    if staleness is None or damping == "none":
        return lr
    if staleness < 0:
        raise CoreError(f"staleness must be >= 0: got {staleness}")
    return lr / (1 + staleness)


def too_stale(config: AsyncConsistency | SyncConsistency, staleness: int | None) -> bool:
    """Whether a push must be refused as stale: async, above `max_staleness` (never when it
    is None); sync, any staleness but 0. An unknown staleness (None) is never too stale
    (whether `base_version` is required is `requires_base_version`)."""
    if staleness is None:
        return False
    if isinstance(config, SyncConsistency):
        return staleness != 0
    return config.max_staleness is not None and staleness > config.max_staleness


def reduce_grads(total: np.ndarray, count: int, reduce: Reduce) -> np.ndarray:
    """Combine `count` gradients summed in `total`: "mean" `total / count` (one division, a
    new array, in `total`'s dtype), "sum" `total` itself."""
    if count < 1:
        raise CoreError(f"count must be >= 1: got {count}")
    if reduce == "sum":
        return total
    return total / count


def accumulation_deadline(config: SyncConsistency, started_at: float) -> float:
    """When an accumulation whose first push came at `started_at` (Unix time) is due:
    `started_at + timeout`."""
    return started_at + config.timeout


def accumulation_expired(
    config: SyncConsistency, count: int, started_at: float | None, now: float
) -> bool:
    """Whether an accumulation of `count` gradients, started at `started_at`, must be
    resolved (`on_timeout`) at `now`: it holds gradients and its deadline is reached. An
    empty one (count 0, or no start known) never expires."""
    if count <= 0 or started_at is None:
        return False
    return now >= accumulation_deadline(config, started_at)
