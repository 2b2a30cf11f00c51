"""Fixtures of the store tests: both stores behind one parametrized `store` fixture.

The Redis store runs against the Redis at `OPTSERVE_TEST_REDIS_URL` (default
redis://127.0.0.1:6379/0) under a key prefix private to each test, whose keys are
deleted afterwards; its tests are skipped, saying why, when that Redis does not answer.
The contract tests also run against a private 3-master Redis Cluster (`redis+cluster://`,
started once per pytest process, tests/support/redis_cluster.py; skipped when
redis-server or redis-cli is missing).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from service.store.memory import MemoryStore
from service.store.redis_store import RedisStore
from tests.support.redis_cluster import PrivateCluster, redis_cluster_missing

REDIS_URL = os.environ.get("OPTSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: chunk size of the stores under test: small, so that 1 MB blobs take many chunks
CHUNK = 64 * 1024

Store = MemoryStore | RedisStore


def _redis_answers(url: str) -> str | None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except Exception as exc:
        return f"no Redis at {url}: {exc}"
    return None


_REDIS_DOWN = _redis_answers(REDIS_URL)


@pytest.fixture
def prefix() -> str:
    """A key prefix private to this test."""
    return f"optserve-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_keys(prefix: str) -> Iterator[redis.Redis]:
    """A plain sync client of the test Redis (skipped if it does not answer); deletes the
    test's keys at the end."""
    if _REDIS_DOWN:
        pytest.skip(_REDIS_DOWN)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest_asyncio.fixture
async def raw_redis(redis_keys: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    """A plain asyncio client of the test Redis."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def private_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A 3-master Redis Cluster for this pytest process (skipped if it cannot start)."""
    reason = redis_cluster_missing()
    if reason:
        pytest.skip(reason)
    cluster = PrivateCluster(Path(tmp_path_factory.mktemp("store-cluster")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest_asyncio.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Store]:
    """Each store under test, open; the Redis ones under the test's private prefix."""
    s: Store
    cluster: PrivateCluster | None = None
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "redis":
        request.getfixturevalue("redis_keys")
        s = RedisStore(REDIS_URL, chunk_bytes=CHUNK, key_prefix=prefix)
    else:
        cluster = request.getfixturevalue("private_cluster")
        s = RedisStore(cluster.url, chunk_bytes=CHUNK, key_prefix=prefix)
        assert s.cluster
    await s.open()
    try:
        yield s
        if isinstance(s, RedisStore):
            for pool in s.pools():
                assert not pool._in_use_connections, "a connection was not given back"
    finally:
        await s.close()
        if cluster is not None:
            cluster.delete_prefix(prefix)


@pytest_asyncio.fixture
async def redis_store(prefix: str, redis_keys: redis.Redis) -> AsyncIterator[RedisStore]:
    """The Redis store alone (for tests that look at Redis' keys)."""
    s = RedisStore(REDIS_URL, chunk_bytes=CHUNK, key_prefix=prefix)
    await s.open()
    try:
        yield s
        assert not s._pool._in_use_connections, "a connection was not given back"
    finally:
        await s.close()
