"""What the sync and async clients share: everything but the I/O.

- where and who: the server address (`base_url`, else `OPTSERVE_URL`, else
  `http://127.0.0.1:8000`) and the API key (`api_key`, else `OPTSERVE_API_KEY`);
- requests: each API call is a `Call` (method, path, headers, body bytes, and how to
  read the answer), built here once and sent as is on every retry;
- encoding: tensors as safetensors (`application/octet-stream`, the default) or as JSON
  nested lists (`binary=False`, for debugging); answers decoded into NumPy arrays;
- errors: a refusal becomes the `clients.errors` class of its status;
- retries (`RetryPolicy`, `Attempts`): what is retried, after how long, how often.

Retries. A connection that could not be opened is retried for every call (nothing was
sent). A connection lost after sending, a timeout and a 502/504 are retried only for calls
that are safe to send twice: reads, delete, the schedule preview, and a step, which
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
import functools
import json
import logging
import math
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any, Generic, Literal, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from clients import errors, tensorfile

log = logging.getLogger("optserve.client")

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "OPTSERVE_URL"
ENV_API_KEY = "OPTSERVE_API_KEY"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
JSON = "application/json"
BINARY = "application/octet-stream"
USER_AGENT = "optserve-python-client/0.1"

ReturnKind = Literal["params", "updates", "none"]
Tensors = Mapping[str, npt.ArrayLike]
Timeout = float | httpx.Timeout | None
T = TypeVar("T")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A session document (`GET /v1/sessions/{id}`): `lr` is the rate of the next step,
    `shapes` each tensor's shape; `doc` is the whole document as the server sent it."""

    id: str
    step: int
    version: int
    lr: float
    optimizer: dict[str, Any]
    schedule: dict[str, Any] | None
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    doc: dict[str, Any] = field(repr=False)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Session:
        params = doc.get("params") or {}
        return cls(
            id=str(doc["id"]),
            step=int(doc["step"]),
            version=int(doc["version"]),
            lr=float(doc["lr"]),
            optimizer=dict(doc["optimizer"]),
            schedule=None if doc.get("schedule") is None else dict(doc["schedule"]),
            dtype=str(doc["dtype"]),
            shapes={str(n): tuple(int(d) for d in info["shape"]) for n, info in params.items()},
            doc=dict(doc),
        )


@dataclass(frozen=True, eq=False)
class StepResult:
    """The answer to a step: the counters after it, the rate it used, the new params
    (`return_="params"`) or the updates (new minus old, `return_="updates"`).

    `skipped`: the gradient was non-finite and the session skips such steps;
    `grad_norm`: the gradient's norm (None when non-finite); `clipped`: clipping changed
    the gradient; `replayed`: this is the server's recorded answer to an earlier
    attempt with the same `Idempotency-Key` (the step was applied once, then).
    """

    step: int
    version: int
    lr: float
    params: dict[str, np.ndarray] | None = None
    updates: dict[str, np.ndarray] | None = None
    skipped: bool = False
    grad_norm: float | None = None
    clipped: bool = False
    replayed: bool = False


@dataclass(frozen=True, eq=False)
class ParamsResult:
    """A session's current params, with the counters they belong to."""

    step: int
    version: int
    params: dict[str, np.ndarray]


@dataclass(frozen=True)
class SchedulePreview:
    """The rates at steps `0 .. steps-1`, and the cycled momentum if the schedule has one."""

    lrs: list[float]
    momenta: list[float] | None = None


# --- retries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry (see the module docstring for what is retried).

    `max_retries`: retries after the first attempt; `initial_delay`, `max_delay`: the
    backoff's first ceiling and its cap (seconds); `max_total_delay`: the most seconds
    spent waiting over all retries of one call: once spent, or when a `Retry-After`
    asks for more than what is left, the retries end (0 turns retries off).
    """

    max_retries: int = 5
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

    def __init__(self, call: Call[T], policy: RetryPolicy) -> None:
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
        if response.is_success:
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
        if response.is_success:
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


def _client_error(exc: httpx.TransportError, call: Call[Any], retries: int) -> errors.OptserveError:
    after = f" (after {retries} retries)" if retries else ""
    text = f"{call.method} {call.path}: {type(exc).__name__}: {str(exc) or 'no details'}{after}"
    if isinstance(exc, httpx.TimeoutException):
        return errors.TimeoutError(text)
    return errors.ConnectionError(text)


# --- calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: the request (sent as is on every retry) and how to read its answer.

    `resend_safe`: sending it twice does no harm (reads, delete, preview, a step with
    its Idempotency-Key); `missing_ok_after_loss`: a 404 after an attempt whose answer
    was lost means success (delete).
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    resend_safe: bool = True
    missing_ok_after_loss: bool = False


class BaseClient:
    """Settings and request building shared by `OptimizerClient` and
    `AsyncOptimizerClient` (which add the I/O)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        binary: bool = True,
        max_retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        url = base_url if base_url is not None else os.environ.get(ENV_URL) or DEFAULT_URL
        self.base_url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        self.api_key: str | None = key or None
        self.binary = binary
        policy = retry_policy or RetryPolicy()
        if max_retries is not None:
            policy = replace(policy, max_retries=max_retries)
        self.retry_policy = policy

    def _default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": JSON}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @property
    def _accept(self) -> str:
        return BINARY if self.binary else JSON

    # the calls of the API ------------------------------------------------------------------

    def _create_call(
        self,
        params: Tensors,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        dtype: Any,
        transforms: Mapping[str, Any] | None,
        nonfinite: str | None,
    ) -> Call[Session]:
        dtype_name = _dtype_name(dtype)
        if self.binary:
            meta = {"optimizer": _dumps(optimizer), "dtype": dtype_name}
            if schedule is not None:
                meta["schedule"] = _dumps(schedule)
            if transforms is not None:
                meta["transforms"] = _dumps(transforms)
            if nonfinite is not None:
                meta["nonfinite"] = nonfinite
            content, ctype = _encode_tensors(params, meta), BINARY
        else:
            body: dict[str, Any] = {
                "optimizer": optimizer,
                "params": _json_tensors(params),
                "dtype": dtype_name,
            }
            if schedule is not None:
                body["schedule"] = schedule
            if transforms is not None:
                body["transforms"] = transforms
            if nonfinite is not None:
                body["nonfinite"] = nonfinite
            content, ctype = _dumps(body).encode(), JSON
        return Call(
            "POST",
            "/v1/sessions",
            _parse_session,
            {"Content-Type": ctype},
            content,
            resend_safe=False,  # a retry after delivery would make a second session
        )

    def _get_session_call(self, session_id: str) -> Call[Session]:
        return Call("GET", _session_path(session_id), _parse_session)

    def _delete_session_call(self, session_id: str) -> Call[None]:
        return Call("DELETE", _session_path(session_id), _ignore, missing_ok_after_loss=True)

    def _step_call(
        self,
        session_id: str,
        grads: Tensors,
        loss: float | None,
        return_: str,
        idempotency_key: str | None,
        skip_missing: bool,
    ) -> Call[StepResult]:
        if self.binary:
            meta = {"return": return_}
            if loss is not None:
                meta["loss"] = repr(float(loss))
            if skip_missing:
                meta["skip_missing"] = "true"
            content, ctype = _encode_tensors(grads, meta), BINARY
        else:
            body: dict[str, Any] = {"grads": _json_tensors(grads), "return": return_}
            if loss is not None:
                body["loss"] = float(loss)
            if skip_missing:
                body["skip_missing"] = True
            content, ctype = _dumps(body).encode(), JSON
        headers = {
            "Content-Type": ctype,
            "Accept": self._accept,
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return Call("POST", _session_path(session_id) + "/step", _parse_step, headers, content)

    def _params_call(self, session_id: str) -> Call[ParamsResult]:
        headers = {"Accept": self._accept}
        return Call("GET", _session_path(session_id) + "/params", _parse_params, headers)

    def _preview_call(
        self, schedule: Mapping[str, Any], lr: float, steps: int
    ) -> Call[SchedulePreview]:
        body = _dumps({"schedule": schedule, "lr": lr, "steps": steps}).encode()
        headers = {"Content-Type": JSON}
        return Call("POST", "/v1/schedules/preview", _parse_preview, headers, body)


def _session_path(session_id: str) -> str:
    if not isinstance(session_id, str) or session_id in ("", ".", ".."):
        raise ValueError(f"not a session id: {session_id!r}")
    return "/v1/sessions/" + urllib.parse.quote(session_id, safe="")


# --- encoding ------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    try:
        return str(np.dtype(dtype).name)
    except TypeError:
        return str(dtype)  # the server names what it takes


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:
        raise ValueError(
            f"{exc} (JSON cannot hold NaN or infinity; tensors holding them can be sent "
            "with binary=True)"
        ) from None


def _json_tensors(tensors: Tensors) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not a number type")
        out[name] = array.tolist()
    return out


def _encode_tensors(tensors: Tensors, metadata: Mapping[str, str]) -> bytes:
    return tensorfile.encode({n: np.asarray(v) for n, v in tensors.items()}, metadata)


# --- decoding ------------------------------------------------------------------------------


def _is_binary(response: httpx.Response) -> bool:
    media = str(response.headers.get("content-type", ""))
    return media.split(";", 1)[0].strip().lower() == BINARY


def _decode_tensors(response: httpx.Response) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors answer as writable arrays (copies: the buffer is the response's)."""
    tensors, metadata = tensorfile.decode(response.content)
    return {name: np.array(a) for name, a in tensors.items()}, metadata


def _json_arrays(value: Any) -> dict[str, np.ndarray] | None:
    """Tensors of a JSON answer (nested lists) as float64 arrays (JSON numbers; a
    float32 value comes back exactly when cast to float32)."""
    if value is None:
        return None
    return {str(n): np.asarray(v, dtype=np.float64) for n, v in value.items()}


def _unreadable(response: httpx.Response, exc: Exception) -> errors.OptserveError:
    return errors.OptserveError(
        f"the answer to {response.request.method} {response.request.url.path} could not be "
        f"read: {type(exc).__name__}: {exc}",
        status=response.status_code,
        headers=response.headers,
    )


def _parsing(parse: Callable[[httpx.Response], T]) -> Callable[[httpx.Response], T]:
    """`parse`, raising an `OptserveError` for an answer it cannot read."""

    @functools.wraps(parse)
    def run(response: httpx.Response) -> T:
        try:
            return parse(response)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(response, exc) from exc

    return run


@_parsing
def _parse_session(response: httpx.Response) -> Session:
    return Session.from_doc(response.json())


def _ignore(response: httpx.Response) -> None:
    return None


def _flag(text: str | None) -> bool:
    return text == "true"


@_parsing
def _parse_step(response: httpx.Response) -> StepResult:
    replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        ret = meta.get("return", "params")
        grad_norm = meta.get("grad_norm")
        return StepResult(
            step=int(meta["step"]),
            version=int(meta["version"]),
            lr=float(meta["lr"]),
            params=tensors if ret == "params" else None,
            updates=tensors if ret == "updates" else None,
            skipped=_flag(meta.get("skipped")),
            grad_norm=None if grad_norm is None else float(grad_norm),
            clipped=_flag(meta.get("clipped")),
            replayed=replayed,
        )
    body = response.json()
    grad_norm = body.get("grad_norm")
    return StepResult(
        step=int(body["step"]),
        version=int(body["version"]),
        lr=float(body["lr"]),
        params=_json_arrays(body.get("params")),
        updates=_json_arrays(body.get("updates")),
        skipped=bool(body.get("skipped", False)),
        grad_norm=None if grad_norm is None else float(grad_norm),
        clipped=bool(body.get("clipped", False)),
        replayed=replayed,
    )


@_parsing
def _parse_params(response: httpx.Response) -> ParamsResult:
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        return ParamsResult(int(meta["step"]), int(meta["version"]), tensors)
    body = response.json()
    return ParamsResult(int(body["step"]), int(body["version"]), _json_arrays(body["params"]) or {})


@_parsing
def _parse_preview(response: httpx.Response) -> SchedulePreview:
    body = response.json()
    momenta = body.get("momenta")
    return SchedulePreview(
        [float(x) for x in body["lrs"]], None if momenta is None else [float(x) for x in momenta]
    )


__all__ = [
    "DEFAULT_URL",
    "ENV_API_KEY",
    "ENV_URL",
    "Attempts",
    "BaseClient",
    "Call",
    "ParamsResult",
    "RetryPolicy",
    "ReturnKind",
    "SchedulePreview",
    "Session",
    "StepResult",
    "parse_retry_after",
]
