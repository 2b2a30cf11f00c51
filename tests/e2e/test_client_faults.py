"""Crashes under load, seen by the Python client with its DEFAULT settings.

Client threads call `OptimizerClient.step()` (default `RetryPolicy`, no test-specific
tuning) on three sessions of a 2-worker server on Redis started with its DEFAULT
idempotency lease, and a crash is caused while they run:

- a uvicorn worker holding client connections is killed with SIGKILL: its in-flight
  steps leave claims that lapse within one lease; retries meanwhile get 409 with
  `Retry-After`, which the client honours;
- Redis (AOF, fsync always) is killed with SIGKILL and restarted on its file: requests
  meanwhile get 503 with `Retry-After`, and claims taken just before the kill come back
  with the AOF and lapse within one lease.

Both show zero client-visible failures: every `step()` returns (no exception), each
session's versions are exactly 1..n across all its steps (nothing applied twice, none
lost), and its params are the core's serial replay of the gradients in version order,
bit for bit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from clients import OptimizerClient
from tests.api.support import core_run
from tests.support.live_server import LiveServer, start_server
from tests.support.redis_server import PrivateRedis

SESSIONS = 3
THREADS = 6
STEPS_PER_THREAD = 40
#: acknowledged steps before the crash
CRASH_AFTER = 60
ADAM = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.01}
SHAPES = {"w": (6, 4), "b": (4,)}
SEED = 99


@dataclass(frozen=True)
class Done:
    session: int
    thread: int
    index: int
    version: int

    def grads(self) -> dict[str, np.ndarray]:
        return grads_of(self.thread, self.index)


def grads_of(thread: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, thread, index])
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def _serving_worker(server: LiveServer) -> int:
    """A worker pid holding an established client connection right now."""
    deadline = time.monotonic() + 10
    while True:
        for pid in server.worker_pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            if any(
                c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == server.port
                for c in conns
            ):
                return pid
        assert time.monotonic() < deadline, "no worker holds a client connection"
        time.sleep(0.001)


def storm(server: LiveServer, crash: Callable[[], None]) -> None:
    """Steps from THREADS default clients, `crash()` after CRASH_AFTER of them; then the
    checks of the module docstring."""
    rng = np.random.default_rng(SEED)
    initials = [
        {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
        for _ in range(SESSIONS)
    ]
    with OptimizerClient(server.base_url) as client:
        sids = [client.create_session(p, ADAM, dtype="float64").id for p in initials]

    lock = threading.Lock()
    done: list[Done] = []
    failures: list[BaseException] = []
    replays = [0]

    def run(t: int) -> None:
        session = t % SESSIONS
        try:
            with OptimizerClient(server.base_url) as client:  # default settings
                for i in range(STEPS_PER_THREAD):
                    r = client.step(sids[session], grads_of(t, i), return_="none")
                    with lock:
                        done.append(Done(session, t, i, r.version))
                        replays[0] += r.replayed
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    try:
        while len(done) < CRASH_AFTER:
            assert not failures, failures
            assert time.monotonic() < deadline, "the storm does not get going"
            time.sleep(0.002)
        crash()
    finally:
        for th in threads:
            th.join(timeout=180)
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    assert not failures, f"client-visible failures: {failures!r}"
    assert len(done) == THREADS * STEPS_PER_THREAD

    with OptimizerClient(server.base_url) as client:
        for session, sid in enumerate(sids):
            mine = sorted((d for d in done if d.session == session), key=lambda d: d.version)
            n = len(mine)
            assert [d.version for d in mine] == list(range(1, n + 1)), (
                f"session {session}: a version repeated or skipped"
            )
            doc = client.get_session(sid)
            assert (doc.step, doc.version, doc.doc["skipped"]) == (n, n, 0)
            got = client.get_params(sid).params
            expected, _ = core_run(ADAM, initials[session], [d.grads() for d in mine], "float64")
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], expected[-1][name], err_msg=name)
    print(f"{len(done)} steps, every one answered; {replays[0]} answered from the record")


@pytest.fixture
def default_server(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server("client-kill", tmp_path, workers=2, redis=private_redis)
    try:
        yield server
    finally:
        server.stop()


def test_worker_kill_default_client(default_server: LiveServer) -> None:
    victims: list[int] = []

    def kill_a_worker() -> None:
        victims.append(_serving_worker(default_server))
        os.kill(victims[0], signal.SIGKILL)

    storm(default_server, kill_a_worker)
    assert victims, "no worker was killed"
    assert default_server.proc.poll() is None, "the master died"


def test_redis_restart_default_client(persistent_redis: PrivateRedis, tmp_path: Path) -> None:
    server = start_server("client-redis-kill", tmp_path, workers=2, redis=persistent_redis)

    def restart_redis() -> None:
        persistent_redis.stop()  # SIGKILL
        time.sleep(1.0)
        persistent_redis.start()

    try:
        storm(server, restart_redis)
    finally:
        server.stop()
