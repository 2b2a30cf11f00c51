"""Retries of the clients' calls: `RetryPolicy` (how often, how long), `Attempts` (the
bookkeeping of one call: whether and how long to wait before the next attempt, or the
error to raise) and `parse_retry_after`.

A connection that could not be opened is retried for every call (nothing was sent). A
connection lost after sending, a timeout and a 502/504 are retried only for calls that
are safe to send twice: reads, delete, the schedule preview, and a step, which
carries one `Idempotency-Key` (a uuid4 per logical step, the same on every retry) so
that the server applies it once and answers a retry of a step that did commit with the
recorded answer (`StepResult.replayed`). Creating a session is not retried after it may
have reached the server (a retry could create a second session). 429 and 503 are
retried for every call, and a 409 when nothing was applied: the same key still in
flight, or a version conflict the server gave up on. Waits are exponential backoff with
full jitter (uniform in `[0, min(max_delay, initial_delay * 2**retry)]`), or what
`Retry-After` says (seconds or an HTTP date), for at most `max_retries` retries and
`max_total_delay` seconds of waiting in all.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Generic, Protocol, TypeVar

import httpx

from clients import errors

log = logging.getLogger("optserve.client")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry (see the module docstring for what is retried).

    `max_retries`: retries after the first attempt; `initial_delay`, `max_delay`: the
    backoff's first ceiling and its cap (seconds); `max_total_delay`: the most seconds
    spent waiting over all retries of one call: once spent, or when a `Retry-After`
    asks for more than what is left, the retries end (0 turns retries off).

    The defaults (10 retries, 60 s) outlast what a server's crash leaves behind: the
    claim of an `Idempotency-Key` whose holder was killed lapses within the server's
    lease (`idempotency_lock_ttl`, 10 s by default; its 409 says when in
    `Retry-After`), and a restarted Redis answers within a few 503s.
    """

    max_retries: int = 10
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_total_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0: got {self.max_retries}")
        for name in ("initial_delay", "max_delay", "max_total_delay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0: got {value}")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `retry` (0-based): full jitter."""
        ceiling = min(self.max_delay, self.initial_delay * 2.0 ** min(retry, 60))
        return (rng or _rng).uniform(0.0, ceiling)


_rng = random.Random()

#: failures where nothing reached the server: any call may be sent again
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: failures after which the request may have arrived (and been applied)
_MAYBE_SENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` in seconds from now: delay-seconds, or an HTTP date (`now` is the
    Unix time it is compared with, default the current time); None if absent or bad."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RetriedCall(Protocol[T_co]):
    """What `Attempts` reads of a call: a `clients._base.Call` (described here, so that
    this module does not import `_base`)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def parse(self) -> Callable[[httpx.Response], T_co]: ...

    @property
    def resend_safe(self) -> bool: ...

    @property
    def missing_ok_after_loss(self) -> bool: ...

    @property
    def accept_status(self) -> frozenset[int]: ...


class Attempts(Generic[T]):
    """The retry bookkeeping of one call: after each attempt, whether and how long to
    wait before the next one, or the error to raise. Used by both clients as:

        attempts = Attempts(call, policy)
        while True:
            try:
                response = send(call)
            except httpx.TransportError as exc:
                delay = attempts.after_error(exc)       # raises when giving up
            else:
                delay = attempts.after_response(response)
                if delay is None:
                    return attempts.result(response)     # parsed, or raises
            sleep(delay)
    """

    def __init__(self, call: RetriedCall[T], policy: RetryPolicy) -> None:
        self.call = call
        self.policy = policy
        self.retries = 0
        self.waited = 0.0
        #: an earlier attempt may have reached the server (its answer was lost)
        self.maybe_delivered = False

    def after_error(self, exc: httpx.TransportError) -> float:
        """The wait before the next attempt after `exc`; raises the client error when
        the call is not retried."""
        sent = not isinstance(exc, _NOT_SENT)
        retryable = isinstance(exc, _NOT_SENT) or (
            isinstance(exc, _MAYBE_SENT) and self.call.resend_safe
        )
        self.maybe_delivered |= sent
        delay = self._next_delay(None) if retryable else None
        if delay is None:
            raise _client_error(exc, self.call, self.retries) from exc
        log.debug("%s %s: %r; retry %d in %.3f s", *self._what(), exc, self.retries, delay)
        return delay

    def after_response(self, response: httpx.Response) -> float | None:
        """The wait before the next attempt, or None: `response` is the answer."""
        if response.is_success or response.status_code in self.call.accept_status:
            return None
        status = response.status_code
        if status == 409:
            error = self._error(response)
            retryable = isinstance(error, errors.ConflictError) and (
                error.in_flight or error.version_conflict
            )
        elif status in (502, 504):
            retryable = self.call.resend_safe
            self.maybe_delivered = True
        else:
            retryable = status in (429, 503)
        if not retryable:
            return None
        delay = self._next_delay(parse_retry_after(response.headers.get("retry-after")))
        if delay is not None:
            log.debug("%s %s: %d; retry %d in %.3f s", *self._what(), status, self.retries, delay)
        return delay

    def result(self, response: httpx.Response) -> T:
        """The parsed answer; the error of its status when it is a refusal."""
        if response.is_success or response.status_code in self.call.accept_status:
            return self.call.parse(response)
        if response.status_code == 404 and self.call.missing_ok_after_loss and self.maybe_delivered:
            return self.call.parse(response)  # a lost answer to the same delete: done
        raise self._error(response)

    def _next_delay(self, retry_after: float | None) -> float | None:
        if self.retries >= self.policy.max_retries:
            return None
        left = self.policy.max_total_delay - self.waited
        if left <= 0:
            return None
        if retry_after is not None:
            if retry_after > left:
                return None
            delay = retry_after
        else:
            delay = min(self.policy.backoff(self.retries), left)
        self.retries += 1
        self.waited += delay
        return delay

    def _error(self, response: httpx.Response) -> errors.OptserveError:
        return errors.error_for_status(
            response.status_code, response.content, response.headers, response.reason_phrase
        )

    def _what(self) -> tuple[str, str]:
        return self.call.method, self.call.path


def _client_error(
    exc: httpx.TransportError, call: RetriedCall[Any], retries: int
) -> errors.OptserveError:
    after = f" (after {retries} retries)" if retries else ""
    text = f"{call.method} {call.path}: {type(exc).__name__}: {str(exc) or 'no details'}{after}"
    if isinstance(exc, httpx.TimeoutException):
        return errors.TimeoutError(text)
    return errors.ConnectionError(text)


__all__ = ["Attempts", "RetriedCall", "RetryPolicy", "parse_retry_after"]
