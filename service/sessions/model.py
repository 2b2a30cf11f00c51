"""What a session keeps beside its params and state, typed: the entries of `meta.extra`.

A session's meta (`service.store.base.SessionMeta`) holds its counters, its spec and
`extra`, a JSON object with one entry per feature the session runs:

| key | model | kept by |
| --- | --- | --- |
| `pending` | `Pending`: the open sync accumulation | sync sessions |
| `last` | `LastStep`: the last step's rate and norms, for pushes that waited | sync sessions |
| `lr_finder` | `service.core.lr_finder.LRFinderState`: the range test so far | range tests |
| `round` | `RoundRecord`: the open federated round | federated sessions |

Each model is the one (de)serialiser of its entry: `read_*` validates what is stored
(strict, no unknown fields) and `model_dump()` writes it, with the fields in the order
the stored JSON has always had them, so a session stored before these models reads and
writes the same bytes. A state file's `extra` is checked with the same models
(`state_io`), so an import can hold nothing a session could not have written.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.federated import MAX_EXAMPLES
from service.store.base import SessionMeta

#: the largest counter a JSON client reads exactly (2**53 - 1)
MAX_SAFE_INT = 2**53 - 1

_STRICT = ConfigDict(extra="forbid", strict=True)


class Pending(BaseModel):
    """A sync session's accumulation on version `base_version`: `count` gradients in,
    their `losses` (None once a push came without one), and `started_at`, the Unix time
    of its first push (None when empty, and in records written before accumulations had
    deadlines: the session then counts from its `updated_at`, `accumulation.pending_of`)."""

    model_config = _STRICT

    base_version: int = Field(ge=0)
    count: int = Field(ge=0)
    losses: list[float | None] | None
    started_at: float | None = Field(None, ge=0, allow_inf_nan=False)

    @classmethod
    def empty(cls, version: int) -> Pending:
        """No gradient yet on `version`."""
        return cls(base_version=version, count=0, losses=[], started_at=None)


class LastStep(BaseModel):
    """The last step of a sync session, as the pushes that waited for it are answered."""

    model_config = _STRICT

    lr: float
    grad_norm: float | None
    clipped: bool
    skipped: bool
    #: gradients combined into that step (0: an accumulation dropped at its deadline);
    #: absent in records written before accumulations had deadlines
    contributors: int | None = Field(None, ge=0, le=MAX_SAFE_INT)


class RoundRecord(BaseModel):
    """A federated session's open round: who reported in it (`clients`, in arrival
    order, with their `num_examples` and `metrics`), when it opened and its deadline."""

    model_config = _STRICT

    round: int = Field(ge=0)
    opened_at: float
    deadline: float
    clients: list[str]
    num_examples: list[int]
    metrics: list[dict[str, float]]

    @model_validator(mode="after")
    def _aligned(self) -> RoundRecord:
        if not len(self.clients) == len(self.num_examples) == len(self.metrics):
            raise ValueError("clients, num_examples and metrics must have the same length")
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("a client is listed twice")
        if any(not 1 <= n <= MAX_EXAMPLES for n in self.num_examples):
            raise ValueError(f"num_examples must be from 1 to {MAX_EXAMPLES}")
        return self


def read_pending(meta: SessionMeta) -> Pending | None:
    """The stored accumulation record of a sync session (None when it has none)."""
    data = meta.extra.get("pending")
    return None if data is None else Pending.model_validate(data)


def read_last(meta: SessionMeta) -> LastStep | None:
    """The stored last step of a sync session (None before its first)."""
    data = meta.extra.get("last")
    return None if data is None else LastStep.model_validate(data)


__all__ = ["MAX_SAFE_INT", "LastStep", "Pending", "RoundRecord", "read_last", "read_pending"]
