"""Helpers of the API tests: an in-process client of `create_app`, store wrappers, and
the core computations the API's numbers are compared with."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.core import FlatLayout, get_optimizer, parse_hyper, tensorfile
from service.core.schedules import parse_schedule
from service.core.schedules.momentum import with_momentum
from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    SessionTx,
    StateStore,
    StoreUnavailable,
)
from service.store.memory import MemoryStore

REDIS_URL = os.environ.get("OPTSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BINARY = "application/octet-stream"


def redis_problem() -> str | None:
    """Why the Redis parameter cannot run (None: it can)."""
    try:
        import service.store.redis_store  # noqa: F401
    except ImportError as exc:
        return f"service/store/redis_store.py is not importable yet: {exc}"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except Exception as exc:
        return f"no Redis answers at {REDIS_URL}: {exc}"
    return None


def _delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@asynccontextmanager
async def base_store(kind: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[StateStore]:
    """A fresh store of `kind` (not opened: the app opens it); Redis under a private
    key prefix whose keys are deleted afterwards, with small chunks so that blobs of a
    few hundred KB take several."""
    if kind == "memory":
        yield MemoryStore()
        return
    reason = redis_problem()
    if reason:
        pytest.skip(reason)
    from service.store.redis_store import RedisStore

    prefix = f"optserve-apitest-{uuid.uuid4().hex[:12]}"
    try:
        yield RedisStore(REDIS_URL, chunk_bytes=chunk_bytes, key_prefix=prefix)
    finally:
        _delete_prefix(prefix)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": {},
        "max_body_bytes": 512 * 1024 * 1024,
        "max_params": 200_000_000,
        "retry_after": 7,
        "max_commit_retries": 5,
        "redis_url": None,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    """An httpx client of an app running in this event loop (lifespan included)."""

    client: httpx.AsyncClient
    app: FastAPI
    store: StateStore
    settings: Settings
    headers: dict[str, str] = field(default_factory=dict)

    async def create(self, body: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/sessions", json=body, headers=self.headers, **kwargs)
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def step(self, sid: str, body: Mapping[str, Any], **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.client.post(
            f"/v1/sessions/{sid}/step", json=body, headers=headers, **kwargs
        )

    async def get(self, sid: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/sessions/{sid}", headers=self.headers)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def version(self, sid: str) -> int:
        return int((await self.get(sid))["version"])

    async def params(self, sid: str) -> dict[str, np.ndarray]:
        r = await self.client.get(
            f"/v1/sessions/{sid}/params", headers={**self.headers, "Accept": BINARY}
        )
        assert r.status_code == 200, r.text
        tensors, _ = tensorfile.decode(r.content)
        return {k: np.array(v) for k, v in tensors.items()}


@asynccontextmanager
async def open_api(
    store: StateStore, settings: Settings | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[Api]:
    settings = settings or make_settings()
    app = create_app(settings, store=store)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://optserve.test", timeout=120
        ) as client:
            yield Api(client, app, store, settings, dict(headers or {}))


def encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    return tensorfile.encode({k: np.asarray(v) for k, v in tensors.items()}, metadata)


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, metadata = tensorfile.decode(data)
    return {k: np.array(v) for k, v in tensors.items()}, metadata


# --- the core, called directly -------------------------------------------------------------


def core_run(
    optimizer: Mapping[str, Any],
    params: Mapping[str, Any],
    grads: Sequence[Mapping[str, Any]],
    dtype: str = "float32",
    schedule: Mapping[str, Any] | None = None,
    losses: Sequence[float | None] | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """What a session computes: the params after each step and the rate of each step."""
    hp = parse_hyper(optimizer)
    opt = get_optimizer(hp.name)
    layout = FlatLayout.from_shapes((n, np.shape(v)) for n, v in params.items())
    flat = layout.flatten(params, dtype)
    state = opt.init(hp, flat, layout)
    sched = None if schedule is None else parse_schedule(schedule)
    sched_state = None if sched is None else sched.initial_state(hp.lr)
    out: list[dict[str, np.ndarray]] = []
    lrs: list[float] = []
    for t, g in enumerate(grads):
        lr = hp.lr if sched is None else sched.lr(t, hp.lr, sched_state)
        hp_t = hp if sched is None else with_momentum(hp, sched.momentum(t))
        flat, state = opt.update(hp_t, layout.flatten(g, dtype), state, flat, lr, layout)
        loss = None if losses is None else losses[t]
        if sched is not None and sched.stateful and loss is not None:
            assert sched_state is not None
            sched_state = sched.observe(sched_state, loss)
        out.append({k: v.copy() for k, v in layout.unflatten(flat).items()})
        lrs.append(float(lr))
    return out, lrs


# --- store wrappers ----------------------------------------------------------------------


class ProxyStore:
    """Delegates everything to `inner` (subclasses override what they test)."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.name = f"proxy({inner.name})"

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()

    async def create(self, meta: SessionMeta, blobs: SessionBlobs, ttl: int | None) -> None:
        await self.inner.create(meta, blobs, ttl)

    async def get_meta(self, session_id: str, ttl: int | None = None) -> SessionMeta | None:
        return await self.inner.get_meta(session_id, ttl)

    async def read(self, session_id: str) -> tuple[SessionMeta, SessionBlobs] | None:
        return await self.inner.read(session_id)

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]:
        return self.inner.transaction(session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        return await self.inner.delete(session_id)

    async def get_idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        return await self.inner.get_idempotency(session_id, key)

    async def claim_idempotency(
        self, session_id: str, key: str, ttl: float, token: str
    ) -> float | None:
        return await self.inner.claim_idempotency(session_id, key, ttl, token)

    async def renew_idempotency(self, session_id: str, key: str, token: str, ttl: float) -> bool:
        return await self.inner.renew_idempotency(session_id, key, token, ttl)

    async def release_idempotency(self, session_id: str, key: str, token: str) -> None:
        await self.inner.release_idempotency(session_id, key, token)

    async def count_sessions(self) -> int:
        return await self.inner.count_sessions()

    async def history(self, session_id: str, limit: int) -> list[bytes]:
        return await self.inner.history(session_id, limit)

    async def list_sessions(self, tenant: str, limit: int) -> list[SessionMeta]:
        return await self.inner.list_sessions(tenant, limit)


class SwitchableStore(ProxyStore):
    """A store that can be made unreachable: then every method raises StoreUnavailable."""

    def __init__(self, inner: StateStore) -> None:
        super().__init__(inner)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off by the test")

    async def open(self) -> None:
        self._check()
        await super().open()

    async def ping(self) -> None:
        self._check()
        await super().ping()

    async def create(self, meta: SessionMeta, blobs: SessionBlobs, ttl: int | None) -> None:
        self._check()
        await super().create(meta, blobs, ttl)

    async def get_meta(self, session_id: str, ttl: int | None = None) -> SessionMeta | None:
        self._check()
        return await super().get_meta(session_id, ttl)

    async def read(self, session_id: str) -> tuple[SessionMeta, SessionBlobs] | None:
        self._check()
        return await super().read(session_id)

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]:
        self._check()
        return super().transaction(session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        self._check()
        return await super().delete(session_id)

    async def get_idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        self._check()
        return await super().get_idempotency(session_id, key)

    async def claim_idempotency(
        self, session_id: str, key: str, ttl: float, token: str
    ) -> float | None:
        self._check()
        return await super().claim_idempotency(session_id, key, ttl, token)

    async def count_sessions(self) -> int:
        self._check()
        return await super().count_sessions()

    async def history(self, session_id: str, limit: int) -> list[bytes]:
        self._check()
        return await super().history(session_id, limit)

    async def list_sessions(self, tenant: str, limit: int) -> list[SessionMeta]:
        self._check()
        return await super().list_sessions(tenant, limit)


class _LosingTx:
    def __init__(self, tx: SessionTx, on_commit: Callable[[], None]) -> None:
        self.tx = tx
        self.on_commit = on_commit

    async def load(
        self, have_version: int | None = None
    ) -> tuple[SessionMeta, SessionBlobs | None] | None:
        return await self.tx.load(have_version)

    async def recorded(self, key: str) -> IdempotencyRecord | None:
        return await self.tx.recorded(key)

    async def commit(
        self,
        meta: SessionMeta,
        blobs: SessionBlobs | None,
        idempotency: IdempotencyRecord | None = None,
        idempotency_ttl: int | None = None,
        history: bytes | None = None,
        history_limit: int = 0,
    ) -> bool:
        self.on_commit()
        return False


class ConflictingStore(ProxyStore):
    """While `conflicts` > 0, every commit reports a version conflict (nothing written)."""

    def __init__(self, inner: StateStore) -> None:
        super().__init__(inner)
        self.conflicts = 0
        self.commits_refused = 0

    def _refused(self) -> None:
        self.conflicts -= 1
        self.commits_refused += 1

    def transaction(
        self, session_id: str, ttl: int | None = None
    ) -> AbstractAsyncContextManager[SessionTx]:
        if self.conflicts <= 0:
            return self.inner.transaction(session_id, ttl)
        inner_cm = self.inner.transaction(session_id, ttl)

        @asynccontextmanager
        async def wrapped() -> AsyncIterator[SessionTx]:
            async with inner_cm as tx:
                yield _LosingTx(tx, self._refused)

        return wrapped()
