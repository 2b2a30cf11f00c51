"""Structured logs on a real server (service/logs.py): every line one JSON object, each
request's lines carrying its request id, which the response returns in `X-Request-ID`
(the client's own id when it sent a valid one)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.support.live_server import LiveServer, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server("logs", tmp_path_factory.mktemp("logs"))
    try:
        yield live
    finally:
        live.stop()


def _lines(server: LiveServer) -> list[dict[str, object]]:
    out = []
    for line in server.log_text().splitlines():
        if line.startswith("optserve: "):  # the CLI's first line, before logging is set up
            continue
        out.append(json.loads(line))  # fails the test on a line that is not JSON
    return out


def _access_line(server: LiveServer, rid: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in _lines(server) if e.get("request_id") == rid]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    access = [e for e in found if e["logger"] == "uvicorn.access"]
    assert len(access) == 1, found
    return access[0]


def test_every_line_is_json_with_a_request_id(server: LiveServer) -> None:
    with server.client() as client:
        given = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
        made = client.post("/v1/sessions", json={"optimizer": {"name": "nope"}, "params": {}})
        bad_id = client.get("/v1/sessions/none", headers={"X-Request-ID": "x" * 200})
    assert given.headers["X-Request-ID"] == "trace-42"
    generated = made.headers["X-Request-ID"]
    assert len(generated) == 32
    int(generated, 16)
    replaced = bad_id.headers["X-Request-ID"]
    assert replaced != "x" * 200
    assert len(replaced) == 32
    for response, rid in ((given, "trace-42"), (made, generated), (bad_id, replaced)):
        line = _access_line(server, rid)
        assert line["status"] == response.status_code
        assert line["path"] == response.request.url.path
        assert line["method"] == response.request.method
    lines = _lines(server)
    assert lines, "no log lines"
    for entry in lines:
        assert {"time", "level", "logger", "message", "pid", "request_id"} <= set(entry)
    startup = [e for e in lines if e["message"] == "Application startup complete."]
    assert len(startup) == 1  # outside any request
    assert all(e["request_id"] == "-" for e in startup)


def test_concurrent_requests_keep_their_own_ids(server: LiveServer) -> None:
    import concurrent.futures

    def call(i: int) -> tuple[str, int]:
        with server.client() as client:
            r = client.get("/v1/sessions/missing", headers={"X-Request-ID": f"req-{i}"})
            return r.headers["X-Request-ID"], r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(40)))
    assert [rid for rid, _ in answers] == [f"req-{i}" for i in range(40)]
    for i in range(40):
        assert _access_line(server, f"req-{i}")["status"] == 404
