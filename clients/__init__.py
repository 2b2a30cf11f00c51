"""Thin clients of optserve, an optimizer as a service: they depend on NumPy and httpx
only (never on `service`).

Register the params once, then send gradients and get the new params back:

    import numpy as np
    from clients import OptimizerClient

    w = np.zeros((4, 3), dtype=np.float32)
    with OptimizerClient() as client:  # $OPTSERVE_URL, $OPTSERVE_API_KEY
        session = client.create_session(
            {"w": w},
            {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
            {"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}},
        )
        for batch in batches:
            grad = compute_grad(w, batch)
            result = client.step(session.id, {"w": grad}, loss=0.7)
            w = result.params["w"]  # result.lr is the rate this step used

The same with asyncio (`AsyncOptimizerClient` mirrors `OptimizerClient` method for
method):

    async with AsyncOptimizerClient("http://127.0.0.1:8000") as client:
        session = await client.create_session({"w": w}, {"name": "sgd", "lr": 0.1})
        result = await client.step(session.id, {"w": grad})

Tensors travel as safetensors (`binary=False` switches to JSON for debugging). Failed
calls are retried with backoff (connection errors, timeouts, 409 in flight, 429,
502-504, honouring `Retry-After`), and every retry of a step carries the same
`Idempotency-Key`, so a step is applied exactly once. Refusals raise the
`clients.errors` class of their status (`ValidationError` for 422, ... all
`OptserveError`), with the problem's `detail` and field `errors`:

    try:
        client.create_session({"w": w}, {"name": "adam", "betas": [1.2, 0.999]})
    except ValidationError as exc:
        print(exc.status, exc.detail, [(e.loc, e.msg) for e in exc.errors])

Training over HTTP (docs/training.md): steps carry `base_version` (stale gradients are
refused: `StaleGradientError`) and, in sync sessions, wait for the accumulated step
(`step(..., wait=..., block=True)`); `get_params(average="ema")`, `post_metrics`,
`history`, the range test (`lr_finder`, its plot `lr_finder_png`, and `lr_find`, which
runs one with a NumPy loss-and-gradient function; `clients.torch.lr_find` for a torch
model), and schedule plots (`schedule_png`, `preview_schedule_png`).

Federated learning (docs/federated.md): `create_session(..., federated={...})` makes a
federated session; `get_round` and `submit_update` are its calls, and `FederatedWorker`
(`AsyncFederatedWorker`) runs one client's loop of rounds with a local `train`
function (`clients.torch.torch_train` for a torch model).

State files (docs/state.md): `export_state` answers a session's whole state as one
safetensors file (bytes), `import_state` makes a new session of one (here or on another
server), `replace_state` puts one back; `StateFile` reads and writes them with NumPy,
and `clients.torch_state` converts them to and from a torch optimizer's `state_dict`.

`clients.tensorfile` is the safetensors codec (NumPy only), shared with the server.
The names below are imported on first use, so that `import clients.tensorfile` (which
the server does) does not import httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.async_client import AsyncOptimizerClient
    from clients.errors import (
        AuthenticationError,
        BadGatewayError,
        BadRequestError,
        ConflictError,
        ConnectionError,
        FieldError,
        GatewayTimeoutError,
        InternalServerError,
        NoAverageError,
        NoRangeTestError,
        NotFoundError,
        OptserveError,
        PayloadTooLargeError,
        RangeTestOverError,
        RateLimitError,
        RoundClosedError,
        ServiceUnavailableError,
        StaleGradientError,
        TimeoutError,
        UnsupportedMediaTypeError,
        ValidationError,
        WaitTimeoutError,
    )
    from clients.federated import (
        AsyncFederatedWorker,
        FederatedWorker,
        LocalResult,
        RoundReport,
    )
    from clients.lr_finder import lr_find
    from clients.results import (
        HistoryEntry,
        LRFinderResult,
        MetricsResult,
        ParamsResult,
        RoundInfo,
        SchedulePreview,
        Session,
        StepResult,
        Suggestion,
        UpdateResult,
    )
    from clients.retries import RetryPolicy
    from clients.state_file import StateFile
    from clients.sync import OptimizerClient

_EXPORTS: dict[str, str] = {
    "OptimizerClient": "clients.sync",
    "AsyncOptimizerClient": "clients.async_client",
    "lr_find": "clients.lr_finder",
    "RetryPolicy": "clients.retries",
    "StateFile": "clients.state_file",
    **dict.fromkeys(
        ["AsyncFederatedWorker", "FederatedWorker", "LocalResult", "RoundReport"],
        "clients.federated",
    ),
    **dict.fromkeys(
        [
            "HistoryEntry",
            "LRFinderResult",
            "MetricsResult",
            "ParamsResult",
            "RoundInfo",
            "SchedulePreview",
            "Session",
            "StepResult",
            "Suggestion",
            "UpdateResult",
        ],
        "clients.results",
    ),
    **dict.fromkeys(
        [
            "AuthenticationError",
            "BadGatewayError",
            "BadRequestError",
            "ConflictError",
            "ConnectionError",
            "FieldError",
            "GatewayTimeoutError",
            "InternalServerError",
            "NoAverageError",
            "NoRangeTestError",
            "NotFoundError",
            "OptserveError",
            "PayloadTooLargeError",
            "RangeTestOverError",
            "RateLimitError",
            "RoundClosedError",
            "ServiceUnavailableError",
            "StaleGradientError",
            "TimeoutError",
            "UnsupportedMediaTypeError",
            "ValidationError",
            "WaitTimeoutError",
        ],
        "clients.errors",
    ),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AsyncFederatedWorker",
    "AsyncOptimizerClient",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "ConflictError",
    "ConnectionError",
    "FederatedWorker",
    "FieldError",
    "GatewayTimeoutError",
    "HistoryEntry",
    "InternalServerError",
    "LRFinderResult",
    "LocalResult",
    "MetricsResult",
    "NoAverageError",
    "NoRangeTestError",
    "NotFoundError",
    "OptimizerClient",
    "OptserveError",
    "ParamsResult",
    "PayloadTooLargeError",
    "RangeTestOverError",
    "RateLimitError",
    "RetryPolicy",
    "RoundClosedError",
    "RoundInfo",
    "RoundReport",
    "SchedulePreview",
    "ServiceUnavailableError",
    "Session",
    "StaleGradientError",
    "StateFile",
    "StepResult",
    "Suggestion",
    "TimeoutError",
    "UnsupportedMediaTypeError",
    "UpdateResult",
    "ValidationError",
    "WaitTimeoutError",
    "lr_find",
]
