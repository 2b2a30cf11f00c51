"""The requests the sessions layer takes: the JSON bodies of create, step, federated
update, metrics and schedule preview, as pydantic models (the API's contract: the
routes declare them, and openapi.yaml is generated from them with `service.api.schemas`'
answers).

Tensors travel as nested lists of numbers (`Tensor`); pydantic passes them through as
they are (no per-element validation, which would be slow): `service.sessions.codecs`
turns each into a NumPy array and refuses ragged or non-numeric ones naming the tensor.
The optimizer and schedule specs are plain objects here; the core validates them
(`parse_hyper`, `parse_schedule`) and each field at fault is reported under
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


class MetricsRequest(BaseModel):
    """`POST /v1/sessions/{id}/metrics`: a loss reported without a step."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"loss": 0.42}]})

    loss: float = Field(strict=True, allow_inf_nan=False, description="the loss to report")


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
