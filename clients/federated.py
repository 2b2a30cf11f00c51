"""`FederatedWorker`: one client of a federated session (docs/federated.md), training
locally on the global params of each round and sending its update.

    from clients import FederatedWorker, OptimizerClient

    def train(params, round):  # the global params (name -> array) of this round
        new = local_sgd(params, my_data)  # a few epochs on this client's data
        return new, len(my_data), {"loss": last_loss}

    with OptimizerClient() as client:
        worker = FederatedWorker(client, session_id, "hospital-7", train, progress=True)
        reports = worker.run(rounds=20)

`train(global_params, round)` gets the round's global params (its own copy: it may
train them in place) and returns the new weights (name -> array, every tensor of the
session with its shape), the number of examples it trained on (the update's weight
in the mean) and optional metrics (name -> finite number), as a tuple `(weights,
num_examples)` / `(weights, num_examples, metrics)` or a `LocalResult`. The worker sends
`weights - global_params` (computed in the session's dtype) as the round's delta, or the
weights themselves with `send="weights"`. With PyTorch, `clients.torch.torch_train(model,
fit)` makes such a `train` of a model and a function that trains it.

The loop of `run(rounds)`, one `RoundReport` per round taken part in:

1. read the open round (`GET .../round`: its number, deadline, who reported, the
   global params);
2. if it is a round this worker already trained for, or one that already holds an
   update of this `client_id` (a worker restarted mid-round), wait for the next round
   (below) and read it again;
3. `train`, then send the update. An update the server refuses as too late
   (`RoundClosedError`: the round closed while this worker trained, a straggler) is
   reported `late` and the worker goes on with the round now open.

**Waiting** never spins and never resends to a round: until the round's deadline, the
worker sleeps `poll_interval` seconds (less when the deadline comes sooner: it wakes just
past the deadline) and reads the session document (`GET /v1/sessions/{id}`, whose
`round` says when the round moved on; it carries no params, so waiting costs little).
Past the deadline it reads the round itself every `poll_interval` seconds, since a look
at the round is what closes a round whose deadline passed with `min_clients` updates.
(The deadline is the server's Unix time, compared with this machine's clock: a skew
only shifts when the worker switches between the two reads.) A round that never gets
`min_clients` updates is waited for as long as it stays open.

**Retries** are the client's (`RetryPolicy`): an update is idempotent per client and
round on the server (the same body gets the first answer again), so a lost connection,
a timeout and 502/503/504 are retried with the same body bytes, like a step; the 409
of a closed round is not. Sleeps between polls go through the client's `sleep` (the
one its retries use).

`AsyncFederatedWorker` is the same loop over an `AsyncOptimizerClient` (its `train` may
be a coroutine function; a plain function runs on the event loop, so wrap heavy work in
`asyncio.to_thread`): the loop is one generator of calls, sleeps and training requests
(`_WorkerBase._loop`), and the two workers only carry them out, as the clients do with
their flows.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from clients._base import BaseClient, Call, UpdateKind, check_client_id
from clients._progress import Bar, progress_bar
from clients.async_client import AsyncOptimizerClient
from clients.errors import ConflictError, RoundClosedError
from clients.results import RoundInfo, Session, UpdateResult
from clients.sync import OptimizerClient

__all__ = [
    "AsyncFederatedWorker",
    "AsyncTrainFn",
    "FederatedWorker",
    "LocalResult",
    "RoundReport",
    "TrainFn",
    "TrainResult",
]

#: the waits of a worker for the next round wake this long after the round's deadline
DEADLINE_SLACK = 0.05


@dataclass(frozen=True)
class LocalResult:
    """What `train` returns (a tuple `(weights, num_examples[, metrics])` does as well):
    the new weights (name -> array), the examples trained on, optional metrics."""

    weights: Mapping[str, npt.ArrayLike]
    num_examples: int
    metrics: Mapping[str, float] | None = None


TrainResult = (
    LocalResult
    | tuple[Mapping[str, npt.ArrayLike], int]
    | tuple[Mapping[str, npt.ArrayLike], int, Mapping[str, float] | None]
)
#: `train(global_params, round)` of a `FederatedWorker`
TrainFn = Callable[[dict[str, np.ndarray], int], TrainResult]
#: `train` of an `AsyncFederatedWorker`: a plain function or a coroutine function
AsyncTrainFn = Callable[[dict[str, np.ndarray], int], TrainResult | Awaitable[TrainResult]]


@dataclass(frozen=True)
class RoundReport:
    """One round a worker took part in: `round`, whether its update was taken
    (`submitted`) or refused as too late (`late`: the round had closed; `current_round`
    is the round then open), the `metrics` and `num_examples` it sent, `seconds` spent
    training and sending, and the server's answer (`update`: `received`, `closed`, ...;
    None when late)."""

    round: int
    submitted: bool
    late: bool
    metrics: dict[str, float] | None
    seconds: float
    num_examples: int
    update: UpdateResult | None = None
    current_round: int | None = None

    @property
    def received(self) -> int | None:
        """The updates the round held after this one (None when late)."""
        return None if self.update is None else self.update.received


# --- the loop: what to do next, for either worker to carry out ----------------------------


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Train:
    params: dict[str, np.ndarray]
    round: int


@dataclass(frozen=True)
class _Submit:
    """An update: answered by its `UpdateResult`, or the `RoundClosedError` (or the
    in-flight `ConflictError`) it raised."""

    call: Call[UpdateResult]


_Action = Call[Any] | _Sleep | _Train | _Submit
#: the worker's loop: yields each action, is sent its outcome, returns the reports
_Loop = Generator[_Action, Any, list[RoundReport]]

ClientT = TypeVar("ClientT", bound=BaseClient)
TrainT = TypeVar("TrainT")


class _WorkerBase(Generic[ClientT, TrainT]):
    """The settings and the loop shared by `FederatedWorker` and `AsyncFederatedWorker`
    (which carry out its actions with their I/O)."""

    def __init__(
        self,
        client: ClientT,
        session_id: str,
        client_id: str,
        train: TrainT,
        *,
        send: UpdateKind = "delta",
        poll_interval: float = 0.5,
        max_rounds: int | None = None,
        progress: bool = False,
        stop_when: Callable[[RoundReport], bool] | None = None,
    ) -> None:
        if send not in ("delta", "weights"):
            raise ValueError(f"send must be 'delta' or 'weights': got {send!r}")
        interval = float(poll_interval)
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"poll_interval must be a number of seconds > 0: got {poll_interval}")
        self.client = client
        self.session_id = session_id
        self.client_id = check_client_id(client_id)
        self.train = train
        self.send: UpdateKind = send
        self.poll_interval = interval
        self.max_rounds = _rounds("max_rounds", max_rounds)
        self.progress = progress
        self.stop_when = stop_when
        #: the clock compared with the server's deadlines (Unix time; tests replace it)
        self._now: Callable[[], float] = time.time
        #: the clock of `RoundReport.seconds`
        self._timer: Callable[[], float] = time.perf_counter

    def _limit(self, rounds: int | None) -> int | None:
        return self.max_rounds if rounds is None else _rounds("rounds", rounds)

    def _bar(self, limit: int | None) -> AbstractContextManager[Bar]:
        return progress_bar(
            self.progress,
            limit,
            desc=f"federated {self.client_id}",
            unit="round",
            caller=f"{type(self).__name__}(progress=True)",
        )

    def _loop(self, limit: int | None, bar: Bar) -> _Loop:
        """The rounds of `run` (see the module docstring)."""
        reports: list[RoundReport] = []
        if limit == 0:
            return reports
        session: Session = yield self.client._get_session_call(self.session_id)
        if session.federated is None:
            raise ValueError(
                f"session {self.session_id} is not federated (create it with federated=...)"
            )
        dtype = np.dtype(session.dtype)
        done: int | None = None  # the last round this worker trained for
        while limit is None or len(reports) < limit:
            info = yield from self._next_round(done)
            start = self._timer()
            given = {name: array.copy() for name, array in info.params.items()}
            local = _local_result((yield _Train(given, info.round)))  # may change `given`
            tensors = self._payload(info.params, local.weights, dtype)
            call = self.client._update_call(
                self.session_id,
                info.round,
                self.client_id,
                delta=tensors if self.send == "delta" else None,
                weights=tensors if self.send == "weights" else None,
                num_examples=local.num_examples,
                metrics=local.metrics,
            )
            while True:
                answer: UpdateResult | ConflictError = yield _Submit(call)
                if not (isinstance(answer, ConflictError) and answer.in_flight):
                    break
                # our earlier attempt's claim, left by a server killed while it held it:
                # it lapses after the server's idempotency_lock_ttl; the same bytes then
                # apply once (or answer that the round closed)
                yield _Sleep(self.poll_interval)
            done = info.round
            update: UpdateResult | None = None
            current: int | None = None
            if isinstance(answer, RoundClosedError):  # too late: the round closed meanwhile
                current = answer.current_round
            else:
                assert isinstance(answer, UpdateResult)
                update = answer
            report = RoundReport(
                round=info.round,
                submitted=update is not None,
                late=update is None,
                metrics=_floats(local.metrics),
                seconds=self._timer() - start,
                num_examples=int(local.num_examples),
                update=update,
                current_round=current,
            )
            reports.append(report)
            bar.update(1)
            bar.set_postfix_str(_postfix(report))
            if self.stop_when is not None and self.stop_when(report):
                break
        return reports

    def _next_round(self, done: int | None) -> Generator[_Action, Any, RoundInfo]:
        """The open round, once it is one this worker has not trained for (after `done`)
        and holds no update of its `client_id`."""
        while True:
            info: RoundInfo = yield self.client._round_call(self.session_id)
            if self.client_id not in info.clients and (done is None or info.round > done):
                return info
            done = info.round if done is None else max(done, info.round)
            yield from self._wait_past(done, info.deadline)

    def _wait_past(self, done: int, deadline: float) -> Generator[_Action, Any, None]:
        """Wait for the session's round to pass `done`: before the round's `deadline`,
        sleeps of `poll_interval` (or until just past the deadline), each followed by a
        look at the session document; past the deadline, one sleep (the caller then
        reads the round, which closes it if it can)."""
        while True:
            left = deadline - self._now()
            if left <= 0:
                yield _Sleep(self.poll_interval)
                return
            yield _Sleep(min(self.poll_interval, left + DEADLINE_SLACK))
            if self._now() >= deadline:
                return
            session: Session = yield self.client._get_session_call(self.session_id)
            if session.round is None or session.round > done:
                return

    def _payload(
        self,
        global_params: Mapping[str, np.ndarray],
        weights: Mapping[str, npt.ArrayLike],
        dtype: np.dtype[Any],
    ) -> dict[str, np.ndarray]:
        """The update's tensors: `weights - global_params` (or the weights), in `dtype`."""
        missing = [n for n in global_params if n not in weights]
        extra = [n for n in weights if n not in global_params]
        if missing or extra:
            raise ValueError(
                "train must return every tensor of the session and no other: "
                f"missing {missing}, unknown {extra}"
            )
        out: dict[str, np.ndarray] = {}
        for name, base in global_params.items():
            new = np.asarray(weights[name])
            if new.shape != base.shape:
                raise ValueError(
                    f"train returned {name!r} of shape {new.shape}; the session's is {base.shape}"
                )
            new = new.astype(dtype, copy=False)
            out[name] = new if self.send == "weights" else new - base.astype(dtype, copy=False)
        return out


class FederatedWorker(_WorkerBase[OptimizerClient, TrainFn]):
    """A client of a federated session: `run` takes part in its rounds (see the module
    docstring).

    `client`: an `OptimizerClient` (its retries, and its `sleep` for the waits);
    `session_id`: a federated session; `client_id`: this client's id in the session (1
    to 128 printable characters; the same id after a restart, so that the server knows
    what it already sent); `train(global_params, round)`: the local training (returns
    `(weights, num_examples[, metrics])` or a `LocalResult`). `send`: `"delta"` (new
    weights minus the round's global params, in the session's dtype) or `"weights"`.
    `poll_interval`: seconds between looks while waiting for the next round (> 0).
    `max_rounds`: how many rounds `run()` takes part in when not told (None: no limit).
    `progress`: a tqdm bar over the rounds (round, updates received, the last metrics;
    tqdm is installed separately). `stop_when(report)`: called after each round; True
    ends `run`.
    """

    def run(self, rounds: int | None = None) -> list[RoundReport]:
        """Take part in `rounds` rounds (None: `max_rounds`; both None: until
        `stop_when` says stop), late ones included; their reports, in order."""
        limit = self._limit(rounds)
        with self._bar(limit) as bar:
            loop = self._loop(limit, bar)
            outcome: Any = None
            while True:
                try:
                    action = loop.send(outcome)
                except StopIteration as done:
                    reports: list[RoundReport] = done.value
                    return reports
                outcome = self._do(action)

    def _do(self, action: _Action) -> Any:
        if isinstance(action, _Sleep):
            return self.client._sleep(action.seconds)
        if isinstance(action, _Train):
            return self.train(action.params, action.round)
        if isinstance(action, _Submit):
            try:
                return self.client._run(action.call)
            except ConflictError as exc:  # late (round closed) or still in flight
                if exc.round_closed or exc.in_flight:
                    return exc
                raise
        return self.client._run(action)


class AsyncFederatedWorker(_WorkerBase[AsyncOptimizerClient, AsyncTrainFn]):
    """`FederatedWorker` over an `AsyncOptimizerClient` (`await worker.run(rounds)`);
    `train` may be a plain function or a coroutine function."""

    async def run(self, rounds: int | None = None) -> list[RoundReport]:
        """Take part in `rounds` rounds (None: `max_rounds`; both None: until
        `stop_when` says stop), late ones included; their reports, in order."""
        limit = self._limit(rounds)
        with self._bar(limit) as bar:
            loop = self._loop(limit, bar)
            outcome: Any = None
            while True:
                try:
                    action = loop.send(outcome)
                except StopIteration as done:
                    reports: list[RoundReport] = done.value
                    return reports
                outcome = await self._do(action)

    async def _do(self, action: _Action) -> Any:
        if isinstance(action, _Sleep):
            return await self.client._sleep(action.seconds)
        if isinstance(action, _Train):
            result = self.train(action.params, action.round)
            return await result if inspect.isawaitable(result) else result
        if isinstance(action, _Submit):
            try:
                return await self.client._run(action.call)
            except ConflictError as exc:  # late (round closed) or still in flight
                if exc.round_closed or exc.in_flight:
                    return exc
                raise
        return await self.client._run(action)


def _rounds(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 or None: got {value!r}")
    return int(value)


def _local_result(value: object) -> LocalResult:
    """`train`'s return value as a `LocalResult`."""
    if isinstance(value, LocalResult):
        result = value
    elif isinstance(value, tuple) and len(value) in (2, 3):
        result = LocalResult(value[0], value[1], value[2] if len(value) == 3 else None)
    else:
        raise TypeError(
            "train must return (weights, num_examples), (weights, num_examples, metrics) "
            f"or a LocalResult, not {type(value).__name__}"
        )
    if not isinstance(result.weights, Mapping):
        raise TypeError(
            f"train's weights must be a mapping of names to arrays, not "
            f"{type(result.weights).__name__}"
        )
    return result


def _floats(metrics: Mapping[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {str(k): float(v) for k, v in metrics.items()}


def _postfix(report: RoundReport) -> str:
    """The progress bar's text after a round: round, updates received, metrics."""
    if report.late:
        return f"round={report.round} late (now {report.current_round})"
    parts = [f"round={report.round}", f"received={report.received}"]
    parts += [f"{name}={value:.4g}" for name, value in (report.metrics or {}).items()]
    return " ".join(parts)
