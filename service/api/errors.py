"""HTTP problems: the `SessionError` tree and the handlers that render RFC 9457 problem+json.

Every refusal the API makes is a problem document (docs/api.md, "Conventions"):

    {"type": "urn:optserve:problem:<slug>", "title": "...", "status": 422,
     "detail": "...", "errors": [{"loc": ["body", "optimizer", "betas", 0], "msg": "..."}]}

`type` is a URN naming the kind of problem (the same for every occurrence, so a client
can branch on it; `title` is its short human text); `errors` lists each field at fault,
its `loc` a path into the request (`["body", ...]`, `["path", "session_id"]`,
`["header", "Idempotency-Key"]`), empty when no field is to blame.

Mapping (the table of docs/api.md):

* `SessionError` subclasses carry their status; raised anywhere below a route.
* core `SpecError` (optimizer, schedule) -> 422 with each error's loc under
  `["body", <field>]` (the engine names the field it validated; see `spec_error`),
  `LayoutError` -> 422 naming the tensor, other `CoreError` -> 422.
* FastAPI's `RequestValidationError` -> 422, or 400 when the body is not JSON at all.
* `StoreUnavailable` -> 503 with `Retry-After: settings.retry_after`.
* Starlette's own `HTTPException` (unknown route 404, method 405, ...) -> problem+json too.
* Anything else -> 500 problem (the traceback goes to the log, not to the client).

`SessionError` subclasses Starlette's `HTTPException`, so FastAPI passes it through untouched
when it is raised while FastAPI reads a body (the streamed-size check of `BodyLimit`).
This module imports FastAPI only inside `install_handlers`: the engine raises these
errors without depending on the web framework.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.core.errors import CoreError, LayoutError, SpecError
from service.sessions.errors import (
    TYPE_PREFIX,
    BadRequest,
    Invalid,
    SessionError,
    as_loc,
    field_error,
    layout_error,
    spec_error,
)
from service.store.base import StoreUnavailable

log = logging.getLogger("optserve.api")

PROBLEM_JSON = "application/problem+json"


class Unauthorized(SessionError):
    """401: authentication is on and no valid `Authorization: Bearer <key>` was sent."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str = "a valid 'Authorization: Bearer <key>' is required") -> None:
        super().__init__(
            detail,
            [field_error(["header", "Authorization"], detail)],
            headers={"WWW-Authenticate": 'Bearer realm="optserve"'},
        )


class PayloadTooLarge(SessionError, StarletteHTTPException):  # type: ignore[misc]  # both set `headers`; a dict is a Mapping
    """413: the body is over `settings.max_body_bytes`, or a JSON body over
    `settings.max_json_body_bytes` (`binary_limit` then says what safetensors may send)."""

    status, slug, title = 413, "payload-too-large", "Request body too large"

    def __init__(self, limit: int, binary_limit: int | None = None) -> None:
        self.binary_limit = binary_limit
        if binary_limit is None:
            detail = f"the request body is over the limit of {limit} bytes"
        else:
            detail = (
                f"the JSON request body is over the limit of {limit} bytes for JSON "
                "(max_json_body_bytes); send large tensors as safetensors (Content-Type: "
                f"{_BINARY}), accepted up to {binary_limit} bytes"
            )
        SessionError.__init__(self, detail, [])
        # also a Starlette HTTPException, which FastAPI lets through when `BodyLimit`
        # raises it while FastAPI reads the body
        self.status_code = self.status


#: the safetensors media type (`codecs.BINARY`; codecs imports this module)
_BINARY = "application/octet-stream"


class StoreDown(SessionError):
    """503: the state store cannot be reached."""

    status, slug, title = 503, "store-unavailable", "State store unavailable"

    def __init__(self, retry_after: int, detail: str = "the state store cannot be reached") -> None:
        super().__init__(detail, [], headers={"Retry-After": str(retry_after)})


def problem_response(
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def render(exc: SessionError) -> Response:
    return problem_response(exc.status, exc.problem(), dict(exc.headers or {}))


# --- handlers ----------------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, SessionError)
    return render(exc)


async def _core_error(_: Request, exc: Exception) -> Response:
    if isinstance(exc, SpecError):
        return render(spec_error(exc, ["body"]))
    if isinstance(exc, LayoutError):
        return render(layout_error(exc, ["body"]))
    return render(Invalid(str(exc), [field_error(["body"], str(exc))]))


async def _validation_error(_: Request, exc: Exception) -> Response:
    errors_of = getattr(exc, "errors", None)
    raw: list[dict[str, Any]] = list(errors_of()) if callable(errors_of) else []
    if any(e.get("type") == "json_invalid" for e in raw):
        ctx = next(e.get("ctx") or {} for e in raw if e.get("type") == "json_invalid")
        msg = f"the body is not valid JSON: {ctx.get('error', 'decode error')}"
        return render(BadRequest(msg, [field_error(["body"], msg)]))
    errors = [field_error(as_loc(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in raw]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return render(Invalid(detail or "invalid request", errors))


def _store_unavailable(settings: Settings) -> Any:
    async def handler(_: Request, exc: Exception) -> Response:
        log.warning("state store unavailable: %s", exc)
        return render(StoreDown(settings.retry_after))

    return handler


_STATUS_PROBLEMS: dict[int, tuple[str, str]] = {
    404: ("not-found", "Not Found"),
    405: ("method-not-allowed", "Method Not Allowed"),
    406: ("not-acceptable", "Not Acceptable"),
    413: ("payload-too-large", "Request body too large"),
}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    slug, title = _STATUS_PROBLEMS.get(exc.status_code, ("http-error", "HTTP error"))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    body = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": exc.status_code,
        "detail": str(exc.detail),
        "errors": [],
    }
    return problem_response(exc.status_code, body, headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method served at the request's path. (Starlette's 405 names only those of
    the first route matching the path: `GET` for `/v1/sessions/{id}`, not `DELETE`.)"""
    routes = getattr(request.scope.get("router"), "routes", ())
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return render(SessionError("internal server error"))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client closed the connection before sending its whole body: nobody is left to
    answer, and nothing was applied. Not a server error: no traceback, no 500."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=400)


def install_handlers(app: Starlette, settings: Settings) -> None:
    """Register every problem+json handler on `app` (a FastAPI application)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.requests import ClientDisconnect

    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(SessionError, _api_error)
    app.add_exception_handler(CoreError, _core_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable(settings))
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unhandled)


# --- body size limit ---------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, or for a JSON body
    (any body but safetensors, `application/octet-stream`) over `json_limit`: a parsed
    JSON number is a Python object, many times its size in the body.

    Checks `Content-Length` before the application runs (answering 413 at once), and
    counts the bytes actually received (a chunked body has no Content-Length; a lying
    one is caught too), raising `PayloadTooLarge` from `receive` the moment the count
    passes the limit, which the handlers render (or this middleware, if it escapes).
    """

    def __init__(self, app: ASGIApp, limit: int, json_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.json_limit = limit if json_limit is None else min(json_limit, limit)

    def _error(self, scope: Scope) -> PayloadTooLarge:
        """The refusal for this request's body: the JSON limit unless it is safetensors."""
        if self.json_limit >= self.limit or _is_binary(scope):
            return PayloadTooLarge(self.limit)
        return PayloadTooLarge(self.json_limit, self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._error(scope)
        limit = self.limit if error.binary_limit is None else self.json_limit
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await render(error)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise error
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            if started:
                raise
            await render(exc)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _is_binary(scope: Scope) -> bool:
    """Whether the body is declared safetensors (`application/octet-stream`)."""
    value = _header(scope, b"content-type")
    if value is None:
        return False
    return value.split(b";", 1)[0].strip().lower() == _BINARY.encode()
