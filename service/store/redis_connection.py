"""The Redis store's settings and connections: `RedisOptions` (the tuning knobs), the
connection pool (one, or one per master on a cluster), one round trip on a pooled
connection (`_run`, `_run_on`, `_run_each`) and what turns connection and cluster
trouble into `StoreUnavailable` (see `service.store.redis_store`'s "Redis Cluster" and
"Errors" sections). `RedisStore` is built on `RedisConnection`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from service.store.base import StoreUnavailable
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

MiB = 1 << 20
#: idempotency records are kept this long when `commit` is given no ttl (seconds)
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600

Parser = Literal["hiredis", "python"]
Packer = Literal["python", "hiredis"]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The tuning knobs of a `RedisStore` (the defaults suit a production server).

    `idempotency_ttl`: seconds an idempotency record is kept when `commit` is given no
    ttl. `socket_timeout`: seconds allowed for a small operation; large ones get
    `nbytes / min_throughput` more (`min_throughput` in bytes per second).
    `socket_connect_timeout`: seconds allowed to open a connection.
    `health_check_interval`: a pooled connection idle that long is PINGed before use.
    `max_connections`: per pool (None: redis-py's default). `parser`/`packer`: the
    client's RESP reply parser and command packer (the defaults are the measured fastest,
    see `service.store.redis_store`).
    """

    idempotency_ttl: int = DEFAULT_IDEMPOTENCY_TTL
    socket_timeout: float = 5.0
    socket_connect_timeout: float = 2.0
    min_throughput: float = 50e6
    health_check_interval: float = 30.0
    max_connections: int | None = None
    parser: Parser = "hiredis"
    packer: Packer = "python"


def pool_kwargs(options: RedisOptions) -> dict[str, Any]:
    """The keyword arguments of the store's redis-py connection pools."""
    kwargs: dict[str, Any] = {
        "connection_class": (
            HiredisPackerConnection if options.packer == "hiredis" else aioredis.Connection
        ),
        "parser_class": _AsyncHiredisParser if options.parser == "hiredis" else _AsyncRESP3Parser,
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": options.health_check_interval,
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
    if options.max_connections is not None:
        kwargs["max_connections"] = options.max_connections
    return kwargs


class RedisConnection:
    """The settings and connection pools of a `RedisStore`, and its round trips.

    `url`: redis://[user:password@]host:port/db (or rediss://, unix://), or
    redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster (the
    seed nodes; TLS is not supported there). `chunk_bytes`: largest value written (blobs
    are cut into chunks of it). `key_prefix`: start of every key (tests use a private
    one). `options`: the tuning knobs (`RedisOptions`; None: the defaults).
    """

    def __init__(
        self,
        url: str,
        *,
        chunk_bytes: int = 64 * MiB,
        key_prefix: str = DEFAULT_PREFIX,
        options: RedisOptions | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        if options is None:
            options = RedisOptions()
        self._url = url
        self._options = options
        self._chunk_bytes = chunk_bytes
        self._keys = Keys(key_prefix)
        self._default_idempotency_ttl = options.idempotency_ttl
        self._socket_timeout = options.socket_timeout
        self._min_throughput = options.min_throughput
        kwargs = pool_kwargs(options)
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

    @property
    def options(self) -> RedisOptions:
        return self._options

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

    # -- round trips -----------------------------------------------------------------

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
