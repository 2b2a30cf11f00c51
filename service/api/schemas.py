"""Request and response models of the v1 API (API.md), with examples for OpenAPI.

Tensors travel as nested lists of numbers (`Tensor`); pydantic passes them through as
they are (no per-element validation, which would be slow): `service.api.codecs` turns
each into a NumPy array and refuses ragged or non-numeric ones naming the tensor.

The optimizer and schedule specs are plain objects here; the core validates them
(`parse_hyper`, `parse_schedule`) and the API reports each field at fault under
`["body", "optimizer", ...]` / `["body", "schedule", ...]`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from service.core.federated import MAX_EXAMPLES
from service.core.optim import OPTIMIZERS
from service.core.schedules import SCHEDULES
from service.core.transforms import GradientTransforms

_TENSOR_SCHEMA: dict[str, Any] = {
    "description": (
        "A tensor: a number (shape []) or a nested list of numbers whose nesting gives "
        "the shape ([[1, 2], [3, 4]] is shape [2, 2]). Non-finite values are refused."
    ),
    "anyOf": [{"type": "number"}, {"type": "array", "items": {}}],
    "examples": [[[0.1, -0.2], [0.3, 0.4]]],
}

#: a tensor as JSON (validated by the codecs, not by pydantic)
Tensor = Annotated[Any, WithJsonSchema(_TENSOR_SCHEMA)]
TensorSet = dict[str, Tensor]

Dtype = Literal["float32", "float64"]
NonFinitePolicy = Literal["error", "skip"]
ReturnKind = Literal["params", "updates", "none"]

OptimizerSpec = Annotated[
    dict[str, Any],
    Field(
        description=(
            "`name` and any hyperparameters, named as in torch.optim; those not given "
            "take the PyTorch (or reference implementation) default."
        ),
        examples=[{"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0}],
        json_schema_extra={
            "required": ["name"],
            "properties": {"name": {"type": "string", "enum": sorted(OPTIMIZERS)}},
        },
    ),
]
ScheduleSpec = Annotated[
    dict[str, Any],
    Field(
        description=(
            "`name` and the schedule's parameters (torch.optim.lr_scheduler names where "
            'PyTorch has it); any schedule may carry `"warmup": {"steps": N, '
            '"start_factor": f}`.'
        ),
        examples=[{"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}}],
        json_schema_extra={
            "required": ["name"],
            "properties": {"name": {"type": "string", "enum": sorted(SCHEDULES)}},
        },
    ),
]


class CreateSession(BaseModel):
    """`POST /v1/sessions` (JSON form).

    In binary form (`application/octet-stream`) the safetensors tensors are `params` and
    `__metadata__` carries `optimizer`, `schedule` and `transforms` as JSON strings and
    `dtype` and `nonfinite` as plain strings.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "optimizer": {
                        "name": "adam",
                        "lr": 0.001,
                        "betas": [0.9, 0.999],
                        "weight_decay": 0.0,
                    },
                    "schedule": {
                        "name": "cosine_decay",
                        "decay_steps": 1000,
                        "warmup": {"steps": 100},
                    },
                    "params": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]},
                    "dtype": "float32",
                }
            ]
        },
    )

    optimizer: OptimizerSpec
    schedule: ScheduleSpec | None = None
    params: TensorSet = Field(
        description="initial values of every tensor, by name",
        # documented only: the binary form validates an empty `params` here (its tensors
        # travel apart), and the engine says which rule a request breaks
        json_schema_extra={"minProperties": 1, "propertyNames": {"not": {"const": "__metadata__"}}},
    )
    dtype: Dtype = Field("float32", description="dtype of the params and optimizer state")
    transforms: GradientTransforms | None = Field(
        None, description="gradient clipping applied before every step (extension)"
    )
    nonfinite: NonFinitePolicy | None = Field(
        None,
        description=(
            "a gradient holding NaN/inf, or a step whose result (params or any optimizer "
            'state) would: refuse the step with 422 naming the tensors ("error", default) '
            'or commit a skipped step that changes nothing but the version ("skip"); a '
            "non-finite result is never stored (extension)"
        ),
    )
    lr_finder: dict[str, Any] | None = Field(
        None,
        description=(
            "run an LR range test: `start_lr` (1e-7), `end_lr` (10), `num_steps` (100), "
            "`mode` (exp | linear), `smooth_f` (0.05), `diverge_th` (5); every step needs "
            "its loss (docs/training.md) (extension)"
        ),
        examples=[{"start_lr": 1e-7, "end_lr": 10.0, "num_steps": 100}],
    )
    ema: dict[str, Any] | None = Field(
        None,
        description="keep an EMA of the params: `decay` (0.999), `bias_correction` (true)",
        examples=[{"decay": 0.999, "bias_correction": True}],
    )
    swa: dict[str, Any] | None = Field(
        None,
        description="keep a stochastic weight average: `start` (0), `every` (1)",
        examples=[{"start": 100}],
    )
    consistency: dict[str, Any] | Literal["async", "sync"] | None = Field(
        None,
        description=(
            'how concurrent workers combine: {"mode": "async", "max_staleness": S, '
            '"staleness_damping": "none" | "inverse"} (default) or {"mode": "sync", '
            '"accumulate": K, "reduce": "mean" | "sum", "timeout": seconds (60; an '
            "accumulation still open that long after its first push is resolved), "
            '"on_timeout": "flush" | "drop"} (extension)'
        ),
        examples=[{"mode": "sync", "accumulate": 4, "timeout": 30.0, "on_timeout": "flush"}],
    )
    history: int | None = Field(
        None,
        strict=True,
        description="history entries kept (default 1000; 0 keeps none) (extension)",
    )
    federated: dict[str, Any] | None = Field(
        None,
        description=(
            "make this a federated session (docs/federated.md): `min_clients`, "
            "`expected_clients`, `round_timeout`, `aggregator`, `update`; the optimizer is "
            "then a server optimizer (fedavg, fedavgm, fedadagrad, fedadam, fedyogi)"
        ),
        examples=[{"min_clients": 8, "expected_clients": 10, "round_timeout": 30}],
    )


class StepRequest(BaseModel):
    """`POST /v1/sessions/{id}/step` (JSON form).

    In binary form the safetensors tensors are `grads` and `__metadata__` may carry
    `loss` (a number as a string), `return` and `skip_missing` (`"true"` / `"false"`).

    With `skip_missing` (extension), `grads` may omit tensors, as PyTorch skips a
    parameter whose `.grad` is None: an omitted tensor keeps its params and every
    optimizer state segment bit for bit. The session's step counter still advances, so
    unlike torch's per-parameter step counts, a tensor skipped at some steps later gets
    bias corrections (Adam, ...) for the session's step.
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {"grads": {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}, "loss": 0.73}
            ]
        },
    )

    grads: TensorSet = Field(
        description=(
            "a gradient for every parameter (or some of them, with `skip_missing`), "
            "registered shapes"
        )
    )
    loss: float | None = Field(
        None, strict=True, description="optional; advances loss-driven schedules (plateau)"
    )
    return_: ReturnKind = Field(
        "params", alias="return", description="what the response carries besides the counters"
    )
    skip_missing: bool = Field(
        False,
        strict=True,
        description=(
            "let `grads` omit tensors (torch's parameters whose .grad is None): those keep "
            "their params and optimizer state bit for bit, while the session's step counter "
            "still advances (bias corrections use the session's step) (extension)"
        ),
    )
    base_version: int | None = Field(
        None,
        ge=0,
        strict=True,
        description=(
            "the version of the params the gradient was computed on: staleness checks "
            "and damping, sync accumulation (extension)"
        ),
    )
    wait: float = Field(
        0.0,
        ge=0.0,
        le=60.0,
        strict=True,
        allow_inf_nan=False,
        description=(
            "sync sessions: seconds a push that does not complete the accumulation waits "
            "for the step before answering 202 (extension)"
        ),
    )


class TensorInfo(BaseModel):
    shape: list[int]


#: a session document as the server answers create and GET (shared with openapi.py)
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
    version: int = Field(description="bumped by every committed change (skipped steps too)")
    lr: float = Field(description="the rate the next step will use")
    optimizer: dict[str, Any] = Field(description="every hyperparameter, defaults filled")
    schedule: dict[str, Any] | None = Field(description="as given, defaults filled")
    dtype: Dtype
    params: dict[str, TensorInfo]
    transforms: dict[str, Any] = Field(description="gradient transforms (extension)")
    nonfinite: NonFinitePolicy = Field(description="non-finite gradient policy (extension)")
    skipped: int = Field(0, description="steps skipped for non-finite gradients (extension)")
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
    skipped: bool = Field(False, description="the gradient was non-finite and skipped")
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


class UpdateRequest(BaseModel):
    """`POST /v1/sessions/{id}/rounds/{round}/updates`: one client's update."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "client_id": "c7",
                    "delta": {"w": [[0.01, -0.02], [0.0, 0.01]], "b": [0.003, 0.0]},
                    "num_examples": 120,
                    "metrics": {"loss": 0.41, "accuracy": 0.88},
                }
            ]
        },
    )

    client_id: str = Field(description="who sends it (1 to 128 printable characters)")
    delta: TensorSet | None = Field(None, description="new weights minus the round's weights")
    weights: TensorSet | None = Field(None, description="the new weights (instead of delta)")
    num_examples: Annotated[int, Field(ge=1, le=MAX_EXAMPLES, strict=True)] = Field(
        description="examples trained on: the update's weight in the mean (at most 10**12)"
    )
    metrics: dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False)]] | None = Field(
        None, description="the client's numbers (loss, accuracy, ...), averaged per round"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> UpdateRequest:
        if (self.delta is None) == (self.weights is None):
            raise ValueError("give exactly one of delta and weights")
        return self


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


class MetricsRequest(BaseModel):
    """`POST /v1/sessions/{id}/metrics`: a loss reported without a step."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"loss": 0.42}]})

    loss: float = Field(strict=True, allow_inf_nan=False, description="the loss to report")


class MetricsResponse(BaseModel):
    step: int
    version: int
    lr: float = Field(description="the rate the next step will use, after this loss")
    observed: bool = Field(description="a loss-driven schedule took the loss")


class HistoryEntry(BaseModel):
    kind: Literal["step", "metrics"]
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


class PreviewRequest(BaseModel):
    """`POST /v1/schedules/preview`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "lr": 0.1,
                    "schedule": {"name": "step", "step_size": 30, "gamma": 0.1},
                    "steps": 100,
                }
            ]
        },
    )

    lr: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = Field(
        0.001, description="the optimizer's lr (default 0.001, PyTorch's Adam/SGD default)"
    )
    schedule: ScheduleSpec
    steps: Annotated[int, Field(ge=1, le=100_000, strict=True)] = Field(
        100, description="rates for steps 0 .. steps-1 (at most 100000)"
    )


class PreviewPlotRequest(PreviewRequest):
    """`POST /v1/schedules/preview.png`: a preview request, and a step to mark."""

    current_step: Annotated[int, Field(ge=0, strict=True)] | None = Field(
        None, description="a step to mark (below `steps`)"
    )


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
