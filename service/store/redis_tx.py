"""The version-checked update of one session in Redis (`RedisTx`, what
`RedisStore.transaction` yields): WATCH meta and read (`load`), MULTI ... EXEC the
commit (`commit`), on one dedicated connection for the transaction's whole life (see
`service.store.redis_store`'s "Transactions").
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    StoreUnavailable,
    check_commit,
)
from service.store.redis_layout import MAX_READ_ATTEMPTS, Commit, RedisLayout, Stored
from service.store.redis_wire import Command, check, connect, exchange


class RedisTx:
    """One version-checked update of one session (see `SessionTx`), on its own connection."""

    def __init__(self, store: RedisLayout, session_id: str, ttl: int | None) -> None:
        self._store = store
        self._sid = session_id
        self._ttl = ttl
        self._conn: aioredis.Connection | None = None
        self._pool: aioredis.ConnectionPool | None = None
        self._watching = False
        self._loaded = False
        self._stored: Stored | None = None
        self._done = False

    async def load(
        self, have_version: int | None = None
    ) -> tuple[SessionMeta, SessionBlobs | None] | None:
        if self._done:
            raise RuntimeError("this transaction is over; open a new one")
        store = self._store
        meta_key = store._keys.meta(self._sid)
        with store._unavailable():
            if self._conn is None:
                cluster = store._cluster
                pool = store._pool if cluster is None else await cluster.pool_for(meta_key)
                self._conn = await connect(pool)
                self._pool = pool
            conn = self._conn
            for _ in range(MAX_READ_ATTEMPTS):
                replies = check(await exchange(conn, [("WATCH", meta_key), ("HGETALL", meta_key)]))
                self._watching = True
                self._loaded = True
                raw = replies[1]
                if not raw:
                    self._stored = None
                    return None
                stored = self._stored = Stored(raw)
                if have_version is not None and have_version == stored.version:
                    return stored.meta(), None
                blobs = await store._read_blobs(conn, self._sid, stored)
                if blobs is not None:
                    return stored.meta(), blobs
                await exchange(conn, [("UNWATCH",)])
                self._watching = False
            raise StoreUnavailable(f"session {self._sid} kept changing while being read")

    async def recorded(self, key: str) -> IdempotencyRecord | None:
        if self._done or not self._watching or self._conn is None:
            raise RuntimeError("recorded() needs a loaded, open transaction")
        record_key = self._store._keys.idem(self._sid, key)
        with self._store._unavailable():
            # watched with meta: a record committed after this read fails our EXEC
            replies = check(
                await exchange(self._conn, [("WATCH", record_key), ("GET", record_key)])
            )
        data = replies[1]
        return None if data is None else IdempotencyRecord.from_bytes(data)

    async def commit(
        self,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        idempotency: IdempotencyRecord | None = None,
        idempotency_ttl: int | None = None,
        history: bytes | None = None,
        history_limit: int = 0,
    ) -> bool:
        stored = self._stored
        check_commit(
            done=self._done,
            loaded=self._loaded,
            found=stored is not None,
            session_id=self._sid,
            loaded_version=-1 if stored is None else stored.version,
            meta=meta,
        )
        assert stored is not None
        self._done = True
        store = self._store
        conn = self._conn
        assert conn is not None
        commit = Commit(meta, blobs, idempotency, idempotency_ttl, history, history_limit)
        commands, nbytes = store._commit_commands(self._sid, stored, self._ttl, commit)
        with store._unavailable():
            replies = await exchange(
                conn, [("MULTI",), *commands, ("EXEC",)], store._timeout(nbytes)
            )
            self._watching = False
            check(replies[:-1])
            result = replies[-1]
            if result is None:
                return False
            if isinstance(result, ResponseError):
                raise result
            check(result)
        return True

    async def _finish(self, failed: bool) -> None:
        """Give the connection back: refresh the expiry of a session loaded but not
        committed, unwatch; on an exception (or any trouble here) drop the connection."""
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        self._done = True
        if conn is None or pool is None:
            return
        store = self._store
        try:
            if failed:
                await conn.disconnect(nowait=True)
            elif self._watching:
                commands: list[Command] = [("UNWATCH",)]
                stored = self._stored
                if stored is not None:
                    ttl = stored.ttl if self._ttl is None else self._ttl
                    if ttl is not None:
                        touch = store._touch_commands(self._sid, stored, ttl)
                        commands += [("MULTI",), *touch, ("EXEC",)]
                await exchange(conn, commands)
        except Exception:
            await conn.disconnect(nowait=True)
        finally:
            await pool.release(conn)
