"""What the sync and async clients share: everything but the I/O.

- where and who: the server address (`base_url`, else `OPTSERVE_URL`, else
  `http://127.0.0.1:8000`) and the API key (`api_key`, else `OPTSERVE_API_KEY`);
- requests: each API call is a `Call` (method, path, headers, body bytes, and how to
  read the answer), built here once and sent as is on every retry;
- encoding: tensors as safetensors (`application/octet-stream`, the default) or as JSON
  nested lists (`binary=False`, for debugging); answers decoded into NumPy arrays and
  results (clients/decoding.py, clients/results.py);
- errors: a refusal becomes the `clients.errors` class of its status;
- retries (`RetryPolicy`, `Attempts`): what is retried, after how long, how often
  (clients/retries.py);
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

Federated sessions (docs/federated.md). `GET .../round` reads the open round (binary
like the other reads); `POST .../rounds/{r}/updates` sends one client's update (its
delta or new weights, `num_examples`, `metrics`). The server takes an update once per
client and round and answers the same body again with its first answer, so the call is
retried as a step is (the body bytes are built once and sent as they are on every
retry; no Idempotency-Key is needed); a 409 `round-closed` (too late, or too early) is
not retried.

State files (docs/state.md). `GET .../state` answers a session's whole state as one
safetensors file (returned as bytes, not decoded), `PUT .../state` replaces a session's
state by one (retried like a read: the same file twice leaves the same state), and
`POST /v1/sessions/import` makes a new session of one (not retried once it may have
reached the server, as a create).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from clients import errors, tensorfile
from clients.decoding import (
    BINARY,
    ignore,
    parse_history,
    parse_lr_finder,
    parse_metrics,
    parse_params,
    parse_png,
    parse_poll,
    parse_preview,
    parse_round,
    parse_session,
    parse_state_file,
    parse_step,
    parse_update,
)
from clients.results import (
    HistoryEntry,
    LRFinderResult,
    MetricsResult,
    ParamsResult,
    RoundInfo,
    SchedulePreview,
    Session,
    StepResult,
    UpdateResult,
)
from clients.retries import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "OPTSERVE_URL"
ENV_API_KEY = "OPTSERVE_API_KEY"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
JSON = "application/json"
PNG = "image/png"
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
UpdateKind = Literal["delta", "weights"]
Tensors = Mapping[str, npt.ArrayLike]
Timeout = float | httpx.Timeout | None
T = TypeVar("T")


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
        federated: Mapping[str, Any] | None = None,
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
                ("federated", federated),
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
            parse_session,
            {"Content-Type": ctype},
            content,
            resend_safe=False,  # a retry after delivery would make a second session
        )

    def _get_session_call(self, session_id: str) -> Call[Session]:
        return Call("GET", _session_path(session_id), parse_session)

    def _delete_session_call(self, session_id: str) -> Call[None]:
        return Call("DELETE", _session_path(session_id), ignore, missing_ok_after_loss=True)

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
            parse_step,
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
            parse_params,
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
            parse_poll,
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
        return Call("POST", _session_path(session_id) + "/metrics", parse_metrics, headers, body)

    def _history_call(self, session_id: str, limit: int) -> Call[list[HistoryEntry]]:
        query = _query({"limit": str(_count("limit", limit))})
        return Call("GET", _session_path(session_id) + "/history" + query, parse_history)

    def _round_call(self, session_id: str) -> Call[RoundInfo]:
        path = _session_path(session_id) + "/round"
        return Call("GET", path, parse_round, {"Accept": self._accept})

    def _update_call(
        self,
        session_id: str,
        round: int,
        client_id: str,
        *,
        delta: Tensors | None,
        weights: Tensors | None,
        num_examples: int,
        metrics: Mapping[str, float] | None,
    ) -> Call[UpdateResult]:
        """One client's update for a round; the body is built here once (the same bytes
        on every retry, which the server answers with its first answer)."""
        if (delta is None) == (weights is None):
            raise ValueError("give exactly one of delta and weights")
        kind: UpdateKind = "delta" if delta is not None else "weights"
        tensors = delta if delta is not None else weights
        assert tensors is not None
        number = _count("round", round)
        check_client_id(client_id)
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
            raise ValueError(f"num_examples must be an int >= 1: got {num_examples!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be an int >= 1: got {num_examples!r}")
        numbers = None if metrics is None else _finite_metrics(metrics)
        if self.binary:
            meta = {"client_id": client_id, "num_examples": str(int(num_examples)), "kind": kind}
            if numbers is not None:
                meta["metrics"] = _dumps(numbers)
            content, ctype = _encode_tensors(tensors, meta), BINARY
        else:
            body: dict[str, Any] = {
                "client_id": client_id,
                kind: _json_tensors(tensors),
                "num_examples": int(num_examples),
            }
            if numbers is not None:
                body["metrics"] = numbers
            content, ctype = _dumps(body).encode(), JSON
        path = f"{_session_path(session_id)}/rounds/{number}/updates"
        return Call("POST", path, parse_update, {"Content-Type": ctype}, content)

    def _export_state_call(self, session_id: str) -> Call[bytes]:
        path = _session_path(session_id) + "/state"
        return Call("GET", path, parse_state_file, {"Accept": BINARY})

    def _import_state_call(self, data: bytes) -> Call[Session]:
        return Call(
            "POST",
            "/v1/sessions/import",
            parse_session,
            {"Content-Type": BINARY},
            _state_file(data),
            resend_safe=False,  # a retry after delivery would make a second session
        )

    def _replace_state_call(self, session_id: str, data: bytes) -> Call[Session]:
        # a PUT of the same file twice leaves the same state: safe to send again
        path = _session_path(session_id) + "/state"
        return Call("PUT", path, parse_session, {"Content-Type": BINARY}, _state_file(data))

    def _lr_finder_call(self, session_id: str) -> Call[LRFinderResult]:
        return Call("GET", _session_path(session_id) + "/lr-finder", parse_lr_finder)

    def _lr_finder_png_call(self, session_id: str) -> Call[bytes]:
        path = _session_path(session_id) + "/lr-finder.png"
        return Call("GET", path, parse_png, {"Accept": PNG})

    def _schedule_png_call(self, session_id: str, steps: int | None) -> Call[bytes]:
        query = _query({} if steps is None else {"steps": str(_count("steps", steps))})
        path = _session_path(session_id) + "/schedule.png" + query
        return Call("GET", path, parse_png, {"Accept": PNG})

    def _preview_call(
        self, schedule: Mapping[str, Any], lr: float, steps: int
    ) -> Call[SchedulePreview]:
        body = _dumps({"schedule": schedule, "lr": lr, "steps": steps}).encode()
        headers = {"Content-Type": JSON}
        return Call("POST", "/v1/schedules/preview", parse_preview, headers, body)

    def _preview_png_call(
        self, schedule: Mapping[str, Any], lr: float, steps: int, current_step: int | None
    ) -> Call[bytes]:
        request: dict[str, Any] = {"schedule": schedule, "lr": lr, "steps": steps}
        if current_step is not None:
            request["current_step"] = current_step
        headers = {"Content-Type": JSON, "Accept": PNG}
        return Call(
            "POST", "/v1/schedules/preview.png", parse_png, headers, _dumps(request).encode()
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


def check_client_id(client_id: str) -> str:
    """A federated client id: 1 to 128 printable characters (the server says which)."""
    if not (
        isinstance(client_id, str)
        and 1 <= len(client_id) <= 128
        and client_id.isprintable()
        and not client_id.isspace()
    ):
        raise ValueError(f"client_id must be 1 to 128 printable characters: got {client_id!r}")
    return client_id


def _state_file(data: bytes | bytearray | memoryview) -> bytes:
    """A state file's bytes as they are sent (docs/state.md; the server validates it)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a state file is bytes (safetensors), not {type(data).__name__}")
    return bytes(data)


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An update's metrics as finite floats by name (the server takes no other)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str: got {name!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} must be a finite number: got {number}")
        out[name] = number
    return out


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


__all__ = [
    "BLOCK_TIMEOUT",
    "DEFAULT_URL",
    "ENV_API_KEY",
    "ENV_URL",
    "BaseClient",
    "Call",
    "Flow",
    "ReturnKind",
    "UpdateKind",
    "check_client_id",
]
