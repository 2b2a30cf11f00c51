"""`/v1/schedules`: preview a learning-rate schedule (docs/api.md)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.api import openapi_examples as ex
from service.api.auth import EngineDep, Tenant
from service.api.openapi_route import parsed_body, problems, success
from service.api.schemas import PreviewResponse
from service.sessions import views
from service.sessions.codecs import JSON, is_binary
from service.sessions.errors import UnsupportedMediaType, field_error
from service.sessions.requests import PreviewPlotRequest, PreviewRequest


async def json_only(request: Request) -> None:
    """415 unless the body is JSON (as the session routes do; FastAPI would say 422)."""
    content_type = request.headers.get("content-type")
    if is_binary(content_type):
        msg = f"this endpoint takes {JSON} only"
        raise UnsupportedMediaType(msg, [field_error(["header", "Content-Type"], msg)])


router = APIRouter(prefix="/v1/schedules", tags=["schedules"], dependencies=[Depends(json_only)])


@router.post(
    "/preview",
    response_model=PreviewResponse,
    summary="Preview a schedule's rates",
    operation_id="previewSchedule",
    responses={
        **success(200, "The rates (and cycled momenta)", ex.PREVIEWS),
        **problems(400, 401, 413, 415, 422, named=ex.PREVIEW_PROBLEMS),
    },
    openapi_extra=parsed_body(ex.PREVIEW_REQUESTS),
)
async def preview(request: PreviewRequest, _: Tenant, engine: EngineDep) -> PreviewResponse:
    """The rate at steps `0 .. steps-1`: exactly what a session with that optimizer `lr`
    and schedule would use (and the cycled momentum, for schedules that cycle one).

    422 for a schedule a session would refuse (over the caps on nesting, schedules and
    list lengths, or a rate that is not finite at some step it can reach with that `lr`)
    and for more than 2,000,000 schedule evaluations (`steps` times the schedules in the
    spec, nested ones included); every rate answered is a finite number >= 0."""
    return PreviewResponse.model_validate(await engine.preview(request))


@router.post(
    "/preview.png",
    summary="Plot a schedule",
    operation_id="previewSchedulePlot",
    response_class=Response,
    responses={
        200: {"description": "a PNG image", "content": {"image/png": {}}},
        **problems(400, 401, 413, 415, 422),
    },
    openapi_extra=parsed_body(),
)
async def preview_png(request: PreviewPlotRequest, _: Tenant, engine: EngineDep) -> Response:
    """The preview's rates (and cycled momentum) against the step as a PNG, with
    `current_step` marked when given; refused (422) as the preview is."""
    data = await views.preview_png(engine, request)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})
