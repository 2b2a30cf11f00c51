"""What only the Redis store has: its keys, chunking, atomicity against a killed
process, and outages of the Redis server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from service.store.base import SessionBlobs, StoreUnavailable
from service.store.redis_store import DamagedSession, RedisOptions, RedisStore
from tests.store.conftest import CHUNK, REDIS_URL
from tests.store.test_contract import commit_next, make_blobs, make_meta, record
from tests.support.redis_cluster import PrivateCluster
from tests.support.redis_server import PrivateRedis

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000


async def session_keys(raw: aioredis.Redis, store: RedisStore, sid: str) -> list[bytes]:
    pattern = store.keys.session(sid).replace("{", "\\{").replace("}", "\\}") + "*"
    return sorted([k async for k in raw.scan_iter(match=pattern, count=1000)])


async def snapshot(raw: aioredis.Redis, store: RedisStore, sid: str) -> dict[bytes, Any]:
    """Every key of the session and its value."""
    out: dict[bytes, Any] = {}
    for key in await session_keys(raw, store, sid):
        kind = await raw.type(key)
        if kind == b"string":
            out[key] = await raw.get(key)
        elif kind == b"hash":
            out[key] = await raw.hgetall(key)
        elif kind == b"zset":
            out[key] = await raw.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            out[key] = await raw.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
    return out


async def test_no_value_exceeds_chunk_bytes(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "big"
    blobs = make_blobs(MB, 3 * MB // 2)
    await redis_store.create(make_meta(sid), blobs, ttl=60)
    await commit_next(redis_store, sid, blobs, idem=record("k"), idem_ttl=60)
    keys = await session_keys(raw_redis, redis_store, sid)
    n_params = -(-MB // CHUNK)
    n_state = -(-(3 * MB // 2) // CHUNK)
    assert len([k for k in keys if b":params:" in k]) == n_params
    assert len([k for k in keys if b":state:" in k]) == n_state
    for key in keys:
        kind = await raw_redis.type(key)
        if kind == b"string":
            assert await raw_redis.strlen(key) <= CHUNK, key
        elif kind == b"hash":
            for name in await raw_redis.hkeys(key):
                assert await raw_redis.hstrlen(key, name) <= CHUNK, (key, name)
    # one slot for all of them: a commit works on a cluster
    assert len({key_slot(k) for k in keys}) == 1


async def test_history_key_is_a_list_in_the_session_slot(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "hist{x}"  # braces in the id: the session's tag still comes first
    await redis_store.create(make_meta(sid), make_blobs(2 * CHUNK, CHUNK), ttl=60)
    for i in range(5):
        await commit_next(redis_store, sid, None, history=b"e%d" % i, history_limit=3)
    key = redis_store.keys.history(sid)
    assert key == f"{redis_store.keys.prefix}:{{{sid}}}:history"
    assert await raw_redis.type(key) == b"list"
    assert await raw_redis.lrange(key, 0, -1) == [b"e4", b"e3", b"e2"]
    keys = await session_keys(raw_redis, redis_store, sid)
    assert key.encode() in keys
    assert len({key_slot(k) for k in keys}) == 1
    assert key_slot(key.encode()) == key_slot(redis_store.keys.meta(sid).encode())
    # the other keys of the session are what they were: a meta hash and chunks
    assert sorted(k for k in keys if k != key.encode()) == sorted(
        [
            redis_store.keys.meta(sid).encode(),
            *(redis_store.keys.params(sid, i).encode() for i in range(2)),
            redis_store.keys.state(sid, 0).encode(),
        ]
    )
    assert await redis_store.count_sessions() == 1


async def test_history_key_follows_the_session_ttl(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "hist-ttl"
    key = redis_store.keys.history(sid)
    await redis_store.create(make_meta(sid), make_blobs(), ttl=100)
    await commit_next(redis_store, sid, None, history=b"e0", history_limit=10)
    assert 90 < await raw_redis.ttl(key) <= 100
    # a commit without an entry, a get_meta(ttl=...), a transaction that only loads:
    # each refreshes the history's expiry with the chunks'
    await commit_next(redis_store, sid, None, ttl=200)
    assert 190 < await raw_redis.ttl(key) <= 200
    assert await redis_store.get_meta(sid, ttl=300) is not None
    assert 290 < await raw_redis.ttl(key) <= 300
    async with redis_store.transaction(sid, ttl=400) as tx:
        assert await tx.load() is not None
    assert 390 < await raw_redis.ttl(key) <= 400
    await commit_next(redis_store, sid, make_blobs(), ttl=500, history=b"e1", history_limit=10)
    for k in await session_keys(raw_redis, redis_store, sid):
        assert 490 < await raw_redis.ttl(k) <= 500, k
    # a session without ttl: its history does not expire either
    await redis_store.create(make_meta("forever"), make_blobs(), ttl=None)
    await commit_next(redis_store, "forever", None, history=b"e0", history_limit=10)
    assert await raw_redis.ttl(redis_store.keys.history("forever")) == -1
    # a transaction ttl on a session created without one applies to the history too
    await commit_next(redis_store, "forever", None, ttl=50, history=b"e1", history_limit=10)
    assert 40 < await raw_redis.ttl(redis_store.keys.history("forever")) <= 50
    assert await redis_store.delete(sid)
    assert await raw_redis.exists(key) == 0


async def test_shrinking_blobs_delete_surplus_chunks(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "shrink"
    await redis_store.create(make_meta(sid), make_blobs(MB, MB), ttl=60)
    small = make_blobs(CHUNK + 1, 10)
    await commit_next(redis_store, sid, small)
    keys = await session_keys(raw_redis, redis_store, sid)
    assert len([k for k in keys if b":params:" in k]) == 2
    assert len([k for k in keys if b":state:" in k]) == 1
    assert await redis_store.read(sid) == (make_meta(sid, 1), small)


async def test_every_key_expires_with_the_session(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "ttl"
    await redis_store.create(make_meta(sid), make_blobs(3 * CHUNK, CHUNK), ttl=100)
    await commit_next(
        redis_store,
        sid,
        None,
        ttl=200,
        idem=record("k"),
        idem_ttl=5000,
        history=b"e",
        history_limit=5,
    )
    assert await redis_store.claim_idempotency(sid, "c", ttl=30, token="t") is None
    for key in await session_keys(raw_redis, redis_store, sid):
        ttl = await raw_redis.ttl(key)
        if key.endswith(b":lock"):
            assert 25 < ttl <= 30, key
        elif b":idem" in key:
            assert 4990 < ttl <= 5000, key
        else:
            assert 190 < ttl <= 200, key
    # ttl=None at creation: nothing expires
    await redis_store.create(make_meta("forever"), make_blobs(3 * CHUNK, CHUNK), ttl=None)
    await commit_next(
        redis_store, "forever", make_blobs(2 * CHUNK, CHUNK), history=b"e", history_limit=5
    )
    for key in await session_keys(raw_redis, redis_store, "forever"):
        assert await raw_redis.ttl(key) == -1, key


async def test_delete_removes_every_key(redis_store: RedisStore, raw_redis: aioredis.Redis) -> None:
    sid = "gone"
    await redis_store.create(make_meta(sid), make_blobs(MB, MB), ttl=60)
    for i in range(3):
        await commit_next(
            redis_store, sid, None, idem=record(f"k{i}"), idem_ttl=60, history=b"e", history_limit=2
        )
    assert redis_store.keys.history(sid).encode() in await session_keys(raw_redis, redis_store, sid)
    assert await redis_store.delete(sid)
    assert await session_keys(raw_redis, redis_store, sid) == []
    assert await raw_redis.zcard(redis_store.keys.sessions()) == 0


async def test_an_evicted_chunk_is_reported_not_served(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    sid = "damaged"
    await redis_store.create(make_meta(sid), make_blobs(3 * CHUNK, CHUNK), ttl=60)
    await raw_redis.delete(redis_store.keys.params(sid, 1))
    with pytest.raises(DamagedSession):
        await redis_store.read(sid)
    with pytest.raises(DamagedSession):
        async with redis_store.transaction(sid) as tx:
            await tx.load()
    assert await redis_store.get_meta(sid) is not None


async def test_count_sessions_follows_expiry_and_refresh(redis_store: RedisStore) -> None:
    await redis_store.create(make_meta("a"), make_blobs(), ttl=1)
    await redis_store.create(make_meta("b"), make_blobs(), ttl=1)
    await redis_store.create(make_meta("c"), make_blobs(), ttl=None)
    assert await redis_store.count_sessions() == 3
    await asyncio.sleep(0.6)
    await commit_next(redis_store, "b", None, ttl=2)  # b now lives until ~2.6 s
    await asyncio.sleep(0.6)  # a expired, b's recorded expiry has passed but it lives
    assert await redis_store.count_sessions() == 2
    assert await redis_store.count_sessions() == 2


async def test_the_tenant_index_follows_create_delete_and_expiry(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    index = redis_store.keys.tenant_sessions("t1")
    assert index == f"{redis_store.keys.prefix}:tenant:t1:sessions"
    assert (
        redis_store.keys.tenant_sessions("{a}:b")
        == f"{redis_store.keys.prefix}:tenant:%7Ba%7D%3Ab:sessions"
    )
    for sid in ("a", "b", "c", "d"):
        await redis_store.create(make_meta(sid), make_blobs(), ttl=60)
    assert await raw_redis.zrange(index, 0, -1) == [b"a", b"b", b"c", b"d"]
    assert await redis_store.delete("a")
    assert await raw_redis.zrange(index, 0, -1) == [b"b", b"c", b"d"]
    # b and c are gone (expired) without a delete: c was indexed long ago, b just now
    # (as if its create were still in flight); the listing skips both, ZREMs only c
    await raw_redis.delete(redis_store.keys.meta("b"), redis_store.keys.meta("c"))
    await raw_redis.zadd(index, {"c": time.time() - 3600}, xx=True)
    assert [m.id for m in await redis_store.list_sessions("t1", 10)] == ["d"]
    assert await raw_redis.zrange(index, 0, -1) == [b"b", b"d"]


# -- atomicity against a killed process --------------------------------------------------


@pytest.mark.parametrize("mode", ["queued", "partial"])
async def test_killed_commit_leaves_the_old_version_whole(
    redis_store: RedisStore, raw_redis: aioredis.Redis, prefix: str, mode: str
) -> None:
    """A process killed (SIGKILL) inside a commit, with every write queued in the MULTI
    but no EXEC (`queued`), or half-way through writing the commit (`partial`), leaves
    the previous version readable and whole (its history included: the child's commit
    adds an entry); the next commit works."""
    sid = "victim"
    blobs = make_blobs(MB, MB // 2)
    await redis_store.create(make_meta(sid), blobs, ttl=60)
    meta = await commit_next(redis_store, sid, None, history=b"h0", history_limit=10)
    before = await snapshot(raw_redis, redis_store, sid)
    argv = [sys.executable, "-m", "tests.store._commit_child", REDIS_URL, prefix, sid]
    argv += [str(CHUNK), mode]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None
            assert child.stderr is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            if line != b"READY 1\n":
                child.kill()
                pytest.fail(f"the child did not stall: {line!r} {child.stderr.read()!r}")
            # stalled inside its commit: nothing of it is visible
            assert await redis_store.read(sid) == (meta, blobs)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    # Redis notices the closed connection and drops its MULTI / partial command
    for _ in range(50):
        clients = await raw_redis.client_list()
        if not any(c.get("multi", "-1") != "-1" for c in clients):
            break
        await asyncio.sleep(0.02)
    assert await snapshot(raw_redis, redis_store, sid) == before
    assert await redis_store.read(sid) == (meta, blobs)
    assert await redis_store.history(sid, 10) == [b"h0"]
    new_blobs = make_blobs(2 * CHUNK, 3 * CHUNK)
    new = await commit_next(redis_store, sid, new_blobs)
    assert await redis_store.read(sid) == (new, new_blobs)


# -- outage and recovery -----------------------------------------------------------------


async def test_outage_raises_store_unavailable_and_recovers(private_redis: PrivateRedis) -> None:
    store = RedisStore(
        private_redis.url,
        chunk_bytes=CHUNK,
        options=RedisOptions(socket_connect_timeout=0.5),
    )
    await store.open()
    try:
        meta, blobs = make_meta("s1"), make_blobs(MB, MB)
        await store.create(meta, blobs, ttl=60)
        assert await store.read("s1") == (meta, blobs)

        private_redis.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.get_meta("s1")
        with pytest.raises(StoreUnavailable):
            await store.read("s1")
        with pytest.raises(StoreUnavailable):
            await store.create(make_meta("s2"), blobs, ttl=60)
        with pytest.raises(StoreUnavailable):
            async with store.transaction("s1") as tx:
                await tx.load()
        with pytest.raises(StoreUnavailable):
            await store.claim_idempotency("s1", "k", ttl=60, token="t")
        with pytest.raises(StoreUnavailable):
            await store.get_idempotency("s1", "k")
        with pytest.raises(StoreUnavailable):
            await store.count_sessions()
        with pytest.raises(StoreUnavailable):
            await store.delete("s1")
        assert time.monotonic() - t0 < 5.0  # refused at once, no retry loops

        private_redis.start()  # same port, empty (no persistence)
        await store.ping()
        assert await store.get_meta("s1") is None
        await store.create(meta, blobs, ttl=60)
        assert await store.read("s1") == (meta, blobs)
        new = await commit_next(store, "s1", make_blobs(10, 10))
        assert (await store.get_meta("s1")) == new
    finally:
        await store.close()


async def test_outage_inside_a_transaction_is_unavailable_not_a_conflict(
    private_redis: PrivateRedis,
) -> None:
    """A commit whose connection dies may or may not have landed: StoreUnavailable (the
    client retries with its Idempotency-Key), never False (recompute, apply twice)."""
    store = RedisStore(
        private_redis.url,
        chunk_bytes=CHUNK,
        options=RedisOptions(socket_connect_timeout=0.5),
    )
    await store.open()
    try:
        await store.create(make_meta("s1"), make_blobs(), ttl=60)
        async with store.transaction("s1") as tx:
            loaded = await tx.load()
            assert loaded is not None
            private_redis.stop()
            with pytest.raises(StoreUnavailable):
                await tx.commit(loaded[0].evolve(version=1), make_blobs())
        private_redis.start()
        await store.create(make_meta("s1"), make_blobs(), ttl=60)
        assert (await commit_next(store, "s1", None)).version == 1
    finally:
        await store.close()


async def test_pool_connections_survive_a_restart(private_redis: PrivateRedis) -> None:
    """Pooled connections that were open when Redis restarted are replaced on use."""
    store = RedisStore(private_redis.url, chunk_bytes=CHUNK)
    await store.open()
    try:
        await asyncio.gather(*(store.ping() for _ in range(8)))  # several pooled connections
        private_redis.stop()
        private_redis.start()
        await asyncio.sleep(0.05)
        # all at once, so that every pooled connection is used
        await asyncio.gather(*(store.ping() for _ in range(8)))
        await asyncio.gather(
            *(store.create(make_meta(f"s{i}"), SessionBlobs(b"p", b"s"), ttl=60) for i in range(8))
        )
        assert await store.count_sessions() == 8
    finally:
        await store.close()


async def test_a_record_written_after_recorded_fails_the_commit(
    redis_store: RedisStore, raw_redis: aioredis.Redis
) -> None:
    """The record key is watched with meta: if another request records the same key
    between our read and our EXEC, our commit is a conflict and writes nothing."""
    sid = "race"
    meta = make_meta(sid)
    await redis_store.create(meta, make_blobs(), ttl=60)
    async with redis_store.transaction(sid, ttl=60) as tx:
        assert await tx.load() is not None
        assert await tx.recorded("k") is None
        await raw_redis.set(redis_store._keys.idem(sid, "k"), record("k").to_bytes())
        ok = await tx.commit(meta.evolve(version=1, step=1), None, record("k"), 60)
    assert ok is False
    stored = await redis_store.get_meta(sid)
    assert stored is not None
    assert stored.version == 0


async def test_cluster_moved_marks_the_slot_map_stale_and_recovers(
    private_cluster: PrivateCluster, prefix: str
) -> None:
    """A command sent to a node that does not serve its slot (an outdated slot map, as
    after a resharding or a failover) answers MOVED: the store raises StoreUnavailable
    once, reads the slot map again, and the next operation goes to the right node."""
    store = RedisStore(private_cluster.url, chunk_bytes=CHUNK, key_prefix=prefix)
    await store.open()
    try:
        sid = "moved"
        blobs = make_blobs(1000, 2000)
        await store.create(make_meta(sid), blobs, ttl=60)
        cluster = store._cluster
        assert cluster is not None
        assert not cluster.stale
        slot = key_slot(store.keys.meta(sid).encode())
        right = cluster._slots[slot]
        wrong = next(p for p in cluster.all_pools() if p is not right)

        async def in_a_transaction() -> None:
            async with store.transaction(sid) as tx:
                await tx.load()

        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get_meta(sid),
            in_a_transaction,
            lambda: store.delete(sid),
        ]
        for operation in operations:
            cluster._slots[slot] = wrong  # an outdated map
            with pytest.raises(StoreUnavailable, match="MovedError"):
                await operation()
            assert cluster.stale
            assert (await store.get_meta(sid)) is not None  # map read again: served
            assert cluster._slots[slot] is right
        await commit_next(store, sid, blobs)
        assert await store.count_sessions() == 1
        assert await store.delete(sid)
        assert await store.count_sessions() == 0
        for pool in store.pools():
            assert not pool._in_use_connections
    finally:
        await store.close()
        private_cluster.delete_prefix(prefix)
