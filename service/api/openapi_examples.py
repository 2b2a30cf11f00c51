"""The examples of the OpenAPI document: those of docs/api.md, and real answers of the
server (tests/api/test_openapi.py sends the requests and compares the answers).

Data only. Each route picks its own beside its decorator (`service.api.openapi_route`):
`examples=CREATE_REQUESTS`, `problems(409, ..., examples=STEP_PROBLEMS)`. A problem status
a route gives no example of gets the one of `PROBLEMS`.
"""

from __future__ import annotations

from typing import Any

from service.api.errors import PayloadTooLarge, StoreDown, Unauthorized
from service.api.schemas import SESSION_EXAMPLE
from service.sessions.codecs import BINARY, JSON
from service.sessions.errors import (
    BadRequest,
    IdempotencyInFlight,
    IdempotencyMismatch,
    Invalid,
    NoAverage,
    NoRangeTest,
    NotAcceptable,
    NotFederated,
    RangeTestOver,
    SessionError,
    SessionNotFound,
    StaleGradient,
    UnsupportedMediaType,
    VersionConflict,
    WaitTimeout,
    field_error,
    invalid,
)

#: named OpenAPI Example Objects: name -> {"summary": ..., "value": ...}
Examples = dict[str, dict[str, Any]]


def example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def problem(error: SessionError, summary: str | None = None) -> dict[str, Any]:
    """The example of a refusal: its problem+json document, titled by default."""
    return example(summary or error.title, error.problem())


# --- requests ---------------------------------------------------------------------------

_CREATE = {
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0},
    "schedule": {"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}},
    "params": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]},
    "dtype": "float32",
}
_GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}

CREATE_REQUESTS: Examples = {
    "adam_cosine": example("Adam with warm-up and cosine decay (docs/api.md)", _CREATE),
    "sgd_float64": example(
        "SGD with Nesterov momentum, float64, constant rate",
        {
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
            "params": {"x": [1.0, 2.0, 3.0], "bias": 0.5},
            "dtype": "float64",
        },
    ),
    "clipped": example(
        "AdamW with gradient clipping; non-finite gradients skipped (extensions)",
        {
            "optimizer": {"name": "adamw", "lr": 0.001},
            "params": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]},
            "transforms": {"clip_norm": 1.0},
            "nonfinite": "skip",
        },
    ),
}

STEP_REQUESTS: Examples = {
    "params": example("A gradient and the loss (docs/api.md)", {"grads": _GRADS, "loss": 0.73}),
    "updates": example("Answer with the updates", {"grads": _GRADS, "return": "updates"}),
    "none": example("Answer with the counters only", {"grads": _GRADS, "return": "none"}),
}

PREVIEW_REQUESTS: Examples = {
    "step": example(
        "StepLR (docs/api.md)",
        {"lr": 0.1, "schedule": {"name": "step", "step_size": 30, "gamma": 0.1}, "steps": 100},
    ),
    "step_short": example(
        "StepLR, six steps",
        {"lr": 0.1, "schedule": {"name": "step", "step_size": 2, "gamma": 0.1}, "steps": 6},
    ),
    "one_cycle": example(
        "OneCycleLR, which cycles the momentum too",
        {"lr": 0.1, "schedule": {"name": "one_cycle", "max_lr": 0.1, "total_steps": 6}, "steps": 6},
    ),
}

# --- answers: the docs/api.md session (created by CREATE_REQUESTS' adam_cosine, stepped
# with STEP_REQUESTS' params) -----------------------------------------------------------

_SESSION = SESSION_EXAMPLE
_SESSION_ID = SESSION_EXAMPLE["id"]
_OTHER_ID = "Vt3xq8kP0aZcR2mL9sWe1uYbNf4HjD6g"
_PARAMS_3 = {
    "w": [[0.099970005, -0.20003], [0.29997, 0.39997]],
    "b": [-2.9999996e-05, 2.9999996e-05],
}
_COUNTERS_3 = {
    "step": 3,
    "version": 3,
    "lr": 2e-05,
    "skipped": False,
    "grad_norm": 0.15165752172470093,
    "clipped": False,
    "staleness": None,
    "contributors": 1,
}
_AFTER_4 = {"step": 4, "version": 4, "lr": 4e-05, "updated_at": 1795266012.2477844}


def _summary(session_id: str, optimizer: str, **counters: Any) -> dict[str, Any]:
    """One session of the list (`SessionSummary`)."""
    return {"id": session_id, "optimizer": optimizer, **counters}


CREATED: Examples = {"created": example("A new session (docs/api.md)", _SESSION)}
SESSION: Examples = {"after_4_steps": example("After four steps", {**_SESSION, **_AFTER_4})}
SESSIONS: Examples = {
    "two": example(
        "Two sessions: the docs/api.md one after four steps, and a newer one",
        {
            "sessions": [
                _summary(
                    _OTHER_ID,
                    "sgd",
                    step=0,
                    version=0,
                    lr=0.1,
                    updated_at=1795266020.5,
                    federated=False,
                    lr_finder=False,
                ),
                _summary(_SESSION_ID, "adam", **_AFTER_4, federated=False, lr_finder=False),
            ],
            "truncated": False,
        },
    ),
    "empty": example("No sessions", {"sessions": [], "truncated": False}),
}
PARAMS: Examples = {
    "params": example("After three steps", {"step": 3, "version": 3, "params": _PARAMS_3})
}
STEPPED: Examples = {
    "params": example('"return": "params" (default)', {**_COUNTERS_3, "params": _PARAMS_3}),
    "updates": example(
        '"return": "updates"',
        {
            **_COUNTERS_3,
            "step": 4,
            "version": 4,
            "lr": 3e-05,
            "updates": {
                "w": [[-3.0003488e-05, -2.9996037e-05], [-3.0010939e-05, -3.0010939e-05]],
                "b": [-2.9999996e-05, 2.9999996e-05],
            },
        },
    ),
    "none": example('"return": "none"', _COUNTERS_3),
    "skipped": example(
        'A non-finite gradient in a session with "nonfinite": "skip"',
        {**_COUNTERS_3, "version": 4, "skipped": True, "grad_norm": None},
    ),
}
PENDING: Examples = {
    "pending": example(
        "A sync push accumulated, 1 of 4 (docs/training.md)",
        {"status": "pending", "version": 3, "wait_for": 4, "pending": 1, "accumulate": 4},
    )
}
PREVIEWS: Examples = {
    "step_short": example(
        "StepLR, six steps",
        {
            "lrs": [
                0.1,
                0.1,
                0.010000000000000002,
                0.010000000000000002,
                0.0010000000000000002,
                0.0010000000000000002,
            ],
            "momenta": None,
        },
    ),
    "one_cycle": example(
        "OneCycleLR, six steps",
        {
            "lrs": [
                0.0040000000000000036,
                0.09944154354509119,
                0.0811745653949763,
                0.046263710266697504,
                0.01334775301888306,
                4e-07,
            ],
            "momenta": [
                0.95,
                0.8505584586887436,
                0.8688255099070633,
                0.9037365046793212,
                0.9366525935914912,
                0.95,
            ],
        },
    ),
}
IMPORTED: Examples = {
    "imported": example(
        "A new session from the state file of the docs/api.md session after three steps",
        {**_SESSION, "id": _OTHER_ID, "step": 3, "version": 3, "lr": 3e-05},
    )
}
REPLACED: Examples = {
    "replaced": example(
        "The docs/api.md session after four steps, put back to its state file of step 3",
        {**_SESSION, "step": 3, "version": 5, "lr": 3e-05, "updated_at": 1795266013.0},
    )
}
ALIVE: Examples = {"ok": example("Alive", {"status": "ok"})}
READY: Examples = {"ready": example("The store answers", {"status": "ready", "store": "redis"})}

METRICS_TEXT = (
    "# HELP optserve_http_requests_total HTTP requests answered, by method, route "
    "template and status.\n"
    "# TYPE optserve_http_requests_total counter\n"
    'optserve_http_requests_total{method="POST",route="/v1/sessions/{session_id}/step",'
    'status="200"} 42.0\n'
)

# --- refusals ---------------------------------------------------------------------------

_NOT_JSON = "invalid literal, expected 'null': line 1 column 1 (char 0)"
_CONFLICT = VersionConflict(
    "the session changed under this step 100 times in a row; nothing was applied, retry"
)
_BETAS = "must be in [0, 1): got 1.2"
_TEXT_PLAIN = "unsupported media type 'text/plain'"
_IN_FLIGHT_OR_CONFLICT: Examples = {
    "in-flight": problem(IdempotencyInFlight()),
    "version-conflict": problem(_CONFLICT),
}

#: by status: the example of a refusal whose route names none of its own
PROBLEMS: dict[int, Examples] = {
    400: {
        "malformed-body": problem(
            BadRequest(
                f"the body is not valid JSON: {_NOT_JSON}", [field_error(["body"], _NOT_JSON)]
            )
        )
    },
    401: {"unauthorized": problem(Unauthorized())},
    404: {"not-found": problem(SessionNotFound())},
    406: {
        "not-acceptable": problem(
            NotAcceptable(
                "the recorded answer to this Idempotency-Key cannot be given as "
                "application/octet-stream; ask for application/json"
            )
        )
    },
    408: {
        "wait-timeout": problem(
            WaitTimeout(
                "version 12 was not reached within 30 s; the session is at version 11; "
                "ask again to keep waiting",
                11,
            )
        )
    },
    409: _IN_FLIGHT_OR_CONFLICT,
    413: {"too-large": problem(PayloadTooLarge(1024))},
    415: {
        "unsupported": problem(
            UnsupportedMediaType(
                f"Content-Type must be {JSON} or {BINARY}, not 'text/plain'",
                [field_error(["header", "Content-Type"], _TEXT_PLAIN)],
            )
        )
    },
    422: {
        "invalid-hyperparameter": problem(
            Invalid(f"betas[0] {_BETAS}", [field_error(["body", "optimizer", "betas", 0], _BETAS)])
        )
    },
    503: {"store-down": problem(StoreDown(1))},
}

STEP_PROBLEMS: dict[int, Examples] = {
    409: {
        **_IN_FLIGHT_OR_CONFLICT,
        "stale-gradient": problem(
            StaleGradient(
                "the gradient was computed on version 7, 3 versions behind the session "
                "(version 10); this session takes at most 2; nothing was applied",
                10,
                7,
            )
        ),
        "range-test-over": problem(
            RangeTestOver(
                "the range test is over (diverged) after 61 steps; read GET "
                "/v1/sessions/{id}/lr-finder for the result; nothing was applied"
            )
        ),
    },
    422: {
        "missing-tensor": problem(invalid(["body", "grads", "b"], "missing tensor 'b'")),
        "idempotency-key-reused": problem(IdempotencyMismatch()),
    },
}
AVERAGE_PROBLEMS: dict[int, Examples] = {
    409: {
        "no-average": problem(
            NoAverage(
                "no step has been averaged into the swa average yet (SWA starts at step "
                "100); the session is at step 12"
            )
        )
    }
}
NOT_FEDERATED_PROBLEMS: dict[int, Examples] = {
    409: {
        "not-federated": problem(
            NotFederated("this session is not federated (create it with 'federated')")
        )
    }
}
ROUND_PROBLEMS: dict[int, Examples] = {
    409: {
        "round-closed": example(
            "Round closed",
            {
                "type": "urn:optserve:problem:round-closed",
                "title": "Round closed",
                "status": 409,
                "detail": "round 3 is closed; the current round is 4",
                "errors": [
                    {"loc": ["path", "round"], "msg": "round 3 is closed; the current round is 4"}
                ],
                "round": 4,
            },
        )
    }
}
RANGE_TEST_PROBLEMS: dict[int, Examples] = {
    409: {
        "no-range-test": problem(
            NoRangeTest("this session runs no LR range test (create it with 'lr_finder')")
        )
    }
}
PREVIEW_PROBLEMS: dict[int, Examples] = {
    422: {
        "unknown-schedule": problem(
            invalid(
                ["body", "schedule", "name"],
                "unknown schedule 'stepp'; known: constant, cosine, ... step",
            )
        )
    }
}

# --- refusals of a state file (docs/state.md) -------------------------------------------

_STATE_MEDIA = f"a state file is sent as {BINARY}, not application/json"
_SHORT = "buffer is shorter than the 8-byte header length"
_STATE_FILE_PROBLEMS: dict[int, Examples] = {
    400: {
        "malformed-body": problem(
            BadRequest(
                f"the body is not a valid safetensors file: {_SHORT}",
                [field_error(["body"], _SHORT)],
            )
        )
    },
    415: {
        "unsupported": problem(
            UnsupportedMediaType(
                _STATE_MEDIA, [field_error(["header", "Content-Type"], _STATE_MEDIA)]
            )
        )
    },
}
_NOT_A_STATE_FILE: Examples = {
    "wrong-format": problem(
        invalid(
            ["body", "__metadata__", "format"],
            "must be 'optserve.session/1' (a session state file): got None",
        ),
        "Not a state file",
    ),
    "missing-tensor": problem(
        invalid(["body", "state/exp_avg_sq/w"], "missing tensor 'state/exp_avg_sq/w'"),
        "A state array missing",
    ),
}
IMPORT_PROBLEMS: dict[int, Examples] = {**_STATE_FILE_PROBLEMS, 422: _NOT_A_STATE_FILE}
REPLACE_PROBLEMS: dict[int, Examples] = {
    **_STATE_FILE_PROBLEMS,
    409: {"version-conflict": problem(_CONFLICT)},
    422: {
        **_NOT_A_STATE_FILE,
        "layout": problem(
            invalid(
                ["body", "params/w"], "tensor 'w' has shape [3] in the file, [2, 2] in the session"
            ),
            "Another layout",
        ),
        "configuration": problem(
            invalid(
                ["body", "__metadata__", "spec", "optimizer"],
                'the file\'s optimizer ({"name":"adam","lr":0.01,...}) is not the session\'s '
                '({"name":"adam","lr":0.001,...}): a PUT replaces the state, not the '
                "configuration (import the file as a new session instead)",
            ),
            "Another configuration",
        ),
    },
}
