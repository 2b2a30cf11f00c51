"""`OptimizerClient`: the blocking client (httpx.Client). `AsyncOptimizerClient`
(clients/async_client.py) is the same over httpx.AsyncClient; both build their requests
(clients/_base.py), read the answers (clients/decoding.py) and decide the retries
(clients/retries.py) alike and differ only in the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx

from clients._base import (
    BLOCK_TIMEOUT,
    DEFAULT_TIMEOUT,
    BaseClient,
    Call,
    Flow,
    ReturnKind,
    Tensors,
    Timeout,
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
from clients.retries import Attempts, RetryPolicy

T = TypeVar("T")


class OptimizerClient(BaseClient):
    """A blocking client of an optserve server.

    `base_url` defaults to `$OPTSERVE_URL`, else `http://127.0.0.1:8000`; `api_key` to
    `$OPTSERVE_API_KEY` (none if unset; pass `""` for none whatever the environment).
    Tensors travel as safetensors; `binary=False` sends and asks for JSON instead
    (readable on the wire; arrays then come back as float64). `timeout` is httpx's
    (seconds, or an `httpx.Timeout`); `transport` replaces the network (tests);
    `max_retries` / `retry_policy` and `sleep` (the wait between retries, `time.sleep`)
    shape the retries described in clients/retries.py.

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
            base_url,
            api_key,
            binary=binary,
            timeout=timeout,
            max_retries=max_retries,
            retry_policy=retry_policy,
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._default_headers(),
            timeout=self.timeout,
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
        lr_finder: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        swa: Mapping[str, Any] | None = None,
        consistency: str | Mapping[str, Any] | None = None,
        history: int | None = None,
        federated: Mapping[str, Any] | None = None,
    ) -> Session:
        """Register `params` (name -> array) with an optimizer spec (`{"name": "adam",
        "lr": 1e-3, ...}`, torch.optim names) and an optional schedule; `dtype` is the
        session's (`"float32"` or `"float64"`); `transforms` (`{"clip_norm": 1.0}`) and
        `nonfinite` (`"error"` or `"skip"`) are the server's gradient handling.

        Training extensions (docs/training.md; each sent only when given): `lr_finder`
        (an LR range test: `{"start_lr", "end_lr", "num_steps", "mode", "smooth_f",
        "diverge_th"}`, `{}` for the defaults), `ema` (`{"decay", "bias_correction"}`),
        `swa` (`{"start", "every"}`), `consistency` (`"async"`, `"sync"`, or
        `{"mode", "max_staleness", "staleness_damping", "accumulate", "reduce",
        "timeout", "on_timeout"}`: a sync accumulation still open `timeout` seconds after
        its first push is applied with what arrived, `"flush"`, or skipped, `"drop"`)
        and `history` (how many history entries to keep).

        `federated` (docs/federated.md): make a federated session, `{"min_clients",
        "expected_clients", "round_timeout", "aggregator", "update"}`; the optimizer is
        then a server optimizer (`fedavg`, `fedavgm`, `fedadagrad`, `fedadam`,
        `fedyogi`) and rounds of client updates drive it (`get_round`,
        `submit_update`, `clients.FederatedWorker`)."""
        call = self._create_call(
            params,
            optimizer,
            schedule,
            dtype,
            transforms,
            nonfinite,
            lr_finder=lr_finder,
            ema=ema,
            swa=swa,
            consistency=consistency,
            history=history,
            federated=federated,
        )
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
        base_version: int | None = None,
        wait: float | None = None,
        block: bool = True,
        block_timeout: float | None = BLOCK_TIMEOUT,
    ) -> StepResult:
        """Apply one gradient (a tensor per parameter) and answer the new params
        (`return_="params"`), the updates (`"updates"`) or neither (`"none"`).

        With `skip_missing`, `grads` may omit tensors (torch's parameters whose `.grad` is
        None): those keep their params and optimizer state (server extension).

        Every retry of the step sends the same `Idempotency-Key` (`idempotency_key`, or
        a fresh uuid4), so the step is applied exactly once.

        `base_version`: the version of the params the gradient was computed on (the
        session refuses a stale one: `StaleGradientError`, not retried). `wait` (0 to 60
        s, sent only when given): how long the server holds a sync push that does not
        complete the accumulation for the step to happen. A push still pending after
        that (202) is, with `block` (the default), followed by polls for the version it
        waits for (`GET .../params?min_version=...`) until the step happened (the result
        is then `status "applied"` with those params and `lr` NaN: see `StepResult`) or
        `block_timeout` seconds (None: no limit) have passed (`clients.errors.
        TimeoutError`); with `block=False` the pending result is returned at once."""
        return self._drive(
            self._step_flow(
                session_id,
                grads,
                loss=loss,
                return_=return_,
                idempotency_key=idempotency_key,
                skip_missing=skip_missing,
                base_version=base_version,
                wait=wait,
                block=block,
                block_timeout=block_timeout,
            )
        )

    def get_params(
        self,
        session_id: str,
        *,
        average: Literal["ema", "swa"] | None = None,
        min_version: int | None = None,
        timeout: float | None = None,
    ) -> ParamsResult:
        """The session's current params and the step/version they belong to.

        `average`: the session's EMA or SWA of the params instead (`NoAverageError`
        before any step was averaged). `min_version`: wait until the session's version
        is at least that, for up to `timeout` seconds (the server's default 30, at most
        60), else `WaitTimeoutError` (408)."""
        call = self._params_call(
            session_id, average=average, min_version=min_version, timeout=timeout
        )
        return self._run(call)

    def post_metrics(
        self, session_id: str, loss: float, *, idempotency_key: str | None = None
    ) -> MetricsResult:
        """Report a loss without a step (a `plateau` schedule takes it in; the history
        records it). Retries send the same `Idempotency-Key` (`idempotency_key`, or a
        fresh uuid4), so it is taken in once."""
        return self._run(self._metrics_call(session_id, loss, idempotency_key))

    def history(self, session_id: str, limit: int = 100) -> list[HistoryEntry]:
        """The session's last `limit` history entries (steps and metrics), most recent
        first."""
        return self._run(self._history_call(session_id, limit))

    def get_round(self, session_id: str) -> RoundInfo:
        """The open round of a federated session: its number, deadline, who reported so
        far, and the global params (`RoundInfo`). A look at the round past its deadline
        closes it when it holds `min_clients` updates (the answer is then the next
        round)."""
        return self._run(self._round_call(session_id))

    def submit_update(
        self,
        session_id: str,
        round: int,
        client_id: str,
        *,
        delta: Tensors | None = None,
        weights: Tensors | None = None,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> UpdateResult:
        """Send client `client_id`'s update for round `round` of a federated session:
        exactly one of `delta` (new weights minus the round's global params) and
        `weights` (the new weights), every tensor of the session; `num_examples` (>= 1,
        its weight in the mean); `metrics` (finite numbers by name, averaged per round
        on the server).

        The server takes one update per client and round, and answers the same update
        sent again with its first answer (`UpdateResult.replayed`): so a lost
        connection, a timeout, 502/503/504 are retried with the same body bytes. An
        update for a round that is not the open one raises `RoundClosedError` (its
        `current_round`; not retried); a different update from the same client for the
        same round is a `ValidationError`."""
        call = self._update_call(
            session_id,
            round,
            client_id,
            delta=delta,
            weights=weights,
            num_examples=num_examples,
            metrics=metrics,
        )
        return self._run(call)

    def export_state(self, session_id: str) -> bytes:
        """The session's whole state as one safetensors file (docs/state.md): params,
        optimizer state, averages, a pending accumulation, counters, schedule state and
        configuration. `import_state` makes a new session of it (here or on another
        server), `replace_state` puts it back; `clients.torch_state` converts it."""
        return self._run(self._export_state_call(session_id))

    def import_state(self, data: bytes) -> Session:
        """A new session (new id) from a state file, with its configuration, params,
        state, `step` and `version` (`ValidationError` naming the tensor or metadata key
        at fault). Not retried once it may have reached the server (a retry could make a
        second session)."""
        return self._run(self._import_state_call(data))

    def replace_state(self, session_id: str, data: bytes) -> Session:
        """Replace the session's state by a state file of the same configuration (its
        params, state, counters, schedule state), atomically; the session's `version`
        goes up by one. Answers the session document."""
        return self._run(self._replace_state_call(session_id, data))

    def lr_finder(self, session_id: str) -> LRFinderResult:
        """The LR range test of a session made with `lr_finder` (so far, or its end),
        with the suggested rates (`NoRangeTestError` for another session)."""
        return self._run(self._lr_finder_call(session_id))

    def lr_finder_png(self, session_id: str) -> bytes:
        """The range test's plot (loss against rate, suggestions marked), a PNG."""
        return self._run(self._lr_finder_png_call(session_id))

    def schedule_png(self, session_id: str, steps: int | None = None) -> bytes:
        """The session's rate over steps `0 .. steps-1` (default: the server's,
        `max(100, 2 * step)`) with the current step marked, a PNG."""
        return self._run(self._schedule_png_call(session_id, steps))

    def preview_schedule(
        self, schedule: Mapping[str, Any], *, lr: float, steps: int
    ) -> SchedulePreview:
        """The rates a session with optimizer `lr` and `schedule` uses at steps
        `0 .. steps-1` (and the cycled momentum, for schedules that cycle one)."""
        return self._run(self._preview_call(schedule, lr, steps))

    def preview_schedule_png(
        self, schedule: Mapping[str, Any], lr: float, steps: int, current_step: int | None = None
    ) -> bytes:
        """`preview_schedule` drawn (a PNG), with `current_step` marked when given."""
        return self._run(self._preview_png_call(schedule, lr, steps, current_step))

    # I/O -----------------------------------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        """Run a flow of calls (clients/_base.py): each call, its answer sent back."""
        try:
            call = next(flow)
            while True:
                call = flow.send(self._run(call))
        except StopIteration as done:
            result: T = done.value
            return result

    def _run(self, call: Call[T]) -> T:
        attempts = Attempts(call, self.retry_policy)
        timeout = httpx.USE_CLIENT_DEFAULT if call.timeout is None else call.timeout
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    content=call.content,
                    headers=call.headers,
                    timeout=timeout,
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
