"""`optserve serve`: its refusals, and a real server process answering HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from service.cli import _is_loopback, main
from tests.api.support import REDIS_URL, redis_problem


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OPTSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_workers_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, "serve", "--workers", "2")
    assert rc == 2
    assert "--workers 2 needs a Redis URL" in err


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "::", "example.com"])
def test_public_host_needs_keys(capsys: pytest.CaptureFixture[str], host: str) -> None:
    rc, err = _run(capsys, "serve", "--host", host)
    assert rc == 2
    assert f"refusing to serve on {host} without API keys" in err
    assert "--allow-unauthenticated" in err


def test_loopback_hosts() -> None:
    assert all(_is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


@pytest.mark.usefixtures("clean_env")
def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, "serve", "--port", "70000")
    assert rc == 2
    assert "invalid settings" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def _serve(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = _free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        yield base
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        sys.stdout.write(out)


@pytest.mark.slow
def test_serve_in_process_store(capfd: pytest.CaptureFixture[str]) -> None:
    with _serve() as base:
        r = httpx.post(
            f"{base}/v1/sessions",
            json={"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"x": [1.0, 2.0]}},
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        r = httpx.post(f"{base}/v1/sessions/{sid}/step", json={"grads": {"x": [1.0, 1.0]}})
        assert r.json()["params"] == {"x": [0.5, 1.5]}
        r = httpx.get(f"{base}/v1/sessions/{sid}/params")
        assert r.json() == {"step": 1, "version": 1, "params": {"x": [0.5, 1.5]}}
        assert "optserve_http_requests_total" in httpx.get(f"{base}/metrics").text
    out = capfd.readouterr().out
    assert "store: in-process (embedded default; state is lost on exit)" in out


@pytest.mark.slow
def test_serve_two_workers_on_redis(
    capfd: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]
) -> None:
    reason = redis_problem()
    if reason:
        pytest.skip(reason)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with (
        _serve("--workers", "2", "--redis-url", REDIS_URL, env=env) as base,
        httpx.Client(base_url=base) as client,
    ):
        r = client.post(
            "/v1/sessions",
            json={"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"x": [1.0]}},
        )
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        for _ in range(4):  # whichever worker answers, the state is Redis'
            assert client.post(f"/v1/sessions/{sid}/step", json={"grads": {"x": [1.0]}}).is_success
        assert client.get(f"/v1/sessions/{sid}/params").json()["params"] == {"x": [-1.0]}
        metrics = client.get("/metrics").text
        assert "optserve_http_requests_total" in metrics
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    out = capfd.readouterr().out
    assert "store: redis at" in out
