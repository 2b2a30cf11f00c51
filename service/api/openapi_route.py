"""What a route declares for the OpenAPI document, beside its decorator.

FastAPI derives an operation from its route: the parameters, a body it parses, the
`response_model` of the success answer. What it cannot know, the route declares with
these helpers, in its own decorator:

* a body the route reads itself (`read_body`: JSON of a request model, and/or a
  safetensors file holding what the route says) -> `openapi_extra`; the examples of a
  body FastAPI parses (`parsed_body`);
* a header FastAPI would describe loosely (`header_parameter`) -> `openapi_extra`;
* its success answer (`success`: description, examples, the safetensors form of an
  answer holding tensors, headers, links) and its refusals (`problems`: problem+json,
  an example of each, the headers the status carries) -> `responses`.

Two things do not survive FastAPI's own rendering, and `service.api.openapi.finish`
completes them. Examples and headers travel as JSON text (`verbatim`): FastAPI's encoder
drops every null member (an example's nulls are data) and may turn an integer into a
float (a header's `minimum: 1`). And the models named by `ref` (read by hand, so FastAPI
never sees them) are added as components.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from service.api.errors import PROBLEM_JSON
from service.api.openapi_examples import PROBLEMS, Examples
from service.api.schemas import SESSION_EXAMPLE, Problem
from service.sessions.codecs import BINARY, JSON

Doc = dict[str, Any]
#: the `responses` of a route decorator, by status
Responses = dict[int | str, dict[str, Any]]

SAFETENSORS = (
    "A safetensors file: an 8-byte little-endian unsigned integer N, then N bytes of "
    'UTF-8 JSON header mapping each tensor name to `{"dtype": "F32", "shape": [2, 2], '
    '"data_offsets": [begin, end]}` (offsets into the data, which follows the header), '
    'plus an optional `"__metadata__"` object of string values, then the raw '
    "little-endian tensor data."
)

#: the key members travel under as JSON text, past FastAPI's encoder, until `finish`
#: puts them back into the object holding it
VERBATIM = "x-optserve-verbatim"

_MODELS: dict[str, type[BaseModel]] = {}


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to `model`'s schema, which the document then holds as a component."""
    _MODELS.setdefault(model.__name__, model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def referenced_models() -> list[type[BaseModel]]:
    """Every model a declaration named by `ref`, in the order they were first named."""
    return list(_MODELS.values())


def verbatim(**members: Any) -> Doc:
    """`members` (those not None), exactly as given, in the finished document."""
    kept = {name: value for name, value in members.items() if value is not None}
    return {VERBATIM: json.dumps(kept)} if kept else {}


def safetensors(what: str) -> Doc:
    """The safetensors media type: the file layout, then what the route says it holds."""
    description = f"{SAFETENSORS} {what}".rstrip()
    return {"schema": {"type": "string", "format": "binary", "description": description}}


# --- requests ---------------------------------------------------------------------------


def read_body(
    model: type[BaseModel] | None,
    binary: str | None = None,
    named: Examples | None = None,
) -> Doc:
    """`openapi_extra` of a route that reads its body itself: JSON of `model` (None: no
    JSON form) with the examples `named`, and/or a safetensors file holding `binary`."""
    content: Doc = {}
    if model is not None:
        content[JSON] = {"schema": ref(model), **verbatim(examples=named)}
    if binary is not None:
        content[BINARY] = safetensors(binary)
    return {"requestBody": {"required": True, "description": _forms(content), "content": content}}


def parsed_body(named: Examples | None = None) -> Doc:
    """`openapi_extra` of a route whose JSON body FastAPI parses (and describes)."""
    content = {JSON: verbatim(examples=named)}
    return {"requestBody": {"description": _forms(content), "content": content}}


def _forms(content: Doc) -> str:
    kinds = (["JSON"] if JSON in content else []) + (
        ["safetensors (`application/octet-stream`)"] if BINARY in content else []
    )
    return " or ".join(kinds) + (", by `Content-Type`." if len(kinds) > 1 else " only.")


def header_parameter(name: str, description: str, schema: Doc) -> Doc:
    """`openapi_extra` describing an optional header exactly (declare it in the route's
    signature with `include_in_schema=False`: FastAPI would title its schema and give an
    optional one a null branch)."""
    parameter = {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }
    return {"parameters": [parameter]}


# --- answers ----------------------------------------------------------------------------

LOCATION: Doc = {
    "Location": {
        "description": "the new session: `/v1/sessions/{id}`",
        "required": True,
        "schema": {"type": "string", "examples": [f"/v1/sessions/{SESSION_EXAMPLE['id']}"]},
    }
}


def success(
    status: int,
    description: str,
    named: Examples | None = None,
    *,
    binary: str | None = None,
    model: type[BaseModel] | None = None,
    headers: Doc | None = None,
    links: Doc | None = None,
) -> Responses:
    """The `responses` entry of a success answer. Its JSON schema is FastAPI's, of the
    route's `response_model` (or of `model`, for a second success status); `named` are
    its JSON examples, `binary` what its safetensors form holds (chosen by `Accept`)."""
    content: Doc = {}
    if named:
        content[JSON] = verbatim(examples=named)
    if binary is not None:
        content[BINARY] = safetensors(binary)
    response: Doc = {"description": description, **verbatim(headers=headers, links=links)}
    if model is not None:
        response["model"] = model
    if content:
        response["content"] = content
    return {status: response}


def link_to(*operation_ids: str, session_id: str, description: str | None = None) -> Doc:
    """Links from an answer to operations on the same session (`session_id`: a runtime
    expression, `$response.body#/id` or `$request.path.session_id`)."""
    link: Doc = {"parameters": {"session_id": session_id}}
    if description is not None:
        link["description"] = description
    return {op[:1].upper() + op[1:]: {"operationId": op, **link} for op in operation_ids}


# --- refusals ---------------------------------------------------------------------------

_DESCRIPTIONS = {
    400: "Malformed body (bad JSON, bad safetensors header)",
    401: "Authentication is on and no valid `Authorization: Bearer <key>` was sent",
    404: "No such session, or another tenant's",
    408: "`min_version` not reached within `timeout` (member `version`); repeat to wait again",
    409: (
        "`Idempotency-Key` still in flight, or a version conflict the server could not "
        "resolve, or a stale gradient (members `version`, `base_version`), or a range test "
        "that is over"
    ),
    406: (
        "An idempotent replay whose recorded answer cannot be re-encoded in the format "
        "`Accept` asks for"
    ),
    413: "Body over the configured limit",
    415: "Content-Type is neither application/json nor application/octet-stream",
    422: "Well-formed but invalid; `errors` names each field",
    503: "The state store is unreachable (see `Retry-After`)",
}

_HEADERS: dict[int, Doc] = {
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


def problems(*statuses: int, named: dict[int, Examples] | None = None) -> Responses:
    """The `responses` entries of refusals with these statuses: problem+json (`Problem`),
    with the route's examples of a status (`named`), else the usual one (`PROBLEMS`)."""
    own = named or {}
    return {
        status: _problem(status, own.get(status) or PROBLEMS.get(status)) for status in statuses
    }


def _problem(status: int, named: Examples | None) -> Doc:
    return {
        "description": _DESCRIPTIONS.get(status, "Problem"),
        "content": {PROBLEM_JSON: {"schema": ref(Problem), **verbatim(examples=named)}},
        **verbatim(headers=_HEADERS.get(status)),
    }


__all__ = [
    "LOCATION",
    "SAFETENSORS",
    "VERBATIM",
    "Responses",
    "header_parameter",
    "link_to",
    "parsed_body",
    "problems",
    "read_body",
    "ref",
    "referenced_models",
    "safetensors",
    "success",
    "verbatim",
]
