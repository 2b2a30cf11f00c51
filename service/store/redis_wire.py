"""The wire under the Redis store: one connection, commands in one write, every reply
read (`exchange`), and what counts as Redis being unreachable (`UNAVAILABLE`). Shared by
the single-node store and the cluster's slot map (`service.store.cluster`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.store import resp

Command = tuple[Any, ...]
#: what a lost or unreachable Redis raises
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class HiredisPackerConnection(aioredis.Connection):
    """An asyncio connection that packs commands with `hiredis.pack_command` (the sync
    client's default packer; it copies every command into one new bytes object)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        encoded = tuple(self.encoder.encode(a) for a in args)  # type: ignore[no-untyped-call]
        return [hiredis.pack_command(encoded)]


async def exchange(
    conn: aioredis.Connection, commands: Sequence[Command], timeout: float | None = None
) -> list[Any]:
    """Send `commands` in one write and read every reply, in order.

    Error replies are returned as `ResponseError` objects, not raised. Anything else that
    goes wrong (connection lost, timeout, cancellation) drops the connection, so it never
    returns to the pool with replies unread. `timeout`: seconds allowed for the whole
    exchange, the write and every reply (default: the connection's socket timeout);
    exceeding it raises `TimeoutError`.

    One deadline for the whole exchange instead of redis-py's own timers, so the
    connection's socket timeout is off while it runs: with one set, redis-py wraps every
    write in `asyncio.wait_for` (a new Task per write) and every reply in its own timeout
    context. Measured on a step's two exchanges (WATCH + HGETALL, then the MULTI/EXEC
    commit of a 1K-parameter session): 162 -> 143 CPU-us, about 2 % of the server's CPU
    per small step (benchmarks/service.py).
    """
    saved = conn.socket_timeout
    budget = saved if timeout is None else timeout
    conn.socket_timeout = None
    try:
        async with asyncio.timeout(budget):
            if isinstance(conn, HiredisPackerConnection):
                packed: Any = conn.pack_commands(commands)
            else:
                packed = resp.pack_commands(commands)
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        conn.socket_timeout = saved


def check(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


async def connect(pool: aioredis.ConnectionPool) -> aioredis.Connection:
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    assert isinstance(conn, aioredis.Connection)
    return conn


__all__ = ["UNAVAILABLE", "Command", "HiredisPackerConnection", "check", "connect", "exchange"]
