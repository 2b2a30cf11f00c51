"""kill -9 of a uvicorn worker in the middle of a storm of steps.

Client threads send steps with idempotency keys to three sessions (Adam, float64) and
record which were acknowledged (200) and at which version; a worker that holds client
connections is killed with SIGKILL while they run (the master may start another).
Clients retry a step a few times on connection errors with the same key, then move
on; after the storm every key still unacknowledged is retried until it answers, so
every step ends acknowledged exactly once, including those that committed but whose
answer died with the worker. Then each session's version and step equal its number of
keys, the keys' versions are exactly 1..n, and its params are the core's serial replay
of those gradients in version order.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from tests.api.support import core_run
from tests.e2e.support import (
    BINARY,
    LiveServer,
    encode,
    read_params,
    session_doc,
    start_server,
)
from tests.support.redis_server import PrivateRedis

SESSIONS = 3
THREADS = 6
KEYS_PER_THREAD = 60
#: acknowledged steps before the kill
KILL_AFTER = 100
#: attempts at a step during the storm before the client leaves it for later (threads
#: of odd number leave a step for later at its first connection error)
ATTEMPTS = 3
ADAM = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.01}
SHAPES = {"w": (6, 4), "b": (4,)}
SEED = 4242


@pytest.fixture
def kill_server(private_redis: PrivateRedis, tmp_path: Path) -> Iterator[LiveServer]:
    # the killed worker's Idempotency-Key claim stays until it expires: keep it short
    server = start_server(
        "redis-kill",
        tmp_path,
        workers=2,
        redis=private_redis,
        env={"OPTSERVE_IDEMPOTENCY_LOCK_TTL": "5"},
    )
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Step:
    key: str
    session: int
    thread: int
    index: int

    def grads(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([SEED, self.thread, self.index])
        return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}

    def body(self) -> bytes:
        return encode(self.grads(), {"return": "none"})


def _post(client: httpx.Client, sid: str, step: Step) -> httpx.Response:
    return client.post(
        f"/v1/sessions/{sid}/step",
        content=step.body(),
        headers={"Content-Type": BINARY, "Idempotency-Key": step.key},
    )


def _serving_worker(server: LiveServer) -> int:
    """A worker pid that holds an established client connection right now."""
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


def _dead(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_kill_a_worker_mid_storm(kill_server: LiveServer) -> None:
    server = kill_server
    rng = np.random.default_rng(SEED)
    initials = [
        {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
        for _ in range(SESSIONS)
    ]
    with server.client() as c:
        sids = []
        for initial in initials:
            r = c.post(
                "/v1/sessions",
                content=encode(initial, {"optimizer": json.dumps(ADAM), "dtype": "float64"}),
                headers={"Content-Type": BINARY},
            )
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])

    lock = threading.Lock()
    acked: dict[str, int] = {}  # key -> version, from a 200
    pending: list[Step] = []
    steps: list[Step] = []
    unexpected: list[str] = []
    connection_errors = [0]
    storm_replays = [0]
    errors: list[BaseException] = []
    deadline = time.monotonic() + 90

    def run(t: int) -> None:
        session = t % SESSIONS
        try:
            with server.client(timeout=20.0) as client:
                for i in range(KEYS_PER_THREAD):
                    step = Step(f"storm-{t}-{i}-{uuid.uuid4()}", session, t, i)
                    with lock:
                        steps.append(step)
                    for _ in range(ATTEMPTS):
                        assert time.monotonic() < deadline, "out of time"
                        try:
                            r = _post(client, sids[session], step)
                        except httpx.TransportError:
                            with lock:
                                connection_errors[0] += 1
                            if t % 2:  # odd threads leave it for after the storm
                                with lock:
                                    pending.append(step)
                                break
                            time.sleep(0.02)
                            continue
                        if r.status_code == 200:
                            with lock:
                                acked[step.key] = r.json()["version"]
                                storm_replays[0] += r.headers.get("idempotent-replayed") == "true"
                            break
                        if r.status_code == 409 and r.json()["type"].endswith("key-in-flight"):
                            time.sleep(0.05)  # the killed worker's claim, until it expires
                            continue
                        with lock:
                            unexpected.append(f"{r.status_code} {r.text}")
                        break
                    else:
                        with lock:
                            pending.append(step)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    victim = None
    try:
        while len(acked) < KILL_AFTER:
            assert not errors, errors
            assert time.monotonic() < deadline, "the storm does not get going"
            time.sleep(0.002)
        victim = _serving_worker(server)
        os.kill(victim, signal.SIGKILL)
    finally:
        for th in threads:
            th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    if errors:
        raise errors[0]
    assert not unexpected, unexpected
    assert len(acked) + len(pending) == len(steps) == THREADS * KEYS_PER_THREAD
    assert victim is not None
    assert connection_errors[0] >= 1, "the kill interrupted no request"
    assert _dead(victim), f"worker {victim} survived SIGKILL"
    assert server.proc.poll() is None, "the master died"

    # every step not acknowledged yet: retried until it answers (applied once, or the
    # recorded answer of a commit whose reply was lost)
    replayed = 0
    with server.client(timeout=20.0) as client:
        for step in pending:
            while True:
                assert time.monotonic() < deadline + 60, f"{step.key} never answered"
                try:
                    r = _post(client, sids[step.session], step)
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if r.status_code == 200:
                    acked[step.key] = r.json()["version"]
                    replayed += r.headers.get("idempotent-replayed") == "true"
                    break
                assert r.status_code == 409, r.text
                assert r.json()["type"].endswith("key-in-flight"), r.text
                time.sleep(0.1)
        # and every acknowledged step replays its first answer's version
        for step in steps:
            r = _post(client, sids[step.session], step)
            assert r.status_code == 200, r.text
            assert r.headers["idempotent-replayed"] == "true"
            assert r.json()["version"] == acked[step.key], step

        for session, sid in enumerate(sids):
            mine = sorted(
                ((acked[s.key], s) for s in steps if s.session == session), key=lambda vs: vs[0]
            )
            n = len(mine)
            assert [v for v, _ in mine] == list(range(1, n + 1)), (
                f"session {session}: versions repeated or skipped"
            )
            doc = session_doc(client, sid)
            assert (doc["step"], doc["version"], doc["skipped"]) == (n, n, 0)
            got, meta = read_params(client, sid)
            assert meta == {"step": str(n), "version": str(n)}
            expected, _ = core_run(ADAM, initials[session], [s.grads() for _, s in mine], "float64")
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], expected[-1][name], err_msg=name)
    print(
        f"killed worker {victim}; {connection_errors[0]} connection errors; "
        f"{storm_replays[0]} replays during the storm; {len(pending)} steps left for "
        f"later ({replayed} of them had committed)"
    )
