"""The OpenAPI document of the API: FastAPI's, finished by hand, and its YAML form.

FastAPI derives the paths, parameters and JSON schemas from the routes and models;
`finish` adds what it cannot know:

* the request models the session routes read by hand (`CreateSession`, `StepRequest`)
  and `Problem`, as components;
* request and response examples (those of docs/api.md, and real answers of the server);
* the safetensors form of each tensor-bearing body (`application/octet-stream`): the
  layout, which tensors it holds and which `__metadata__` keys it carries;
* `Accept` negotiation of the responses holding tensors;
* a problem+json example (and the `WWW-Authenticate` / `Retry-After` headers) for every
  refusal, replacing FastAPI's own 422 (`HTTPValidationError`), which this API never
  sends;
* the `Location` and `Idempotent-Replayed` headers, the `Idempotency-Key` parameter's
  exact form, links from a created session to the operations on it, tag descriptions.

`openapi.yaml` at the project root is `to_yaml(create_app().openapi())`, written by
`optserve openapi -o openapi.yaml`; tests/api/test_openapi.py fails when they differ.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from service.api.errors import PROBLEM_JSON, PayloadTooLarge, StoreDown, Unauthorized
from service.api.schemas import SESSION_EXAMPLE, PendingResponse, Problem
from service.sessions.codecs import BINARY, JSON
from service.sessions.errors import (
    BadRequest,
    IdempotencyInFlight,
    IdempotencyMismatch,
    Invalid,
    NoAverage,
    NoRangeTest,
    NotAcceptable,
    RangeTestOver,
    SessionNotFound,
    StaleGradient,
    UnsupportedMediaType,
    VersionConflict,
    WaitTimeout,
    field_error,
    invalid,
)
from service.sessions.requests import CreateSession, MetricsRequest, StepRequest, UpdateRequest

Doc = dict[str, Any]

CONVENTIONS = """
## Conventions

* **Authentication.** When the server has API keys (`OPTSERVE_API_KEYS`), every `/v1`
  request needs `Authorization: Bearer <key>` (401 otherwise); without keys,
  authentication is off. A session belongs to the key's tenant: another tenant gets 404,
  exactly as for an id that does not exist. `/healthz`, `/readyz` and `/metrics` are open.
* **Tensors in JSON** are nested lists of numbers whose nesting gives the shape
  (`[[1, 2], [3, 4]]` is shape `[2, 2]`, a bare number is shape `[]`). Non-finite values
  cannot be written in JSON and are refused.
* **Tensors in binary**: a request body sent with `Content-Type: application/octet-stream`
  is one safetensors file (see each operation for its tensors and `__metadata__` keys).
  The server never unpickles anything.
* **Content negotiation.** A request body is JSON when its `Content-Type` is
  `application/json` (or `application/*+json`, or absent) and safetensors when it is
  `application/octet-stream`; any other type is 415. A response holding tensors (params,
  step) is JSON unless `Accept` prefers `application/octet-stream` (a higher q-value than
  `application/json`; `*/*` and `application/*` count just below an explicit
  `application/json`); session documents, previews and problems are always JSON.
* **Errors** are RFC 9457 `application/problem+json` documents (`Problem`): `type` is a
  URN naming the kind of problem, `errors` lists each field at fault (`loc` is a path
  into the request: `["body", ...]`, `["header", "Idempotency-Key"]`). A refused request
  changes nothing: the session's `version` is the same after it.
""".rstrip()

TAGS = [
    {"name": "sessions", "description": "Optimizer sessions: create, read, step, delete."},
    {
        "name": "training",
        "description": (
            "Training beyond one step (docs/training.md): losses without a step, history, "
            "LR range test, plots."
        ),
    },
    {
        "name": "federated",
        "description": "Federated rounds (docs/federated.md): the round, clients' updates.",
    },
    {
        "name": "state",
        "description": (
            "A session's full state as one safetensors file (docs/state.md): export, "
            "import as a new session, replace."
        ),
    },
    {"name": "schedules", "description": "Learning-rate schedules, without a session."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]

SAFETENSORS = (
    "A safetensors file: an 8-byte little-endian unsigned integer N, then N bytes of "
    'UTF-8 JSON header mapping each tensor name to `{"dtype": "F32", "shape": [2, 2], '
    '"data_offsets": [begin, end]}` (offsets into the data, which follows the header), '
    'plus an optional `"__metadata__"` object of string values, then the raw '
    "little-endian tensor data."
)

_NEGOTIATION = (
    "\n\n**Response format.** JSON by default; send `Accept: application/octet-stream` "
    "for the safetensors form (it must be preferred to `application/json`: a higher "
    "q-value, or `application/json` not named). Problems are always problem+json."
)

# --- examples (docs/api.md, and real answers of the server) -----------------------------

_CREATE = {
    "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.0},
    "schedule": {"name": "cosine_decay", "decay_steps": 1000, "warmup": {"steps": 100}},
    "params": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]},
    "dtype": "float32",
}
_GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
_SESSION = SESSION_EXAMPLE
_SESSION_ID = SESSION_EXAMPLE["id"]
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


def _ex(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


_REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "createSession": {
        "adam_cosine": _ex("Adam with warm-up and cosine decay (docs/api.md)", _CREATE),
        "sgd_float64": _ex(
            "SGD with Nesterov momentum, float64, constant rate",
            {
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
                "params": {"x": [1.0, 2.0, 3.0], "bias": 0.5},
                "dtype": "float64",
            },
        ),
        "clipped": _ex(
            "AdamW with gradient clipping; non-finite gradients skipped (extensions)",
            {
                "optimizer": {"name": "adamw", "lr": 0.001},
                "params": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]},
                "transforms": {"clip_norm": 1.0},
                "nonfinite": "skip",
            },
        ),
    },
    "stepSession": {
        "params": _ex("A gradient and the loss (docs/api.md)", {"grads": _GRADS, "loss": 0.73}),
        "updates": _ex("Answer with the updates", {"grads": _GRADS, "return": "updates"}),
        "none": _ex("Answer with the counters only", {"grads": _GRADS, "return": "none"}),
    },
    "previewSchedule": {
        "step": _ex(
            "StepLR (docs/api.md)",
            {"lr": 0.1, "schedule": {"name": "step", "step_size": 30, "gamma": 0.1}, "steps": 100},
        ),
        "step_short": _ex(
            "StepLR, six steps",
            {"lr": 0.1, "schedule": {"name": "step", "step_size": 2, "gamma": 0.1}, "steps": 6},
        ),
        "one_cycle": _ex(
            "OneCycleLR, which cycles the momentum too",
            {
                "lr": 0.1,
                "schedule": {"name": "one_cycle", "max_lr": 0.1, "total_steps": 6},
                "steps": 6,
            },
        ),
    },
}

_RESPONSE_EXAMPLES: dict[str, dict[str, Any]] = {
    "createSession": {"created": _ex("A new session (docs/api.md)", _SESSION)},
    "getSession": {
        "after_4_steps": _ex(
            "After four steps",
            {**_SESSION, "step": 4, "version": 4, "lr": 4e-05, "updated_at": 1795266012.2477844},
        )
    },
    "listSessions": {
        "two": _ex(
            "Two sessions: the docs/api.md one after four steps, and a newer one",
            {
                "sessions": [
                    {
                        "id": "Vt3xq8kP0aZcR2mL9sWe1uYbNf4HjD6g",
                        "optimizer": "sgd",
                        "step": 0,
                        "version": 0,
                        "lr": 0.1,
                        "updated_at": 1795266020.5,
                        "federated": False,
                        "lr_finder": False,
                    },
                    {
                        "id": _SESSION_ID,
                        "optimizer": "adam",
                        "step": 4,
                        "version": 4,
                        "lr": 4e-05,
                        "updated_at": 1795266012.2477844,
                        "federated": False,
                        "lr_finder": False,
                    },
                ],
                "truncated": False,
            },
        ),
        "empty": _ex("No sessions", {"sessions": [], "truncated": False}),
    },
    "getParams": {
        "params": _ex("After three steps", {"step": 3, "version": 3, "params": _PARAMS_3})
    },
    "stepSession": {
        "params": _ex('"return": "params" (default)', {**_COUNTERS_3, "params": _PARAMS_3}),
        "updates": _ex(
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
        "none": _ex('"return": "none"', _COUNTERS_3),
        "skipped": _ex(
            'A non-finite gradient in a session with "nonfinite": "skip"',
            {**_COUNTERS_3, "version": 4, "skipped": True, "grad_norm": None},
        ),
    },
    "previewSchedule": {
        "step_short": _ex(
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
        "one_cycle": _ex(
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
    },
    "importSession": {
        "imported": _ex(
            "A new session from the state file of the docs/api.md session after three steps",
            {
                **_SESSION,
                "id": "Vt3xq8kP0aZcR2mL9sWe1uYbNf4HjD6g",
                "step": 3,
                "version": 3,
                "lr": 3e-05,
            },
        )
    },
    "replaceState": {
        "replaced": _ex(
            "The docs/api.md session after four steps, put back to its state file of step 3",
            {**_SESSION, "step": 3, "version": 5, "lr": 3e-05, "updated_at": 1795266013.0},
        )
    },
    "healthz": {"ok": _ex("Alive", {"status": "ok"})},
    "readyz": {"ready": _ex("The store answers", {"status": "ready", "store": "redis"})},
}

#: examples of a response other than the operation's success (by operationId, status)
_STATUS_EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("stepSession", "202"): {
        "pending": _ex(
            "A sync push accumulated, 1 of 4 (docs/training.md)",
            {"status": "pending", "version": 3, "wait_for": 4, "pending": 1, "accumulate": 4},
        )
    },
}

_RESPONSE_DESCRIPTIONS = {
    "createSession": "Created: the session document",
    "listSessions": "The tenant's sessions, most recently updated first",
    "getSession": "The session document",
    "deleteSession": "Deleted",
    "getParams": "The current params (JSON, or safetensors by `Accept`)",
    "stepSession": "Applied (or skipped, or replayed): the counters and the lr used, "
    "with params or updates (JSON, or safetensors by `Accept`)",
    "previewSchedule": "The rates (and cycled momenta)",
    "reportMetrics": "Taken: the counters and the rate the next step will use",
    "getHistory": "The newest entries, most recent first",
    "getLRFinder": "The range test so far and its suggestions",
    "importSession": "Created: the new session's document",
    "exportState": "The state file (safetensors)",
    "replaceState": "Replaced: the session document (`version` one up)",
    "healthz": "The process is alive",
    "readyz": "The state store answers",
}

_METRICS_EXAMPLE = (
    "# HELP optserve_http_requests_total HTTP requests answered, by method, route "
    "template and status.\n"
    "# TYPE optserve_http_requests_total counter\n"
    'optserve_http_requests_total{method="POST",route="/v1/sessions/{session_id}/step",'
    'status="200"} 42.0\n'
)


def _problem_examples() -> dict[tuple[str, int], dict[str, Any]]:
    """problem+json examples by (operationId or "*", status)."""
    not_json = "invalid literal, expected 'null': line 1 column 1 (char 0)"
    bad_json = BadRequest(
        f"the body is not valid JSON: {not_json}", [field_error(["body"], not_json)]
    )
    media = "unsupported media type 'text/plain'"
    conflict = VersionConflict(
        "the session changed under this step 100 times in a row; nothing was applied, retry"
    )
    betas = Invalid(
        "betas[0] must be in [0, 1): got 1.2",
        [field_error(["body", "optimizer", "betas", 0], "must be in [0, 1): got 1.2")],
    )
    return {
        ("*", 400): {"malformed-body": _ex(bad_json.title, bad_json.problem())},
        ("*", 401): {"unauthorized": _ex(Unauthorized.title, Unauthorized().problem())},
        ("*", 404): {"not-found": _ex(SessionNotFound.title, SessionNotFound().problem())},
        ("*", 409): {
            "in-flight": _ex(IdempotencyInFlight.title, IdempotencyInFlight().problem()),
            "version-conflict": _ex(VersionConflict.title, conflict.problem()),
        },
        ("*", 413): {"too-large": _ex(PayloadTooLarge.title, PayloadTooLarge(1024).problem())},
        ("*", 415): {
            "unsupported": _ex(
                UnsupportedMediaType.title,
                UnsupportedMediaType(
                    f"Content-Type must be {JSON} or {BINARY}, not 'text/plain'",
                    [field_error(["header", "Content-Type"], media)],
                ).problem(),
            )
        },
        ("*", 406): {
            "not-acceptable": _ex(
                NotAcceptable.title,
                NotAcceptable(
                    "the recorded answer to this Idempotency-Key cannot be given as "
                    "application/octet-stream; ask for application/json"
                ).problem(),
            )
        },
        ("*", 408): {
            "wait-timeout": _ex(
                WaitTimeout.title,
                WaitTimeout(
                    "version 12 was not reached within 30 s; the session is at version 11; "
                    "ask again to keep waiting",
                    11,
                ).problem(),
            )
        },
        ("stepSession", 409): {
            "in-flight": _ex(IdempotencyInFlight.title, IdempotencyInFlight().problem()),
            "version-conflict": _ex(VersionConflict.title, conflict.problem()),
            "stale-gradient": _ex(
                StaleGradient.title,
                StaleGradient(
                    "the gradient was computed on version 7, 3 versions behind the session "
                    "(version 10); this session takes at most 2; nothing was applied",
                    10,
                    7,
                ).problem(),
            ),
            "range-test-over": _ex(
                RangeTestOver.title,
                RangeTestOver(
                    "the range test is over (diverged) after 61 steps; read GET "
                    "/v1/sessions/{id}/lr-finder for the result; nothing was applied"
                ).problem(),
            ),
        },
        ("getParams", 409): {
            "no-average": _ex(
                NoAverage.title,
                NoAverage(
                    "no step has been averaged into the swa average yet (SWA starts at step "
                    "100); the session is at step 12"
                ).problem(),
            )
        },
        ("submitUpdate", 409): {
            "round-closed": _ex(
                "Round closed",
                {
                    "type": "urn:optserve:problem:round-closed",
                    "title": "Round closed",
                    "status": 409,
                    "detail": "round 3 is closed; the current round is 4",
                    "errors": [
                        {
                            "loc": ["path", "round"],
                            "msg": "round 3 is closed; the current round is 4",
                        }
                    ],
                    "round": 4,
                },
            )
        },
        ("getLRFinder", 409): {
            "no-range-test": _ex(
                NoRangeTest.title,
                NoRangeTest(
                    "this session runs no LR range test (create it with 'lr_finder')"
                ).problem(),
            )
        },
        ("*", 422): {"invalid-hyperparameter": _ex(Invalid.title, betas.problem())},
        ("stepSession", 422): {
            "missing-tensor": _ex(
                Invalid.title, invalid(["body", "grads", "b"], "missing tensor 'b'").problem()
            ),
            "idempotency-key-reused": _ex(
                IdempotencyMismatch.title, IdempotencyMismatch().problem()
            ),
        },
        ("previewSchedule", 422): {
            "unknown-schedule": _ex(
                Invalid.title,
                invalid(
                    ["body", "schedule", "name"],
                    "unknown schedule 'stepp'; known: constant, cosine, ... step",
                ).problem(),
            )
        },
        ("*", 503): {"store-down": _ex(StoreDown.title, StoreDown(1).problem())},
        **_state_problems(),
    }


def _state_problems() -> dict[tuple[str, int], dict[str, Any]]:
    """problem+json examples of the state-file operations (docs/state.md)."""
    media = f"a state file is sent as {BINARY}, not application/json"
    not_binary = UnsupportedMediaType(media, [field_error(["header", "Content-Type"], media)])
    short = "buffer is shorter than the 8-byte header length"
    bad_file = BadRequest(
        f"the body is not a valid safetensors file: {short}", [field_error(["body"], short)]
    )
    wrong_format = invalid(
        ["body", "__metadata__", "format"],
        "must be 'optserve.session/1' (a session state file): got None",
    )
    missing = invalid(["body", "state/exp_avg_sq/w"], "missing tensor 'state/exp_avg_sq/w'")
    layout = invalid(
        ["body", "params/w"], "tensor 'w' has shape [3] in the file, [2, 2] in the session"
    )
    lr = invalid(
        ["body", "__metadata__", "spec", "optimizer"],
        'the file\'s optimizer ({"name":"adam","lr":0.01,...}) is not the session\'s '
        '({"name":"adam","lr":0.001,...}): a PUT replaces the state, not the configuration '
        "(import the file as a new session instead)",
    )
    conflict = VersionConflict(
        "the session changed under this step 100 times in a row; nothing was applied, retry"
    )
    examples: dict[tuple[str, int], dict[str, Any]] = {}
    for op in ("importSession", "replaceState"):
        examples[op, 400] = {"malformed-body": _ex(bad_file.title, bad_file.problem())}
        examples[op, 415] = {"unsupported": _ex(not_binary.title, not_binary.problem())}
        examples[op, 422] = {
            "wrong-format": _ex("Not a state file", wrong_format.problem()),
            "missing-tensor": _ex("A state array missing", missing.problem()),
        }
    examples["replaceState", 422].update(
        {
            "layout": _ex("Another layout", layout.problem()),
            "configuration": _ex("Another configuration", lr.problem()),
        }
    )
    examples["replaceState", 409] = {
        "version-conflict": _ex(VersionConflict.title, conflict.problem())
    }
    return examples


_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "the scheme to use: `Bearer`",
            "required": True,
            "schema": {"type": "string", "examples": ['Bearer realm="optserve"']},
        }
    },
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying (the server's `retry_after`)",
            "required": True,
            "schema": {"type": "integer", "minimum": 1, "examples": [1]},
        }
    },
}

_LINK_PARAMS = {"session_id": "$response.body#/id"}
_SAME_SESSION = {"session_id": "$request.path.session_id"}
_LINKS: dict[tuple[str, str], dict[str, Any]] = {
    ("createSession", "201"): {
        "GetSession": {"operationId": "getSession", "parameters": _LINK_PARAMS},
        "GetParams": {"operationId": "getParams", "parameters": _LINK_PARAMS},
        "StepSession": {"operationId": "stepSession", "parameters": _LINK_PARAMS},
        "DeleteSession": {"operationId": "deleteSession", "parameters": _LINK_PARAMS},
        "ExportState": {"operationId": "exportState", "parameters": _LINK_PARAMS},
        "ReplaceState": {"operationId": "replaceState", "parameters": _LINK_PARAMS},
    },
    ("importSession", "201"): {
        "GetSession": {"operationId": "getSession", "parameters": _LINK_PARAMS},
        "ExportState": {"operationId": "exportState", "parameters": _LINK_PARAMS},
        "DeleteSession": {"operationId": "deleteSession", "parameters": _LINK_PARAMS},
    },
    ("stepSession", "200"): {
        "GetSession": {"operationId": "getSession", "parameters": _SAME_SESSION},
        "GetParams": {"operationId": "getParams", "parameters": _SAME_SESSION},
    },
    ("deleteSession", "204"): {
        "GetSession": {
            "operationId": "getSession",
            "parameters": _SAME_SESSION,
            "description": "a deleted session is gone: 404",
        },
    },
}

_IDEMPOTENCY_KEY_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    # printable ASCII; HTTP strips a header value's outer spaces, so none can count
    "pattern": "^[!-~]([ -~]*[!-~])?$",
    "examples": ["b6f1e0c2-step-000042"],
}


# --- the finishing pass ----------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Make `app.openapi()` return the finished document (built once, then cached)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(default())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(doc: Doc) -> Doc:
    """FastAPI's document with everything the module docstring lists added."""
    doc = copy.deepcopy(doc)
    doc["info"]["description"] = doc["info"].get("description", "") + "\n" + CONVENTIONS
    doc["tags"] = copy.deepcopy(TAGS)
    _add_models(doc)
    problems = _problem_examples()
    for item in doc["paths"].values():
        for op in item.values():
            _finish_operation(op, problems)
    _drop_unused(doc, ("HTTPValidationError", "ValidationError"))
    return doc


def _add_models(doc: Doc) -> None:
    _, extra = models_json_schema(
        [
            (CreateSession, "validation"),
            (StepRequest, "validation"),
            (Problem, "validation"),
            (PendingResponse, "validation"),
            (MetricsRequest, "validation"),
            (UpdateRequest, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    # JSON has no infinity: the max norm is written "inf" (as the session document does)
    norm_type = components.get("GradientTransforms", {}).get("properties", {}).get("norm_type")
    if norm_type is not None and norm_type.get("type") == "number":
        number = {k: norm_type.pop(k) for k in ("type", "exclusiveMinimum") if k in norm_type}
        norm_type["anyOf"] = [number, {"type": "string", "enum": ["inf"]}]
        norm_type["description"] = 'p > 0, or "inf" for the max norm'


def _finish_operation(op: Doc, problems: dict[tuple[str, int], dict[str, Any]]) -> None:
    op_id = op["operationId"]
    responses: dict[str, Doc] = op["responses"]
    # FastAPI's 422 (HTTPValidationError as application/json) is never sent: refusals
    # are problem+json, and a route that can answer 422 declares it itself
    for status, response in list(responses.items()):
        if "HTTPValidationError" in json.dumps(response):
            del responses[status]
    for param in op.get("parameters", ()):
        if param["in"] == "header" and param["name"] == "Idempotency-Key":
            param["schema"] = copy.deepcopy(_IDEMPOTENCY_KEY_SCHEMA)
    body = op.get("requestBody")
    if body is not None:
        _finish_request(op_id, body)
    for status, response in responses.items():
        _finish_response(op_id, status, response, problems)
    if {JSON, BINARY} <= set(responses.get("200", {}).get("content", {})):
        op["description"] = op.get("description", "").rstrip() + _NEGOTIATION


def _finish_request(op_id: str, body: Doc) -> None:
    content: dict[str, Doc] = body["content"]
    kinds = (["JSON"] if JSON in content else []) + (
        ["safetensors (`application/octet-stream`)"] if BINARY in content else []
    )
    body["description"] = " or ".join(kinds) + (
        ", by `Content-Type`." if len(kinds) > 1 else " only."
    )
    if JSON in content and op_id in _REQUEST_EXAMPLES:
        content[JSON]["examples"] = copy.deepcopy(_REQUEST_EXAMPLES[op_id])
    if BINARY in content:
        _describe_safetensors(content[BINARY])


def _describe_safetensors(media: Doc) -> None:
    """A binary string: the safetensors layout, then what the route says it holds."""
    what = media.get("schema", {}).get("description", "")
    media["schema"] = {
        "type": "string",
        "format": "binary",
        "description": f"{SAFETENSORS} {what}".rstrip(),
    }


def _finish_response(
    op_id: str, status: str, response: Doc, problems: dict[tuple[str, int], dict[str, Any]]
) -> None:
    content: dict[str, Doc] = response.get("content", {})
    if PROBLEM_JSON in content:
        code = int(status)
        examples = problems.get((op_id, code)) or problems.get(("*", code))
        if examples:
            content[PROBLEM_JSON]["examples"] = copy.deepcopy(examples)
        if code in _PROBLEM_HEADERS:
            response["headers"] = copy.deepcopy(_PROBLEM_HEADERS[code])
        return
    if op_id in _RESPONSE_DESCRIPTIONS:
        response["description"] = _RESPONSE_DESCRIPTIONS[op_id]
    if JSON in content and (op_id, status) in _STATUS_EXAMPLES:
        content[JSON]["examples"] = copy.deepcopy(_STATUS_EXAMPLES[op_id, status])
    elif JSON in content and op_id in _RESPONSE_EXAMPLES and status in ("200", "201"):
        content[JSON]["examples"] = copy.deepcopy(_RESPONSE_EXAMPLES[op_id])
    if BINARY in content:
        _describe_safetensors(content[BINARY])
    if "text/plain" in content and op_id == "metrics":
        content["text/plain"]["example"] = _METRICS_EXAMPLE
    headers = _SUCCESS_HEADERS.get((op_id, status))
    if headers:
        response["headers"] = copy.deepcopy(headers)
    links = _LINKS.get((op_id, status))
    if links:
        response["links"] = copy.deepcopy(links)


_LOCATION = {
    "Location": {
        "description": "the new session: `/v1/sessions/{id}`",
        "required": True,
        "schema": {"type": "string", "examples": [f"/v1/sessions/{_SESSION_ID}"]},
    }
}
_SUCCESS_HEADERS: dict[tuple[str, str], dict[str, Any]] = {
    ("createSession", "201"): _LOCATION,
    ("importSession", "201"): _LOCATION,
    ("stepSession", "200"): {
        "Idempotent-Replayed": {
            "description": (
                "`true` when this is the recorded answer to an earlier request with the "
                "same `Idempotency-Key` (the step was not applied again)"
            ),
            "schema": {"type": "string", "enum": ["true"]},
        }
    },
}


def _drop_unused(doc: Doc, names: tuple[str, ...]) -> None:
    schemas: dict[str, Any] = doc.get("components", {}).get("schemas", {})
    for _ in names:  # dropping one can orphan another
        text = json.dumps(doc)
        for name in names:
            if name in schemas and f'"#/components/schemas/{name}"' not in text:
                del schemas[name]


# --- YAML ------------------------------------------------------------------------------


def to_yaml(doc: Doc) -> str:
    """The document as YAML: keys sorted, so the same document is the same text. (It
    goes through JSON first: what `/openapi.json` serves, with no object shared, so no
    YAML anchors.)"""
    import yaml

    dump: Callable[..., str] = yaml.safe_dump
    plain = json.loads(json.dumps(doc))
    return dump(plain, sort_keys=True, allow_unicode=True, width=100, default_flow_style=False)


__all__ = ["CONVENTIONS", "SAFETENSORS", "finish", "install", "to_yaml"]
