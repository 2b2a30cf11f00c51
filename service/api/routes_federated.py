"""`/v1/sessions/{id}/round` and `/rounds/{round}/updates`: federated rounds
(docs/federated.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from service.api import openapi_examples as ex
from service.api.auth import EngineDep, Tenant
from service.api.openapi_route import problems, read_body, success
from service.api.routes_sessions import SessionId, send, step_call
from service.api.schemas import RoundResponse, UpdateResponse
from service.sessions.codecs import wants_binary
from service.sessions.requests import UpdateRequest

router = APIRouter(prefix="/v1/sessions", tags=["federated"])

RoundNumber = Annotated[int, Path(ge=0, description="the round the update belongs to")]


@router.get(
    "/{session_id}/round",
    summary="Read the current round",
    operation_id="getRound",
    response_model=RoundResponse,
    responses={
        **success(
            200,
            "The round and the global params (JSON, or safetensors by `Accept`)",
            binary="The tensors are the global params. `__metadata__` keys: the other fields "
            "as strings (`clients` as a JSON list).",
        ),
        **problems(401, 404, 409, 503, named=ex.NOT_FEDERATED_PROBLEMS),
    },
)
async def get_round(
    session_id: SessionId, request: Request, tenant: Tenant, engine: EngineDep
) -> Response:
    """The open round (number, deadline, who reported) and the global params; a round
    whose deadline passed with enough updates is closed first."""
    binary = wants_binary(request.headers.get("accept"))
    return send(await engine.read_round(tenant, session_id, binary))


@router.post(
    "/{session_id}/rounds/{round}/updates",
    summary="Submit a client's update",
    operation_id="submitUpdate",
    response_model=UpdateResponse,
    responses=problems(400, 401, 404, 409, 413, 415, 422, 503, named=ex.ROUND_PROBLEMS),
    openapi_extra=read_body(
        UpdateRequest,
        "The tensors are the delta (or the weights). `__metadata__` keys: `client_id`, "
        "`num_examples`, `kind` (`delta` or `weights`), `metrics` (a JSON object as a string).",
    ),
)
async def submit_update(
    session_id: SessionId,
    round: RoundNumber,
    request: Request,
    tenant: Tenant,
    engine: EngineDep,
) -> Response:
    """A client's delta (or weights) for the round, weighted by `num_examples`;
    idempotent per client and round; may close the round."""
    call = await step_call(request, tenant, session_id, None)
    return send(await engine.submit_update(call, round))
