"""Two API replicas on one Redis: a session stepped through both computes what a single
process computes, and neither replica's in-memory state cache ever serves a stale version.

Replicas A and B are independent `optserve serve --workers 1` processes (own ports, own
caches) on one private redis-server. Each keeps the state of the version it last
committed or read; a step or a read through it must notice that the other replica has
stepped since (the stored version is newer) and read the session again.

- `test_steps_alternate_between_replicas`: Adam (weight decay, amsgrad: four state arrays
  and a step count that all matter) in float32 and float64. Session S is stepped A, B, A,
  B, ... then in a fixed random order of runs (A A B A B B B ...); session R gets the same
  gradients through A alone. After every step: S's answer is version i + 1 and its params
  equal R's answer and the core's serial run (`core_run`) bit for bit; then both A and B
  answer `GET params` (and the session document) with that version and those params.
- `test_concurrent_steps_through_two_replicas`: two client threads, one bound to A, one
  to B, step one session at random moments (with Idempotency-Keys), and read its params
  through their own replica now and then. The versions of all answers are exactly 1..n,
  each thread's strictly increase, and every answer (step or read) of version v holds the
  params of the core's serial run of the gradients in version order, up to v, bit for bit.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from tests.api.support import core_run
from tests.e2e.conftest import need_redis_server
from tests.e2e.support import BINARY, LiveServer, decode, encode, session_doc, start_server
from tests.support.redis_server import PrivateRedis, free_port

ADAM = {
    "name": "adam",
    "lr": 0.01,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "amsgrad": True,
}
SHAPES = {"w": (16, 8), "b": (8,)}
SEED = 777
#: steps of the sequential test: alternating first, then random runs
ALTERNATE = 20
RANDOM_RUNS = 30
#: steps per thread of the concurrent test
PER_THREAD = 40


@dataclass(frozen=True)
class Replicas:
    a: LiveServer
    b: LiveServer


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two `optserve serve --workers 1` processes on one private redis-server."""
    need_redis_server()
    tmp = tmp_path_factory.mktemp("replicas")
    redis = PrivateRedis(free_port())
    redis.start()
    a = b = None
    try:
        a = start_server("replica-a", tmp, workers=1, redis=redis)
        b = start_server("replica-b", tmp, workers=1, redis=redis)
        assert a.port != b.port
        assert a.proc.pid != b.proc.pid
        yield Replicas(a, b)
    finally:
        for server in (a, b):
            if server is not None:
                server.stop()
        redis.stop()


def _grads(tag: int, i: int, dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, tag, i])
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def _create(client: httpx.Client, initial: Mapping[str, np.ndarray], dtype: str) -> str:
    r = client.post(
        "/v1/sessions",
        content=encode(initial, {"optimizer": json.dumps(ADAM), "dtype": dtype}),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _step(
    client: httpx.Client, sid: str, grads: Mapping[str, np.ndarray], key: str | None = None
) -> httpx.Response:
    headers = {"Content-Type": BINARY, "Accept": BINARY}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(
        f"/v1/sessions/{sid}/step", content=encode(grads, {"return": "params"}), headers=headers
    )


def _answer(r: httpx.Response) -> tuple[int, dict[str, np.ndarray]]:
    """The version and params of a binary step answer or params read."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == BINARY
    tensors, meta = decode(r.content)
    return int(meta["version"]), tensors


def _read(client: httpx.Client, sid: str) -> tuple[int, dict[str, np.ndarray]]:
    return _answer(client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY}))


def _same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], what: str) -> None:
    """Bit for bit: same names, dtypes, shapes and values."""
    assert set(got) == set(want), what
    for name in want:
        assert got[name].dtype == want[name].dtype, (what, name, got[name].dtype)
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


def _initial(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, 0])
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_alternate_between_replicas(replicas: Replicas, dtype: str) -> None:
    t0 = time.monotonic()
    order = ["a", "b"] * (ALTERNATE // 2)
    rnd = random.Random(SEED)
    for _ in range(RANDOM_RUNS):  # runs of 1 to 3 steps on one replica: cache hits too
        order += [rnd.choice("ab")] * rnd.randint(1, 3)
    n = len(order)
    initial = _initial(dtype)
    grads = [_grads(1, i, dtype) for i in range(n)]
    serial, _ = core_run(ADAM, initial, grads, dtype)
    switches = sum(x != y for x, y in itertools.pairwise(order))

    with replicas.a.client() as a, replicas.b.client() as b:
        by_name = {"a": a, "b": b}
        sid = _create(a, initial, dtype)  # stepped through both
        ref = _create(a, initial, dtype)  # stepped through A alone
        v0, p0 = _read(b, sid)
        assert v0 == 0
        _same(p0, initial, "B reads the new session")
        for i, name in enumerate(order):
            version, params = _answer(_step(by_name[name], sid, grads[i]))
            assert version == i + 1, f"step {i} through {name}: version {version}"
            ref_version, ref_params = _answer(_step(a, ref, grads[i]))
            assert ref_version == i + 1
            _same(ref_params, serial[i], f"step {i}: single replica vs core")
            _same(params, ref_params, f"step {i} through {name}: two replicas vs one")
            # both replicas now serve this version, whichever took the step
            for reader, client in (("a", a), ("b", b)):
                got_version, got = _read(client, sid)
                assert got_version == i + 1, f"step {i}: {reader} reads version {got_version}"
                _same(got, serial[i], f"step {i} through {name}: params read through {reader}")
                doc = session_doc(client, sid)
                assert (doc["version"], doc["step"]) == (i + 1, i + 1), (reader, doc)
    print(
        f"\nreplicas ({dtype}): {n} steps through A and B ({switches} switches of "
        f"replica), each equal bit for bit to one replica's and the core's; "
        f"{time.monotonic() - t0:.1f} s"
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_concurrent_steps_through_two_replicas(replicas: Replicas, dtype: str) -> None:
    t0 = time.monotonic()
    initial = _initial(dtype)
    with replicas.a.client() as c:
        sid = _create(c, initial, dtype)

    lock = threading.Lock()
    #: (version, thread, index) of every step answer, and the params answered
    answers: list[tuple[int, int, int]] = []
    answered: dict[int, dict[str, np.ndarray]] = {}
    reads: list[tuple[int, int, dict[str, np.ndarray]]] = []  # (thread, version, params)
    conflicts = [0, 0]
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def run(t: int, server: LiveServer) -> None:
        rnd = random.Random(SEED + t)
        last = 0
        try:
            with server.client() as client:
                for i in range(PER_THREAD):
                    time.sleep(rnd.random() * 0.01)
                    key = f"replica-{t}-{i}-{uuid.uuid4()}"
                    while True:
                        assert time.monotonic() < deadline, "out of time"
                        r = _step(client, sid, _grads(10 + t, i, dtype), key)
                        if r.status_code != 409:
                            break
                        # the other replica kept committing first: nothing applied, retry
                        assert r.json()["type"].endswith("version-conflict"), r.text
                        conflicts[t] += 1
                    version, params = _answer(r)
                    assert version > last, f"thread {t}: version {version} after {last}"
                    last = version
                    with lock:
                        answers.append((version, t, i))
                        answered[version] = params
                    if rnd.random() < 0.3:
                        version, params = _read(client, sid)
                        assert version >= last, f"thread {t} reads {version} after {last}"
                        with lock:
                            reads.append((t, version, params))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(t, server))
        for t, server in enumerate((replicas.a, replicas.b))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=90)
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    if errors:
        raise errors[0]

    n = 2 * PER_THREAD
    answers.sort()
    assert [v for v, _, _ in answers] == list(range(1, n + 1)), "versions repeated or skipped"
    grads = [_grads(10 + t, i, dtype) for _, t, i in answers]
    serial, _ = core_run(ADAM, initial, grads, dtype)
    for v in range(1, n + 1):
        _same(answered[v], serial[v - 1], f"step answer of version {v}")
    for t, v, params in reads:
        assert 1 <= v <= n
        _same(params, serial[v - 1], f"thread {t} read of version {v}")
    with replicas.a.client() as a, replicas.b.client() as b:
        for name, client in (("a", a), ("b", b)):
            version, params = _read(client, sid)
            assert version == n, (name, version)
            _same(params, serial[-1], f"final params read through {name}")
            doc = session_doc(client, sid)
            assert (doc["version"], doc["step"]) == (n, n)
    threads_by_version = [t for _, t, _ in answers]
    switches = sum(x != y for x, y in itertools.pairwise(threads_by_version))
    assert switches >= 5, f"the replicas hardly interleaved: {threads_by_version}"
    print(
        f"\nreplicas concurrent ({dtype}): {n} steps, {switches} switches of replica in "
        f"version order, {len(reads)} reads, {sum(conflicts)} version conflicts "
        f"answered 409 (retried); all bit for bit the core's serial run; "
        f"{time.monotonic() - t0:.1f} s"
    )
