"""How a session lies in Redis (see `service.store.redis_store`'s "Layout"): what its
meta hash says (`Stored`), the read of its blobs from their chunks, and the commands
(for inside a MULTI) that write, refresh and commit it (`RedisLayout`, a base of
`RedisStore`). `Commit` is what one `SessionTx.commit` writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service.store.base import IdempotencyRecord, SessionBlobs, SessionMeta
from service.store.redis_connection import RedisConnection
from service.store.redis_wire import Command, check, exchange

#: how often `load`/`read` read again when a commit keeps slipping in between
MAX_READ_ATTEMPTS = 100


class DamagedSession(RuntimeError):
    """A session's meta names a chunk that is missing or of the wrong size (evicted?)."""


def _int(value: Any, default: int = 0) -> int:
    return default if value is None else int(value)


def _field(meta: dict[Any, Any], name: str) -> Any:
    return meta.get(name.encode())


def expire(names: Iterable[str], ttl: int | None) -> list[Command]:
    """Commands that make the keys `names` expire after `ttl` seconds (None: never)."""
    if ttl is None:
        return [("PERSIST", k) for k in names]
    return [("EXPIRE", k, ttl) for k in names]


def chunks(blob: bytes, chunk_bytes: int) -> list[memoryview]:
    view = memoryview(blob)
    return [view[i : i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]


class Stored:
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


@dataclass(frozen=True, slots=True)
class Commit:
    """What one commit writes (the arguments of `SessionTx.commit`, see there)."""

    meta: SessionMeta
    blobs: SessionBlobs | None
    idempotency: IdempotencyRecord | None = None
    idempotency_ttl: int | None = None
    history: bytes | None = None
    history_limit: int = 0


class RedisLayout(RedisConnection):
    """The reads and writes of a session's keys, on a `RedisConnection`."""

    async def _read_blobs(
        self, conn: aioredis.Connection, session_id: str, stored: Stored
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
        stored: Stored | None,
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
                parts = chunks(blob, self._chunk_bytes)
                fields += [kind + "b", len(blob), kind + "n", len(parts)]
                commands += [("SET", key(sid, i), part, *ex) for i, part in enumerate(parts)]
                if old_n > len(parts):
                    commands.append(("DEL", *(key(sid, i) for i in range(len(parts), old_n))))
                nbytes += len(blob)
        elif stored is not None:
            commands += expire(self._chunk_keys(sid, stored), ttl)
        head: list[Command] = [("HSET", meta_key, *fields), *expire([meta_key], ttl)]
        return head + commands, nbytes + len(fields[1])

    def _chunk_keys(self, sid: str, stored: Stored) -> list[str]:
        """The keys of the chunks that `stored` names."""
        keys = self._keys
        chunk_keys = [keys.params(sid, i) for i in range(stored.pn)]
        chunk_keys += [keys.state(sid, i) for i in range(stored.sn)]
        return chunk_keys

    def _touch_commands(self, sid: str, stored: Stored, ttl: int) -> list[Command]:
        """Commands (for inside a MULTI) that refresh the idle expiry of every key of the
        session but the idempotency ones (which keep their own)."""
        keys = self._keys
        return expire([keys.meta(sid), *self._chunk_keys(sid, stored), keys.history(sid)], ttl)

    def _commit_commands(
        self, sid: str, stored: Stored, ttl: int | None, commit: Commit
    ) -> tuple[list[Command], int]:
        """Commands (for inside a MULTI) of a commit (see `SessionTx.commit`), and their
        bytes. `ttl`: the transaction's (None: the ttl the session was created with)."""
        keys = self._keys
        effective_ttl = stored.ttl if ttl is None else ttl
        commands, nbytes = self._write_commands(
            sid, commit.meta, commit.blobs, stored, effective_ttl, None
        )
        history_key = keys.history(sid)
        history = commit.history
        if history is not None and commit.history_limit > 0:
            commands.append(("LPUSH", history_key, history))
            commands.append(("LTRIM", history_key, 0, commit.history_limit - 1))
            nbytes += len(history)
        # after the LPUSH, which may have just created the key
        commands += expire([history_key], effective_ttl)
        idempotency = commit.idempotency
        if idempotency is not None:
            idem_ttl = (
                self._default_idempotency_ttl
                if commit.idempotency_ttl is None
                else commit.idempotency_ttl
            )
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
