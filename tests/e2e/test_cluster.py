"""Redis Cluster end to end: two `optserve serve --redis-url redis+cluster://...` processes
on a private 3-master cluster (tests/support/redis_cluster.py).

- 300 sessions created through both servers spread over all three masters (checked with
  `CLUSTER KEYSLOT` of each meta key against `CLUSTER SLOTS` ownership, `EXISTS` on the
  owner and `CLUSTER COUNTKEYSINSLOT` 0 on the other two).
- SGD (momentum, float64) steps alternating between the two servers on several sessions
  (in different slots, on different masters): every answer is the next version and its
  params equal the core's serial run bit for bit; both servers then read the same.
- The session count (`optserve_sessions` of /metrics, whose index is a sorted set in yet
  another slot) follows creates and deletes; a deleted session is gone on its node.

Skipped, saying why, when redis-server or redis-cli is not installed.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.support import core_run
from tests.e2e.support import BINARY, LiveServer, decode, encode, start_server
from tests.support.redis_cluster import PrivateCluster, redis_cluster_missing

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
SHAPES = {"w": (6, 4), "b": (4,)}
SESSIONS = 300
#: sessions stepped, and steps per session (alternating servers)
STEPPED = 6
STEPS = 50
SEED = 8


@dataclass(frozen=True)
class Setup:
    cluster: PrivateCluster
    a: LiveServer
    b: LiveServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = redis_cluster_missing()
    if reason:
        pytest.skip(reason)
    tmp = Path(tmp_path_factory.mktemp("cluster"))
    t0 = time.monotonic()
    cluster = PrivateCluster(tmp / "redis")
    cluster.start()
    print(f"\ncluster of 3 masters on {cluster.ports} ready in {time.monotonic() - t0:.1f} s")
    a = b = None
    try:
        # seeded with one node only: the servers learn the others from it
        url = f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
        a = start_server("cluster-a", tmp, redis_url=url)
        b = start_server("cluster-b", tmp, redis_url=url)
        yield Setup(cluster, a, b)
    finally:
        for server in (a, b):
            if server is not None:
                server.stop()
        cluster.stop()


def _owners(cluster: PrivateCluster) -> dict[int, int]:
    """slot -> port of the master that serves it."""
    client = cluster.client(cluster.ports[0])
    try:
        slots = client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    owners: dict[int, int] = {}
    for entry in slots:
        start, end, master = entry[0], entry[1], entry[2]
        port = int(master[1])
        for slot in range(int(start), int(end) + 1):
            owners[slot] = port
    assert len(owners) == 16384
    return owners


def _params(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, i])
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _grads(i: int, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, i, t, 1])
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _create(client: httpx.Client, i: int) -> str:
    r = client.post(
        "/v1/sessions",
        content=encode(
            _params(i),
            {"optimizer": '{"name": "sgd", "lr": 0.05, "momentum": 0.9}', "dtype": "float64"},
        ),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _count(client: httpx.Client) -> int:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    m = re.search(r"^optserve_sessions(?:\{[^}]*\})? (\S+)$", r.text, re.MULTILINE)
    assert m, r.text[:2000]
    return int(float(m.group(1)))


def test_sessions_spread_and_steps_through_two_servers(setup: Setup) -> None:
    cluster = setup.cluster
    owners = _owners(cluster)
    nodes = {p: cluster.client(p) for p in cluster.ports}
    try:
        with setup.a.client() as a, setup.b.client() as b:
            before = _count(a)
            t0 = time.monotonic()
            sids = [_create(a if i % 2 == 0 else b, i) for i in range(SESSIONS)]
            created_s = time.monotonic() - t0
            assert len(set(sids)) == SESSIONS

            # where each session lives: its meta key's slot, that slot's master
            where: dict[str, int] = {}
            for sid in sids:
                key = f"optserve:{{{sid}}}:meta"
                first = nodes[cluster.ports[0]]
                slot = int(first.execute_command("CLUSTER KEYSLOT", key))  # type: ignore[no-untyped-call]
                port = owners[slot]
                assert nodes[port].exists(key) == 1, (sid, port)
                for other in cluster.ports:  # (EXISTS there would answer MOVED)
                    if other != port:
                        node = nodes[other]
                        count = node.execute_command(  # type: ignore[no-untyped-call]
                            "CLUSTER COUNTKEYSINSLOT", slot
                        )
                        assert int(count) == 0, (sid, other)
                where[sid] = port
            spread = Counter(where.values())
            dbsize = {p: int(nodes[p].dbsize()) for p in cluster.ports}
            print(
                f"{SESSIONS} sessions created through 2 servers in {created_s:.1f} s; "
                f"sessions per master {dict(sorted(spread.items()))}; DBSIZE {dbsize}"
            )
            assert set(spread) == set(cluster.ports), spread
            assert all(n >= SESSIONS // 10 for n in spread.values()), spread

            assert _count(a) == before + SESSIONS
            assert _count(b) == before + SESSIONS

            # steps alternating A, B on sessions of every master
            stepped: list[int] = []
            for port in cluster.ports:
                stepped += [i for i, s in enumerate(sids) if where[s] == port][: STEPPED // 3]
            t0 = time.monotonic()
            steps = 0
            for t in range(STEPS):
                for n, i in enumerate(stepped):
                    client = a if (t + n) % 2 == 0 else b
                    r = client.post(
                        f"/v1/sessions/{sids[i]}/step",
                        content=encode(_grads(i, t), {"return": "params"}),
                        headers={"Content-Type": BINARY, "Accept": BINARY},
                    )
                    assert r.status_code == 200, r.text
                    _, meta = decode(r.content)
                    assert int(meta["version"]) == t + 1, (i, t, meta)
                    steps += 1
            step_s = time.monotonic() - t0
            for i in stepped:
                want, _ = core_run(SGD, _params(i), [_grads(i, t) for t in range(STEPS)], "float64")
                for client in (a, b):
                    r = client.get(f"/v1/sessions/{sids[i]}/params", headers={"Accept": BINARY})
                    assert r.status_code == 200, r.text
                    got, meta = decode(r.content)
                    assert int(meta["version"]) == STEPS
                    for name in SHAPES:
                        assert got[name].dtype == np.float64
                        np.testing.assert_array_equal(got[name], want[-1][name])
            print(
                f"{steps} SGD steps alternating the 2 servers on {len(stepped)} sessions "
                f"(masters {sorted({where[sids[i]] for i in stepped})}) in {step_s:.1f} s "
                f"({1000 * step_s / steps:.1f} ms/step); params equal the core's bit for bit"
            )

            # delete through either server; the count follows
            doomed = sids[:30]
            for n, sid in enumerate(doomed):
                r = (a if n % 2 else b).delete(f"/v1/sessions/{sid}")
                assert r.status_code == 204, r.text
                assert nodes[where[sid]].exists(f"optserve:{{{sid}}}:meta") == 0
                assert (b if n % 2 else a).get(f"/v1/sessions/{sid}").status_code == 404
            assert _count(a) == before + SESSIONS - len(doomed)
            assert _count(b) == before + SESSIONS - len(doomed)
            assert a.get("/readyz").status_code == 200
    finally:
        for node in nodes.values():
            node.close()
