"""`RedisStore`: sessions in Redis (redis-py asyncio), committed atomically.

The commit mechanism was chosen by measuring (`benchmarks/store_commit.py`: meta plus a
4 MB params blob and an 8 MB state blob, local Redis 7.0, redis-py 8.1 asyncio,
hiredis 3.5, Python 3.11, a shared and busy 2-core machine; medians of 30-100 commits
per case; ranges over five runs):

    mechanism (parser=hiredis, packer=python)   median ms    x plain SETs (same run)
    WATCH meta / MULTI / HSET + SETs / EXEC      9.6 - 14.0   0.9 - 1.4 (mostly ~1.0)
    Lua script (EVALSHA) checks version, SETs   28.1 - 33.1   2.5 - 3.2
    plain pipelined HSET + SETs (not atomic)     9.0 - 13.5   1 (the floor)
    with the hiredis packer instead              2.0 - 3.2x slower (p90 up to 42 ms)
    with parser=python instead                   commits: same; 12 MB read ~5 % faster;
                                                 small replies (HGETALL) 10-35 % slower

So a commit is WATCH/MULTI/EXEC with plain SETs: atomic and version-checked at about
the cost of the non-atomic floor (the WATCH rides on the round trip that `load()` makes
anyway). The Lua script costs 2.2-3.2x as much, because the blobs are copied into Lua
strings and back out. The command packer is pure Python (`service.store.resp`, which
packs as redis-py asyncio's own packer does, for a third of its CPU on small
commands): it hands large values to the socket as separate buffers, where
`hiredis.pack_command` copies every command, blobs included, into one new bytes object
(2-3x slower and erratic). The reply parser stays hiredis (redis-py's default): a tie
on large values, faster on the many small replies. (`RedisOptions.parser` and
`RedisOptions.packer` choose otherwise.)

Layout (key names in `service.store.keys`; every key of a session carries the hash tag
`{<id>}`, so a commit touches one Cluster slot):

- `meta`, a hash: `json` (the `SessionMeta` JSON), `version`, `ttl` (the idle ttl the
  session was created with, -1: never), and for each blob its size and chunk count
  (`pb`/`pn` for params, `sb`/`sn` for state). Readers take the chunk counts from it.
- `params:<i>`, `state:<i>`: the blobs cut into chunks of at most `chunk_bytes`, so no
  value ever exceeds it (Redis refuses values over 512 MB, and big values stall it).
  A commit that shrinks a blob deletes the surplus chunks in the same MULTI.
- `idem:<key>` (the record, its own ttl), `idem:<key>:lock` (the in-flight claim: the
  holder's random token, a short lease that the holder renews while it works; renewal
  and release are compare-and-set scripts on the token) and `idems`, a sorted set of the
  recorded keys that `delete` uses.
- `history`, a list of history entries, newest first: a commit LPUSHes its entry and
  LTRIMs the list to the newest `history_limit` (`create` deletes any left by an
  earlier session of the same id).
- `<prefix>:sessions`, outside any session's slot: ids scored by their last known expiry,
  for `count_sessions` (below).
- `<prefix>:tenant:<tenant>:sessions`, outside any session's slot too: the ids of one
  tenant's sessions scored by creation time, for `list_sessions` (below).

Transactions: `transaction(sid)` takes a dedicated connection from the pool for its whole
life. `load()` sends WATCH meta + HGETALL meta in one round trip and, unless the caller's
cached version is current, GETs every chunk plus HGETALL meta again in a second; if meta
changed in between (a commit slipped in), it watches and reads again, so the blobs it
hands out are always those of the meta it hands out. `commit()` sends MULTI, HSET meta
(version + 1, chunk counts), SET of every chunk, DEL of surplus chunks, the idempotency
record (SET ... EX idempotency_ttl) and the DEL of its claim, the history entry (LPUSH,
LTRIM), the expiries, EXEC, in one write: EXEC answers nil if meta was touched since the
WATCH (commit returns False, nothing was written), and otherwise applies everything at
once. A process that dies before EXEC reaches Redis leaves the old version whole (Redis
discards a MULTI whose connection closes). A connection lost after EXEC was sent leaves
the outcome unknown: that is `StoreUnavailable`, never False (False would make the
caller recompute and possibly apply the gradient twice; with StoreUnavailable the
client retries with its Idempotency-Key and gets the recorded answer if the commit did
land).

Expiry: every key of a session (meta, chunks, history) is given the session's idle ttl
on use: by the commit's MULTI, by `get_meta(ttl=...)`, and at the end of a transaction
that loaded the session but did not commit (EXPIRE in a MULTI; a transaction with
`ttl=None` uses the ttl the session was created with; a commit PERSISTs the keys of a
session that has none). Idempotency records and claims keep their own ttl. Use
`maxmemory-policy noeviction`: an evicted chunk would damage a session (it is reported
as an error, never served).

Counting: `<prefix>:sessions` holds every id created (scored "check me now") until
`delete` removes it. `count_sessions` (for /metrics) checks only the ids whose score is
in the past: PTTL of their meta tells whether they still exist (ZREM if not) and until
when (the new score). An active session is checked about once per ttl, so a call costs
O(log n) plus the few sessions that expired or were refreshed since; never a SCAN.

Listing: `create` adds the id to its tenant's index and `delete` removes it, each with
a command of its own, like `<prefix>:sessions`. `list_sessions(tenant)` reads the index,
then the `json` field of every listed meta (HGET, `LIST_BATCH` per round trip), drops
the ids whose meta is gone (expired, or a crash between a delete's DEL and its ZREM)
and ZREMs them from the index (only those indexed more than `INDEX_GRACE` s ago: a
younger one may be a create in flight), and orders the rest by `updated_at`, which
changes with every step and so is in no index: a listing costs one meta read per
session of the tenant, whatever `limit` is.

Redis Cluster: a `redis+cluster://[user:password@]host:port[,host:port...]` url (any
masters or replicas of the cluster as seeds; database 0 only) selects cluster mode.
The store reads the slot map (`CLUSTER SLOTS`) on first use and keeps a connection pool
per master; each operation goes, on the store's own raw connections and with the very
same WATCH/MULTI/EXEC, to the master of its session's slot (every key of a session has
the session's hash tag, so a commit is single-node). `<prefix>:sessions` is in another
slot: `create` and `delete` update it with a command of its own on its own node (never
inside a session's MULTI, which would be CROSSSLOT; an index entry without a session is
dropped by the next count, as after any crash), and `count_sessions` sends the PTTLs of
the ids it checks to their nodes, one round trip per node. A tenant's index is handled
alike: on the node of its own key, and `list_sessions` sends the HGETs of the metas to
their nodes, one round trip per node. A MOVED or ASK reply, TRYAGAIN,
CLUSTERDOWN, MASTERDOWN or READONLY (a failed-over master), or a connection error, marks
the slot map stale and raises `StoreUnavailable` (the API answers 503 with Retry-After,
a client retries with its Idempotency-Key); the next operation reads the map again and
goes to the new owner. No redirection is followed within an operation: during a live
resharding, the sessions of a slot being migrated are unavailable until it is done.
`ping` PINGs every master. The single-node path (`redis://`) is unchanged: one pool,
one attribute test per operation.

Errors: `redis.exceptions.ConnectionError`/`TimeoutError`, `OSError` and asyncio timeouts
become `StoreUnavailable`; the failed connection is dropped and the pool opens a fresh
one on the next call, so the store recovers by itself when Redis comes back. Socket
timeouts grow with the bytes of an operation (`socket_timeout` plus the time to move
them at `min_throughput`), so a slow link does not time out a large commit.

Modules: this one holds `RedisStore` and its session reads and writes (create, get_meta,
read, transaction, delete); it is built on `redis_connection` (`RedisOptions`, pools,
round trips, errors), `redis_layout` (the meta hash, chunks and the commands of a
commit), `redis_tx` (the WATCH/MULTI/EXEC transaction), `redis_listing` (listing,
history, counting) and `redis_idempotency` (records and claims).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    SessionTx,
    StoreUnavailable,
)
from service.store.redis_connection import (
    DEFAULT_IDEMPOTENCY_TTL,
    MiB,
    Packer,
    Parser,
    RedisOptions,
)
from service.store.redis_idempotency import RedisIdempotency
from service.store.redis_layout import (
    MAX_READ_ATTEMPTS,
    Commit,
    DamagedSession,
    RedisLayout,
    Stored,
)
from service.store.redis_listing import INDEX_GRACE, LIST_BATCH, RedisListing
from service.store.redis_tx import RedisTx
from service.store.redis_wire import (
    UNAVAILABLE,
    Command,
    HiredisPackerConnection,
    check,
    connect,
    exchange,
)

if TYPE_CHECKING:
    from service.store.base import StateStore

__all__ = [
    "DEFAULT_IDEMPOTENCY_TTL",
    "INDEX_GRACE",
    "LIST_BATCH",
    "MAX_READ_ATTEMPTS",
    "UNAVAILABLE",
    "Command",
    "Commit",
    "DamagedSession",
    "HiredisPackerConnection",
    "IdempotencyRecord",
    "MiB",
    "Packer",
    "Parser",
    "RedisOptions",
    "RedisStore",
    "SessionBlobs",
    "SessionMeta",
    "StoreUnavailable",
    "check",
    "connect",
    "exchange",
]


class RedisStore(RedisLayout, RedisListing, RedisIdempotency):
    """Sessions in Redis (see the module docstring).

    `RedisStore(url, *, chunk_bytes=64 MiB, key_prefix=DEFAULT_PREFIX, options=None)`:
    `url` is redis://[user:password@]host:port/db (or rediss://, unix://), or
    redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster (the
    seed nodes; TLS is not supported there); `chunk_bytes` the largest value written
    (blobs are cut into chunks of it); `key_prefix` the start of every key (tests use a
    private one); `options` the tuning knobs (`RedisOptions`: timeouts, pool size, the
    idempotency ttl, the client's RESP parser and packer; None: the defaults). See
    `RedisConnection`.
    """

    name = "redis"

    # -- sessions --------------------------------------------------------------------

    async def create(self, meta: SessionMeta, blobs: SessionBlobs, ttl: int | None) -> None:
        sid = meta.id
        keys = self._keys
        # "check me at the next count": robust whatever happens to the MULTI
        now = time.time()
        index: Command = ("ZADD", keys.sessions(), now, sid)
        tenant_key = keys.tenant_sessions(meta.tenant)
        tenant_index: Command = ("ZADD", tenant_key, now, sid)
        commands: list[Command] = [
            ("MULTI",),
            # a new session starts with no history, whatever an old one of this id left
            ("DEL", keys.meta(sid), keys.history(sid)),
        ]
        body, nbytes = self._write_commands(sid, meta, blobs, None, ttl, ttl)
        commands += body
        commands.append(("EXEC",))
        if self._cluster is None:
            replies = await self._run([index, tenant_index, *commands], self._timeout(nbytes))
        else:  # the indexes live in other slots: a command of their own each, first
            await self._run_on(keys.sessions(), [index])
            await self._run_on(tenant_key, [tenant_index])
            replies = await self._run_on(keys.meta(sid), commands, self._timeout(nbytes))
        if not isinstance(replies[-1], list):
            raise RuntimeError(f"create of session {sid} failed: {replies[-1]!r}")
        check(replies[-1])

    async def get_meta(self, session_id: str, ttl: int | None = None) -> SessionMeta | None:
        meta_key = self._keys.meta(session_id)
        with self._unavailable():
            cluster = self._cluster
            pool = self._pool if cluster is None else await cluster.pool_for(meta_key)
            conn = await connect(pool)
            try:
                (raw,) = check(await exchange(conn, [("HGETALL", meta_key)]))
                if not raw:
                    return None
                stored = Stored(raw)
                if ttl is not None:
                    touch = self._touch_commands(session_id, stored, ttl)
                    check(await exchange(conn, [("MULTI",), *touch, ("EXEC",)]))
                return stored.meta()
            finally:
                await pool.release(conn)

    async def read(self, session_id: str) -> tuple[SessionMeta, SessionBlobs] | None:
        meta_key = self._keys.meta(session_id)
        with self._unavailable():
            cluster = self._cluster
            pool = self._pool if cluster is None else await cluster.pool_for(meta_key)
            conn = await connect(pool)
            try:
                for _ in range(MAX_READ_ATTEMPTS):
                    (raw,) = check(await exchange(conn, [("HGETALL", meta_key)]))
                    if not raw:
                        return None
                    stored = Stored(raw)
                    blobs = await self._read_blobs(conn, session_id, stored)
                    if blobs is not None:
                        return stored.meta(), blobs
            finally:
                await pool.release(conn)
        raise StoreUnavailable(f"session {session_id} kept changing while being read")

    @asynccontextmanager
    async def _transaction(self, session_id: str, ttl: int | None) -> AsyncIterator[SessionTx]:
        tx = RedisTx(self, session_id, ttl)
        try:
            yield tx
        except BaseException:
            await tx._finish(failed=True)
            raise
        else:
            await tx._finish(failed=False)

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]:
        """A version-checked update of `session_id` on a dedicated connection.

        `ttl`: idle expiry to refresh the session with (None: the ttl it was created
        with)."""
        return self._transaction(session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        keys = self._keys
        meta_key = keys.meta(session_id)
        index_key = keys.idem_index(session_id)
        with self._unavailable():
            cluster = self._cluster
            pool = self._pool if cluster is None else await cluster.pool_for(meta_key)
            conn = await connect(pool)
            deleted: bool | None = None
            unindex: list[tuple[str, Command]] = []
            try:
                for _ in range(MAX_READ_ATTEMPTS):
                    replies = check(
                        await exchange(
                            conn,
                            [
                                ("WATCH", meta_key, index_key),
                                ("HGETALL", meta_key),
                                ("ZRANGE", index_key, 0, -1),
                            ],
                        )
                    )
                    raw, idem_keys = replies[1], replies[2]
                    doomed = [meta_key, index_key, keys.history(session_id)]
                    if raw:
                        doomed += self._chunk_keys(session_id, Stored(raw))
                    doomed += [keys.idem(session_id, k.decode()) for k in idem_keys]
                    replies = await exchange(conn, [("MULTI",), ("DEL", *doomed), ("EXEC",)])
                    if replies[2] is not None:
                        check(replies)
                        deleted = bool(raw)
                        unindex = [(keys.sessions(), ("ZREM", keys.sessions(), session_id))]
                        if raw:
                            tenant_key = keys.tenant_sessions(Stored(raw).meta().tenant)
                            unindex.append((tenant_key, ("ZREM", tenant_key, session_id)))
                        if cluster is None:
                            check(await exchange(conn, [command for _, command in unindex]))
                            return deleted
                        break
            finally:
                await pool.release(conn)
        if deleted is not None:  # cluster: the indexes are in other slots, on their nodes
            for key, command in unindex:
                await self._run_on(key, [command])
            return deleted
        raise StoreUnavailable(f"session {session_id} kept changing while being deleted")


if TYPE_CHECKING:
    _check_protocol: StateStore = RedisStore("redis://")
