"""/healthz, /readyz, /metrics, the store log line, and an event loop that keeps serving
while a large step computes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time

import numpy as np
import pytest

from service.app import create_app, redact_url
from service.store.memory import MemoryStore
from tests.api.support import BINARY, Api, base_store, encode, make_settings, open_api

pytestmark = pytest.mark.asyncio


async def test_healthz_and_readyz(api: Api) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "store": None}
    r = await api.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "store": api.store.name}


async def test_metrics(api: Api) -> None:
    sid = (await api.create({"optimizer": {"name": "sgd"}, "params": {"x": [1.0]}}))["id"]
    await api.step(sid, {"grads": {"x": [1.0]}})
    await api.step(sid, {"grads": {"y": [1.0]}})
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in (
        'optserve_http_requests_total{method="POST",route="/v1/sessions/{session_id}/step",status="200"}',
        'optserve_http_requests_total{method="POST",route="/v1/sessions/{session_id}/step",status="422"}',
        'optserve_http_requests_total{method="POST",route="/v1/sessions",status="201"}',
        "optserve_http_request_duration_seconds_bucket",
        'optserve_step_duration_seconds_count{outcome="applied"}',
        'optserve_step_duration_seconds_count{outcome="refused"}',
        'optserve_store_round_trips_total{op="commit"}',
        'optserve_store_round_trips_total{op="load"}',
        "optserve_version_conflicts_total",
        "optserve_idempotent_replays_total",
        "optserve_sessions ",
    ):
        assert needle in text, needle
    count = [line for line in text.splitlines() if line.startswith("optserve_sessions ")]
    assert float(count[0].split()[1]) >= 1


async def test_metrics_multiprocess_mode(
    api: Api, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, /metrics reads the per-process files there."""
    from service.api import metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    body, content_type = metrics.exposition()  # an empty dir: a valid, empty exposition
    assert content_type.startswith("text/plain")
    assert isinstance(body, bytes)


async def test_first_log_line_names_the_store(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(make_settings(), store=MemoryStore())
    with caplog.at_level(logging.INFO, logger="optserve"):
        async with app.router.lifespan_context(app):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "optserve"]
    assert lines[0] == "store: in-process (embedded default; state is lost on exit)"


async def test_first_log_line_names_redis(caplog: pytest.LogCaptureFixture) -> None:
    async with base_store("redis") as store:
        url = "redis://:secret@127.0.0.1:6379/0"
        app = create_app(make_settings(redis_url=url), store=store)
        with caplog.at_level(logging.INFO, logger="optserve"):
            async with app.router.lifespan_context(app):
                pass
    lines = [r.getMessage() for r in caplog.records if r.name == "optserve"]
    assert lines[0] == "store: redis at redis://:***@127.0.0.1:6379/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.slow
async def test_event_loop_serves_during_a_large_step() -> None:
    """A step over 2e7 parameters computes in a worker thread: /healthz keeps answering."""
    n = 20_000_000
    async with open_api(MemoryStore()) as api:
        body = encode({"w": np.zeros(n, np.float32)}, {"optimizer": '{"name": "adam", "lr": 0.01}'})
        r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        grads = encode({"w": np.ones(n, np.float32)}, {"return": "none"})
        del body

        done = asyncio.Event()
        answered: list[float] = []  # when each health check was answered

        async def poll() -> None:
            while not done.is_set():
                r = await api.client.get("/healthz")
                assert r.status_code == 200
                answered.append(time.perf_counter())
                await asyncio.sleep(0.005)

        async def step() -> tuple[float, float]:
            await asyncio.sleep(0.05)  # let the poller start
            t0 = time.perf_counter()
            try:
                r = await api.client.post(
                    f"/v1/sessions/{sid}/step", content=grads, headers={"Content-Type": BINARY}
                )
                assert r.status_code == 200, r.text
                assert r.json()["version"] == 1
            finally:
                done.set()
            return t0, time.perf_counter()

        (start, end), _ = await asyncio.gather(step(), poll())
        took = end - start
        times = [start, *(t for t in answered if start < t < end), end]
        gap = max(b - a for a, b in itertools.pairwise(times))
        print(f"step {took:.3f} s, {len(times) - 2} health checks, longest gap {gap:.4f} s")
        assert took > 0.1, "the step was too quick to tell anything"
        # the loop kept serving: health checks answered all along, never a long silence.
        # (Run on the event loop, the step leaves one silence as long as itself. Short
        # ones remain where the worker holds the GIL, copying the new state into bytes.)
        assert len(times) - 2 >= 10, (len(times), took)
        assert gap < took / 2, (gap, took)
        params = await api.params(sid)
        assert params["w"][:3].tolist() == pytest.approx([-0.01] * 3)


async def test_openapi_describes_every_endpoint(api: Api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    paths = doc["paths"]
    assert set(paths["/v1/sessions"]) == {"get", "post"}
    assert set(paths["/v1/sessions/{session_id}"]) == {"get", "delete"}
    assert set(paths["/v1/sessions/{session_id}/params"]) == {"get"}
    assert set(paths["/v1/sessions/{session_id}/step"]) == {"post"}
    assert set(paths["/v1/schedules/preview"]) == {"post"}
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    step = paths["/v1/sessions/{session_id}/step"]["post"]
    assert set(step["requestBody"]["content"]) == {"application/json", BINARY}
    assert {"200", "400", "404", "409", "413", "422", "503"} <= set(step["responses"])
    schemas = doc["components"]["schemas"]
    assert {"CreateSession", "StepRequest", "Problem", "SessionDoc", "StepResponse"} <= set(schemas)
    refs = [m.group(1) for m in re.finditer(r'"#/components/schemas/([^"]+)"', r.text)]
    assert set(refs) <= set(schemas)
