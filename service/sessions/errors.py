"""Refusals of the sessions layer: the `SessionError` tree, plain exceptions that carry
what the API renders as RFC 9457 problem+json (`service.api.errors` maps every one to
its answer in one handler): a status, a problem type (`urn:optserve:problem:<slug>`), a
title, a detail, and the fields at fault as `loc` paths into the request
(`["body", "optimizer", "betas", 0]`, `["header", "Idempotency-Key"]`).

No web framework here: the sessions layer raises these wherever it refuses, before
anything is committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from service.core.errors import LayoutError, SpecError

TYPE_PREFIX = "urn:optserve:problem:"

Loc = Sequence[str | int]
FieldError = dict[str, Any]


def field_error(loc: Loc, msg: str) -> FieldError:
    """One entry of a problem's `errors`."""
    return {"loc": [p if isinstance(p, int) else str(p) for p in loc], "msg": msg}


class SessionError(Exception):
    """A refusal: what the API renders as problem+json (`service.api.errors`). Subclasses
    fix `status`, `slug` and `title`; an instance carries the `detail`, the fields at
    fault (`errors`, each a `loc` path into the request and a `msg`), headers the answer
    must carry (`Retry-After`) and extension members (the session's `version`)."""

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
        self.detail: str = detail if detail is not None else self.title
        self.headers: dict[str, str] = dict(headers or {})
        Exception.__init__(self, self.detail)

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug

    def problem(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": self.errors,
            **self.members,
        }


class BadRequest(SessionError):
    """400: the body cannot be read at all (bad JSON, bad safetensors header)."""

    status, slug, title = 400, "malformed-body", "Malformed request body"


class SessionNotFound(SessionError):
    """404: no such session, or another tenant's (the body is the same either way)."""

    status, slug, title = 404, "session-not-found", "Session not found"

    def __init__(self) -> None:
        super().__init__("no session with this id", [])


class IdempotencyInFlight(SessionError):
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


class VersionConflict(SessionError):
    """409: concurrent steps kept winning the version race; nothing was applied."""

    status, slug, title = 409, "version-conflict", "Version conflict"


class StaleGradient(SessionError):
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


class RangeTestOver(SessionError):
    """409: a step sent to an LR range-test session whose test has ended."""

    status, slug, title = 409, "range-test-over", "Range test over"


class NoAverage(SessionError):
    """409: averaged params asked for before any step was averaged."""

    status, slug, title = 409, "no-average", "No average yet"


class NoRangeTest(SessionError):
    """409: the range-test result of a session that runs no range test (not 404, which
    says the session itself does not exist)."""

    status, slug, title = 409, "no-range-test", "No range test"


class NotFederated(SessionError):
    """409: the round of a session that is not federated (the session exists)."""

    status, slug, title = 409, "not-federated", "Not a federated session"


class WaitTimeout(SessionError):
    """408: the version waited for (`min_version`) was not reached in time; member
    `version` (the session's now). Repeat the request to wait again."""

    status, slug, title = 408, "wait-timeout", "Version not reached in time"

    def __init__(self, detail: str, version: int) -> None:
        super().__init__(detail, [], members={"version": version})


class NotAcceptable(SessionError):
    """406: the answer cannot be given in the format `Accept` asks for (an idempotent
    replay whose recorded answer cannot be re-encoded in that format)."""

    status, slug, title = 406, "not-acceptable", "Not Acceptable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, [field_error(["header", "Accept"], detail)])


class UnsupportedMediaType(SessionError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class Invalid(SessionError):
    """422: well-formed but invalid (spec, tensor names or shapes, non-finite values)."""

    status, slug, title = 422, "validation-error", "Invalid request"


class IdempotencyMismatch(SessionError):
    """422: an `Idempotency-Key` already used with a different request."""

    status, slug, title = 422, "idempotency-key-reused", "Idempotency key reused"

    def __init__(self) -> None:
        msg = "this Idempotency-Key was used with a different request (method, path or body)"
        super().__init__(msg, [field_error(["header", "Idempotency-Key"], msg)])


def invalid(loc: Loc, msg: str) -> Invalid:
    """A 422 naming one field."""
    return Invalid(msg, [field_error(loc, msg)])


def spec_error(exc: SpecError, prefix: Loc) -> Invalid:
    """A core SpecError as a 422, each loc under `prefix` (e.g. `["body", "optimizer"]`)."""
    errors = [
        field_error([*prefix, *as_loc(e.get("loc", ()))], str(e.get("msg", "invalid")))
        for e in exc.errors
    ]
    return Invalid(str(exc), errors)


def layout_error(exc: LayoutError, prefix: Loc) -> Invalid:
    """A core LayoutError as a 422 naming the tensor (`prefix + [name]`)."""
    loc = [*prefix, exc.name] if exc.name is not None else list(prefix)
    return Invalid(str(exc), [field_error(loc, str(exc))])


def as_loc(loc: object) -> list[str | int]:
    if isinstance(loc, (list, tuple)):
        return [p if isinstance(p, int) else str(p) for p in loc]
    return [str(loc)]
