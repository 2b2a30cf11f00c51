"""`/v1/sessions`: create, list, read, delete a session, read its params, step it (docs/api.md).

Bodies are read raw (JSON or safetensors, by Content-Type) and handed to the engine;
responses carrying tensors follow `Accept` (`application/octet-stream` for safetensors).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response

from service.api import openapi_examples as ex
from service.api.auth import EngineDep, Tenant
from service.api.openapi_route import (
    LOCATION,
    header_parameter,
    link_to,
    problems,
    read_body,
    success,
)
from service.api.responses import FastJSONResponse
from service.api.schemas import (
    ParamsResponse,
    PendingResponse,
    SessionDoc,
    SessionList,
    StepResponse,
)
from service.sessions import views
from service.sessions.codecs import Reply, wants_binary
from service.sessions.engine_base import StepCall
from service.sessions.requests import CreateSession, StepRequest

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Annotated[
    str, Path(description="the session id returned by create", examples=["Gq3lq0xZ2yZ6n1m1"])
]
#: the `Idempotency-Key` header of the routes that change a session; described in the
#: document by `IDEMPOTENCY_KEY` (FastAPI would say "a string or null")
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", include_in_schema=False)]
IDEMPOTENCY_KEY: dict[str, Any] = header_parameter(
    "Idempotency-Key",
    "a retry with the same key and body gets the first response again (with "
    "`Idempotent-Replayed: true`) and is not applied twice; keys are kept "
    "for the server's idempotency_ttl (24 h by default)",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        # printable ASCII; HTTP strips a header value's outer spaces, so none can count
        "pattern": "^[!-~]([ -~]*[!-~])?$",
        "examples": ["b6f1e0c2-step-000042"],
    },
)
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": (
            "`true` when this is the recorded answer to an earlier request with the "
            "same `Idempotency-Key` (the step was not applied again)"
        ),
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_CREATED_ID = "$response.body#/id"
_SAME_ID = "$request.path.session_id"


def send(reply: Reply) -> Response:
    return Response(reply.body, reply.status, headers=reply.headers, media_type=reply.media_type)


@router.post(
    "",
    status_code=201,
    response_model=SessionDoc,
    summary="Create a session",
    operation_id="createSession",
    responses={
        **success(
            201,
            "Created: the session document",
            ex.CREATED,
            headers=LOCATION,
            links=link_to(
                "getSession",
                "getParams",
                "stepSession",
                "deleteSession",
                "exportState",
                "replaceState",
                session_id=_CREATED_ID,
            ),
        ),
        **problems(400, 401, 413, 415, 422, 503),
    },
    openapi_extra=read_body(
        CreateSession,
        "The tensors are the initial `params` (any float or integer dtype, cast to `dtype`; "
        "the name `__metadata__` is reserved). `__metadata__` keys: `optimizer` (required; "
        'the optimizer spec as a JSON string, e.g. `{"name": "adam", "lr": 0.001}`), '
        "`schedule` and `transforms` (optional; JSON strings), `dtype` (`float32` or "
        "`float64`) and `nonfinite` (`error` or `skip`).",
        ex.CREATE_REQUESTS,
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
    responses={
        **success(200, "The tenant's sessions, most recently updated first", ex.SESSIONS),
        **problems(401, 422, 503),
    },
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
    responses={**success(200, "The session document", ex.SESSION), **problems(401, 404, 503)},
)
async def get_session(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    """The session document; `lr` is the rate the next step will use."""
    return FastJSONResponse(await engine.get(tenant, session_id))


@router.delete(
    "/{session_id}",
    status_code=204,
    summary="Delete a session",
    operation_id="deleteSession",
    responses={
        **success(
            204,
            "Deleted",
            links=link_to(
                "getSession", session_id=_SAME_ID, description="a deleted session is gone: 404"
            ),
        ),
        **problems(401, 404, 503),
    },
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
        **success(
            200,
            "The current params (JSON, or safetensors by `Accept`)",
            ex.PARAMS,
            binary="The tensors are the params, in the session's dtype (F32 or F64). "
            "`__metadata__` keys: `step`, `version` (integers as strings), and with "
            "`average`: `average`, `averaged_steps`.",
        ),
        **problems(401, 404, 408, 409, 422, 503, named=ex.AVERAGE_PROBLEMS),
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
        **success(
            200,
            "Applied (or skipped, or replayed): the counters and the lr used, with params or "
            "updates (JSON, or safetensors by `Accept`)",
            ex.STEPPED,
            binary="The tensors are the new params (`return: params`, the default), the "
            "updates (`return: updates`, new minus old params) or none (`return: none`), in "
            "the session's dtype. `__metadata__` keys (strings): `step`, `version`, `lr`, "
            "`skipped` and `clipped` (`true` / `false`), `grad_norm` (absent when the "
            "gradient was non-finite), `staleness`, `contributors` and `return`.",
            headers=_REPLAYED,
            links=link_to("getSession", "getParams", session_id=_SAME_ID),
        ),
        **success(
            202,
            "a sync push accumulated; the step is not applied yet (extension)",
            ex.PENDING,
            model=PendingResponse,
        ),
        # 406: a replay asked for a format its recorded answer cannot be given in
        **problems(400, 401, 404, 406, 409, 413, 415, 422, 503, named=ex.STEP_PROBLEMS),
    },
    openapi_extra={
        **read_body(
            StepRequest,
            "The tensors are the `grads`, one per parameter with its registered shape. "
            "`__metadata__` keys (optional): `loss` (a number written as a string, e.g. "
            '`"0.73"`), `return` (`params`, `updates` or `none`), `skip_missing`, '
            "`base_version` and `wait` (extensions).",
            ex.STEP_REQUESTS,
        ),
        **IDEMPOTENCY_KEY,
    },
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
