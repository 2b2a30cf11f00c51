"""`OptimizerClient`: the blocking client (httpx.Client). `AsyncOptimizerClient`
(clients/async_client.py) is the same over httpx.AsyncClient; both build their requests,
read the answers and decide the retries in clients/_base.py and differ only in the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from clients._base import (
    DEFAULT_TIMEOUT,
    Attempts,
    BaseClient,
    Call,
    ParamsResult,
    RetryPolicy,
    ReturnKind,
    SchedulePreview,
    Session,
    StepResult,
    Tensors,
    Timeout,
)

T = TypeVar("T")


class OptimizerClient(BaseClient):
    """A blocking client of an optserve server.

    `base_url` defaults to `$OPTSERVE_URL`, else `http://127.0.0.1:8000`; `api_key` to
    `$OPTSERVE_API_KEY` (none if unset; pass `""` for none whatever the environment).
    Tensors travel as safetensors; `binary=False` sends and asks for JSON instead
    (readable on the wire; arrays then come back as float64). `timeout` is httpx's
    (seconds, or an `httpx.Timeout`); `transport` replaces the network (tests);
    `max_retries` / `retry_policy` and `sleep` (the wait between retries, `time.sleep`)
    shape the retries described in clients/_base.py.

        with OptimizerClient() as client:
            session = client.create_session({"w": w}, {"name": "adam", "lr": 1e-3})
            result = client.step(session.id, {"w": grad_w}, loss=0.7)
            w = result.params["w"]
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        binary: bool = True,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url, api_key, binary=binary, max_retries=max_retries, retry_policy=retry_policy
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._default_headers(),
            timeout=timeout,
            transport=transport,
        )

    # lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections (the client cannot be used afterwards)."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # the API -------------------------------------------------------------------------------

    def create_session(
        self,
        params: Tensors,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        *,
        dtype: Any = "float32",
        transforms: Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
    ) -> Session:
        """Register `params` (name -> array) with an optimizer spec (`{"name": "adam",
        "lr": 1e-3, ...}`, torch.optim names) and an optional schedule; `dtype` is the
        session's (`"float32"` or `"float64"`); `transforms` (`{"clip_norm": 1.0}`) and
        `nonfinite` (`"error"` or `"skip"`) are the server's gradient handling."""
        call = self._create_call(params, optimizer, schedule, dtype, transforms, nonfinite)
        return self._run(call)

    def get_session(self, session_id: str) -> Session:
        """The session document (`Session.lr` is the rate the next step will use)."""
        return self._run(self._get_session_call(session_id))

    def delete_session(self, session_id: str) -> None:
        """Delete a session (`NotFoundError` if there is none)."""
        self._run(self._delete_session_call(session_id))

    def step(
        self,
        session_id: str,
        grads: Tensors,
        *,
        loss: float | None = None,
        return_: ReturnKind = "params",
        idempotency_key: str | None = None,
        skip_missing: bool = False,
    ) -> StepResult:
        """Apply one gradient (a tensor per parameter) and answer the new params
        (`return_="params"`), the updates (`"updates"`) or neither (`"none"`).

        With `skip_missing`, `grads` may omit tensors (torch's parameters whose `.grad` is
        None): those keep their params and optimizer state (server extension).

        Every retry of the step sends the same `Idempotency-Key` (`idempotency_key`, or
        a fresh uuid4), so the step is applied exactly once."""
        call = self._step_call(session_id, grads, loss, return_, idempotency_key, skip_missing)
        return self._run(call)

    def get_params(self, session_id: str) -> ParamsResult:
        """The session's current params and the step/version they belong to."""
        return self._run(self._params_call(session_id))

    def preview_schedule(
        self, schedule: Mapping[str, Any], *, lr: float, steps: int
    ) -> SchedulePreview:
        """The rates a session with optimizer `lr` and `schedule` uses at steps
        `0 .. steps-1` (and the cycled momentum, for schedules that cycle one)."""
        return self._run(self._preview_call(schedule, lr, steps))

    # I/O -----------------------------------------------------------------------------------

    def _run(self, call: Call[T]) -> T:
        attempts = Attempts(call, self.retry_policy)
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, content=call.content, headers=call.headers
                )
            except httpx.TransportError as exc:
                delay = attempts.after_error(exc)
            else:
                retry_in = attempts.after_response(response)
                if retry_in is None:
                    return attempts.result(response)
                delay = retry_in
            self._sleep(delay)


__all__ = ["OptimizerClient"]
