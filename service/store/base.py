"""The StateStore protocol: what the API needs from a session store.

A session is a small JSON document (`SessionMeta`: spec, step, version, schedule state)
plus two blobs (`SessionBlobs`: the flat parameter vector's raw bytes and the optimizer
state's safetensors bytes). Two implementations: Redis (`service.store.redis_store`) and
in-process (`service.store.memory`), the embedded default. Both behave the same.

A step is a transaction (docs/design.md, decision 3): inside `store.transaction(sid)`,
`load()` reads the session at version v (skipping the blobs when the caller already
holds version v), the caller computes, and `commit()` writes meta, blobs and the
idempotency record so that they become visible together or not at all, and only if the
stored version is still v; it returns False on a conflict (the caller reloads and
recomputes). A process killed before `commit` returns leaves version v whole.

A session also has a history (docs/training.md, "History"): a bounded list of small
opaque entries, newest first, that a commit can prepend to in the same atomic write as
the step it records, so the history never shows a step that did not land nor misses one
that did. It lives and dies with the session (same idle expiry, removed by `delete`).

Every method raises `StoreUnavailable` when the backing service cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson


class StoreUnavailable(Exception):
    """The state store cannot be reached (the API answers 503 with Retry-After)."""


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """Everything about a session but its blobs; small, stored as JSON.

    `spec` is the normalized creation spec (optimizer and schedule with defaults filled,
    dtype, layout as `[[name, shape], ...]`, transforms, nonfinite policy, ...): the
    store does not interpret it. `version` is the store's revision: bumped by every
    commit, it is what a commit is checked against and what names the blobs.
    `params_version` is the version clients see (docs/api.md's `version`): bumped by every
    step, applied or skipped, but not by commits that leave the params as they were (a
    reported loss, a gradient accumulated in a sync session). `step` counts applied
    steps; `skipped` counts steps skipped for non-finite gradients. `extra` holds small
    JSON state of the API's features (range test, sync accumulation, last step).
    """

    id: str
    tenant: str
    version: int
    step: int
    spec: dict[str, Any]
    schedule_state: dict[str, Any] | None = None
    skipped: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    params_version: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "tenant": self.tenant,
                "version": self.version,
                "step": self.step,
                "spec": self.spec,
                "schedule_state": self.schedule_state,
                "skipped": self.skipped,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "extra": self.extra,
                "params_version": self.params_version,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> SessionMeta:
        d = orjson.loads(data)
        return cls(
            id=d["id"],
            tenant=d["tenant"],
            version=int(d["version"]),
            step=int(d["step"]),
            spec=d["spec"],
            schedule_state=d.get("schedule_state"),
            skipped=int(d.get("skipped", 0)),
            created_at=float(d.get("created_at", 0.0)),
            updated_at=float(d.get("updated_at", 0.0)),
            extra=d.get("extra") or {},
            params_version=int(d.get("params_version", d["version"])),
        )

    def evolve(self, **changes: Any) -> SessionMeta:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class SessionBlobs:
    """The large parts: `params` (raw little-endian bytes of the flat parameter vector)
    and `state` (`OptState.to_bytes()`)."""

    params: bytes
    state: bytes


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The stored outcome of a request made with an `Idempotency-Key`.

    `fingerprint` identifies the request (method, path and body hash): a retry with the
    same key and fingerprint gets `status`/`headers`/`body` replayed; the same key with
    another fingerprint is refused (422).
    """

    key: str
    fingerprint: str
    status: int
    headers: dict[str, str]
    body: bytes

    def to_bytes(self) -> bytes:
        head = orjson.dumps(
            {
                "key": self.key,
                "fingerprint": self.fingerprint,
                "status": self.status,
                "headers": self.headers,
            }
        )
        return len(head).to_bytes(4, "little") + head + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> IdempotencyRecord:
        n = int.from_bytes(data[:4], "little")
        head = orjson.loads(data[4 : 4 + n])
        return cls(head["key"], head["fingerprint"], head["status"], head["headers"], data[4 + n :])


def newest_first(metas: Iterable[SessionMeta], limit: int) -> list[SessionMeta]:
    """The `limit` most recently updated of `metas` (ties: the later created, then the
    greater id), newest first: the order of `StateStore.list_sessions` in every store."""
    if limit <= 0:
        return []
    ordered = sorted(metas, key=lambda m: (m.updated_at, m.created_at, m.id), reverse=True)
    return ordered[:limit]


def check_commit(
    *,
    done: bool,
    loaded: bool,
    found: bool,
    session_id: str,
    loaded_version: int,
    meta: SessionMeta,
) -> None:
    """The preconditions of `SessionTx.commit` that every store enforces alike."""
    if done:
        raise RuntimeError("this transaction is over; open a new one")
    if not loaded:
        raise RuntimeError("commit() before load()")
    if not found:
        raise RuntimeError("commit() on a session that load() did not find")
    if meta.id != session_id:
        raise ValueError(f"meta.id {meta.id!r} is not this transaction's session")
    if meta.version != loaded_version + 1:
        raise ValueError(
            f"meta.version must be the loaded version + 1 ({loaded_version + 1}),"
            f" not {meta.version}"
        )


class SessionTx(Protocol):
    """One attempt at a version-checked update of one session."""

    async def load(
        self, have_version: int | None = None
    ) -> tuple[SessionMeta, SessionBlobs | None] | None:
        """The session as stored now (None if there is none).

        Blobs are None when `have_version` equals the stored version (the caller's
        cached copy is current), and read otherwise.
        """
        ...

    async def recorded(self, key: str) -> IdempotencyRecord | None:
        """The idempotency record of `key`, read inside this transaction (after `load`).

        If a record for `key` is committed by anyone after this read, this transaction's
        commit fails as a conflict: a step whose claim expired while it ran cannot be
        applied a second time by a retry that claimed the key anew.
        """
        ...

    async def commit(
        self,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        idempotency: IdempotencyRecord | None = None,
        idempotency_ttl: int | None = None,
        history: bytes | None = None,
        history_limit: int = 0,
    ) -> bool:
        """Write `meta` (whose version must be loaded version + 1), `blobs` (None: keep the
        stored ones), the idempotency record and the history entry atomically, if the
        stored version is still the loaded one. False on a conflict: nothing was written.

        `history`: one entry to prepend to the session's history, which is then trimmed
        to its newest `history_limit` entries; with `history=None` or `history_limit=0`
        the history is left as it is."""
        ...


class StateStore(Protocol):
    """A session store. `ttl` arguments are seconds of idle time before expiry (None: never)."""

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the store answers; raise StoreUnavailable otherwise."""
        ...

    async def create(self, meta: SessionMeta, blobs: SessionBlobs, ttl: int | None) -> None: ...

    async def get_meta(self, session_id: str, ttl: int | None = None) -> SessionMeta | None:
        """The session's meta (refreshing its idle expiry when `ttl` is given)."""
        ...

    async def read(self, session_id: str) -> tuple[SessionMeta, SessionBlobs] | None:
        """Meta and blobs of one version, read consistently."""
        ...

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]: ...

    async def delete(self, session_id: str) -> bool:
        """Remove the session with everything of it (history, idempotency records);
        False if there was none."""
        ...

    async def list_sessions(self, tenant: str, limit: int) -> list[SessionMeta]:
        """The metas of `tenant`'s live sessions, most recently updated (or created)
        first, at most `limit` of them (`newest_first`). Deleted and expired sessions
        are not listed. Does not refresh any idle expiry."""
        ...

    async def history(self, session_id: str, limit: int) -> list[bytes]:
        """The newest `limit` history entries of the session, most recent first ([] for
        a session without history, or none at all). Does not refresh the idle expiry."""
        ...

    async def get_idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None: ...

    async def claim_idempotency(
        self, session_id: str, key: str, ttl: float, token: str
    ) -> float | None:
        """Mark `key` in flight for `ttl` seconds (a lease), held by `token`: None when
        claimed, else the seconds the current holder's lease has left."""
        ...

    async def renew_idempotency(self, session_id: str, key: str, token: str, ttl: float) -> bool:
        """Extend the lease of `key` to `ttl` seconds from now if `token` still holds it;
        False when it does not (it lapsed, or was released)."""
        ...

    async def release_idempotency(self, session_id: str, key: str, token: str) -> None:
        """Drop the claim of `key` if `token` holds it (another holder's is left alone)."""
        ...

    async def count_sessions(self) -> int: ...
