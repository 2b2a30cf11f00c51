"""`MemoryStore`: the in-process session store (the embedded default, no Redis needed).

It behaves like the Redis store (`service.store.redis_store`) for one process:

- A session is its meta (kept as JSON bytes, decoded afresh for every reader, so a
  caller that mutates `meta.spec` cannot change the stored session, and anything that
  would not survive Redis' JSON does not survive here either) and its two blobs (kept
  as immutable `bytes`; a `bytearray`/`memoryview` handed in is copied).
- `transaction(sid)` holds a per-session `asyncio.Lock` for its whole duration, so two
  transactions of one process never interleave; `commit` still checks that the stored
  version is the loaded one (a `delete`/`create` does not take the lock) and replaces
  meta, blobs, the idempotency record and the history in one synchronous step, with
  no `await` in between: other tasks see all of it or none of it.
- The history is an immutable tuple in the session's entry, newest first: a commit
  stages the new tuple (its entry, then the newest `history_limit - 1` old ones) with
  the rest and swaps it in, so a reader never sees a half-made list. It goes with the
  entry: `delete`, expiry and a new `create` of the id all leave no history behind.
- Expiry: a session's `ttl` is the idle time before it expires, as a monotonic
  deadline. `create` sets it; `get_meta(ttl=...)` and every transaction that finds the
  session refresh it (a transaction with `ttl=None` refreshes with the ttl the session
  was created with). Expired sessions are invisible at once and purged lazily (on
  access, and by a sweep of everything at most every `sweep_interval` seconds).
  `list_sessions(tenant)` filters every session by its tenant (kept in the entry, so
  only the tenant's metas are decoded), skipping expired ones.
  Idempotency records keep their own ttl (they outlive an expired session, as in
  Redis; `delete` removes them), and so do in-flight claims.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    SessionTx,
    check_commit,
    newest_first,
)

if TYPE_CHECKING:
    from service.store.base import StateStore

#: idempotency records are kept this long when `commit` is given no ttl (seconds)
DEFAULT_IDEMPOTENCY_TTL = 24 * 3600


def _frozen(data: bytes) -> bytes:
    """`data` as immutable bytes (no copy when it already is)."""
    return data if type(data) is bytes else bytes(data)


@dataclass(slots=True)
class _Session:
    meta_json: bytes
    version: int
    params: bytes
    state: bytes
    #: the idle ttl the session was created with (None: never expires)
    ttl: int | None
    #: monotonic time at which it expires (None: never)
    deadline: float | None
    #: history entries, newest first
    history: tuple[bytes, ...] = ()
    #: the tenant the session belongs to (never changes), for `list_sessions`
    tenant: str = ""


@dataclass(slots=True)
class _LockRef:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class _MemoryTx:
    """One version-checked update of one session (see `SessionTx`)."""

    def __init__(self, store: MemoryStore, session_id: str, ttl: int | None) -> None:
        self._store = store
        self._sid = session_id
        self._ttl = ttl
        self._loaded = False
        self._entry: _Session | None = None
        self._version = -1
        self._done = False

    async def load(
        self, have_version: int | None = None
    ) -> tuple[SessionMeta, SessionBlobs | None] | None:
        if self._done:
            raise RuntimeError("this transaction is over; open a new one")
        store = self._store
        entry = store._live(self._sid)
        self._loaded = True
        self._entry = entry
        if entry is None:
            return None
        self._version = entry.version
        store._refresh(entry, self._ttl)
        meta = SessionMeta.from_json(entry.meta_json)
        if have_version is not None and have_version == entry.version:
            return meta, None
        return meta, SessionBlobs(entry.params, entry.state)

    async def recorded(self, key: str) -> IdempotencyRecord | None:
        # records are written only by commits of this session, which this transaction's
        # lock keeps out until it ends: what is read here stays true until our commit
        if self._done or not self._loaded:
            raise RuntimeError("recorded() needs a loaded, open transaction")
        return await self._store.get_idempotency(self._sid, key)

    async def commit(
        self,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        idempotency: IdempotencyRecord | None = None,
        idempotency_ttl: int | None = None,
        history: bytes | None = None,
        history_limit: int = 0,
    ) -> bool:
        check_commit(
            done=self._done,
            loaded=self._loaded,
            found=self._entry is not None,
            session_id=self._sid,
            loaded_version=self._version,
            meta=meta,
        )
        self._done = True
        store = self._store
        entry = store._live(self._sid)
        if entry is None or entry is not self._entry or entry.version != self._version:
            return False
        # From here on nothing awaits: the whole write is one step of the event loop.
        meta_json = meta.to_json()
        params = entry.params if blobs is None else _frozen(blobs.params)
        state = entry.state if blobs is None else _frozen(blobs.state)
        record = None if idempotency is None else idempotency.to_bytes()
        entries = entry.history
        if history is not None and history_limit > 0:
            entries = (_frozen(history), *entries[: history_limit - 1])
        entry.meta_json = meta_json
        entry.version = meta.version
        entry.params = params
        entry.state = state
        entry.history = entries
        store._refresh(entry, self._ttl)
        if idempotency is not None and record is not None:
            store._put_idempotency(self._sid, idempotency.key, record, idempotency_ttl)
            store._drop_claim(self._sid, idempotency.key)
        return True

    def _close(self) -> None:
        self._done = True


class MemoryStore:
    """Sessions in a dict of this process (see the module docstring)."""

    name = "memory"

    def __init__(
        self,
        *,
        idempotency_ttl: int = DEFAULT_IDEMPOTENCY_TTL,
        sweep_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default_idempotency_ttl = idempotency_ttl
        self._sweep_interval = sweep_interval
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        #: session id -> idempotency key -> (record bytes, deadline)
        self._idem: dict[str, dict[str, tuple[bytes, float]]] = {}
        #: session id -> idempotency key -> (holder's token, deadline) of the in-flight claim
        self._claims: dict[str, dict[str, tuple[str, float]]] = {}
        self._locks: dict[str, _LockRef] = {}
        self._next_sweep = clock() + sweep_interval

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    # -- sessions --------------------------------------------------------------------

    async def create(self, meta: SessionMeta, blobs: SessionBlobs, ttl: int | None) -> None:
        self._maybe_sweep()
        self._sessions[meta.id] = _Session(
            meta_json=meta.to_json(),
            version=meta.version,
            params=_frozen(blobs.params),
            state=_frozen(blobs.state),
            ttl=ttl,
            deadline=None if ttl is None else self._clock() + ttl,
            tenant=meta.tenant,
        )

    async def get_meta(self, session_id: str, ttl: int | None = None) -> SessionMeta | None:
        self._maybe_sweep()
        entry = self._live(session_id)
        if entry is None:
            return None
        if ttl is not None:
            entry.deadline = self._clock() + ttl
        return SessionMeta.from_json(entry.meta_json)

    async def read(self, session_id: str) -> tuple[SessionMeta, SessionBlobs] | None:
        self._maybe_sweep()
        entry = self._live(session_id)
        if entry is None:
            return None
        return SessionMeta.from_json(entry.meta_json), SessionBlobs(entry.params, entry.state)

    @asynccontextmanager
    async def _transaction(self, session_id: str, ttl: int | None) -> AsyncIterator[SessionTx]:
        self._maybe_sweep()
        ref = self._locks.get(session_id)
        if ref is None:
            ref = self._locks[session_id] = _LockRef()
        ref.users += 1
        try:
            async with ref.lock:
                tx = _MemoryTx(self, session_id, ttl)
                try:
                    yield tx
                finally:
                    tx._close()
        finally:
            ref.users -= 1
            if ref.users == 0:
                del self._locks[session_id]

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]:
        """A version-checked update of `session_id`, holding the session's lock.

        `ttl`: idle expiry to refresh the session with (None: the ttl it was created
        with)."""
        return self._transaction(session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        self._maybe_sweep()
        existed = self._live(session_id) is not None
        self._sessions.pop(session_id, None)
        self._idem.pop(session_id, None)
        return existed

    async def list_sessions(self, tenant: str, limit: int) -> list[SessionMeta]:
        self._maybe_sweep()
        now = self._clock()
        metas = [
            SessionMeta.from_json(e.meta_json)
            for e in self._sessions.values()
            if e.tenant == tenant and (e.deadline is None or e.deadline > now)
        ]
        return newest_first(metas, limit)

    async def history(self, session_id: str, limit: int) -> list[bytes]:
        self._maybe_sweep()
        entry = self._live(session_id)
        if entry is None or limit <= 0:
            return []
        return list(entry.history[:limit])

    async def count_sessions(self) -> int:
        self._sweep()
        return len(self._sessions)

    # -- idempotency -----------------------------------------------------------------

    async def get_idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        self._maybe_sweep()
        records = self._idem.get(session_id)
        if records is None:
            return None
        found = records.get(key)
        if found is None:
            return None
        data, deadline = found
        if deadline <= self._clock():
            del records[key]
            if not records:
                del self._idem[session_id]
            return None
        return IdempotencyRecord.from_bytes(data)

    async def claim_idempotency(
        self, session_id: str, key: str, ttl: float, token: str
    ) -> float | None:
        self._maybe_sweep()
        now = self._clock()
        claims = self._claims.setdefault(session_id, {})
        held = claims.get(key)
        if held is not None and held[1] > now:
            return held[1] - now
        claims[key] = (token, now + ttl)
        return None

    async def renew_idempotency(self, session_id: str, key: str, token: str, ttl: float) -> bool:
        now = self._clock()
        claims = self._claims.get(session_id, {})
        held = claims.get(key)
        if held is None or held[0] != token or held[1] <= now:
            return False
        claims[key] = (token, now + ttl)
        return True

    async def release_idempotency(self, session_id: str, key: str, token: str) -> None:
        held = self._claims.get(session_id, {}).get(key)
        if held is not None and held[0] == token:
            self._drop_claim(session_id, key)

    # -- internals -------------------------------------------------------------------

    def _live(self, session_id: str) -> _Session | None:
        """The session if it exists and has not expired (an expired one is purged)."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        if entry.deadline is not None and entry.deadline <= self._clock():
            del self._sessions[session_id]
            return None
        return entry

    def _refresh(self, entry: _Session, ttl: int | None) -> None:
        ttl = entry.ttl if ttl is None else ttl
        if ttl is not None:
            entry.deadline = self._clock() + ttl

    def _put_idempotency(self, session_id: str, key: str, record: bytes, ttl: int | None) -> None:
        ttl = self._default_idempotency_ttl if ttl is None else ttl
        self._idem.setdefault(session_id, {})[key] = (record, self._clock() + ttl)

    def _drop_claim(self, session_id: str, key: str) -> None:
        claims = self._claims.get(session_id)
        if claims is not None:
            claims.pop(key, None)
            if not claims:
                del self._claims[session_id]

    def _maybe_sweep(self) -> None:
        if self._clock() >= self._next_sweep:
            self._sweep()

    def _sweep(self) -> None:
        """Purge every expired session, idempotency record and claim."""
        now = self._clock()
        self._next_sweep = now + self._sweep_interval
        expired = [
            sid for sid, e in self._sessions.items() if e.deadline is not None and e.deadline <= now
        ]
        for sid in expired:
            del self._sessions[sid]
        for sid in list(self._idem):
            records = self._idem[sid]
            for key in [k for k, (_, deadline) in records.items() if deadline <= now]:
                del records[key]
            if not records:
                del self._idem[sid]
        for sid in list(self._claims):
            claims = self._claims[sid]
            for key in [k for k, (_, deadline) in claims.items() if deadline <= now]:
                del claims[key]
            if not claims:
                del self._claims[sid]


if TYPE_CHECKING:
    _check: StateStore = MemoryStore()
