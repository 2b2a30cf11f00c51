"""Response models of the v1 API (docs/api.md), with examples for OpenAPI; the request models
are the sessions layer's (`service.sessions.requests`), re-exported here.

"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.sessions.requests import (
    CreateSession,
    Dtype,
    MetricsRequest,
    NonFinitePolicy,
    PreviewPlotRequest,
    PreviewRequest,
    ReturnKind,
    StepRequest,
    Tensor,
    TensorSet,
    UpdateRequest,
)


class TensorInfo(BaseModel):
    shape: list[int]


#: a session document as the server answers create and GET (the examples of openapi.yaml)
SESSION_EXAMPLE: dict[str, Any] = {
    "id": "SBkXXGsj-4ri2ntgCzbuEpG46oOCXFDe",
    "step": 0,
    "version": 0,
    "lr": 0.0,
    "optimizer": {
        "name": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-08,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    },
    "schedule": {
        "name": "cosine_decay",
        "warmup": {"steps": 100, "start_factor": 0.0},
        "decay_steps": 1000,
        "alpha": 0.0,
    },
    "dtype": "float32",
    "params": {"w": {"shape": [2, 2]}, "b": {"shape": [2]}},
    "transforms": {"clip_norm": None, "norm_type": 2.0, "per_tensor": False, "clip_value": None},
    "nonfinite": "error",
    "skipped": 0,
    "created_at": 1795266012.1014316,
    "updated_at": 1795266012.1014316,
    "lr_finder": None,
    "ema": None,
    "swa": None,
    "consistency": {"mode": "async", "max_staleness": None, "staleness_damping": "none"},
    "history": 1000,
    "pending": None,
    "federated": None,
    "round": None,
}


class PendingDoc(BaseModel):
    """A sync session's open accumulation, in its document (docs/training.md)."""

    base_version: int = Field(description="the version the gradients are accumulated on")
    count: int = Field(description="gradients accumulated so far")
    accumulate: int = Field(description="gradients per step")
    started_at: float | None = Field(
        None, description="Unix time of the accumulation's first push (null when empty)"
    )
    deadline: float | None = Field(
        None,
        description=(
            "Unix time from which the next push or waiting reader resolves the "
            "accumulation as `on_timeout` says: `started_at + timeout` (null when empty)"
        ),
    )


class SessionDoc(BaseModel):
    """A session (`GET /v1/sessions/{id}`, and the answer to create)."""

    model_config = ConfigDict(json_schema_extra={"examples": [SESSION_EXAMPLE]})

    id: str
    step: int = Field(description="steps applied")
    version: int = Field(
        description=(
            "the params version: bumped by every step, skipped ones included (a reported "
            "loss or a pending sync push does not move it)"
        )
    )
    lr: float = Field(description="the rate the next step will use")
    optimizer: dict[str, Any] = Field(description="every hyperparameter, defaults filled")
    schedule: dict[str, Any] | None = Field(description="as given, defaults filled")
    dtype: Dtype
    params: dict[str, TensorInfo]
    transforms: dict[str, Any] = Field(description="gradient transforms (extension)")
    nonfinite: NonFinitePolicy = Field(description="non-finite gradient policy (extension)")
    skipped: int = Field(
        0,
        description=(
            "steps skipped: a non-finite gradient or result under `nonfinite: skip`, a "
            "diverged range test, a sync accumulation dropped at its deadline (extension)"
        ),
    )
    created_at: float = Field(0.0, description="Unix time (extension)")
    updated_at: float = Field(0.0, description="Unix time (extension)")
    lr_finder: dict[str, Any] | None = Field(None, description="range test (extension)")
    ema: dict[str, Any] | None = Field(None, description="EMA settings (extension)")
    swa: dict[str, Any] | None = Field(None, description="SWA settings (extension)")
    consistency: dict[str, Any] | None = Field(None, description="(extension)")
    history: int = Field(0, description="history entries kept (extension)")
    pending: PendingDoc | None = Field(
        None, description="sync sessions: the open accumulation (extension)"
    )
    federated: dict[str, Any] | None = Field(None, description="federated settings (extension)")
    round: int | None = Field(None, description="federated sessions: the open round")


class SessionSummary(BaseModel):
    """One session of `GET /v1/sessions`."""

    id: str
    optimizer: str = Field(description="the optimizer's name")
    step: int = Field(description="steps applied")
    version: int = Field(description="as in the session document")
    lr: float = Field(description="the rate the next step will use")
    updated_at: float = Field(description="Unix time of the last change (or of creation)")
    federated: bool = Field(description="a federated session (docs/federated.md)")
    lr_finder: bool = Field(description="a session running an LR range test")


class SessionList(BaseModel):
    """The tenant's sessions (`GET /v1/sessions`)."""

    sessions: list[SessionSummary] = Field(description="most recently updated first")
    truncated: bool = Field(description="the tenant has more sessions than `limit`")


class StepResponse(BaseModel):
    """The answer to a step: `params` or `updates` (new minus old) or neither."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "step": 1,
                    "version": 1,
                    "lr": 0.001,
                    "skipped": False,
                    "grad_norm": 0.158,
                    "clipped": False,
                    "params": {"w": [[0.099, -0.201], [0.299, 0.399]], "b": [-0.001, 0.001]},
                }
            ]
        }
    )

    step: int
    version: int
    lr: float = Field(description="the rate used by this step (the schedule at t = step - 1)")
    skipped: bool = Field(
        False,
        description="the step changed nothing: a non-finite gradient or result was skipped",
    )
    grad_norm: float | None = Field(
        None, description="norm of the incoming gradient (null when non-finite) (extension)"
    )
    clipped: bool = Field(False, description="clipping changed the gradient (extension)")
    staleness: int | None = Field(
        None, description="version - base_version (null without base_version) (extension)"
    )
    contributors: int = Field(1, description="gradients combined into this step (extension)")
    params: TensorSet | None = Field(None, description='with "return": "params" (default)')
    updates: TensorSet | None = Field(None, description='with "return": "updates"')


class PendingResponse(BaseModel):
    """`202` to a sync push that did not complete the accumulation (docs/training.md)."""

    status: Literal["pending"] = "pending"
    version: int = Field(description="the version the gradient was accumulated against")
    wait_for: int = Field(description="the version the step will make")
    pending: int = Field(description="gradients accumulated so far")
    accumulate: int = Field(description="gradients per step")


class UpdateResponse(BaseModel):
    round: int
    accepted: bool
    received: int = Field(description="updates in this round so far")
    closed: bool = Field(description="this update closed the round")
    next_round: int | None = None


class RoundResponse(BaseModel):
    """`GET /v1/sessions/{id}/round`."""

    round: int
    deadline: float
    opened_at: float
    received: int
    min_clients: int
    expected_clients: int | None
    clients: list[str]
    step: int
    version: int
    lr: float = Field(description="the server rate this round closes with")
    params: TensorSet


class MetricsResponse(BaseModel):
    step: int
    version: int
    lr: float = Field(description="the rate the next step will use, after this loss")
    observed: bool = Field(description="a loss-driven schedule took the loss")


class HistoryEntry(BaseModel):
    kind: Literal["step", "metrics", "round"]
    step: int
    version: int
    time: float
    lr: float
    loss: float | None = None
    grad_norm: float | None = None
    update_norm: float | None = None
    skipped: bool | None = None
    staleness: int | None = None
    contributors: int | None = None
    flushed: bool | None = Field(
        None,
        description=(
            "sync: the step applied an accumulation at its deadline, with `contributors` "
            "gradients, fewer than `accumulate`"
        ),
    )
    dropped: int | None = Field(
        None,
        description="sync: gradients discarded at the accumulation's deadline (a skipped step)",
    )


class HistoryResponse(BaseModel):
    limit: int = Field(description="entries the session keeps")
    entries: list[HistoryEntry] = Field(description="most recent first")


class SuggestionModel(BaseModel):
    method: str
    lr: float | None
    index: int | None = None
    loss: float | None = None
    reason: str | None = None
    reference: str


class LRFinderResponse(BaseModel):
    """`GET /v1/sessions/{id}/lr-finder`: the range test so far and its suggestions."""

    config: dict[str, Any]
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    best_loss: float | None
    done: bool
    stop_reason: Literal["completed", "diverged"] | None
    nonfinite_lr: float | None
    next_lr: float | None
    suggestions: dict[str, SuggestionModel]


class ParamsResponse(BaseModel):
    """`GET /v1/sessions/{id}/params`."""

    step: int
    version: int
    params: TensorSet


class PreviewResponse(BaseModel):
    lrs: list[float] = Field(description="the rate at steps 0 .. steps-1")
    momenta: list[float] | None = Field(
        None, description="the cycled momentum / beta1 per step, if the schedule cycles one"
    )


class Health(BaseModel):
    status: str
    store: str | None = None


class ProblemField(BaseModel):
    loc: list[str | int] = Field(description='where, e.g. ["body", "optimizer", "betas", 0]')
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem (`application/problem+json`): every refusal of the API."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:optserve:problem:validation-error",
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "betas[0] must be in [0, 1): got 1.2",
                    "errors": [
                        {
                            "loc": ["body", "optimizer", "betas", 0],
                            "msg": "must be in [0, 1): got 1.2",
                        }
                    ],
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemField]
    version: int | None = Field(
        None, description="the session's version now (stale-gradient, wait-timeout)"
    )
    base_version: int | None = Field(
        None, description="the base_version the request sent (stale-gradient)"
    )
    round: int | None = Field(None, description="the current round (round-closed)")


__all__ = [
    "CreateSession",
    "Dtype",
    "Health",
    "HistoryEntry",
    "HistoryResponse",
    "LRFinderResponse",
    "MetricsRequest",
    "MetricsResponse",
    "NonFinitePolicy",
    "ParamsResponse",
    "PendingDoc",
    "PendingResponse",
    "PreviewPlotRequest",
    "PreviewRequest",
    "PreviewResponse",
    "Problem",
    "ProblemField",
    "ReturnKind",
    "RoundResponse",
    "SessionDoc",
    "StepRequest",
    "StepResponse",
    "Tensor",
    "TensorInfo",
    "TensorSet",
    "UpdateRequest",
    "UpdateResponse",
]
