"""The StateStore contract, run against both stores (MemoryStore and RedisStore)."""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from service.store.base import IdempotencyRecord, SessionBlobs, SessionMeta
from tests.store.conftest import CHUNK, Store

pytestmark = pytest.mark.asyncio

MB = 1_000_000


def make_meta(sid: str, version: int = 0, **changes: object) -> SessionMeta:
    meta = SessionMeta(
        id=sid,
        tenant="t1",
        version=version,
        step=version,
        spec={"optimizer": {"name": "adam", "lr": 0.001}, "layout": [["w", [2, 2]]]},
        created_at=1.0,
        updated_at=2.0,
        extra={"count": 0},
    )
    return meta.evolve(**changes) if changes else meta


def make_blobs(params_bytes: int = 1000, state_bytes: int = 3000) -> SessionBlobs:
    return SessionBlobs(os.urandom(params_bytes), os.urandom(state_bytes))


def record(key: str, body: bytes = b'{"step": 1}') -> IdempotencyRecord:
    return IdempotencyRecord(
        key=key,
        fingerprint="POST /v1/sessions/x/step sha256:abc",
        status=200,
        headers={"content-type": "application/json"},
        body=body,
    )


async def commit_next(
    store: Store,
    sid: str,
    blobs: SessionBlobs | None,
    ttl: int | None = None,
    idem: IdempotencyRecord | None = None,
    idem_ttl: int | None = None,
    history: bytes | None = None,
    history_limit: int = 0,
) -> SessionMeta:
    async with store.transaction(sid, ttl=ttl) as tx:
        loaded = await tx.load()
        assert loaded is not None
        meta = loaded[0]
        new = meta.evolve(version=meta.version + 1, step=meta.step + 1)
        assert await tx.commit(
            new, blobs, idem, idem_ttl, history=history, history_limit=history_limit
        )
    return new


# -- sessions ----------------------------------------------------------------------------


async def test_create_get_read_delete(store: Store) -> None:
    meta, blobs = make_meta("s1"), make_blobs()
    assert await store.get_meta("s1") is None
    assert await store.read("s1") is None
    await store.create(meta, blobs, ttl=60)
    assert await store.get_meta("s1") == meta
    assert await store.get_meta("s1", ttl=60) == meta
    assert await store.read("s1") == (meta, blobs)
    assert await store.count_sessions() == 1
    assert await store.delete("s1") is True
    assert await store.get_meta("s1") is None
    assert await store.read("s1") is None
    assert await store.delete("s1") is False
    assert await store.count_sessions() == 0


async def test_empty_blobs_round_trip(store: Store) -> None:
    meta, blobs = make_meta("s1"), SessionBlobs(b"", b"")
    await store.create(meta, blobs, ttl=None)
    assert await store.read("s1") == (meta, blobs)


async def test_handed_out_meta_cannot_change_the_store(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    got = await store.get_meta("s1")
    assert got is not None
    got.spec["optimizer"]["lr"] = 99.0
    got.extra["count"] = 99
    again = await store.get_meta("s1")
    assert again == make_meta("s1")


async def test_transaction_load_commit_bumps_version(store: Store) -> None:
    meta, blobs = make_meta("s1"), make_blobs()
    await store.create(meta, blobs, ttl=60)
    new_blobs = make_blobs()
    async with store.transaction("s1", ttl=60) as tx:
        loaded = await tx.load()
        assert loaded == (meta, blobs)
        new = meta.evolve(version=1, step=1, extra={"count": 1})
        assert await tx.commit(new, new_blobs) is True
    assert await store.read("s1") == (new, new_blobs)
    # blobs=None keeps the stored blobs
    newer = await commit_next(store, "s1", None)
    assert newer.version == 2
    assert await store.read("s1") == (newer, new_blobs)


async def test_load_skips_blobs_when_caller_holds_the_version(store: Store) -> None:
    meta, blobs = make_meta("s1"), make_blobs()
    await store.create(meta, blobs, ttl=60)
    await commit_next(store, "s1", blobs)
    async with store.transaction("s1") as tx:
        assert await tx.load(have_version=1) == (meta.evolve(version=1, step=1), None)
    async with store.transaction("s1") as tx:
        assert await tx.load(have_version=0) == (meta.evolve(version=1, step=1), blobs)


async def test_transaction_on_missing_session(store: Store) -> None:
    async with store.transaction("nope") as tx:
        assert await tx.load() is None
        with pytest.raises(RuntimeError):
            await tx.commit(make_meta("nope", 1), None)
    assert await store.get_meta("nope") is None


async def test_commit_refuses_a_wrong_version_or_id(store: Store) -> None:
    meta = make_meta("s1")
    await store.create(meta, make_blobs(), ttl=60)
    async with store.transaction("s1") as tx:
        await tx.load()
        with pytest.raises(ValueError, match="version"):
            await tx.commit(meta.evolve(version=2), None)
        with pytest.raises(ValueError, match="id"):
            await tx.commit(make_meta("s2", 1), None)
    assert await store.get_meta("s1") == meta


async def test_commit_loses_to_a_recreated_session(store: Store) -> None:
    """Delete + create behind a transaction's back (same id, same version 0: ABA)."""
    old, old_blobs = make_meta("s1"), make_blobs()
    await store.create(old, old_blobs, ttl=60)
    fresh, fresh_blobs = make_meta("s1", tenant="t2"), make_blobs()
    async with store.transaction("s1") as tx:
        assert await tx.load() == (old, old_blobs)
        assert await store.delete("s1")
        await store.create(fresh, fresh_blobs, ttl=60)
        assert await tx.commit(old.evolve(version=1), make_blobs()) is False
    assert await store.read("s1") == (fresh, fresh_blobs)


async def test_commit_loses_to_a_delete(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    async with store.transaction("s1") as tx:
        loaded = await tx.load()
        assert loaded is not None
        assert await store.delete("s1")
        assert await tx.commit(loaded[0].evolve(version=1), make_blobs()) is False
    assert await store.read("s1") is None
    assert await store.count_sessions() == 0


async def test_second_transaction_on_the_same_version(store: Store) -> None:
    """Two transactions load version 0; the first commit wins and the second gets False
    (Redis), or the second waits for the first and loads version 1 (memory: the session
    lock serializes transactions of one process)."""
    meta, blobs = make_meta("s1"), make_blobs()
    await store.create(meta, blobs, ttl=60)
    first_blobs, second_blobs = make_blobs(), make_blobs()
    second_loaded: list[int] = []
    second_result: list[bool] = []

    async def second() -> None:
        async with store.transaction("s1") as tx:
            loaded = await tx.load()
            assert loaded is not None
            second_loaded.append(loaded[0].version)
            await asyncio.sleep(0.05)  # the first commits meanwhile (when it can)
            new = loaded[0].evolve(version=loaded[0].version + 1, extra={"by": "second"})
            second_result.append(await tx.commit(new, second_blobs))

    async with store.transaction("s1") as tx:
        loaded = await tx.load()
        assert loaded == (meta, blobs)
        task = asyncio.create_task(second())
        await asyncio.sleep(0.02)  # the second loads now, if it can
        first = meta.evolve(version=1, extra={"by": "first"})
        assert await tx.commit(first, first_blobs) is True
    await task
    stored = await store.read("s1")
    if store.name == "redis":
        assert second_loaded == [0]
        assert second_result == [False]
        assert stored == (first, first_blobs)
    else:
        assert second_loaded == [1]
        assert second_result == [True]
        assert stored == (first.evolve(version=2, extra={"by": "second"}), second_blobs)


async def test_concurrent_increments_lose_nothing(store: Store) -> None:
    """Many tasks increment a counter in meta (and write blobs that say the same); each
    retries on a conflict. The count ends equal to the number of commits."""
    tasks, per_task = 16, 5
    await store.create(make_meta("s1"), SessionBlobs(b"", b""), ttl=60)
    commits = 0
    conflicts = 0

    def blobs_for(count: int) -> SessionBlobs:
        # several chunks each, so a torn read would show
        return SessionBlobs(struct.pack("<q", count) * (CHUNK // 4), b"s" * count)

    async def worker() -> None:
        nonlocal commits, conflicts
        for _ in range(per_task):
            while True:
                async with store.transaction("s1") as tx:
                    loaded = await tx.load()
                    assert loaded is not None
                    meta, blobs = loaded
                    count = meta.extra["count"]
                    if count:
                        assert blobs == blobs_for(count)
                    await asyncio.sleep(0)
                    new = meta.evolve(version=meta.version + 1, extra={"count": count + 1})
                    if await tx.commit(new, blobs_for(count + 1)):
                        commits += 1
                        break
                    conflicts += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    got = await store.read("s1")
    assert got is not None
    meta, blobs = got
    assert commits == tasks * per_task
    assert meta.extra["count"] == commits
    assert meta.version == commits
    assert blobs == blobs_for(commits)
    if store.name == "memory":
        assert conflicts == 0


async def test_blobs_larger_than_a_chunk(store: Store) -> None:
    meta, blobs = make_meta("s1"), make_blobs(MB, 3 * MB // 2)
    await store.create(meta, blobs, ttl=60)
    assert await store.read("s1") == (meta, blobs)
    # shrink, then grow again: every version reads back whole
    for size in (CHUNK + 1, 10, 2 * MB + 3):
        new_blobs = make_blobs(size, size // 2)
        new = await commit_next(store, "s1", new_blobs)
        assert await store.read("s1") == (new, new_blobs)
        async with store.transaction("s1") as tx:
            assert await tx.load() == (new, new_blobs)


# -- idempotency -------------------------------------------------------------------------


async def test_idempotency_claim_release_record(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.get_idempotency("s1", "k1") is None
    assert await store.claim_idempotency("s1", "k1", ttl=60, token="a") is None
    left = await store.claim_idempotency("s1", "k1", ttl=60, token="b")
    assert left is not None
    assert 55 < left <= 60
    assert await store.claim_idempotency("s1", "k2", ttl=60, token="b") is None
    assert await store.claim_idempotency("s2", "k1", ttl=60, token="b") is None
    await store.release_idempotency("s1", "k1", "b")  # not b's claim: left alone
    assert await store.claim_idempotency("s1", "k1", ttl=60, token="c") is not None
    await store.release_idempotency("s1", "k1", "a")
    assert await store.claim_idempotency("s1", "k1", ttl=60, token="c") is None
    # the commit records the response and drops the claim, atomically with the step
    rec = record("k1", body=b"\x00binary\xff" * 100)
    await commit_next(store, "s1", make_blobs(), idem=rec, idem_ttl=60)
    assert await store.get_idempotency("s1", "k1") == rec
    assert await store.get_idempotency("s1", "k2") is None
    assert await store.get_idempotency("s2", "k1") is None
    assert await store.claim_idempotency("s1", "k1", ttl=60, token="d") is None
    # a deleted session takes its records along
    assert await store.delete("s1")
    assert await store.get_idempotency("s1", "k1") is None


async def test_idempotency_keys_are_opaque(store: Store) -> None:
    """A key that looks like another key's claim does not collide with it."""
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.claim_idempotency("s1", "a", ttl=60, token="t") is None
    rec = record("a:lock")
    await commit_next(store, "s1", None, idem=rec, idem_ttl=60)
    assert await store.get_idempotency("s1", "a:lock") == rec
    assert await store.claim_idempotency("s1", "a", ttl=60, token="u") is not None
    for key in ("%3A", "{x}", "ü/é ?*[]"):
        assert await store.claim_idempotency("s1", key, ttl=60, token="t") is None
        await commit_next(store, "s1", None, idem=record(key), idem_ttl=60)
        assert await store.get_idempotency("s1", key) == record(key)


async def test_idempotency_expiry(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.claim_idempotency("s1", "c", ttl=1, token="t") is None
    rec = record("r")
    await commit_next(store, "s1", None, idem=rec, idem_ttl=1)
    await commit_next(store, "s1", None, idem=record("long"), idem_ttl=60)
    assert await store.get_idempotency("s1", "r") == rec
    assert await store.claim_idempotency("s1", "c", ttl=1, token="u") is not None
    await asyncio.sleep(1.2)
    assert await store.get_idempotency("s1", "r") is None
    assert await store.get_idempotency("s1", "long") == record("long")
    assert await store.claim_idempotency("s1", "c", ttl=1, token="u") is None


async def test_idempotency_lease_renewal(store: Store) -> None:
    """A claim is a lease: its holder (and only its holder) renews it; once it lapses or
    is released, renewing fails and another request may claim the key."""
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.claim_idempotency("s1", "k", ttl=0.6, token="a") is None
    for _ in range(3):  # renewed well past its first lease
        await asyncio.sleep(0.3)
        assert await store.renew_idempotency("s1", "k", "a", 0.6)
        assert not await store.renew_idempotency("s1", "k", "b", 0.6)
    left = await store.claim_idempotency("s1", "k", ttl=0.6, token="b")
    assert left is not None
    assert 0 < left <= 0.6
    await asyncio.sleep(0.8)  # the holder stopped renewing (killed): the lease lapses
    assert not await store.renew_idempotency("s1", "k", "a", 0.6)
    assert await store.claim_idempotency("s1", "k", ttl=0.6, token="b") is None
    await store.release_idempotency("s1", "k", "b")
    assert not await store.renew_idempotency("s1", "k", "b", 0.6)
    assert await store.claim_idempotency("s1", "k", ttl=60, token="c") is None


# -- expiry ------------------------------------------------------------------------------


async def test_session_expires_when_idle(store: Store) -> None:
    await store.create(make_meta("short"), make_blobs(2 * CHUNK), ttl=1)
    await store.create(make_meta("forever"), make_blobs(), ttl=None)
    assert await store.count_sessions() == 2
    await asyncio.sleep(1.2)
    assert await store.get_meta("short") is None
    assert await store.read("short") is None
    async with store.transaction("short") as tx:
        assert await tx.load() is None
    assert await store.get_meta("forever") is not None
    assert await store.count_sessions() == 1


async def test_use_refreshes_the_idle_expiry(store: Store) -> None:
    """Sessions with a 2 s ttl, used at 1.2 s in four ways, live past 2 s and expire
    2 s after their use; an unused one expires at 2 s."""
    blobs = make_blobs(2 * CHUNK + 5, CHUNK)
    names = ["unused", "get_meta", "commit", "commit_keep_blobs", "load_only"]
    for name in names:
        await store.create(make_meta(name), blobs, ttl=2)
    await asyncio.sleep(1.2)
    assert await store.get_meta("get_meta", ttl=2) is not None
    await commit_next(store, "commit", blobs)
    await commit_next(store, "commit_keep_blobs", None)
    async with store.transaction("load_only") as tx:
        assert await tx.load(have_version=0) is not None
    await asyncio.sleep(1.2)  # 2.4 s after creation, 1.2 s after use
    assert await store.read("unused") is None
    for name in names[1:]:
        got = await store.read(name)
        assert got is not None, name
        assert got[1] == blobs, name
    assert await store.count_sessions() == 4
    await asyncio.sleep(1.0)  # 2.2 s after use
    for name in names:
        assert await store.get_meta(name) is None, name
    assert await store.count_sessions() == 0


async def test_transaction_ttl_overrides_the_created_ttl(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=None)
    await commit_next(store, "s1", make_blobs(), ttl=1)
    await asyncio.sleep(1.2)
    assert await store.get_meta("s1") is None


async def test_count_sessions(store: Store) -> None:
    for i in range(5):
        await store.create(make_meta(f"s{i}"), make_blobs(), ttl=60)
    assert await store.count_sessions() == 5
    await store.delete("s0")
    assert await store.count_sessions() == 4
    t0 = time.monotonic()
    for _ in range(20):
        assert await store.count_sessions() == 4
    assert time.monotonic() - t0 < 1.0


async def test_blobs_are_copied_in(store: Store) -> None:
    params, state = bytearray(b"p" * 1000), bytearray(b"s" * 2000)
    await store.create(make_meta("s1"), SessionBlobs(params, state), ttl=60)  # type: ignore[arg-type]
    params[:] = b"x" * 1000
    got = await store.read("s1")
    assert got is not None
    assert got[1] == SessionBlobs(b"p" * 1000, b"s" * 2000)
    assert isinstance(got[1].params, bytes)


async def test_a_failed_or_cancelled_transaction_releases_the_session(store: Store) -> None:
    meta, blobs = make_meta("s1"), make_blobs()
    await store.create(meta, blobs, ttl=60)

    async def failing() -> None:
        async with store.transaction("s1") as tx:
            await tx.load()
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await failing()
    loaded = asyncio.Event()

    async def stuck() -> None:
        async with store.transaction("s1") as tx:
            await tx.load()
            loaded.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(stuck())
    await loaded.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    new = await asyncio.wait_for(commit_next(store, "s1", None), 5)
    assert await store.read("s1") == (new, blobs)
    # a transaction object cannot be used after its block
    async with store.transaction("s1") as tx:
        await tx.load()
    with pytest.raises(RuntimeError):
        await tx.load()


async def test_recorded_reads_the_key_inside_the_transaction(store: Store) -> None:
    """A step re-checks its key in the transaction: a record committed by a retry while
    this step ran (its claim expired) is seen there, and the step answers from it."""
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    async with store.transaction("s1", ttl=60) as tx:
        assert await tx.load() is not None
        assert await tx.recorded("k") is None
    await commit_next(store, "s1", None, idem=record("k"), idem_ttl=60)
    async with store.transaction("s1", ttl=60) as tx:
        assert await tx.load() is not None
        found = await tx.recorded("k")
        assert found == record("k")


# -- history -----------------------------------------------------------------------------


def entry(i: int) -> bytes:
    return b'{"kind": "step", "step": %d}' % i


async def test_history_is_newest_first_and_trimmed_to_the_limit(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.history("s1", 10) == []
    for i in range(25):
        await commit_next(store, "s1", None, history=entry(i), history_limit=10)
        newest = min(i + 1, 10)
        assert await store.history("s1", 100) == [entry(j) for j in range(i, i - newest, -1)]
    assert await store.history("s1", 10) == [entry(j) for j in range(24, 14, -1)]
    # fewer than stored: the newest ones; more than stored: all of them
    assert await store.history("s1", 3) == [entry(24), entry(23), entry(22)]
    assert await store.history("s1", 1) == [entry(24)]
    assert await store.history("s1", 1000) == [entry(j) for j in range(24, 14, -1)]
    assert await store.history("s1", 0) == []
    # a smaller limit trims the older entries; a larger one keeps what is there and grows
    await commit_next(store, "s1", None, history=entry(25), history_limit=4)
    assert await store.history("s1", 100) == [entry(25), entry(24), entry(23), entry(22)]
    await commit_next(store, "s1", make_blobs(), history=entry(26), history_limit=6)
    assert await store.history("s1", 100) == [entry(j) for j in range(26, 21, -1)]


async def test_history_entries_are_opaque_bytes(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=None)
    entries = [b"", b"\x00\xff" * 1000, b'{"loss": 0.5}']
    for e in entries:
        await commit_next(store, "s1", None, history=e, history_limit=10)
    assert await store.history("s1", 10) == entries[::-1]


async def test_no_history_or_limit_zero_leaves_the_history_alone(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    await commit_next(store, "s1", None, history=entry(0), history_limit=5)
    await commit_next(store, "s1", None, history=entry(1), history_limit=5)
    await commit_next(store, "s1", make_blobs())
    await commit_next(store, "s1", None, history=None, history_limit=5)
    await commit_next(store, "s1", None, history=entry(99), history_limit=0)
    assert await store.history("s1", 10) == [entry(1), entry(0)]
    got = await store.get_meta("s1")
    assert got is not None
    assert got.version == 5
    # none at all yet: nothing is created
    await store.create(make_meta("s2"), make_blobs(), ttl=60)
    await commit_next(store, "s2", None, history=entry(0), history_limit=0)
    assert await store.history("s2", 10) == []


async def test_a_conflicting_commit_writes_no_history(store: Store) -> None:
    """The commit that loses (its session changed behind it) adds no entry."""
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    await commit_next(store, "s1", None, history=entry(0), history_limit=10)
    async with store.transaction("s1") as tx:
        loaded = await tx.load()
        assert loaded is not None
        # another transaction commits first (memory: the session lock keeps out other
        # transactions, so the session is deleted and created anew behind our back)
        if store.name == "redis":
            await commit_next(store, "s1", None, history=entry(1), history_limit=10)
        else:
            await store.delete("s1")
            await store.create(make_meta("s1"), make_blobs(), ttl=60)
        new = loaded[0].evolve(version=loaded[0].version + 1)
        assert await tx.commit(new, make_blobs(), history=entry(2), history_limit=10) is False
    expected = [entry(1), entry(0)] if store.name == "redis" else []
    assert await store.history("s1", 10) == expected


async def test_delete_and_create_drop_the_history(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    for i in range(3):
        await commit_next(store, "s1", None, history=entry(i), history_limit=10)
    assert len(await store.history("s1", 10)) == 3
    assert await store.delete("s1")
    assert await store.history("s1", 10) == []
    await store.create(make_meta("s1"), make_blobs(), ttl=60)
    assert await store.history("s1", 10) == []
    await commit_next(store, "s1", None, history=entry(7), history_limit=10)
    assert await store.history("s1", 10) == [entry(7)]


async def test_history_of_an_unknown_session_is_empty(store: Store) -> None:
    assert await store.history("nope", 10) == []
    assert await store.history("nope", 0) == []


async def test_history_expires_with_the_session(store: Store) -> None:
    await store.create(make_meta("s1"), make_blobs(), ttl=1)
    await commit_next(store, "s1", None, history=entry(0), history_limit=10)
    assert await store.history("s1", 10) == [entry(0)]
    await asyncio.sleep(1.2)
    assert await store.get_meta("s1") is None
    assert await store.history("s1", 10) == []


# -- listing -----------------------------------------------------------------------------


def ids(metas: list[SessionMeta]) -> list[str]:
    return [m.id for m in metas]


async def test_list_sessions_is_per_tenant_newest_first(store: Store) -> None:
    assert await store.list_sessions("t1", 10) == []
    for i, updated in enumerate([5.0, 9.0, 7.0, 3.0]):
        meta = make_meta(f"a{i}", created_at=float(i), updated_at=updated)
        await store.create(meta, make_blobs(), ttl=60)
    await store.create(make_meta("b0", tenant="t2", updated_at=100.0), make_blobs(), ttl=60)
    listed = await store.list_sessions("t1", 10)
    assert ids(listed) == ["a1", "a2", "a0", "a3"]
    assert listed[0] == make_meta("a1", created_at=1.0, updated_at=9.0)
    assert ids(await store.list_sessions("t2", 10)) == ["b0"]
    assert await store.list_sessions("t3", 10) == []
    # a tenant id of any text, hash-tag braces included, is a tenant of its own
    await store.create(make_meta("c0", tenant="{t1}:x/%"), make_blobs(), ttl=60)
    assert ids(await store.list_sessions("{t1}:x/%", 10)) == ["c0"]
    assert ids(await store.list_sessions("t1", 10)) == ["a1", "a2", "a0", "a3"]


async def test_list_sessions_limit(store: Store) -> None:
    for i in range(5):
        await store.create(make_meta(f"s{i}", updated_at=float(i)), make_blobs(), ttl=60)
    assert ids(await store.list_sessions("t1", 2)) == ["s4", "s3"]
    assert ids(await store.list_sessions("t1", 5)) == ["s4", "s3", "s2", "s1", "s0"]
    assert len(await store.list_sessions("t1", 1000)) == 5
    assert await store.list_sessions("t1", 0) == []


async def test_list_sessions_follows_commits(store: Store) -> None:
    await store.create(make_meta("old", updated_at=1.0), make_blobs(), ttl=60)
    await store.create(make_meta("new", updated_at=2.0), make_blobs(), ttl=60)
    assert ids(await store.list_sessions("t1", 10)) == ["new", "old"]
    async with store.transaction("old") as tx:
        loaded = await tx.load()
        assert loaded is not None
        assert await tx.commit(loaded[0].evolve(version=1, step=1, updated_at=3.0), None)
    listed = await store.list_sessions("t1", 10)
    assert ids(listed) == ["old", "new"]
    assert (listed[0].step, listed[0].updated_at) == (1, 3.0)


async def test_deleted_and_expired_sessions_are_not_listed(store: Store) -> None:
    await store.create(make_meta("kept", updated_at=1.0), make_blobs(), ttl=60)
    await store.create(make_meta("deleted", updated_at=2.0), make_blobs(), ttl=60)
    await store.create(make_meta("short", updated_at=3.0), make_blobs(), ttl=1)
    await store.create(make_meta("other", tenant="t2"), make_blobs(), ttl=1)
    assert ids(await store.list_sessions("t1", 10)) == ["short", "deleted", "kept"]
    assert await store.delete("deleted")
    assert ids(await store.list_sessions("t1", 10)) == ["short", "kept"]
    await asyncio.sleep(1.2)
    assert ids(await store.list_sessions("t1", 10)) == ["kept"]
    assert await store.list_sessions("t2", 10) == []
    # a new session of the id is listed again
    await store.create(make_meta("short", updated_at=4.0), make_blobs(), ttl=60)
    assert ids(await store.list_sessions("t1", 10)) == ["short", "kept"]
