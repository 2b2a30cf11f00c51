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
from typing import Any

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
