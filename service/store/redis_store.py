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
on large values, faster on the many small replies. (`parser=` and `packer=` choose
otherwise.)

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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ResponseError,
)
from redis.maint_notifications import MaintNotificationsConfig

from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    SessionTx,
    StoreUnavailable,
    check_commit,
    newest_first,
)
from service.store.cluster import (
    CLUSTER_TROUBLE,
    ClusterMap,
    is_cluster_url,
    parse_cluster_url,
)
from service.store.keys import DEFAULT_PREFIX, Keys
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

MiB = 1 << 20
#: idempotency records are kept this long when `commit` is given no ttl (seconds)
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600
#: how often `load`/`read` read again when a commit keeps slipping in between
MAX_READ_ATTEMPTS = 100
#: `list_sessions` drops an id without a meta from its tenant's index only when it was
#: indexed longer ago than this (seconds): a younger one may be a `create` in flight,
#: whose index entry is written before its MULTI
INDEX_GRACE = 300.0
#: metas read per round trip by `list_sessions`
LIST_BATCH = 1000

Parser = Literal["hiredis", "python"]
Packer = Literal["python", "hiredis"]


class DamagedSession(RuntimeError):
    """A session's meta names a chunk that is missing or of the wrong size (evicted?)."""


#: extend / drop an idempotency claim only while it is still the caller's (its token)
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def _millis(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _int(value: Any, default: int = 0) -> int:
    return default if value is None else int(value)


def _field(meta: dict[Any, Any], name: str) -> Any:
    return meta.get(name.encode())


def _expire(names: Iterable[str], ttl: int | None) -> list[Command]:
    """Commands that make the keys `names` expire after `ttl` seconds (None: never)."""
    if ttl is None:
        return [("PERSIST", k) for k in names]
    return [("EXPIRE", k, ttl) for k in names]


def _chunks(blob: bytes, chunk_bytes: int) -> list[memoryview]:
    view = memoryview(blob)
    return [view[i : i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]


class _Stored:
    """What the meta hash says about a session."""

    __slots__ = ("meta_json", "pb", "pn", "raw", "sb", "sn", "ttl", "version")

    def __init__(self, raw: dict[Any, Any]) -> None:
        self.raw = raw
        self.meta_json: bytes = _field(raw, "json")
        self.version = _int(_field(raw, "version"))
        ttl = _int(_field(raw, "ttl"), -1)
        self.ttl: int | None = None if ttl < 0 else ttl
        self.pb = _int(_field(raw, "pb"))
        self.pn = _int(_field(raw, "pn"))
        self.sb = _int(_field(raw, "sb"))
        self.sn = _int(_field(raw, "sn"))

    def meta(self) -> SessionMeta:
        return SessionMeta.from_json(self.meta_json)


class _RedisTx:
    """One version-checked update of one session (see `SessionTx`), on its own connection."""

    def __init__(self, store: RedisStore, session_id: str, ttl: int | None) -> None:
        self._store = store
        self._sid = session_id
        self._ttl = ttl
        self._conn: aioredis.Connection | None = None
        self._pool: aioredis.ConnectionPool | None = None
        self._watching = False
        self._loaded = False
        self._stored: _Stored | None = None
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
                stored = self._stored = _Stored(raw)
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
        commands, nbytes = store._commit_commands(
            self._sid,
            stored,
            meta,
            blobs,
            self._ttl,
            idempotency=idempotency,
            idempotency_ttl=idempotency_ttl,
            history=history,
            history_limit=history_limit,
        )
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


class RedisStore:
    """Sessions in Redis (see the module docstring).

    `url`: redis://[user:password@]host:port/db (or rediss://, unix://), or
    redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster (the
    seed nodes; TLS is not supported there). `chunk_bytes`:
    largest value written (blobs are cut into chunks of it). `key_prefix`: start of every
    key (tests use a private one). `socket_timeout`: seconds allowed for a small
    operation; large ones get `nbytes / min_throughput` more. `health_check_interval`:
    a pooled connection idle that long is PINGed before use. `parser`/`packer`: the
    client's RESP reply parser and command packer (the defaults are the measured
    fastest, see the module docstring).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        chunk_bytes: int = 64 * MiB,
        key_prefix: str = DEFAULT_PREFIX,
        idempotency_ttl: int = DEFAULT_IDEMPOTENCY_TTL,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        min_throughput: float = 50e6,
        health_check_interval: float = 30.0,
        max_connections: int | None = None,
        parser: Parser = "hiredis",
        packer: Packer = "python",
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self._url = url
        self._chunk_bytes = chunk_bytes
        self._keys = Keys(key_prefix)
        self._default_idempotency_ttl = idempotency_ttl
        self._socket_timeout = socket_timeout
        self._min_throughput = min_throughput
        kwargs: dict[str, Any] = {
            "connection_class": (
                HiredisPackerConnection if packer == "hiredis" else aioredis.Connection
            ),
            "parser_class": _AsyncHiredisParser if parser == "hiredis" else _AsyncRESP3Parser,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "socket_keepalive": True,
            "health_check_interval": health_check_interval,
            # No retries inside redis-py: an unreachable Redis is reported at once (the
            # API answers 503 with Retry-After), and a lost EXEC is never re-sent.
            "retry": Retry(NoBackoff(), 0),
            "client_name": "optserve",
            # Off (they are for Redis Enterprise/Cloud): when on, and with redis-py's
            # default "auto" they count as on, the pool stops checking a pooled
            # connection for EOF before handing it out, so connections that were open
            # when Redis restarted would fail once each instead of being replaced.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        }
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        #: cluster mode: the slot -> node map and a pool per node (None: one Redis)
        self._cluster: ClusterMap | None = None
        if is_cluster_url(url):
            seeds, auth = parse_cluster_url(url)
            self._cluster = ClusterMap(seeds, {**kwargs, **auth})
            # the first seed's pool: what `ping` uses before the map is known
            self._pool = self._cluster.node_pool(*seeds[0])
        else:
            self._pool = aioredis.ConnectionPool.from_url(url, **kwargs)

    @property
    def keys(self) -> Keys:
        return self._keys

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        await self.ping()

    async def close(self) -> None:
        if self._cluster is None:
            await self._pool.aclose()
        else:
            await self._cluster.aclose()

    async def ping(self) -> None:
        cluster = self._cluster
        if cluster is None:
            await self._run([("PING",)])
            return
        with self._unavailable():  # every master, each on its own connection
            pools = await cluster.masters()
            await asyncio.gather(*(self._run_in(p, [("PING",)]) for p in pools))

    @property
    def cluster(self) -> bool:
        """Whether this store talks to a Redis Cluster (a `redis+cluster://` url)."""
        return self._cluster is not None

    def pools(self) -> list[aioredis.ConnectionPool]:
        """Every connection pool of the store (one per node on a cluster; for tests)."""
        return [self._pool] if self._cluster is None else self._cluster.all_pools()

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
                stored = _Stored(raw)
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
                    stored = _Stored(raw)
                    blobs = await self._read_blobs(conn, session_id, stored)
                    if blobs is not None:
                        return stored.meta(), blobs
            finally:
                await pool.release(conn)
        raise StoreUnavailable(f"session {session_id} kept changing while being read")

    @asynccontextmanager
    async def _transaction(self, session_id: str, ttl: int | None) -> AsyncIterator[SessionTx]:
        tx = _RedisTx(self, session_id, ttl)
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
                        doomed += self._chunk_keys(session_id, _Stored(raw))
                    doomed += [keys.idem(session_id, k.decode()) for k in idem_keys]
                    replies = await exchange(conn, [("MULTI",), ("DEL", *doomed), ("EXEC",)])
                    if replies[2] is not None:
                        check(replies)
                        deleted = bool(raw)
                        unindex = [(keys.sessions(), ("ZREM", keys.sessions(), session_id))]
                        if raw:
                            tenant_key = keys.tenant_sessions(_Stored(raw).meta().tenant)
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

    async def list_sessions(self, tenant: str, limit: int) -> list[SessionMeta]:
        if limit <= 0:
            return []
        index = self._keys.tenant_sessions(tenant)
        now = time.time()
        listed, old = await self._run_on(
            index,
            [("ZRANGE", index, 0, -1), ("ZRANGE", index, "-inf", now - INDEX_GRACE, "BYSCORE")],
        )
        prunable = set(old)
        metas: list[SessionMeta] = []
        gone: list[bytes] = []
        for start in range(0, len(listed), LIST_BATCH):
            batch = listed[start : start + LIST_BATCH]
            meta_keys = [self._keys.meta(sid.decode()) for sid in batch]
            commands: list[Command] = [("HGET", k, "json") for k in meta_keys]
            if self._cluster is None:
                found = await self._run(commands)
            else:
                found = await self._run_each(meta_keys, commands)
            for sid, data in zip(batch, found, strict=True):
                if data is None:
                    if sid in prunable:
                        gone.append(sid)
                    continue
                meta = SessionMeta.from_json(data)
                if meta.tenant == tenant:
                    metas.append(meta)
        if gone:
            await self._run_on(index, [("ZREM", index, *gone)])
        return newest_first(metas, limit)

    async def history(self, session_id: str, limit: int) -> list[bytes]:
        if limit <= 0:  # LRANGE 0 -1 would be the whole list
            return []
        key = self._keys.history(session_id)
        (entries,) = await self._run_on(key, [("LRANGE", key, 0, limit - 1)])
        return list(entries)

    async def count_sessions(self) -> int:
        index = self._keys.sessions()
        now = time.time()
        for _ in range(100):
            (due,) = await self._run_on(
                index, [("ZRANGE", index, "-inf", now, "BYSCORE", "LIMIT", 0, 1000)]
            )
            if not due:
                break
            sids = [d.decode() for d in due]
            metas = [self._keys.meta(sid) for sid in sids]
            if self._cluster is None:
                ttls = await self._run([("PTTL", k) for k in metas])
            else:
                ttls = await self._run_each(metas, [("PTTL", k) for k in metas])
            fixes: list[Command] = []
            for sid, pttl in zip(sids, ttls, strict=True):
                if pttl == -2:
                    fixes.append(("ZREM", index, sid))
                else:
                    score: Any = "+inf" if pttl == -1 else now + pttl / 1000.0
                    fixes.append(("ZADD", index, "XX", score, sid))
            await self._run_on(index, fixes)
        (count,) = await self._run_on(index, [("ZCARD", index)])
        return int(count)

    # -- idempotency -----------------------------------------------------------------

    async def get_idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        record_key = self._keys.idem(session_id, key)
        (data,) = await self._run_on(record_key, [("GET", record_key)])
        return None if data is None else IdempotencyRecord.from_bytes(data)

    async def claim_idempotency(
        self, session_id: str, key: str, ttl: float, token: str
    ) -> float | None:
        lock = self._keys.idem_lock(session_id, key)
        ok, pttl = await self._run_on(
            lock, [("SET", lock, token, "NX", "PX", _millis(ttl)), ("PTTL", lock)]
        )
        if ok is not None:
            return None
        return max(int(pttl), 0) / 1000.0  # -2: released meanwhile; try again at once

    async def renew_idempotency(self, session_id: str, key: str, token: str, ttl: float) -> bool:
        lock = self._keys.idem_lock(session_id, key)
        (done,) = await self._run_on(lock, [("EVAL", _RENEW, 1, lock, token, _millis(ttl))])
        return bool(done)

    async def release_idempotency(self, session_id: str, key: str, token: str) -> None:
        lock = self._keys.idem_lock(session_id, key)
        await self._run_on(lock, [("EVAL", _RELEASE, 1, lock, token)])

    # -- internals -------------------------------------------------------------------

    def _unavailable(self) -> _Unavailable:
        return _Unavailable(self._url, self._cluster)

    async def _run(self, commands: Sequence[Command], timeout: float | None = None) -> list[Any]:
        """`commands` on a pooled connection, one round trip; error replies raise."""
        with self._unavailable():
            pool = self._pool
            conn = await connect(pool)
            try:
                return check(await exchange(conn, commands, timeout))
            finally:
                await pool.release(conn)

    async def _run_on(
        self, key: str, commands: Sequence[Command], timeout: float | None = None
    ) -> list[Any]:
        """`_run` on the node that serves `key` (every command must be of its slot)."""
        with self._unavailable():
            cluster = self._cluster
            pool = self._pool if cluster is None else await cluster.pool_for(key)
            conn = await connect(pool)
            try:
                return check(await exchange(conn, commands, timeout))
            finally:
                await pool.release(conn)

    async def _run_each(self, keys: Sequence[str], commands: Sequence[Command]) -> list[Any]:
        """Cluster: `commands[i]` (of the slot of `keys[i]`) on its node, one round trip
        per node, all nodes at once; the replies in the order of `commands`."""
        cluster = self._cluster
        assert cluster is not None
        with self._unavailable():
            groups: dict[int, tuple[aioredis.ConnectionPool, list[int]]] = {}
            for i, key in enumerate(keys):
                pool = await cluster.pool_for(key)
                groups.setdefault(id(pool), (pool, []))[1].append(i)
            answers = await asyncio.gather(
                *(self._run_in(pool, [commands[i] for i in idx]) for pool, idx in groups.values())
            )
        replies: list[Any] = [None] * len(commands)
        for (_, idx), got in zip(groups.values(), answers, strict=True):
            for i, reply in zip(idx, got, strict=True):
                replies[i] = reply
        return replies

    async def _run_in(
        self,
        pool: aioredis.ConnectionPool,
        commands: Sequence[Command],
        timeout: float | None = None,
    ) -> list[Any]:
        conn = await connect(pool)
        try:
            return check(await exchange(conn, commands, timeout))
        finally:
            await pool.release(conn)

    def _timeout(self, nbytes: int) -> float:
        return self._socket_timeout + nbytes / self._min_throughput

    async def _read_blobs(
        self, conn: aioredis.Connection, session_id: str, stored: _Stored
    ) -> SessionBlobs | None:
        """The blobs `stored` describes, or None if meta changed meanwhile (read again)."""
        keys = self._keys
        gets: list[Command] = [("GET", keys.params(session_id, i)) for i in range(stored.pn)]
        gets += [("GET", keys.state(session_id, i)) for i in range(stored.sn)]
        replies = check(
            await exchange(
                conn,
                [*gets, ("HGETALL", keys.meta(session_id))],
                self._timeout(stored.pb + stored.sb),
            )
        )
        if replies[-1] != stored.raw:
            return None
        parts = replies[:-1]
        if any(p is None for p in parts):
            raise DamagedSession(f"session {session_id}: a chunk is missing (evicted?)")
        params = b"".join(parts[: stored.pn])
        state = b"".join(parts[stored.pn :])
        if len(params) != stored.pb or len(state) != stored.sb:
            raise DamagedSession(f"session {session_id}: chunks do not add up to the blobs")
        return SessionBlobs(params, state)

    def _write_commands(
        self,
        sid: str,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        stored: _Stored | None,
        ttl: int | None,
        created_ttl: int | None,
    ) -> tuple[list[Command], int]:
        """Commands (for inside a MULTI) that write `meta` and `blobs` (None: keep the
        stored ones), all keys expiring after `ttl` (None: never); and their bytes."""
        keys = self._keys
        meta_key = keys.meta(sid)
        commands: list[Command] = []
        nbytes = 0
        fields: list[Any] = ["json", meta.to_json(), "version", meta.version]
        if created_ttl is not None or stored is None:
            fields += ["ttl", -1 if created_ttl is None else created_ttl]
        ex: tuple[Any, ...] = () if ttl is None else ("EX", ttl)
        if blobs is not None:
            for kind, blob, key, old_n in (
                ("p", blobs.params, keys.params, 0 if stored is None else stored.pn),
                ("s", blobs.state, keys.state, 0 if stored is None else stored.sn),
            ):
                parts = _chunks(blob, self._chunk_bytes)
                fields += [kind + "b", len(blob), kind + "n", len(parts)]
                commands += [("SET", key(sid, i), part, *ex) for i, part in enumerate(parts)]
                if old_n > len(parts):
                    commands.append(("DEL", *(key(sid, i) for i in range(len(parts), old_n))))
                nbytes += len(blob)
        elif stored is not None:
            commands += _expire(self._chunk_keys(sid, stored), ttl)
        head: list[Command] = [("HSET", meta_key, *fields), *_expire([meta_key], ttl)]
        return head + commands, nbytes + len(fields[1])

    def _chunk_keys(self, sid: str, stored: _Stored) -> list[str]:
        """The keys of the chunks that `stored` names."""
        keys = self._keys
        chunk_keys = [keys.params(sid, i) for i in range(stored.pn)]
        chunk_keys += [keys.state(sid, i) for i in range(stored.sn)]
        return chunk_keys

    def _touch_commands(self, sid: str, stored: _Stored, ttl: int) -> list[Command]:
        """Commands (for inside a MULTI) that refresh the idle expiry of every key of the
        session but the idempotency ones (which keep their own)."""
        keys = self._keys
        return _expire([keys.meta(sid), *self._chunk_keys(sid, stored), keys.history(sid)], ttl)

    def _commit_commands(
        self,
        sid: str,
        stored: _Stored,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        ttl: int | None,
        *,
        idempotency: IdempotencyRecord | None,
        idempotency_ttl: int | None,
        history: bytes | None,
        history_limit: int,
    ) -> tuple[list[Command], int]:
        """Commands (for inside a MULTI) of a commit (see `SessionTx.commit`), and their
        bytes. `ttl`: the transaction's (None: the ttl the session was created with)."""
        keys = self._keys
        effective_ttl = stored.ttl if ttl is None else ttl
        commands, nbytes = self._write_commands(sid, meta, blobs, stored, effective_ttl, None)
        history_key = keys.history(sid)
        if history is not None and history_limit > 0:
            commands.append(("LPUSH", history_key, history))
            commands.append(("LTRIM", history_key, 0, history_limit - 1))
            nbytes += len(history)
        # after the LPUSH, which may have just created the key
        commands += _expire([history_key], effective_ttl)
        if idempotency is not None:
            idem_ttl = self._default_idempotency_ttl if idempotency_ttl is None else idempotency_ttl
            record = idempotency.to_bytes()
            now = time.time()
            index = keys.idem_index(sid)
            commands += [
                ("SET", keys.idem(sid, idempotency.key), record, "EX", idem_ttl),
                ("DEL", keys.idem_lock(sid, idempotency.key)),
                ("ZADD", index, now + idem_ttl, idempotency.key),
                ("ZREMRANGEBYSCORE", index, "-inf", now),
                ("EXPIRE", index, idem_ttl),
            ]
            nbytes += len(record)
        return commands, nbytes


class _Unavailable:
    """Context manager: connection trouble becomes `StoreUnavailable`; on a cluster,
    so do redirections and cluster errors (`CLUSTER_TROUBLE`), and both mark the slot
    map stale (it is read again before the next command)."""

    __slots__ = ("_cluster", "_url")

    def __init__(self, url: str, cluster: ClusterMap | None) -> None:
        self._url = url
        self._cluster = cluster

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc is None:
            return
        cluster = self._cluster
        if isinstance(exc, UNAVAILABLE):
            if cluster is not None:
                cluster.stale = True
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        if cluster is not None and isinstance(exc, CLUSTER_TROUBLE):
            cluster.stale = True
            raise StoreUnavailable(f"Redis Cluster: {type(exc).__name__}: {exc}") from exc


if TYPE_CHECKING:
    _check_protocol: StateStore = RedisStore("redis://")
