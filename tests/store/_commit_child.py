"""A process that starts a RedisStore commit and stalls inside it, waiting to be killed.

    python -m tests.store._commit_child URL PREFIX SESSION_ID CHUNK_BYTES MODE

MODE says where the commit stalls:

- `queued`: MULTI and every write of the commit (a history entry included) have been
  sent and answered QUEUED; EXEC has not been sent.
- `partial`: half of the bytes of the commit's MULTI ... EXEC have been written to the
  socket; the rest has not.

It prints `READY <loaded version>` once stalled, then sleeps until killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from service.store import redis_store, redis_tx
from service.store.redis_store import RedisStore, exchange


async def _stall(loaded_version: int) -> None:
    print(f"READY {loaded_version}", flush=True)
    await asyncio.sleep(3600)


async def main(url: str, prefix: str, sid: str, chunk_bytes: int, mode: str) -> None:
    store = RedisStore(url, chunk_bytes=chunk_bytes, key_prefix=prefix)
    await store.open()
    loaded_version = -1

    async def stalling_exchange(
        conn: aioredis.Connection, commands: Sequence[Any], timeout: float | None = None
    ) -> list[Any]:
        if not commands or commands[0] != ("MULTI",):
            return await exchange(conn, commands, timeout)
        if mode == "queued":
            replies = await exchange(conn, commands[:-1], timeout)
            assert replies[0] == b"OK", replies[0]
            assert all(r == b"QUEUED" for r in replies[1:]), replies
        else:
            data = b"".join(bytes(part) for part in conn.pack_commands(commands))
            await conn.send_packed_command(data[: len(data) // 2])
        await _stall(loaded_version)
        raise AssertionError("not reached")

    # the transaction (load, commit) sends its commands through `redis_tx.exchange`
    redis_tx.exchange = stalling_exchange  # type: ignore[assignment]
    async with store.transaction(sid) as tx:
        loaded = await tx.load()
        assert loaded is not None
        meta = loaded[0]
        loaded_version = meta.version
        blobs = redis_store.SessionBlobs(os.urandom(3 * chunk_bytes + 7), os.urandom(chunk_bytes))
        new = meta.evolve(version=meta.version + 1, tenant="child")
        await tx.commit(new, blobs, history=b"child", history_limit=10)


if __name__ == "__main__":
    url, prefix, sid, chunk, mode = sys.argv[1:6]
    asyncio.run(main(url, prefix, sid, int(chunk), mode))
