"""The real server in a subprocess (`optserve serve`), for tests of every package.

`start_server` runs `python -m service.cli serve --port <free> [--workers N --redis-url
URL]` with a clean `OPTSERVE_*` environment, its output in a log file, and waits until
`/readyz` answers 200 and every worker has finished its startup. `LiveServer.stop()`
sends SIGTERM to the master, then SIGKILL to it and to any of its processes still
alive, by pid. Every running server is listed in `RUNNING`, so that a failed test can
show their logs (tests/support/live_fixtures.py). The shared servers (`memory_server`,
`redis_server`) are fixtures of tests/support/live_fixtures.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.redis_server import PrivateRedis, free_port

#: seconds a server may take to answer /readyz with all its workers started
STARTUP_TIMEOUT = 90.0
#: the body limit the live servers are started with (the 413 checks go over it)
MAX_BODY_BYTES = 256 * 1024

RUNNING: list[LiveServer] = []


@dataclass
class LiveServer:
    """An `optserve serve` process (the uvicorn master) and where it answers."""

    name: str
    port: int
    workers: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    redis: PrivateRedis | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def worker_pids(self) -> list[int]:
        """The pids of the processes that serve requests: the uvicorn workers (children
        started by multiprocessing's spawn), or the master itself with one worker."""
        if self.workers == 1:
            return [self.proc.pid]
        pids = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.is_running() and any("spawn_main" in a for a in child.cmdline()):
                    pids.append(child.pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return sorted(pids)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 120) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the master; after `timeout` s SIGKILL to it and to any process of
        its tree still alive (by pid: only what this server started)."""
        if self in RUNNING:
            RUNNING.remove(self)
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for child in tree:  # workers the master did not take down with it
            try:
                child.kill()
                child.wait(timeout=timeout)
            except psutil.NoSuchProcess:
                pass


def start_server(
    name: str,
    log_dir: Path,
    *,
    workers: int = 1,
    redis: PrivateRedis | None = None,
    env: Mapping[str, str] | None = None,
    redis_url: str | None = None,
) -> LiveServer:
    """`optserve serve` on a free port of 127.0.0.1 (Redis' if given, or `redis_url`, e.g.
    a `redis+cluster://` one; else in-process), ready: /readyz is 200 and each of its
    `workers` has completed its startup."""
    assert redis is None or redis_url is None, "redis or redis_url, not both"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    full_env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OPTSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "OPTSERVE_RETRY_AFTER": "1",
        }
    )
    if workers > 1:
        prom = log_dir / f"{name}-prometheus"
        prom.mkdir(exist_ok=True)
        full_env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    full_env.update(env or {})
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    argv += ["--workers", str(workers)]
    if redis is not None:
        argv += ["--redis-url", redis.url]
    elif redis_url is not None:
        argv += ["--redis-url", redis_url]
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(name, port, workers, log_path, proc, redis, dict(env or {}))
    RUNNING.append(server)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name}: optserve serve exited with {server.proc.returncode}:\n"
                    + server.log_text()
                )
            started = server.log_text().count("Application startup complete.")
            if started >= server.workers and len(server.worker_pids()) == server.workers:
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name}: not ready after {STARTUP_TIMEOUT} s:\n" + server.log_text()
                )
            time.sleep(0.05)
