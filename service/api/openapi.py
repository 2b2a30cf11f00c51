"""The OpenAPI document of the API: FastAPI's, from the routes' own declarations, and its YAML.

Each route declares its contract in its decorator: its models (FastAPI's), and with the
helpers of `service.api.openapi_route` what FastAPI cannot know (a body read by hand,
JSON or safetensors; the safetensors form of an answer, chosen by `Accept`; its
refusals, each with a problem+json example; headers, links, examples). `finish` adds
only what belongs to the whole document:

* the conventions (authentication, tensors, content negotiation, errors) and the tag
  descriptions;
* the models the routes name but read by hand (`openapi_route.ref`), as components;
* the examples and headers, which declarations carry as JSON text (`verbatim`: FastAPI's
  encoder drops null members and may turn integers into floats);
* the `Accept` paragraph of every operation whose answer has a safetensors form;
* no FastAPI 422 (`HTTPValidationError`): this API refuses with problem+json only, and
  a route that can answer 422 declares it.

`openapi.yaml` at the project root is `to_yaml(create_app().openapi())`, written by
`optserve openapi -o openapi.yaml`; tests/api/test_openapi.py fails when they differ.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.openapi_route import VERBATIM, referenced_models
from service.sessions.codecs import BINARY, JSON

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

_NEGOTIATION = (
    "\n\n**Response format.** JSON by default; send `Accept: application/octet-stream` "
    "for the safetensors form (it must be preferred to `application/json`: a higher "
    "q-value, or `application/json` not named). Problems are always problem+json."
)


def install(app: FastAPI) -> None:
    """Make `app.openapi()` return the finished document (built once, then cached)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(default())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(doc: Doc) -> Doc:
    """FastAPI's document with what the module docstring lists added."""
    doc = copy.deepcopy(doc)
    doc["info"]["description"] = doc["info"].get("description", "") + "\n" + CONVENTIONS
    doc["tags"] = copy.deepcopy(TAGS)
    _add_models(doc, referenced_models())
    for item in doc["paths"].values():
        for op in item.values():
            _finish_operation(op)
    _unpack_verbatim(doc)
    _drop_unused(doc, ("HTTPValidationError", "ValidationError"))
    return doc


def _add_models(doc: Doc, models: list[type[BaseModel]]) -> None:
    """The models' schemas as components (FastAPI's own, of the same name, stay)."""
    _, extra = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    # JSON has no infinity: the max norm is written "inf" (as the session document does);
    # this belongs in GradientTransforms' own schema (service/sessions/requests.py)
    norm_type = components.get("GradientTransforms", {}).get("properties", {}).get("norm_type")
    if norm_type is not None and norm_type.get("type") == "number":
        number = {k: norm_type.pop(k) for k in ("type", "exclusiveMinimum") if k in norm_type}
        norm_type["anyOf"] = [number, {"type": "string", "enum": ["inf"]}]
        norm_type["description"] = 'p > 0, or "inf" for the max norm'


def _finish_operation(op: Doc) -> None:
    responses: dict[str, Doc] = op["responses"]
    # FastAPI's 422 (HTTPValidationError as application/json) is never sent: refusals
    # are problem+json, and a route that can answer 422 declares it itself
    for status, response in list(responses.items()):
        if "HTTPValidationError" in json.dumps(response):
            del responses[status]
    if {JSON, BINARY} <= set(responses.get("200", {}).get("content", {})):
        op["description"] = op.get("description", "").rstrip() + _NEGOTIATION


def _unpack_verbatim(node: Any) -> None:
    """Put back every member a declaration sent as JSON text (`openapi_route.verbatim`)."""
    if isinstance(node, dict):
        text = node.pop(VERBATIM, None)
        if text is not None:
            node.update(json.loads(text))
        for value in node.values():
            _unpack_verbatim(value)
    elif isinstance(node, list):
        for value in node:
            _unpack_verbatim(value)


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


__all__ = ["CONVENTIONS", "TAGS", "finish", "install", "to_yaml"]
