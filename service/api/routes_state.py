"""A session's full state as one safetensors file (docs/state.md): export it
(`GET /v1/sessions/{id}/state`), replace it (`PUT` there), make a new session of one
(`POST /v1/sessions/import`).

`/v1/sessions/import` has the shape of `/v1/sessions/{session_id}`, whose `GET` and
`DELETE` would answer it (404: no session has that id). So that it answers 405 with
`Allow: POST` to every other method, as any other path does, this router is included
before the sessions router (service/app.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api import openapi_examples as ex
from service.api.auth import EngineDep, Tenant
from service.api.openapi_route import LOCATION, link_to, problems, read_body, success
from service.api.responses import FastJSONResponse
from service.api.routes_sessions import SessionId, send
from service.api.schemas import SessionDoc
from service.sessions.codecs import BINARY
from service.sessions.errors import SessionError

router = APIRouter(prefix="/v1/sessions", tags=["state"])

#: what a state file holds (after the safetensors layout, `openapi_route.SAFETENSORS`)
STATE_FILE = (
    "A session state file (docs/state.md). Tensors: `params/<name>` (each parameter "
    "tensor, in its shape and the session's dtype), `state/<key>/<name>` (each state "
    "array, the optimizer's and the session's own such as `ema.avg` or `acc.sum`, split "
    "per parameter tensor), `scalar/<key>` (each state scalar, 0-d: I64, F64 or BOOL). "
    "`__metadata__` keys: `format` (`optserve.session/1`), `spec` (the configuration as "
    "JSON, with `layout`), `step`, `version`, `skipped` (integers as strings), "
    "`schedule_state` and `extra` (JSON), and `id`, `created_at`, `updated_at`, `lr` "
    "(informational)."
)


class MethodNotAllowed(SessionError):
    """405 for a method `/v1/sessions/import` does not serve (only POST)."""

    status, slug, title = 405, "method-not-allowed", "Method Not Allowed"

    def __init__(self) -> None:
        super().__init__("Method Not Allowed", [], headers={"Allow": "POST"})


@router.api_route(
    "/import",
    methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"],
    include_in_schema=False,
)
async def import_other_methods() -> Response:
    raise MethodNotAllowed()


@router.post(
    "/import",
    status_code=201,
    response_model=SessionDoc,
    summary="Import a session from a state file",
    operation_id="importSession",
    responses={
        **success(
            201,
            "Created: the new session's document",
            ex.IMPORTED,
            headers=LOCATION,
            links=link_to(
                "getSession", "exportState", "deleteSession", session_id="$response.body#/id"
            ),
        ),
        **problems(400, 401, 413, 415, 422, 503, named=ex.IMPORT_PROBLEMS),
    },
    openapi_extra=read_body(None, STATE_FILE),
)
async def import_session(request: Request, tenant: Tenant, engine: EngineDep) -> Response:
    """A new session (new id) with the file's configuration, params, state and counters;
    the file is validated entirely before anything is stored."""
    body = await request.body()
    doc = await engine.import_state(tenant, body, request.headers.get("content-type"))
    return FastJSONResponse(doc, status_code=201, headers={"Location": f"/v1/sessions/{doc['id']}"})


@router.get(
    "/{session_id}/state",
    summary="Export the session's state file",
    operation_id="exportState",
    response_class=Response,
    responses={
        **success(200, "The state file (safetensors)", binary=STATE_FILE),
        **problems(401, 404, 503),
    },
)
async def export_state(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    """Params, optimizer state, the session's own entries (averages, a pending sync
    accumulation, a federated round's updates), counters, schedule state and
    configuration of one version, as one safetensors file (always binary)."""
    data = await engine.export_state(tenant, session_id)
    return Response(data, media_type=BINARY)


@router.put(
    "/{session_id}/state",
    summary="Replace the session's state",
    operation_id="replaceState",
    response_model=SessionDoc,
    responses={
        **success(200, "Replaced: the session document (`version` one up)", ex.REPLACED),
        **problems(400, 401, 404, 409, 413, 415, 422, 503, named=ex.REPLACE_PROBLEMS),
    },
    openapi_extra=read_body(None, STATE_FILE),
)
async def replace_state(
    session_id: SessionId, request: Request, tenant: Tenant, engine: EngineDep
) -> Response:
    """The session's params, state, counters, schedule state and `extra` become the
    file's, atomically, and `version` goes up by one; the file's configuration must be
    the session's. Idempotent by nature (no `Idempotency-Key`)."""
    body = await request.body()
    reply = await engine.replace_state(
        tenant, session_id, body, request.headers.get("content-type")
    )
    return send(reply)
