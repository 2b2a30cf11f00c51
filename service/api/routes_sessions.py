"""`/v1/sessions`: create, list, read, delete a session, read its params, step it (docs/api.md).

Bodies are read raw (JSON or safetensors, by Content-Type) and handed to the engine;
responses carrying tensors follow `Accept` (`application/octet-stream` for safetensors).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response

from service.api.auth import EngineDep, Tenant
from service.api.errors import problems
from service.api.responses import FastJSONResponse
from service.api.schemas import ParamsResponse, SessionDoc, SessionList, StepResponse
from service.sessions import views
from service.sessions.codecs import BINARY, JSON, Reply, wants_binary
from service.sessions.engine_base import StepCall

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Annotated[
    str, Path(description="the session id returned by create", examples=["Gq3lq0xZ2yZ6n1m1"])
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description=(
            "a retry with the same key and body gets the first response again (with "
            "`Idempotent-Replayed: true`) and is not applied twice; keys are kept "
            "for the server's idempotency_ttl (24 h by default)"
        ),
    ),
]


def _binary_body(schema: str, what: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                BINARY: {
                    "schema": {"type": "string", "format": "binary", "description": what},
                },
            },
        }
    }


def _tensor_response(schema: str, what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "OK",
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                BINARY: {"schema": {"type": "string", "format": "binary", "description": what}},
            },
        }
    }


def send(reply: Reply) -> Response:
    return Response(reply.body, reply.status, headers=reply.headers, media_type=reply.media_type)


@router.post(
    "",
    status_code=201,
    response_model=SessionDoc,
    summary="Create a session",
    operation_id="createSession",
    responses=problems(400, 401, 413, 415, 422, 503),
    openapi_extra=_binary_body(
        "CreateSession",
        "The tensors are the initial `params` (any float or integer dtype, cast to `dtype`; "
        "the name `__metadata__` is reserved). `__metadata__` keys: `optimizer` (required; "
        'the optimizer spec as a JSON string, e.g. `{"name": "adam", "lr": 0.001}`), '
        "`schedule` and `transforms` (optional; JSON strings), `dtype` (`float32` or "
        "`float64`) and `nonfinite` (`error` or `skip`).",
    ),
)
async def create_session(request: Request, tenant: Tenant, engine: EngineDep) -> Response:
    """Register params, optimizer and schedule; answers the session document."""
    body = await request.body()
    doc = await engine.create(tenant, body, request.headers.get("content-type"))
    return FastJSONResponse(doc, status_code=201, headers={"Location": f"/v1/sessions/{doc['id']}"})


@router.get(
    "",
    response_model=SessionList,
    summary="List the tenant's sessions",
    operation_id="listSessions",
    responses=problems(401, 422, 503),
)
async def list_sessions(
    tenant: Tenant,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="sessions to return")] = 100,
) -> Response:
    """The caller's sessions (of its API key's tenant), most recently updated (or
    created) first, at most `limit`; `truncated` tells whether there are more. Deleted
    and expired sessions are not listed. Listing refreshes no session's idle expiry."""
    return FastJSONResponse(await engine.list_sessions(tenant, limit))


@router.get(
    "/{session_id}",
    response_model=SessionDoc,
    summary="Read a session",
    operation_id="getSession",
    responses=problems(401, 404, 503),
)
async def get_session(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    """The session document; `lr` is the rate the next step will use."""
    return FastJSONResponse(await engine.get(tenant, session_id))


@router.delete(
    "/{session_id}",
    status_code=204,
    summary="Delete a session",
    operation_id="deleteSession",
    responses=problems(401, 404, 503),
)
async def delete_session(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    await engine.delete(tenant, session_id)
    return Response(status_code=204)


@router.get(
    "/{session_id}/params",
    summary="Read the current params",
    operation_id="getParams",
    response_model=ParamsResponse,
    responses={
        **_tensor_response(
            "ParamsResponse",
            "The tensors are the params, in the session's dtype (F32 or F64). `__metadata__` "
            "keys: `step`, `version` (integers as strings), and with `average`: `average`, "
            "`averaged_steps`.",
        ),
        **problems(401, 404, 408, 409, 422, 503),
    },
)
async def get_params(
    session_id: SessionId,
    request: Request,
    tenant: Tenant,
    engine: EngineDep,
    average: Annotated[
        Literal["ema", "swa"] | None,
        Query(description="the EMA or SWA of the params instead (extension)"),
    ] = None,
    min_version: Annotated[
        int | None,
        Query(ge=0, description="wait until the session's version is at least this (extension)"),
    ] = None,
    timeout: Annotated[
        float,
        Query(gt=0, le=60, description="seconds to wait for min_version (408 after)"),
    ] = 30.0,
) -> Response:
    """The current params with `step` and `version`; `average=ema|swa` answers the
    averaged params (and `averaged_steps`); `min_version` waits for that version first."""
    binary = wants_binary(request.headers.get("accept"))
    reply = await views.read_params(
        engine,
        tenant,
        session_id,
        binary,
        average=average,
        min_version=min_version,
        timeout=timeout,
    )
    return send(reply)


@router.post(
    "/{session_id}/step",
    summary="Apply one optimizer step",
    operation_id="stepSession",
    response_model=StepResponse,
    responses={
        202: {
            "description": "a sync push accumulated; the step is not applied yet (extension)",
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/PendingResponse"}}},
        },
        **_tensor_response(
            "StepResponse",
            "The tensors are the new params (`return: params`, the default), the updates "
            "(`return: updates`, new minus old params) or none (`return: none`), in the "
            "session's dtype. `__metadata__` keys (strings): `step`, `version`, `lr`, "
            "`skipped` and `clipped` (`true` / `false`), `grad_norm` (absent when the "
            "gradient was non-finite), `staleness`, `contributors` and `return`.",
        ),
        # 406: a replay asked for a format its recorded answer cannot be given in
        **problems(400, 401, 404, 406, 409, 413, 415, 422, 503),
    },
    openapi_extra=_binary_body(
        "StepRequest",
        "The tensors are the `grads`, one per parameter with its registered shape. "
        "`__metadata__` keys (optional): `loss` (a number written as a string, e.g. "
        '`"0.73"`), `return` (`params`, `updates` or `none`), `skip_missing`, '
        "`base_version` and `wait` (extensions).",
    ),
)
async def step(
    session_id: SessionId,
    request: Request,
    tenant: Tenant,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Apply a gradient; answers step, version, the lr used, and params or updates."""
    call = await step_call(request, tenant, session_id, idempotency_key)
    return send(await engine.step(call))


async def step_call(
    request: Request, tenant: str, session_id: str, idempotency_key: str | None
) -> StepCall:
    """A request that changes a session (a step, a reported loss), as the engine takes it."""
    return StepCall(
        tenant=tenant,
        session_id=session_id,
        body=await request.body(),
        content_type=request.headers.get("content-type"),
        binary_response=wants_binary(request.headers.get("accept")),
        idempotency_key=idempotency_key,
        method=request.method,
        path=request.url.path,
    )
