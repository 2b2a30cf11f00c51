"""Helpers of the client tests: a fault-injecting proxy in front of a live server,
scripted httpx transports, and fake sleeps."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

PROBLEM = "application/problem+json"

#: what the proxy may do with a request
FAULTS = ("ok", "drop_before", "drop_after", "delay")


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream_port` that, per request and
    at random (seeded), forwards it faithfully (`ok`), drops the client's connection
    before forwarding (`drop_before`: nothing reaches the server), drops it after
    forwarding (`drop_after`: the server applied the request, the answer is lost), or
    holds the answer `delay` seconds (past the client's timeout) and then drops the
    connection (`delay`). Only requests for which `faulty(method, path)` holds get
    faults; others are forwarded.

    It reads each request's framing (head, Content-Length body), forwards it on a new
    upstream connection and reads the answer by its Content-Length, so the client may
    keep its connection alive between requests. It runs its own event loop in a thread:
    usable from sync and async tests alike. `log` lists `(method, path, fault)`.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int,
        weights: Mapping[str, float],
        delay: float,
        faulty: Callable[[str, str], bool] = lambda method, path: True,
    ) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.kinds = list(weights)
        self.weights = [weights[k] for k in self.kinds]
        self.delay = delay
        self.faulty = faulty
        self.log: list[tuple[str, str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> Counter[str]:
        return Counter(fault for _, _, fault in self.log)

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, path, length = _request_line(head)
                body = await reader.readexactly(length)
                fault = "ok"
                if self.faulty(method, path):
                    fault = self.rng.choices(self.kinds, self.weights)[0]
                self.log.append((method, path, fault))
                if fault == "drop_before":
                    writer.transport.abort()
                    return
                answer = await self._forward(head + body)
                if fault == "drop_after":
                    writer.transport.abort()
                    return
                if fault == "delay":
                    await asyncio.sleep(self.delay)
                    writer.transport.abort()  # the client has given up by now
                    return
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _forward(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = _content_length(head)
            if status in (204, 304) or length == 0:
                body = b""
            elif length is None:
                body = await reader.read()
            else:
                body = await reader.readexactly(length)
            return head + body
        finally:
            writer.close()


def _request_line(head: bytes) -> tuple[str, str, int]:
    method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    return method, path, _content_length(head) or 0


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


# --- scripted transports -------------------------------------------------------------------

#: a scripted answer: a response, or an exception class raised for the request
Answer = httpx.Response | type[httpx.TransportError]


@dataclass
class Script:
    """A `httpx.MockTransport` handler that answers the requests in turn from `answers`
    (the last one again when they run out) and records every request."""

    answers: list[Answer]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, httpx.Response):  # a fresh copy: answers may repeat
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )
        raise answer("scripted failure", request=request)

    def sync(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def header(self, name: str) -> list[str | None]:
        return [r.headers.get(name) for r in self.requests]


def problem_response(
    status: int,
    slug: str = "some-problem",
    detail: str = "something is wrong",
    errors: Iterable[tuple[list[str | int], str]] = (),
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    body = {
        "type": f"urn:optserve:problem:{slug}",
        "title": slug.replace("-", " ").capitalize(),
        "status": status,
        "detail": detail,
        "errors": [{"loc": loc, "msg": msg} for loc, msg in errors],
    }
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"Content-Type": PROBLEM, **(headers or {})},
    )


def session_doc(sid: str = "s1", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": sid,
        "step": 0,
        "version": 0,
        "lr": 0.1,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "schedule": None,
        "dtype": "float64",
        "params": {"x": {"shape": [3]}},
        "transforms": {},
        "nonfinite": "error",
        "skipped": 0,
    }
    doc.update(overrides)
    return doc


def step_json(step: int = 1, **overrides: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "step": step,
        "version": step,
        "lr": 0.1,
        "params": {"x": [1.0, 2.0, 3.0]},
        "skipped": False,
        "grad_norm": 1.0,
        "clipped": False,
    }
    body.update(overrides)
    return httpx.Response(200, json=body)


class FakeSleep:
    """Records the waits instead of waiting (`sync` for the blocking client, the
    instance itself awaited for the async one)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sync(self, seconds: float) -> None:
        self.waits.append(seconds)

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


# --- a fake server of LR range tests -------------------------------------------------------


@dataclass
class _RangeSession:
    params: dict[str, Any]
    dtype: str
    config: dict[str, Any]
    version: int = 0
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    best: float | None = None
    stop_reason: str | None = None
    nonfinite_lr: float | None = None

    def ramp(self, i: int) -> float:
        c = self.config
        r = i / (c["num_steps"] - 1)
        if c["mode"] == "exp":
            return float(c["start_lr"] * (c["end_lr"] / c["start_lr"]) ** r)
        return float(c["start_lr"] + r * (c["end_lr"] - c["start_lr"]))


class FakeRangeTestServer:
    """A `httpx.MockTransport` handler that serves LR range-test sessions as
    docs/training.md describes them (plain SGD at the ramp's rate, pytorch-lr-finder's
    smoothing and divergence rule), JSON or binary: create, get, delete, step (409
    `range-test-over` once over; a non-finite loss ends the test unapplied) and
    `GET .../lr-finder` (its `steepest` suggestion only). `requests` records
    `(method, path)`; `steps` counts the step requests."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "start_lr": 1e-7,
        "end_lr": 10.0,
        "num_steps": 100,
        "mode": "exp",
        "smooth_f": 0.05,
        "diverge_th": 5.0,
    }

    def __init__(self) -> None:
        self.sessions: dict[str, _RangeSession] = {}
        self.requests: list[tuple[str, str]] = []
        self.steps = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import numpy as np

        from clients import tensorfile

        request.read()
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        binary = request.headers.get("content-type") == "application/octet-stream"
        if method == "POST" and path == "/v1/sessions":
            if binary:
                tensors, meta = tensorfile.decode(request.content)
                config, dtype = json.loads(meta["lr_finder"]), meta["dtype"]
            else:
                body = json.loads(request.content)
                tensors = {n: np.asarray(v) for n, v in body["params"].items()}
                config, dtype = body["lr_finder"], body["dtype"]
            sid = f"s{len(self.sessions) + 1}"
            self.sessions[sid] = _RangeSession(
                {n: np.asarray(a, dtype=dtype) for n, a in tensors.items()},
                dtype,
                {**self.DEFAULTS, **config},
            )
            return httpx.Response(201, json=self._doc(sid))
        parts = path.split("/")  # "", "v1", "sessions", id, [what]
        sid = parts[3]
        what = parts[4] if len(parts) > 4 else ""
        if sid not in self.sessions:
            return problem_response(404, "not-found", "no session with this id")
        session = self.sessions[sid]
        if method == "GET" and what == "":
            return httpx.Response(200, json=self._doc(sid))
        if method == "DELETE":
            del self.sessions[sid]
            return httpx.Response(204)
        if method == "GET" and what == "lr-finder":
            return httpx.Response(200, json=self._result(session))
        if method == "POST" and what == "step":
            self.steps += 1
            if binary:
                grads, meta = tensorfile.decode(request.content)
                loss = float(meta["loss"])
            else:
                body = json.loads(request.content)
                grads = {n: np.asarray(v) for n, v in body["grads"].items()}
                loss = float(body["loss"])
            if session.stop_reason is not None:
                return problem_response(409, "range-test-over", "the range test is over")
            lr = session.ramp(len(session.lrs))
            session.version += 1
            if not np.isfinite(loss):
                session.stop_reason, session.nonfinite_lr = "diverged", lr
                answer = {"step": session.version, "version": session.version, "lr": lr}
                return httpx.Response(200, json=answer)
            for name, g in grads.items():
                session.params[name] = (session.params[name] - lr * np.asarray(g)).astype(
                    session.dtype
                )
            self._observe(session, lr, loss)
            meta = {"step": str(session.version), "version": str(session.version)}
            meta |= {"lr": repr(lr), "return": "params"}
            if request.headers.get("accept") == "application/octet-stream":
                return httpx.Response(
                    200,
                    content=tensorfile.encode(session.params, meta),
                    headers={"Content-Type": "application/octet-stream"},
                )
            params = {n: a.tolist() for n, a in session.params.items()}
            return httpx.Response(
                200,
                json={
                    "step": session.version,
                    "version": session.version,
                    "lr": lr,
                    "params": params,
                },
            )
        return problem_response(405, "method-not-allowed", f"{method} {path}")

    @staticmethod
    def _observe(session: _RangeSession, lr: float, loss: float) -> None:
        f, i = session.config["smooth_f"], len(session.lrs)
        smoothed = loss if i == 0 or f == 0 else f * loss + (1 - f) * session.smoothed[-1]
        best = smoothed if session.best is None else min(session.best, smoothed)
        session.lrs.append(lr)
        session.losses.append(loss)
        session.smoothed.append(smoothed)
        session.best = best
        if smoothed > session.config["diverge_th"] * best:
            session.stop_reason = "diverged"
        elif i + 1 >= session.config["num_steps"]:
            session.stop_reason = "completed"

    def _doc(self, sid: str) -> dict[str, Any]:
        s = self.sessions[sid]
        done = s.stop_reason is not None
        return session_doc(
            sid,
            step=s.version,
            version=s.version,
            lr=None if done else s.ramp(len(s.lrs)),
            dtype=s.dtype,
            params={n: {"shape": list(a.shape)} for n, a in s.params.items()},
            lr_finder=s.config,
        )

    def _result(self, s: _RangeSession) -> dict[str, Any]:
        import numpy as np

        done = s.stop_reason is not None
        steepest: dict[str, Any] = {"method": "steepest", "lr": None, "reason": "too few"}
        trimmed = s.smoothed[10:-5]
        if len(trimmed) >= 2:
            k = 10 + int(np.argmin(np.gradient(np.asarray(trimmed))))
            steepest = {"method": "steepest", "lr": s.lrs[k], "index": k, "loss": s.smoothed[k]}
        return {
            "config": s.config,
            "lrs": s.lrs,
            "losses": s.losses,
            "smoothed": s.smoothed,
            "best_loss": s.best,
            "done": done,
            "stop_reason": s.stop_reason,
            "nonfinite_lr": s.nonfinite_lr,
            "next_lr": None if done else s.ramp(len(s.lrs)),
            "suggestions": {"steepest": {**steepest, "reference": "fake"}},
        }


# --- a fake server of federated sessions ---------------------------------------------------


@dataclass
class ReceivedUpdate:
    """An update the fake federation took (or refused: `answer` None)."""

    round: int
    client_id: str
    kind: str
    tensors: dict[str, Any]
    num_examples: int
    metrics: dict[str, float] | None
    body: bytes
    binary: bool


class FakeFederation:
    """A `httpx.MockTransport` handler serving one federated session (`SID`) as
    docs/federated.md describes it, on a fake clock: `GET /v1/sessions/{id}`, `GET
    .../round` (JSON or binary) and `POST .../rounds/{r}/updates` (JSON or binary).

    The server optimizer is fedavg with lr 1 and the mean aggregator (weighted by
    `num_examples`): a round's close adds the weighted mean of its deltas to the params.
    A round closes when `expected_clients` reported, or when a request that touches it
    (an update, or a look at the round) comes past its deadline with `min_clients` in.
    Updates are idempotent per client and round (the same body gets the first answer,
    `Idempotent-Replayed: true`; another body 422); an update for another round is 409
    `round-closed` (member `round`).

    Other clients are simulated: `phantoms` maps an id to the seconds after a round
    opens at which it reports (a zero delta, one example), if the round is still open.
    The clock `now` moves only by `sleep` / `asleep` / `advance` (the clients' and the
    workers' sleeps); phantom reports due by `now` are taken (at their time) before each
    request is answered. `drop_answers`: the numbers (1-based) of update requests whose
    answer is lost after the update was taken (`RemoteProtocolError`); `in_flight`: how
    many update requests, from the first, are answered 409 `idempotency-key-in-flight`
    (a claim left by a server killed mid-update) without being looked at.

    Records: `requests` (`(method, path)`), `raw` (the requests), `waits` (the sleeps),
    `taken` / `refused` (the updates of the workers: taken, or refused with a 409),
    `closed` (`(round, clients, time)` of each round closed).
    """

    SID = "f1"

    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        dtype: str = "float32",
        min_clients: int = 1,
        expected_clients: int | None = None,
        round_timeout: float = 60.0,
        phantoms: Mapping[str, float] | None = None,
        drop_answers: Iterable[int] = (),
        in_flight: int = 0,
        now: float = 1_000.0,
    ) -> None:
        import numpy as np

        self.dtype = dtype
        self.params = {n: np.asarray(v, dtype=dtype) for n, v in params.items()}
        self.min_clients = min_clients
        self.expected_clients = expected_clients
        self.round_timeout = round_timeout
        self.phantoms = dict(phantoms or {})
        self.drop_answers = set(drop_answers)
        self.in_flight = in_flight
        self.now = now
        self.round = 0
        self.opened_at = now
        #: this round's updates by client: (body, answer)
        self.current: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.deltas: dict[str, tuple[Any, int]] = {}
        #: every update taken, and the answers by (client, round) for replays
        self.taken: list[ReceivedUpdate] = []
        self.refused: list[ReceivedUpdate] = []
        self.answers: dict[tuple[str, int], tuple[bytes, dict[str, Any]]] = {}
        #: the rounds closed: (round, clients, closing time)
        self.closed: list[tuple[int, list[str], float]] = []
        self.requests: list[tuple[str, str]] = []
        self.raw: list[httpx.Request] = []
        self.waits: list[float] = []
        self.update_requests = 0

    # the clock ------------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let the other tasks run

    @property
    def deadline(self) -> float:
        return self.opened_at + self.round_timeout

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    # the rounds -----------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Take the phantom reports due by `now`, each at its time."""
        while True:
            due = [
                (self.opened_at + delay, pid)
                for pid, delay in self.phantoms.items()
                if pid not in self.current and self.opened_at + delay <= self.now
            ]
            if not due:
                return
            when, pid = min(due)
            import numpy as np

            zeros = {n: np.zeros_like(a) for n, a in self.params.items()}
            self._take(pid, zeros, 1, b"phantom", {"round": self.round}, when)

    def _take(
        self,
        client: str,
        delta: dict[str, Any],
        n: int,
        body: bytes,
        answer: dict[str, Any],
        when: float,
    ) -> dict[str, Any]:
        self.current[client] = (body, answer)
        self.deltas[client] = (delta, n)
        answer.update(accepted=True, received=len(self.current), closed=False)
        if self._closable(when):
            answer.update(closed=True, next_round=self.round + 1)
            self._close(when)
        return answer

    def _closable(self, when: float) -> bool:
        received = len(self.current)
        if received < self.min_clients:
            return False
        if self.expected_clients is not None and received >= self.expected_clients:
            return True
        return when >= self.deadline

    def _close(self, when: float) -> None:
        total = sum(n for _, n in self.deltas.values())
        for name in self.params:
            mean = sum(d[name].astype("float64") * n for d, n in self.deltas.values()) / total
            self.params[name] = (self.params[name] + mean).astype(self.dtype)
        for client, (body, answer) in self.current.items():
            self.answers[(client, self.round)] = (body, answer)
        self.closed.append((self.round, list(self.current), when))
        self.round += 1
        self.opened_at = when
        self.current, self.deltas = {}, {}

    # HTTP -----------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        method, path = request.method, request.url.path
        self.requests.append((method, path))
        self.raw.append(request)
        self._catch_up()
        base = f"/v1/sessions/{self.SID}"
        if method == "GET" and path == base:
            return httpx.Response(200, json=self.doc())
        if method == "GET" and path == base + "/round":
            if self._closable(self.now):
                self._close(self.now)
            return self._round_answer(request.headers.get("accept") == "application/octet-stream")
        prefix = base + "/rounds/"
        if method == "POST" and path.startswith(prefix) and path.endswith("/updates"):
            number = int(path[len(prefix) : -len("/updates")])
            if self.in_flight > 0:
                self.in_flight -= 1
                return _problem_json(409, "idempotency-key-in-flight")
            response = self._update(request, number)
            self.update_requests += 1
            if self.update_requests in self.drop_answers:
                raise httpx.RemoteProtocolError("answer lost", request=request)
            return response
        if path.startswith("/v1/sessions/"):
            return problem_response(404, "not-found", "no session with this id")
        return problem_response(405, "method-not-allowed", f"{method} {path}")

    def doc(self) -> dict[str, Any]:
        return session_doc(
            self.SID,
            step=self.round,
            version=self.round,
            dtype=self.dtype,
            optimizer={"name": "fedavg", "lr": 1.0},
            params={n: {"shape": list(a.shape)} for n, a in self.params.items()},
            federated={
                "min_clients": self.min_clients,
                "expected_clients": self.expected_clients,
                "round_timeout": self.round_timeout,
                "aggregator": {"name": "mean"},
                "update": "delta",
            },
            round=self.round,
        )

    def _round_answer(self, binary: bool) -> httpx.Response:
        info: dict[str, Any] = {
            "round": self.round,
            "deadline": self.deadline,
            "opened_at": self.opened_at,
            "received": len(self.current),
            "min_clients": self.min_clients,
            "expected_clients": self.expected_clients,
            "clients": list(self.current),
            "step": self.round,
            "version": self.round,
            "lr": 1.0,
        }
        if binary:
            from clients import tensorfile

            meta = {k: _meta_text(v) for k, v in info.items() if v is not None}
            return httpx.Response(
                200,
                content=tensorfile.encode(self.params, meta),
                headers={"Content-Type": "application/octet-stream"},
            )
        params = {n: a.tolist() for n, a in self.params.items()}
        return httpx.Response(200, json={**info, "params": params})

    def _update(self, request: httpx.Request, number: int) -> httpx.Response:
        import numpy as np

        from clients import tensorfile

        body = request.content
        binary = request.headers.get("content-type") == "application/octet-stream"
        if binary:
            tensors, meta = tensorfile.decode(body)
            client, kind = meta["client_id"], meta["kind"]
            n = int(meta["num_examples"])
            metrics = json.loads(meta["metrics"]) if "metrics" in meta else None
        else:
            data = json.loads(body)
            client, n, metrics = data["client_id"], data["num_examples"], data.get("metrics")
            kind = "delta" if "delta" in data else "weights"
            tensors = {k: np.asarray(v) for k, v in data[kind].items()}
        seen = self.answers.get((client, number))
        if seen is None and number == self.round and client in self.current:
            seen = self.current[client]
        if seen is not None:
            if seen[0] != body:
                return problem_response(422, "validation-error", "a different update")
            return httpx.Response(200, json=seen[1], headers={"Idempotent-Replayed": "true"})
        received = ReceivedUpdate(number, client, kind, dict(tensors), n, metrics, body, binary)
        if number != self.round:
            self.refused.append(received)
            return _problem_json(409, "round-closed", round=self.round)
        self.taken.append(received)
        delta = {
            name: np.asarray(tensors[name], dtype="float64")
            - (self.params[name] if kind == "weights" else 0)
            for name in self.params
        }
        answer = self._take(client, delta, n, body, {"round": number}, self.now)
        return httpx.Response(200, json=answer)


def _meta_text(value: Any) -> str:
    """A binary answer's metadata value, as the server writes it."""
    if isinstance(value, list):
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _problem_json(status: int, slug: str, **members: Any) -> httpx.Response:
    body = {
        "type": f"urn:optserve:problem:{slug}",
        "title": slug,
        "status": status,
        "detail": f"{slug} detail",
        "errors": [],
        **members,
    }
    return httpx.Response(status, json=body, headers={"Content-Type": PROBLEM})
