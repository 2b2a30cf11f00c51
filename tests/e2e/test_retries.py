"""A client that loses the connection before reading the answer, and retries with the
same `Idempotency-Key` until it gets one: every key is applied exactly once, and the
retry of a step that did commit is the recorded answer (`Idempotent-Replayed: true`).

Three ways of losing the answer, in turn:

- `drop`: a raw socket sends the whole request and closes at once;
- `lost`: a raw socket sends the whole request, waits until the session's version shows
  that the step committed, and closes without reading (with a reset): the answer is
  lost for sure, the step applied for sure;
- `timeout`: httpx with a read timeout of a few milliseconds.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid
from typing import Any

import httpx
import numpy as np

from tests.e2e.support import LiveServer, assert_close, read_params, session_doc

KEYS = 45
LR = 0.05
SEED = 7


def _grads(i: int) -> list[float]:
    return [float(v) for v in np.random.default_rng([SEED, i]).standard_normal(6)]


def _raw_request(server: LiveServer, path: str, body: bytes, key: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def _headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Idempotency-Key": key}


def _version(client: httpx.Client, sid: str) -> int:
    return int(session_doc(client, sid)["version"])


def test_lost_answers_are_replayed_and_applied_once(live: LiveServer) -> None:
    with live.client() as client:
        r = client.post(
            "/v1/sessions",
            json={
                "optimizer": {"name": "sgd", "lr": LR},
                "params": {"x": [0.5] * 6},
                "dtype": "float64",
            },
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        path = f"/v1/sessions/{sid}/step"
        outcomes: dict[str, int] = {}
        for i in range(KEYS):
            mode = ("drop", "lost", "timeout")[i % 3]
            key = f"retry-{uuid.uuid4()}"
            payload: dict[str, Any] = {"grads": {"x": _grads(i)}, "return": "params"}
            body = json.dumps(payload).encode()
            assert _version(client, sid) == i
            if mode == "timeout":
                timeout = httpx.Timeout(30.0, read=0.001 * (1 + i % 4))
                try:
                    with live.client(timeout=timeout) as impatient:
                        impatient.post(path, content=body, headers=_headers(key))
                except httpx.TimeoutException:
                    pass
                else:  # answered within the few ms: lose nothing, and say so
                    mode = "answered"
            else:
                sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
                try:
                    sock.sendall(_raw_request(live, path, body, key))
                    if mode == "lost":
                        deadline = time.monotonic() + 20
                        while _version(client, sid) == i:
                            assert time.monotonic() < deadline, "the step never committed"
                            time.sleep(0.005)
                        # close with a reset, the answer unread
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                finally:
                    sock.close()
            committed = _version(client, sid) == i + 1  # before the first retry
            replay = _retry_until_answered(client, path, body, key)
            assert replay.json()["version"] == i + 1, replay.text
            assert_close(
                {"x": np.asarray(replay.json()["params"]["x"])}, {"x": _expected(i + 1)}, 1e-12
            )
            replayed = replay.headers.get("idempotent-replayed") == "true"
            if committed:
                assert replayed, f"key {i} ({mode}): committed before the retry, not replayed"
            outcome = f"{mode}/{'replayed' if replayed else 'applied by the retry'}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            # and once more: still the recorded answer, still applied once
            again = client.post(path, content=body, headers=_headers(key))
            assert again.status_code == 200
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == replay.content
            assert _version(client, sid) == i + 1, f"key {i} ({mode}) was applied twice"

        assert outcomes.get("lost/replayed") == KEYS // 3, outcomes
        doc = session_doc(client, sid)
        assert (doc["step"], doc["version"]) == (KEYS, KEYS)
        got, _ = read_params(client, sid)
    assert_close(got, {"x": _expected(KEYS)}, rtol=1e-12)


def _expected(n: int) -> np.ndarray:
    """The params after the first `n` keys, each applied once."""
    x = np.full(6, 0.5)
    for i in range(n):
        x = x - LR * np.asarray(_grads(i))
    return x


def _retry_until_answered(
    client: httpx.Client, path: str, body: bytes, key: str, seconds: float = 30.0
) -> httpx.Response:
    """POST again with the same key until the server answers 200; 409 (the first
    attempt still in flight) is the only other answer allowed."""
    deadline = time.monotonic() + seconds
    while True:
        r = client.post(path, content=body, headers=_headers(key))
        if r.status_code == 200:
            return r
        assert r.status_code == 409, r.text
        assert r.json()["type"].endswith("idempotency-key-in-flight"), r.text
        assert time.monotonic() < deadline, f"key {key} still in flight after {seconds} s"
        time.sleep(0.01)
