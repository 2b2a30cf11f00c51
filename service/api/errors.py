"""HTTP problems: the `ApiError` tree and the handlers that render RFC 9457 problem+json.

Every refusal the API makes is a problem document (API.md, "Conventions"):

    {"type": "urn:optserve:problem:<slug>", "title": "...", "status": 422,
     "detail": "...", "errors": [{"loc": ["body", "optimizer", "betas", 0], "msg": "..."}]}

`type` is a URN naming the kind of problem (the same for every occurrence, so a client
can branch on it; `title` is its short human text); `errors` lists each field at fault,
its `loc` a path into the request (`["body", ...]`, `["path", "session_id"]`,
`["header", "Idempotency-Key"]`), empty when no field is to blame.

Mapping (the table of API.md):

* `ApiError` subclasses carry their status; raised anywhere below a route.
* core `SpecError` (optimizer, schedule) -> 422 with each error's loc under
  `["body", <field>]` (the engine names the field it validated; see `spec_error`),
  `LayoutError` -> 422 naming the tensor, other `CoreError` -> 422.
* FastAPI's `RequestValidationError` -> 422, or 400 when the body is not JSON at all.
* `StoreUnavailable` -> 503 with `Retry-After: settings.retry_after`.
* Starlette's own `HTTPException` (unknown route 404, method 405, ...) -> problem+json too.
* Anything else -> 500 problem (the traceback goes to the log, not to the client).

`ApiError` subclasses Starlette's `HTTPException`, so FastAPI passes it through untouched
when it is raised while FastAPI reads a body (the streamed-size check of `BodyLimit`).
This module imports FastAPI only inside `install_handlers`: the engine raises these
errors without depending on the web framework.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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
from service.store.base import StoreUnavailable

log = logging.getLogger("optserve.api")

PROBLEM_JSON = "application/problem+json"
_TYPE_PREFIX = "urn:optserve:problem:"

Loc = Sequence[str | int]
FieldError = dict[str, Any]


def field_error(loc: Loc, msg: str) -> FieldError:
    """One entry of a problem's `errors`."""
    return {"loc": [p if isinstance(p, int) else str(p) for p in loc], "msg": msg}


class ApiError(StarletteHTTPException):
    """A refusal rendered as problem+json. Subclasses fix `status`, `slug` and `title`."""

    status: int = 500
    slug: str = "internal"
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        errors: Iterable[FieldError] = (),
        headers: dict[str, str] | None = None,
        members: dict[str, Any] | None = None,
    ) -> None:
        self.errors: list[FieldError] = list(errors)
        #: RFC 9457 extension members of this problem (e.g. the session's `version`)
        self.members: dict[str, Any] = dict(members or {})
        text = detail if detail is not None else self.title
        super().__init__(status_code=self.status, detail=text, headers=headers)

    @property
    def type(self) -> str:
        return _TYPE_PREFIX + self.slug

    def problem(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": self.errors,
            **self.members,
        }


class BadRequest(ApiError):
    """400: the body cannot be read at all (bad JSON, bad safetensors header)."""

    status, slug, title = 400, "malformed-body", "Malformed request body"


class Unauthorized(ApiError):
    """401: authentication is on and no valid `Authorization: Bearer <key>` was sent."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str = "a valid 'Authorization: Bearer <key>' is required") -> None:
        super().__init__(
            detail,
            [field_error(["header", "Authorization"], detail)],
            headers={"WWW-Authenticate": 'Bearer realm="optserve"'},
        )


class SessionNotFound(ApiError):
    """404: no such session, or another tenant's (the body is the same either way)."""

    status, slug, title = 404, "session-not-found", "Session not found"

    def __init__(self) -> None:
        super().__init__("no session with this id", [])


class IdempotencyInFlight(ApiError):
    """409: a request with the same `Idempotency-Key` is still being processed;
    `Retry-After` says when its claim's lease ends (at most `idempotency_lock_ttl`)."""

    status, slug, title = 409, "idempotency-key-in-flight", "Idempotency key in flight"

    def __init__(self, retry_after: int = 1, *, federated: bool = False) -> None:
        # a federated update is keyed by its round and client_id, not by a header
        what, loc = (
            ("an update from this client_id for this round", ["body", "client_id"])
            if federated
            else ("a request with this Idempotency-Key", ["header", "Idempotency-Key"])
        )
        msg = (
            f"{what} is still in flight; retry after {retry_after} s (the same request "
            "then gets its answer, or is applied if that request died)"
        )
        super().__init__(msg, [field_error(loc, msg)], headers={"Retry-After": str(retry_after)})


class VersionConflict(ApiError):
    """409: concurrent steps kept winning the version race; nothing was applied."""

    status, slug, title = 409, "version-conflict", "Version conflict"


class StaleGradient(ApiError):
    """409: a gradient computed on a version the session has moved too far from (an async
    session's `max_staleness`, or any other version in a sync session); members
    `version` (the session's now) and `base_version` (the one sent)."""

    status, slug, title = 409, "stale-gradient", "Stale gradient"

    def __init__(self, detail: str, version: int, base_version: int) -> None:
        super().__init__(
            detail,
            [field_error(["body", "base_version"], detail)],
            members={"version": version, "base_version": base_version},
        )


class RangeTestOver(ApiError):
    """409: a step sent to an LR range-test session whose test has ended."""

    status, slug, title = 409, "range-test-over", "Range test over"


class NoAverage(ApiError):
    """409: averaged params asked for before any step was averaged."""

    status, slug, title = 409, "no-average", "No average yet"


class NoRangeTest(ApiError):
    """409: the range-test result of a session that runs no range test (not 404, which
    says the session itself does not exist)."""

    status, slug, title = 409, "no-range-test", "No range test"


class NotFederated(ApiError):
    """409: the round of a session that is not federated (the session exists)."""

    status, slug, title = 409, "not-federated", "Not a federated session"


class WaitTimeout(ApiError):
    """408: the version waited for (`min_version`) was not reached in time; member
    `version` (the session's now). Repeat the request to wait again."""

    status, slug, title = 408, "wait-timeout", "Version not reached in time"

    def __init__(self, detail: str, version: int) -> None:
        super().__init__(detail, [], members={"version": version})


class NotAcceptable(ApiError):
    """406: the answer cannot be given in the format `Accept` asks for (an idempotent
    replay whose recorded answer cannot be re-encoded in that format)."""

    status, slug, title = 406, "not-acceptable", "Not Acceptable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, [field_error(["header", "Accept"], detail)])


class PayloadTooLarge(ApiError):
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
        super().__init__(detail, [])


#: the safetensors media type (`codecs.BINARY`; codecs imports this module)
_BINARY = "application/octet-stream"


class UnsupportedMediaType(ApiError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class Invalid(ApiError):
    """422: well-formed but invalid (spec, tensor names or shapes, non-finite values)."""

    status, slug, title = 422, "validation-error", "Invalid request"


class IdempotencyMismatch(ApiError):
    """422: an `Idempotency-Key` already used with a different request."""

    status, slug, title = 422, "idempotency-key-reused", "Idempotency key reused"

    def __init__(self) -> None:
        msg = "this Idempotency-Key was used with a different request (method, path or body)"
        super().__init__(msg, [field_error(["header", "Idempotency-Key"], msg)])


class StoreDown(ApiError):
    """503: the state store cannot be reached."""

    status, slug, title = 503, "store-unavailable", "State store unavailable"

    def __init__(self, retry_after: int, detail: str = "the state store cannot be reached") -> None:
        super().__init__(detail, [], headers={"Retry-After": str(retry_after)})


def invalid(loc: Loc, msg: str) -> Invalid:
    """A 422 naming one field."""
    return Invalid(msg, [field_error(loc, msg)])


def spec_error(exc: SpecError, prefix: Loc) -> Invalid:
    """A core SpecError as a 422, each loc under `prefix` (e.g. `["body", "optimizer"]`)."""
    errors = [
        field_error([*prefix, *_as_loc(e.get("loc", ()))], str(e.get("msg", "invalid")))
        for e in exc.errors
    ]
    return Invalid(str(exc), errors)


def layout_error(exc: LayoutError, prefix: Loc) -> Invalid:
    """A core LayoutError as a 422 naming the tensor (`prefix + [name]`)."""
    loc = [*prefix, exc.name] if exc.name is not None else list(prefix)
    return Invalid(str(exc), [field_error(loc, str(exc))])


def _as_loc(loc: object) -> list[str | int]:
    if isinstance(loc, (list, tuple)):
        return [p if isinstance(p, int) else str(p) for p in loc]
    return [str(loc)]


def problem_response(
    status: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def render(exc: ApiError) -> Response:
    return problem_response(exc.status, exc.problem(), dict(exc.headers or {}))


# --- handlers ----------------------------------------------------------------------------


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
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
    errors = [field_error(_as_loc(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in raw]
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
        "type": _TYPE_PREFIX + slug,
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
    return render(ApiError("internal server error"))


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
    app.add_exception_handler(ApiError, _api_error)
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


# --- OpenAPI -----------------------------------------------------------------------------

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


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for problem+json answers with these statuses."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "Problem"),
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for status in statuses
    }
