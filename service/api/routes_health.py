"""Health and metrics, outside `/v1`: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

from contextlib import suppress

import anyio
from fastapi import APIRouter, Response

from service.api import metrics
from service.api import openapi_examples as ex
from service.api.auth import EngineDep, SettingsDep
from service.api.errors import StoreDown
from service.api.openapi_route import problems, success
from service.api.schemas import Health
from service.store.base import StoreUnavailable

router = APIRouter(tags=["health"])

#: seconds /readyz and /metrics wait for the store before giving up on it
STORE_TIMEOUT = 2.0


@router.get(
    "/healthz",
    response_model=Health,
    summary="The process is alive",
    operation_id="healthz",
    responses=success(200, "The process is alive", ex.ALIVE),
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The state store is reachable",
    operation_id="readyz",
    responses={**success(200, "The state store answers", ex.READY), **problems(503)},
)
async def readyz(engine: EngineDep, settings: SettingsDep) -> Health:
    try:
        with anyio.fail_after(STORE_TIMEOUT):
            await engine.ping()
    except (StoreUnavailable, TimeoutError):
        raise StoreDown(settings.retry_after, "the state store does not answer") from None
    return Health(status="ready", store=engine.store.name)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}, "example": ex.METRICS_TEXT}},
            "description": "Prometheus text format",
        }
    },
)
async def prometheus_metrics(engine: EngineDep) -> Response:
    with suppress(StoreUnavailable, TimeoutError), anyio.fail_after(STORE_TIMEOUT):
        metrics.SESSIONS.set(await engine.count_sessions())
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
