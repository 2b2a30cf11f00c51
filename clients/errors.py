"""The errors the clients raise: one class per HTTP status, built from the problem body.

Every refusal of the server is an RFC 9457 problem (`application/problem+json`):

    {"type": "urn:optserve:problem:validation-error", "title": "Invalid request",
     "status": 422, "detail": "...", "errors": [{"loc": ["body", "optimizer", "lr"],
     "msg": "..."}]}

`error_for_status` turns it into the class of its status (`ValidationError` for 422,
...), with each member as an attribute; failures on the client's side (no connection,
a timeout) are `ConnectionError` and `TimeoutError`, which are also the builtins of the
same names. Everything derives from `OptserveError`:

    OptserveError
    ├── BadRequestError             400
    ├── AuthenticationError         401
    ├── NotFoundError               404
    ├── ConflictError               409  (`in_flight`, `version_conflict`)
    ├── PayloadTooLargeError        413
    ├── UnsupportedMediaTypeError   415
    ├── ValidationError             422
    ├── RateLimitError              429
    ├── InternalServerError         5xx
    │   └── ServiceUnavailableError 503
    │       ├── BadGatewayError     502
    │       └── GatewayTimeoutError 504
    ├── ConnectionError             (also builtins.ConnectionError)
    └── TimeoutError                (also builtins.TimeoutError)

Another status is a plain `OptserveError` with that `status`.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PROBLEM_PREFIX = "urn:optserve:problem:"


@dataclass(frozen=True, slots=True)
class FieldError:
    """One entry of a problem's `errors`: where (`loc`) and what (`msg`)."""

    loc: tuple[str | int, ...]
    msg: str

    @property
    def path(self) -> str:
        """`loc` as text: `body.optimizer.betas[0]`."""
        text = ""
        for part in self.loc:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text

    def __str__(self) -> str:
        return f"{self.path}: {self.msg}" if self.loc else self.msg


class OptserveError(Exception):
    """Base of every error of the clients.

    For an answer of the server: `status`, and the problem's `type`, `title`, `detail`
    and `errors` (a list of `FieldError`), plus the response `headers`. For a failure
    on the client's side (`ConnectionError`, `TimeoutError`) `status` is None.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str | None = None,
        title: str | None = None,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors: list[FieldError] = list(errors)
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}

    def __str__(self) -> str:
        head = self.detail
        if self.status is not None:
            head = f"{self.status} {self.title or 'Error'}: {self.detail}"
        lines = [head]
        lines += [f"  {e}" for e in self.errors if str(e) != self.detail]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, detail={self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite keyword-only members
        return (_rebuild, (type(self), self.detail, self.__dict__))


def _rebuild(cls: type[OptserveError], detail: str, state: dict[str, Any]) -> OptserveError:
    error = cls.__new__(cls)
    Exception.__init__(error, detail)
    error.__dict__.update(state)
    return error


class BadRequestError(OptserveError):
    """400: the body could not be read (bad JSON, bad safetensors)."""


class AuthenticationError(OptserveError):
    """401: the server has API keys and the request had no valid one."""


class NotFoundError(OptserveError):
    """404: no such session (or another tenant's)."""


class ConflictError(OptserveError):
    """409: the same `Idempotency-Key` is still in flight, or a version conflict the
    server could not resolve. Nothing was applied; the clients retry both."""

    @property
    def in_flight(self) -> bool:
        return (self.type or "").endswith("idempotency-key-in-flight")

    @property
    def version_conflict(self) -> bool:
        return (self.type or "").endswith("version-conflict")


class PayloadTooLargeError(OptserveError):
    """413: the body is over the server's limit."""


class UnsupportedMediaTypeError(OptserveError):
    """415: a `Content-Type` the server does not take."""


class ValidationError(OptserveError):
    """422: well-formed but invalid; `errors` names each field at fault."""


class RateLimitError(OptserveError):
    """429: too many requests (retried, honouring `Retry-After`)."""


class InternalServerError(OptserveError):
    """5xx: the server (or a proxy in front of it) failed."""


class ServiceUnavailableError(InternalServerError):
    """503: the server's state store is unreachable (retried, honouring `Retry-After`)."""


class BadGatewayError(ServiceUnavailableError):
    """502: a proxy in front of the server got no valid answer (retried)."""


class GatewayTimeoutError(ServiceUnavailableError):
    """504: a proxy in front of the server timed out (retried)."""


class ConnectionError(OptserveError, builtins.ConnectionError):
    """The server could not be reached, or it closed the connection without an answer."""


class TimeoutError(OptserveError, builtins.TimeoutError):
    """No answer within the client's timeout."""


STATUS_ERRORS: dict[int, type[OptserveError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def error_class(status: int) -> type[OptserveError]:
    """The class of the error for an HTTP status."""
    cls = STATUS_ERRORS.get(status)
    if cls is not None:
        return cls
    return InternalServerError if status >= 500 else OptserveError


def error_for_status(
    status: int, content: bytes, headers: Mapping[str, str], reason: str = ""
) -> OptserveError:
    """The error for a response: its problem+json members, or (for a body that is not a
    problem, e.g. from a proxy) the start of its text as `detail`."""
    problem = _problem(content)
    cls = error_class(status)
    if problem is None:
        text = content[:500].decode("utf-8", "replace").strip()
        return cls(text or reason or f"HTTP {status}", status=status, title=reason, headers=headers)
    errors = [_field_error(e) for e in problem.get("errors") or () if isinstance(e, dict)]
    title = problem.get("title")
    detail = problem.get("detail")
    kind = problem.get("type")
    return cls(
        str(detail) if detail is not None else str(title or reason or f"HTTP {status}"),
        status=status,
        type=str(kind) if kind is not None else None,
        title=str(title) if title is not None else reason,
        errors=errors,
        headers=headers,
    )


def _problem(content: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _field_error(entry: Mapping[str, Any]) -> FieldError:
    loc = entry.get("loc")
    parts = tuple(p if isinstance(p, int) else str(p) for p in loc) if isinstance(loc, list) else ()
    return FieldError(parts, str(entry.get("msg", "")))


__all__ = [
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "ConflictError",
    "ConnectionError",
    "FieldError",
    "GatewayTimeoutError",
    "InternalServerError",
    "NotFoundError",
    "OptserveError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServiceUnavailableError",
    "TimeoutError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "error_class",
    "error_for_status",
]
