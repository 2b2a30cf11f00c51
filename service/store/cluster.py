"""Redis Cluster for the store: `redis+cluster://` URLs and the slot map (`ClusterMap`):
which master serves a key's slot, with one connection pool per master.

Every key of a session carries its hash tag, so a session's commands (a whole commit
included) go to one master; the map is read with `CLUSTER SLOTS` on first use and again
after any redirection or connection trouble (see `RedisStore`'s "Redis Cluster"
section).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from service.store.redis_wire import UNAVAILABLE, check, connect, exchange

CLUSTER_SCHEME = "redis+cluster"
#: error replies that mean "not here, not now" on a cluster: the slot moved (MOVED),
#: is moving (ASK, TRYAGAIN), or the cluster or a master is down
CLUSTER_TROUBLE = (AskError, TryAgainError, ClusterDownError, MasterDownError, ReadOnlyError)


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME + "://")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes and the credentials of `redis+cluster://[user:password@]host:port
    [,host:port...]` (a cluster has database 0 only: a path other than `/` or `/0` is
    refused, as is a query)."""
    if not is_cluster_url(url):
        raise ValueError(f"not a {CLUSTER_SCHEME}:// url: {url!r}")
    rest = url[len(CLUSTER_SCHEME) + 3 :]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if query or path not in ("", "0"):
        raise ValueError(f"{CLUSTER_SCHEME}:// takes no database and no options: {url!r}")
    userinfo, _, hosts = netloc.rpartition("@")
    auth: dict[str, Any] = {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            auth["username"] = unquote(user)
        if has_password:
            auth["password"] = unquote(password)
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:  # no port given
            host, port = item.strip(), "6379"
        host = host.strip("[]")  # [::1]:7000
        if not host:
            raise ValueError(f"empty host in {url!r}")
        seeds.append((host, int(port)))
    return seeds, auth


class ClusterMap:
    """The slot map of a Redis Cluster and a connection pool per master.

    The map comes from `CLUSTER SLOTS` (asked of the seeds, then of the nodes known),
    read on first use and again after any redirection or connection trouble
    (`stale`). Commands are sent to the pool of the master of their key's slot."""

    def __init__(self, seeds: list[tuple[str, int]], pool_kwargs: dict[str, Any]) -> None:
        self._seeds = seeds
        self._pool_kwargs = pool_kwargs
        self._pools: dict[tuple[str, int], aioredis.ConnectionPool] = {}
        self._slots: list[aioredis.ConnectionPool | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._lock: asyncio.Lock | None = None
        self.stale = True

    def node_pool(self, host: str, port: int) -> aioredis.ConnectionPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = aioredis.ConnectionPool(host=host, port=port, **self._pool_kwargs)
            self._pools[(host, port)] = pool
        return pool

    def all_pools(self) -> list[aioredis.ConnectionPool]:
        return list(self._pools.values())

    async def pool_for(self, key: str) -> aioredis.ConnectionPool:
        if self.stale:
            await self.refresh()
        pool = self._slots[key_slot(key.encode())]
        if pool is None:
            raise ClusterDownError(f"no node serves the slot of {key!r}")
        return pool

    async def masters(self) -> list[aioredis.ConnectionPool]:
        if self.stale:
            await self.refresh()
        return list({id(p): p for p in self._slots if p is not None}.values())

    async def refresh(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.stale:  # another task read it meanwhile
                return
            candidates = list(dict.fromkeys([*self._seeds, *self._pools]))
            error: BaseException | None = None
            for host, port in candidates:
                pool = self.node_pool(host, port)
                try:
                    conn = await connect(pool)
                    try:
                        (slots,) = check(await exchange(conn, [("CLUSTER", "SLOTS")]))
                    finally:
                        await pool.release(conn)
                except (*UNAVAILABLE, ResponseError) as exc:
                    error = exc
                    continue
                table: list[aioredis.ConnectionPool | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
                for start, end, master, *_replicas in slots:
                    node_host = master[0].decode() if master[0] else host
                    owner = self.node_pool(node_host, int(master[1]))
                    table[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
                self._slots = table
                self.stale = False
                return
            assert error is not None
            raise error

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        self._slots = [None] * REDIS_CLUSTER_HASH_SLOTS
        self.stale = True
        for pool in pools:
            await pool.aclose()


__all__ = ["CLUSTER_SCHEME", "CLUSTER_TROUBLE", "ClusterMap", "is_cluster_url", "parse_cluster_url"]
