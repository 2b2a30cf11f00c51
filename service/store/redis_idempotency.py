"""Idempotency records and claims in the Redis store (see `service.store.redis_store`'s
"Layout"): read a record, and take, renew and release the in-flight claim
`idem:<key>:lock` (renewal and release are compare-and-set scripts on the holder's
token). The record itself is written by the commit (`RedisLayout._commit_commands`).
A base of `RedisStore`.
"""

from __future__ import annotations

from service.store.base import IdempotencyRecord
from service.store.redis_connection import RedisConnection

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


class RedisIdempotency(RedisConnection):
    """The idempotency records and claims of a `RedisStore`."""

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
