"""What the sync and async clients share: everything but the I/O.

- where and who: the server address (`base_url`, else `OPTSERVE_URL`, else
  `http://127.0.0.1:8000`) and the API key (`api_key`, else `OPTSERVE_API_KEY`);
- requests: each API call is a `Call` (method, path, headers, body bytes, and how to
  read the answer), built here once and sent as is on every retry;
- encoding: tensors as safetensors (`application/octet-stream`, the default) or as JSON
  nested lists (`binary=False`, for debugging); answers decoded into NumPy arrays;
- errors: a refusal becomes the `clients.errors` class of its status;
- retries (`RetryPolicy`, `Attempts`): what is retried, after how long, how often;
- flows (`Flow`): an API method that takes several calls (a step whose push is pending
  in a sync session, then polls for the version it waits for) is a generator here that
  yields each `Call` and is sent its answer; the clients drive it with their I/O.

Waiting (docs/training.md). A call the server may hold (a step's `wait`, a params read
with `min_version`) gets a read timeout `WAIT_MARGIN` seconds longer than that wait. A
step answered 202 (pending: the sync accumulation is not full) is, with `block=True`,
followed by `GET .../params?min_version=<wait_for>&timeout=<POLL_SECONDS>` polls (a 408
means "not yet": polled again at once, since the server already waited) until the
version is reached, or until `block_timeout` seconds have passed (`errors.TimeoutError`).
A stale-gradient 409 is not retried (the same gradient stays stale).

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
from collections.abc import Callable, Generator, Mapping
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
PNG = "image/png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the longest a server holds a request (`wait`, `timeout`), and its default `timeout`
MAX_SERVER_WAIT = 60.0
DEFAULT_SERVER_WAIT = 30.0
#: a call the server may hold `w` seconds gets a read timeout of at least `w` + this
WAIT_MARGIN = 10.0
#: the `timeout` of each poll for the version a pending push waits for
POLL_SECONDS = 30.0
#: how long `step(block=True)` waits in all for a pending push's step (default)
BLOCK_TIMEOUT = 300.0
USER_AGENT = "optserve-python-client/0.1"

ReturnKind = Literal["params", "updates", "none"]
Tensors = Mapping[str, npt.ArrayLike]
Timeout = float | httpx.Timeout | None
T = TypeVar("T")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A session document (`GET /v1/sessions/{id}`): `lr` is the rate of the next step
    (NaN when there is none: a range test that is over), `shapes` each tensor's shape;
    `doc` is the whole document as the server sent it.

    The training extensions (docs/training.md), as the server echoes them with defaults
    filled, None when absent (or from a server without them): `lr_finder` (the range
    test's config), `ema`, `swa`, `consistency` (`{"mode": "async" | "sync", ...}`),
    `history` (how many history entries it keeps) and, for sync sessions, `pending`
    (`{"base_version", "count", "accumulate"}`).
    """

    id: str
    step: int
    version: int
    lr: float
    optimizer: dict[str, Any]
    schedule: dict[str, Any] | None
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    doc: dict[str, Any] = field(repr=False)
    lr_finder: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    swa: dict[str, Any] | None = None
    consistency: dict[str, Any] | None = None
    history: int | None = None
    pending: dict[str, Any] | None = None

    @property
    def sync(self) -> bool:
        """The session combines `accumulate` gradients per step (consistency "sync")."""
        return (self.consistency or {}).get("mode") == "sync"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Session:
        params = doc.get("params") or {}
        lr = doc.get("lr")
        history = doc.get("history")
        consistency = doc.get("consistency")
        if isinstance(consistency, str):
            consistency = {"mode": consistency}
        return cls(
            id=str(doc["id"]),
            step=int(doc["step"]),
            version=int(doc["version"]),
            lr=math.nan if lr is None else float(lr),
            optimizer=dict(doc["optimizer"]),
            schedule=_opt_dict(doc.get("schedule")),
            dtype=str(doc["dtype"]),
            shapes={str(n): tuple(int(d) for d in info["shape"]) for n, info in params.items()},
            doc=dict(doc),
            lr_finder=_opt_dict(doc.get("lr_finder")),
            ema=_opt_dict(doc.get("ema")),
            swa=_opt_dict(doc.get("swa")),
            consistency=_opt_dict(consistency),
            history=None if history is None else int(history),
            pending=_opt_dict(doc.get("pending")),
        )


StepStatus = Literal["applied", "pending"]


@dataclass(frozen=True, eq=False)
class StepResult:
    """The answer to a step: the counters after it, the rate it used, the new params
    (`return_="params"`) or the updates (new minus old, `return_="updates"`).

    `skipped`: the gradient was non-finite and the session skips such steps;
    `grad_norm`: the gradient's norm (None when non-finite); `clipped`: clipping changed
    the gradient; `replayed`: this is the server's recorded answer to an earlier
    attempt with the same `Idempotency-Key` (the step was applied once, then).
    `staleness`: the session's version minus the `base_version` sent (None without
    one); `contributors`: the gradients combined into the step (K in a sync session).

    A push into a sync session that did not complete the accumulation is `status
    "pending"` (the 202 answer, with `block=False`): `version` is the session's,
    `wait_for` the version the step will make, `pending` / `accumulate` how many of the
    K gradients are in; `step` is -1 and `lr` NaN (unknown yet), `contributors` 0, no
    params. A pending push the client waited for (`block=True`) is `status "applied"`
    with the params read at version >= `wait_for`, `staleness` 0, `contributors` K, and
    the counters of that read; the rate, which a params read does not carry, is NaN
    then (`skipped`, `grad_norm`, `clipped` unknown: their defaults). With a `wait`, the
    server usually answers the step itself (with its rate) before the client has to.
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
    status: StepStatus = "applied"
    staleness: int | None = None
    contributors: int = 1
    wait_for: int | None = None
    pending: int | None = None
    accumulate: int | None = None


@dataclass(frozen=True, eq=False)
class ParamsResult:
    """A session's current params, with the counters they belong to; for averaged params
    (`average="ema"`/`"swa"`), which average and how many steps are in it."""

    step: int
    version: int
    params: dict[str, np.ndarray]
    average: str | None = None
    averaged_steps: int | None = None


@dataclass(frozen=True)
class SchedulePreview:
    """The rates at steps `0 .. steps-1`, and the cycled momentum if the schedule has one."""

    lrs: list[float]
    momenta: list[float] | None = None


@dataclass(frozen=True)
class MetricsResult:
    """The answer to `post_metrics`: the counters (unchanged), the rate of the next step
    after the loss was taken in, and whether the schedule watches losses (`observed`)."""

    step: int
    version: int
    lr: float
    observed: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One entry of a session's history (`kind` "step" or "metrics"): `step` / `version`
    after it, `time` (Unix seconds), the rate, and what the entry has of loss,
    gradient norm (as received), update norm, skipped, staleness and contributors
    (None where the server gave none)."""

    kind: str
    step: int
    version: int
    time: float
    lr: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    update_norm: float | None = None
    skipped: bool | None = None
    staleness: int | None = None
    contributors: int | None = None


@dataclass(frozen=True)
class Suggestion:
    """A rate suggested by a range test (`method`: steepest, minimum, steep, valley), or
    why there is none (`lr` None and `reason`); `index` / `loss` locate the point of
    the smoothed curve the method picked."""

    method: str
    lr: float | None
    index: int | None = None
    loss: float | None = None
    reason: str | None = None
    reference: str | None = None


@dataclass(frozen=True)
class LRFinderResult:
    """An LR range test (`GET .../lr-finder`): its `config`, the rate, loss and smoothed
    loss of each recorded step, the best smoothed loss, whether it is over and why
    (`stop_reason` "completed" or "diverged"; `nonfinite_lr`: the rate whose loss was
    not finite), the rate of its next step (None when over), and the `suggestions` by
    method. `session_id` is set by `lr_find` (None from `lr_finder`)."""

    config: dict[str, Any]
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    best_loss: float | None
    done: bool
    stop_reason: str | None
    nonfinite_lr: float | None
    next_lr: float | None
    suggestions: dict[str, Suggestion]
    session_id: str | None = None


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
    was lost means success (delete); `accept_status`: refusals that are answers for
    `parse` (the 408 of a poll for a version); `timeout`: the httpx timeout of this call
    when not the client's (a call the server may hold for a while: its read timeout
    exceeds that wait).
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    resend_safe: bool = True
    missing_ok_after_loss: bool = False
    accept_status: frozenset[int] = frozenset()
    timeout: httpx.Timeout | None = None


#: a sequence of calls, each chosen from the answers to the ones before: a generator that
#: yields each `Call` and is sent its parsed answer, and returns the result. The clients
#: run it (`_drive`) with their I/O; the logic stays here.
Flow = Generator[Call[Any], Any, T]


class BaseClient:
    """Settings and request building shared by `OptimizerClient` and
    `AsyncOptimizerClient` (which add the I/O)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        binary: bool = True,
        timeout: Timeout = DEFAULT_TIMEOUT,
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
        self.timeout = httpx.Timeout(timeout)
        #: the clock of `block_timeout` (tests replace it)
        self._clock: Callable[[], float] = time.monotonic

    def _default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": JSON}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @property
    def _accept(self) -> str:
        return BINARY if self.binary else JSON

    def _timeout_for_wait(self, seconds: float) -> httpx.Timeout:
        """The client's timeout with a read timeout longer than a server-side wait of
        `seconds` (unchanged when the client has no read timeout)."""
        read = self.timeout.read
        if read is not None:
            read = max(read, float(seconds) + WAIT_MARGIN)
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=read,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    # the calls of the API ------------------------------------------------------------------

    def _create_call(
        self,
        params: Tensors,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        dtype: Any,
        transforms: Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
        *,
        lr_finder: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        swa: Mapping[str, Any] | None = None,
        consistency: str | Mapping[str, Any] | None = None,
        history: int | None = None,
    ) -> Call[Session]:
        dtype_name = _dtype_name(dtype)
        if isinstance(consistency, str):  # the short form, spelled out
            consistency = {"mode": consistency}
        # the optional members, in JSON form (binary metadata: each as a JSON string)
        options: dict[str, Any] = {
            name: value
            for name, value in (
                ("schedule", schedule),
                ("transforms", transforms),
                ("lr_finder", lr_finder),
                ("ema", ema),
                ("swa", swa),
                ("consistency", consistency),
                ("history", history),
            )
            if value is not None
        }
        if self.binary:
            meta = {"optimizer": _dumps(optimizer), "dtype": dtype_name}
            meta.update((name, _dumps(value)) for name, value in options.items())
            if nonfinite is not None:
                meta["nonfinite"] = nonfinite
            content, ctype = _encode_tensors(params, meta), BINARY
        else:
            body: dict[str, Any] = {
                "optimizer": optimizer,
                "params": _json_tensors(params),
                "dtype": dtype_name,
                **options,
            }
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
        base_version: int | None = None,
        wait: float | None = None,
    ) -> Call[StepResult]:
        if base_version is not None:
            base_version = _count("base_version", base_version)
        if wait is not None:
            wait = _seconds("wait", wait)
        if self.binary:
            meta = {"return": return_}
            if loss is not None:
                meta["loss"] = repr(float(loss))
            if skip_missing:
                meta["skip_missing"] = "true"
            if base_version is not None:
                meta["base_version"] = str(base_version)
            if wait is not None:
                meta["wait"] = repr(wait)
            content, ctype = _encode_tensors(grads, meta), BINARY
        else:
            body: dict[str, Any] = {"grads": _json_tensors(grads), "return": return_}
            if loss is not None:
                body["loss"] = float(loss)
            if skip_missing:
                body["skip_missing"] = True
            if base_version is not None:
                body["base_version"] = base_version
            if wait is not None:
                body["wait"] = wait
            content, ctype = _dumps(body).encode(), JSON
        headers = {
            "Content-Type": ctype,
            "Accept": self._accept,
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        return Call(
            "POST",
            _session_path(session_id) + "/step",
            _parse_step,
            headers,
            content,
            timeout=None if wait is None else self._timeout_for_wait(wait),
        )

    def _step_flow(
        self,
        session_id: str,
        grads: Tensors,
        *,
        loss: float | None,
        return_: str,
        idempotency_key: str | None,
        skip_missing: bool,
        base_version: int | None,
        wait: float | None,
        block: bool,
        block_timeout: float | None,
    ) -> Flow[StepResult]:
        """A step; with `block`, a pending push (202) is followed by polls for the version
        it waits for (see `OptimizerClient.step`)."""
        if block_timeout is not None:
            block_timeout = _seconds("block_timeout", block_timeout, upper=math.inf)
        call = self._step_call(
            session_id, grads, loss, return_, idempotency_key, skip_missing, base_version, wait
        )
        result: StepResult = yield call
        if result.status == "applied" or not block:
            return result
        target = result.wait_for if result.wait_for is not None else result.version + 1
        start = self._clock()
        left = math.inf if block_timeout is None else block_timeout
        while True:
            got: ParamsResult | None = yield self._poll_call(
                session_id, target, min(POLL_SECONDS, max(0.0, left))
            )
            if got is not None:
                return replace(
                    result,
                    status="applied",
                    step=got.step,
                    version=got.version,
                    params=got.params if return_ == "params" else None,
                    staleness=0,
                    contributors=result.accumulate or 1,
                    wait_for=target,
                    pending=None,
                )
            if block_timeout is not None:
                left = block_timeout - (self._clock() - start)
                if left <= 0:
                    raise errors.TimeoutError(
                        f"session {session_id}: the gradient pushed on version "
                        f"{result.version} is pending ({result.pending} of "
                        f"{result.accumulate} in) and version {target} was not reached "
                        f"within block_timeout={block_timeout} s; the push stays "
                        "accumulated on the server (a retry of the step with the same "
                        "idempotency_key waits again)"
                    )

    def _params_call(
        self,
        session_id: str,
        *,
        average: str | None = None,
        min_version: int | None = None,
        timeout: float | None = None,
    ) -> Call[ParamsResult]:
        query: dict[str, str] = {}
        if average is not None:
            query["average"] = str(average)
        if min_version is not None:
            query["min_version"] = str(_count("min_version", min_version))
        if timeout is not None:
            query["timeout"] = repr(_seconds("timeout", timeout))
        held = None  # how long the server may hold the answer
        if min_version is not None:
            held = DEFAULT_SERVER_WAIT if timeout is None else float(timeout)
        return Call(
            "GET",
            _session_path(session_id) + "/params" + _query(query),
            _parse_params,
            {"Accept": self._accept},
            timeout=None if held is None else self._timeout_for_wait(held),
        )

    def _poll_call(
        self, session_id: str, min_version: int, timeout: float
    ) -> Call[ParamsResult | None]:
        """The params once the session's version is `min_version` or more; None for the
        408 that says it was not within `timeout` (ask again)."""
        call = self._params_call(session_id, min_version=min_version, timeout=timeout)
        return Call(
            call.method,
            call.path,
            _parse_poll,
            call.headers,
            accept_status=frozenset({408}),
            timeout=call.timeout,
        )

    def _metrics_call(
        self, session_id: str, loss: float, idempotency_key: str | None
    ) -> Call[MetricsResult]:
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(f"loss must be a finite number: got {value}")
        headers = {
            "Content-Type": JSON,
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        body = _dumps({"loss": value}).encode()
        return Call("POST", _session_path(session_id) + "/metrics", _parse_metrics, headers, body)

    def _history_call(self, session_id: str, limit: int) -> Call[list[HistoryEntry]]:
        query = _query({"limit": str(_count("limit", limit))})
        return Call("GET", _session_path(session_id) + "/history" + query, _parse_history)

    def _lr_finder_call(self, session_id: str) -> Call[LRFinderResult]:
        return Call("GET", _session_path(session_id) + "/lr-finder", _parse_lr_finder)

    def _lr_finder_png_call(self, session_id: str) -> Call[bytes]:
        path = _session_path(session_id) + "/lr-finder.png"
        return Call("GET", path, _parse_png, {"Accept": PNG})

    def _schedule_png_call(self, session_id: str, steps: int | None) -> Call[bytes]:
        query = _query({} if steps is None else {"steps": str(_count("steps", steps))})
        path = _session_path(session_id) + "/schedule.png" + query
        return Call("GET", path, _parse_png, {"Accept": PNG})

    def _preview_call(
        self, schedule: Mapping[str, Any], lr: float, steps: int
    ) -> Call[SchedulePreview]:
        body = _dumps({"schedule": schedule, "lr": lr, "steps": steps}).encode()
        headers = {"Content-Type": JSON}
        return Call("POST", "/v1/schedules/preview", _parse_preview, headers, body)

    def _preview_png_call(
        self, schedule: Mapping[str, Any], lr: float, steps: int, current_step: int | None
    ) -> Call[bytes]:
        request: dict[str, Any] = {"schedule": schedule, "lr": lr, "steps": steps}
        if current_step is not None:
            request["current_step"] = current_step
        headers = {"Content-Type": JSON, "Accept": PNG}
        return Call(
            "POST", "/v1/schedules/preview.png", _parse_png, headers, _dumps(request).encode()
        )


def _session_path(session_id: str) -> str:
    if not isinstance(session_id, str) or session_id in ("", ".", ".."):
        raise ValueError(f"not a session id: {session_id!r}")
    return "/v1/sessions/" + urllib.parse.quote(session_id, safe="")


def _query(params: Mapping[str, str]) -> str:
    return "?" + urllib.parse.urlencode(params) if params else ""


def _count(name: str, value: int) -> int:
    """An int >= 0 (bools and floats are refused: a version is a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0: got {value!r}")
    return int(value)


def _seconds(name: str, value: float, upper: float = MAX_SERVER_WAIT) -> float:
    seconds = float(value)
    if not 0.0 <= seconds <= upper:
        raise ValueError(f"{name} must be in [0, {upper}] seconds: got {value!r}")
    return seconds


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


def _opt_dict(value: Any) -> dict[str, Any] | None:
    return None if value is None else dict(value)


def _opt_float(value: Any) -> float | None:
    """A number of an answer (a JSON number, or binary metadata text); None for null."""
    if value is None or value in ("", "null", "none", "None"):
        return None
    return float(value)


def _opt_int(value: Any) -> int | None:
    if value is None or value in ("", "null", "none", "None"):
        return None
    return int(value)


def _opt_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value == "true"
    return bool(value)


@_parsing
def _parse_step(response: httpx.Response) -> StepResult:
    replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        ret = meta.get("return", "params")
        return StepResult(
            step=int(meta["step"]),
            version=int(meta["version"]),
            lr=float(meta["lr"]),
            params=tensors if ret == "params" else None,
            updates=tensors if ret == "updates" else None,
            skipped=_flag(meta.get("skipped")),
            grad_norm=_opt_float(meta.get("grad_norm")),
            clipped=_flag(meta.get("clipped")),
            replayed=replayed,
            staleness=_opt_int(meta.get("staleness")),
            contributors=_opt_int(meta.get("contributors")) or 1,
        )
    body = response.json()  # a 202 is JSON whatever was asked
    if response.status_code == 202 or body.get("status") == "pending":
        version = int(body["version"])
        wait_for = _opt_int(body.get("wait_for"))
        return StepResult(
            step=-1,
            version=version,
            lr=math.nan,
            replayed=replayed,
            status="pending",
            contributors=0,
            wait_for=version + 1 if wait_for is None else wait_for,
            pending=_opt_int(body.get("pending")),
            accumulate=_opt_int(body.get("accumulate")),
        )
    return StepResult(
        step=int(body["step"]),
        version=int(body["version"]),
        lr=float(body["lr"]),
        params=_json_arrays(body.get("params")),
        updates=_json_arrays(body.get("updates")),
        skipped=bool(body.get("skipped", False)),
        grad_norm=_opt_float(body.get("grad_norm")),
        clipped=bool(body.get("clipped", False)),
        replayed=replayed,
        staleness=_opt_int(body.get("staleness")),
        contributors=_opt_int(body.get("contributors")) or 1,
    )


@_parsing
def _parse_params(response: httpx.Response) -> ParamsResult:
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        body: Mapping[str, Any] = meta
    else:
        body = response.json()
        tensors = _json_arrays(body["params"]) or {}
    average = body.get("average")
    return ParamsResult(
        int(body["step"]),
        int(body["version"]),
        tensors,
        average=None if average in (None, "", "null") else str(average),
        averaged_steps=_opt_int(body.get("averaged_steps")),
    )


def _parse_poll(response: httpx.Response) -> ParamsResult | None:
    """The params of a poll for a version, or None for its 408 (not reached yet)."""
    if response.status_code == 408:
        return None
    return _parse_params(response)


@_parsing
def _parse_metrics(response: httpx.Response) -> MetricsResult:
    body = response.json()
    return MetricsResult(
        int(body["step"]), int(body["version"]), float(body["lr"]), bool(body["observed"])
    )


@_parsing
def _parse_history(response: httpx.Response) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            kind=str(e["kind"]),
            step=int(e["step"]),
            version=int(e["version"]),
            time=float(e["time"]),
            lr=_opt_float(e.get("lr")),
            loss=_opt_float(e.get("loss")),
            grad_norm=_opt_float(e.get("grad_norm")),
            update_norm=_opt_float(e.get("update_norm")),
            skipped=_opt_bool(e.get("skipped")),
            staleness=_opt_int(e.get("staleness")),
            contributors=_opt_int(e.get("contributors")),
        )
        for e in response.json()["entries"]
    ]


@_parsing
def _parse_lr_finder(response: httpx.Response) -> LRFinderResult:
    body = response.json()
    suggestions = {
        str(name): Suggestion(
            method=str(s.get("method", name)),
            lr=_opt_float(s.get("lr")),
            index=_opt_int(s.get("index")),
            loss=_opt_float(s.get("loss")),
            reason=None if s.get("reason") is None else str(s["reason"]),
            reference=None if s.get("reference") is None else str(s["reference"]),
        )
        for name, s in (body.get("suggestions") or {}).items()
    }
    stop_reason = body.get("stop_reason")
    return LRFinderResult(
        config=dict(body["config"]),
        lrs=[float(x) for x in body["lrs"]],
        losses=[float(x) for x in body["losses"]],
        smoothed=[float(x) for x in body["smoothed"]],
        best_loss=_opt_float(body.get("best_loss")),
        done=bool(body["done"]),
        stop_reason=None if stop_reason is None else str(stop_reason),
        nonfinite_lr=_opt_float(body.get("nonfinite_lr")),
        next_lr=_opt_float(body.get("next_lr")),
        suggestions=suggestions,
    )


@_parsing
def _parse_png(response: httpx.Response) -> bytes:
    content = response.content
    if not content.startswith(PNG_SIGNATURE):
        kind = response.headers.get("content-type", "no Content-Type")
        raise ValueError(f"not a PNG image ({kind}, {len(content)} bytes)")
    return content


@_parsing
def _parse_preview(response: httpx.Response) -> SchedulePreview:
    body = response.json()
    momenta = body.get("momenta")
    return SchedulePreview(
        [float(x) for x in body["lrs"]], None if momenta is None else [float(x) for x in momenta]
    )


__all__ = [
    "BLOCK_TIMEOUT",
    "DEFAULT_URL",
    "ENV_API_KEY",
    "ENV_URL",
    "Attempts",
    "BaseClient",
    "Call",
    "Flow",
    "HistoryEntry",
    "LRFinderResult",
    "MetricsResult",
    "ParamsResult",
    "RetryPolicy",
    "ReturnKind",
    "SchedulePreview",
    "Session",
    "StepResult",
    "StepStatus",
    "Suggestion",
    "parse_retry_after",
]
