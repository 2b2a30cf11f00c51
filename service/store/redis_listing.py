"""Listing, history and counting in the Redis store (see `service.store.redis_store`'s
"Listing" and "Counting"): `list_sessions` from a tenant's index, `history` from a
session's list, `count_sessions` from `<prefix>:sessions`. A base of `RedisStore`.
"""

from __future__ import annotations

import time
from typing import Any

from service.store.base import SessionMeta, newest_first
from service.store.redis_connection import RedisConnection
from service.store.redis_wire import Command

#: `list_sessions` drops an id without a meta from its tenant's index only when it was
#: indexed longer ago than this (seconds): a younger one may be a `create` in flight,
#: whose index entry is written before its MULTI
INDEX_GRACE = 300.0
#: metas read per round trip by `list_sessions`
LIST_BATCH = 1000


class RedisListing(RedisConnection):
    """The indexes of a `RedisStore`: its tenants' sessions, the count, the history."""

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
