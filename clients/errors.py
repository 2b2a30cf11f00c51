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
    ├── ConflictError               409  (`in_flight`, `version_conflict`, `stale`, ...)
    │   ├── NoRangeTestError        409  no-range-test (the session runs no LR range test)
    │   ├── StaleGradientError      409  stale-gradient (`current_version`, `base_version`)
    │   ├── RangeTestOverError      409  range-test-over
    │   ├── NoAverageError          409  no-average
    │   └── RoundClosedError        409  round-closed (`current_round`)
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
        └── WaitTimeoutError        408  wait-timeout (`current_version`)

Another status is a plain `OptserveError` with that `status`. Where the problem `type`
names a narrower class of its status (the ones with a slug above), that class is
raised. A problem's extension members (anything but type, title, status, detail,
errors) are the error's `members` dict.
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
    and `errors` (a list of `FieldError`), its extension `members` (a dict), plus the
    response `headers`. For a failure
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
        members: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors: list[FieldError] = list(errors)
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        #: the problem's extension members (e.g. `version` of a stale-gradient 409)
        self.members: dict[str, Any] = dict(members or {})

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
    """409: nothing was applied. The same `Idempotency-Key` still in flight
    (`in_flight`) and a version conflict the server could not resolve
    (`version_conflict`) are retried by the clients; the others are not (sending the
    same request again cannot succeed): a stale gradient (`StaleGradientError`), a
    range test that is over (`RangeTestOverError`), no average yet (`NoAverageError`),
    the range-test result of a session that runs none (`NoRangeTestError`),
    a federated update for a round that is not the open one (`RoundClosedError`).
    """

    @property
    def slug(self) -> str:
        """The problem type without its `urn:optserve:problem:` prefix."""
        return (self.type or "").removeprefix(PROBLEM_PREFIX)

    @property
    def in_flight(self) -> bool:
        return self.slug == "idempotency-key-in-flight"

    @property
    def version_conflict(self) -> bool:
        return self.slug == "version-conflict"

    @property
    def stale(self) -> bool:
        """The gradient was computed on a version too far behind the session's."""
        return self.slug == "stale-gradient"

    @property
    def range_test_over(self) -> bool:
        """A step sent to an LR range-test session whose test has ended."""
        return self.slug == "range-test-over"

    @property
    def round_closed(self) -> bool:
        """A federated update for a round that is not the session's open round."""
        return self.slug == "round-closed"


def _int_member(error: OptserveError, name: str) -> int | None:
    value = error.members.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


class NoRangeTestError(ConflictError):
    """409 `no-range-test`: the range-test result of a session made without `lr_finder`."""


class StaleGradientError(ConflictError):
    """409 `stale-gradient`: the step's `base_version` is too far behind the session's
    version (an async session's `max_staleness`; in a sync session any other version).
    Nothing was applied or accumulated; not retried. `current_version` is the session's
    version now, `base_version` the one sent (None if the server did not say)."""

    @property
    def current_version(self) -> int | None:
        return _int_member(self, "version")

    @property
    def base_version(self) -> int | None:
        return _int_member(self, "base_version")


class RangeTestOverError(ConflictError):
    """409 `range-test-over`: a step sent to an LR range-test session whose test has
    ended (completed or diverged); nothing changed. Not retried."""


class NoAverageError(ConflictError):
    """409 `no-average`: averaged params (`average="ema"`/`"swa"`) asked for before any
    step was averaged. Not retried."""


class RoundClosedError(ConflictError):
    """409 `round-closed`: a federated update (docs/federated.md) for a round that is not
    the session's open one: it closed before the update came (a straggler), or it has
    not opened. Nothing was taken; not retried (the round will not reopen).
    `current_round` is the session's open round (None if the server did not say)."""

    @property
    def current_round(self) -> int | None:
        return _int_member(self, "round")


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
    """No answer within the client's timeout, or (a step's `block_timeout`) the step a
    pending push waits for did not happen in time."""


class WaitTimeoutError(TimeoutError):
    """408 `wait-timeout`: the server waited `timeout` seconds for `min_version` and the
    session did not reach it; `current_version` is its version then. Repeating the
    request waits again (a pending step's wait does so itself)."""

    @property
    def current_version(self) -> int | None:
        return _int_member(self, "version")


STATUS_ERRORS: dict[int, type[OptserveError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    408: WaitTimeoutError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


#: narrower classes by problem type (slug), used when the status is theirs
TYPE_ERRORS: dict[str, type[OptserveError]] = {
    "stale-gradient": StaleGradientError,
    "range-test-over": RangeTestOverError,
    "no-average": NoAverageError,
    "no-range-test": NoRangeTestError,
    "round-closed": RoundClosedError,
}

#: the members of a problem that are not extension members
_STANDARD_MEMBERS = frozenset({"type", "title", "status", "detail", "errors", "instance"})


def error_class(status: int, problem_type: str | None = None) -> type[OptserveError]:
    """The class of the error for an HTTP status (and problem `type`, when a narrower
    class of that status has it)."""
    cls = STATUS_ERRORS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else OptserveError
    if problem_type is not None and problem_type.startswith(PROBLEM_PREFIX):
        narrow = TYPE_ERRORS.get(problem_type.removeprefix(PROBLEM_PREFIX))
        if narrow is not None and issubclass(narrow, cls):
            return narrow
    return cls


def error_for_status(
    status: int, content: bytes, headers: Mapping[str, str], reason: str = ""
) -> OptserveError:
    """The error for a response: its problem+json members, or (for a body that is not a
    problem, e.g. from a proxy) the start of its text as `detail`."""
    problem = _problem(content)
    if problem is None:
        cls = error_class(status)
        text = content[:500].decode("utf-8", "replace").strip()
        return cls(text or reason or f"HTTP {status}", status=status, title=reason, headers=headers)
    errors = [_field_error(e) for e in problem.get("errors") or () if isinstance(e, dict)]
    title = problem.get("title")
    detail = problem.get("detail")
    kind = problem.get("type")
    cls = error_class(status, str(kind) if kind is not None else None)
    return cls(
        str(detail) if detail is not None else str(title or reason or f"HTTP {status}"),
        status=status,
        type=str(kind) if kind is not None else None,
        title=str(title) if title is not None else reason,
        errors=errors,
        headers=headers,
        members={k: v for k, v in problem.items() if k not in _STANDARD_MEMBERS},
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
    "NoAverageError",
    "NoRangeTestError",
    "NotFoundError",
    "OptserveError",
    "PayloadTooLargeError",
    "RangeTestOverError",
    "RateLimitError",
    "RoundClosedError",
    "ServiceUnavailableError",
    "StaleGradientError",
    "TimeoutError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "WaitTimeoutError",
    "error_class",
    "error_for_status",
]
