"""`/v1/sessions/{id}/...` for training beyond one step (docs/training.md): losses without
a step, the history, the LR range test's result and plot, the schedule plot."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.api import openapi_examples as ex
from service.api.auth import EngineDep, Tenant
from service.api.openapi_route import problems, read_body, success
from service.api.responses import FastJSONResponse
from service.api.routes_sessions import (
    IDEMPOTENCY_KEY,
    IdempotencyKey,
    SessionId,
    send,
    step_call,
)
from service.api.schemas import HistoryResponse, LRFinderResponse, MetricsResponse
from service.sessions import views
from service.sessions.requests import MetricsRequest

router = APIRouter(prefix="/v1/sessions", tags=["training"])

PNG = "image/png"
_PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "a PNG image", "content": {PNG: {}}}
}


def _png(data: bytes) -> Response:
    return Response(data, media_type=PNG, headers={"Cache-Control": "no-store"})


@router.post(
    "/{session_id}/metrics",
    summary="Report a loss without a step",
    operation_id="reportMetrics",
    response_model=MetricsResponse,
    responses={
        **success(200, "Taken: the counters and the rate the next step will use"),
        **problems(400, 401, 404, 409, 413, 415, 422, 503),
    },
    openapi_extra={**read_body(MetricsRequest), **IDEMPOTENCY_KEY},
)
async def report_metrics(
    session_id: SessionId,
    request: Request,
    tenant: Tenant,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A loss-driven schedule (`plateau`) takes the loss as if it came with a step; the
    params and their `version` stay. The loss goes into the history either way."""
    call = await step_call(request, tenant, session_id, idempotency_key)
    return send(await engine.metrics(call))


@router.get(
    "/{session_id}/history",
    summary="Read the step history",
    operation_id="getHistory",
    response_model=HistoryResponse,
    responses={
        **success(200, "The newest entries, most recent first"),
        **problems(401, 404, 422, 503),
    },
)
async def get_history(
    session_id: SessionId,
    tenant: Tenant,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="entries to return")] = 100,
) -> Response:
    """Step, rate, loss, gradient norm and update norm per step (and reported losses),
    most recent first, at most the session's `history` entries."""
    return FastJSONResponse(await views.history(engine, tenant, session_id, limit))


@router.get(
    "/{session_id}/lr-finder",
    summary="Read the LR range test",
    operation_id="getLRFinder",
    response_model=LRFinderResponse,
    responses={
        **success(200, "The range test so far and its suggestions"),
        **problems(401, 404, 409, 503, named=ex.RANGE_TEST_PROBLEMS),
    },
)
async def get_lr_finder(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    """The rates, raw and smoothed losses, stop reason and suggestions of the session's
    range test."""
    return FastJSONResponse(await views.lr_finder(engine, tenant, session_id))


@router.get(
    "/{session_id}/lr-finder.png",
    summary="Plot the LR range test",
    operation_id="getLRFinderPlot",
    response_class=Response,
    responses={**_PNG_RESPONSE, **problems(401, 404, 409, 503, named=ex.RANGE_TEST_PROBLEMS)},
)
async def get_lr_finder_png(session_id: SessionId, tenant: Tenant, engine: EngineDep) -> Response:
    """Loss against rate, the smoothed curve over the raw one, the suggestions marked."""
    return _png(await views.lr_finder_png(engine, tenant, session_id))


@router.get(
    "/{session_id}/schedule.png",
    summary="Plot the session's schedule",
    operation_id="getSchedulePlot",
    response_class=Response,
    responses={**_PNG_RESPONSE, **problems(401, 404, 422, 503)},
)
async def get_schedule_png(
    session_id: SessionId,
    tenant: Tenant,
    engine: EngineDep,
    steps: Annotated[
        int | None,
        Query(ge=1, le=views.MAX_PLOT_STEPS, description="steps drawn (max(100, 2 * step))"),
    ] = None,
) -> Response:
    """The rate (and cycled momentum) against the step, the current step marked."""
    return _png(await views.schedule_png(engine, tenant, session_id, steps))
