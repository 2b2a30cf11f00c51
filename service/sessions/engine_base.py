"""The engine's foundation (`EngineBase`): the store and settings it works on, the
parsed specs and the per-replica cache of sessions it keeps, tenant checks, reads of a
session's current version, and running CPU work in a worker thread (`offload`,
`heavy`): the event loop must not stall for more than a few milliseconds on one request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from service.config import Settings
from service.core.state import OptState
from service.sessions import metrics as m
from service.sessions.accumulation import pending_deadline, pending_of
from service.sessions.cache import SessionCache
from service.sessions.errors import SessionNotFound
from service.sessions.spec import Limits, Spec
from service.sessions.stepping import Computed, current_lr
from service.store.base import SessionMeta, StateStore

T = TypeVar("T")
#: session ids this server makes (token_urlsafe) and accepts: anything else is 404
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Idempotency-Key: 1 to 255 printable ASCII characters
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
#: work on a session of more elements or tensors than these, or on a body of more bytes,
#: runs in a worker thread (`heavy`): the event loop must not stall for more than a few
#: milliseconds on one request (decoding 64 KiB of JSON takes about 1 ms)
OFFLOAD_ELEMENTS = 1 << 16
OFFLOAD_TENSORS = 256
OFFLOAD_BYTES = 1 << 16
#: parsed specs kept in memory (small: layouts and hyperparameters, no tensors)
SPEC_CACHE_SIZE = 4096
#: seconds between two looks at a session's version while waiting (first, longest)
WAIT_POLL_FIRST = 0.005
WAIT_POLL_MAX = 0.05


@dataclass(frozen=True, slots=True)
class StepCall:
    """One `POST /v1/sessions/{id}/step`, as received."""

    tenant: str
    session_id: str
    body: bytes
    content_type: str | None
    binary_response: bool
    idempotency_key: str | None = None
    method: str = "POST"
    path: str = ""


@dataclass(frozen=True, slots=True)
class Current:
    """A session as stored now: meta, spec and params of one version, and the state blob
    (decoded on demand: `engine.state_of`)."""

    meta: SessionMeta
    spec: Spec
    params: np.ndarray
    state: OptState | None
    state_bytes: bytes | None


#: what a transaction computes from the loaded meta, params and state
Compute = Callable[[SessionMeta, np.ndarray, OptState], Computed]


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What identifies a request for idempotency: sha256 of method, path and body."""
    h = hashlib.sha256()
    h.update(method.upper().encode())
    h.update(b"\n")
    h.update(path.encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def new_session_id() -> str:
    """A random id: 24 bytes (192 bits) from `secrets`, URL-safe base64 (32 characters)."""
    return secrets.token_urlsafe(24)


class EngineBase:
    """What every part of the engine stands on: store, settings, specs, cache."""

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.cache = SessionCache(settings.cache_sessions, settings.cache_bytes)
        self.limits = Limits(settings.max_params, settings.max_history, settings.max_tensors)
        #: session id -> (tenant, parsed spec): neither ever changes for an id (ids are
        #: random and never reused), so a step needs no meta read to validate its body
        self._specs: OrderedDict[str, tuple[str, Spec]] = OrderedDict()

    async def owned_meta(self, tenant: str, session_id: str, refresh: bool = False) -> SessionMeta:
        """The session's meta if it exists and is `tenant`'s; 404 (the same) otherwise."""
        if not SESSION_ID.fullmatch(session_id):
            raise SessionNotFound()
        self._round_trip("get_meta")
        meta = await self.store.get_meta(session_id, self.settings.session_ttl if refresh else None)
        if meta is None or meta.tenant != tenant:
            raise SessionNotFound()
        return meta

    async def _spec(self, tenant: str, session_id: str) -> Spec:
        """The session's parsed spec, if it is `tenant`'s (404 otherwise); from memory
        when this replica has seen the session (the transaction checks it still exists)."""
        known = self._specs.get(session_id)
        if known is not None:
            self._specs.move_to_end(session_id)
            if known[0] != tenant:
                raise SessionNotFound()
            return known[1]
        return await self.load_spec(await self.owned_meta(tenant, session_id))

    async def load_spec(self, meta: SessionMeta) -> Spec:
        """The parsed spec of `meta`'s session: from memory when this replica parsed it
        before (a session's spec never changes), else parsed, in a worker thread when its
        layout is large (10,000 tensors take about 15 ms to parse), and remembered."""
        known = self._specs.get(meta.id)
        if known is not None and known[0] == meta.tenant:
            self._specs.move_to_end(meta.id)
            return known[1]
        layout = meta.spec.get("layout")
        big = isinstance(layout, list) and len(layout) > OFFLOAD_TENSORS
        spec = await self.offload(big, Spec.load, meta.spec)
        self._remember_spec(meta.id, meta.tenant, spec)
        return spec

    def _remember_spec(self, session_id: str, tenant: str, spec: Spec) -> None:
        self._specs[session_id] = (tenant, spec)
        while len(self._specs) > SPEC_CACHE_SIZE:
            self._specs.popitem(last=False)

    @staticmethod
    def _round_trip(op: str) -> None:
        m.STORE_ROUND_TRIPS.labels(op).inc()

    @staticmethod
    async def offload(big: bool, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)`, in a worker thread when `big` (the event loop keeps serving)."""
        if big:
            return await anyio.to_thread.run_sync(func, *args)
        return func(*args)

    async def load_current(self, tenant: str, session_id: str, with_state: bool = False) -> Current:
        """The session's meta, spec and params of one version (from this replica's cache
        when it holds the stored version), and its state when `with_state`."""
        meta = await self.owned_meta(tenant, session_id, refresh=True)
        spec = await self.load_spec(meta)
        cached = self.cache.get(session_id)
        if cached is not None and cached.version == meta.version:
            return Current(meta, spec, cached.params, cached.state, None)
        self._round_trip("read")
        got = await self.store.read(session_id)
        if got is None or got[0].tenant != tenant:
            raise SessionNotFound()
        meta, blobs = got
        params = np.frombuffer(blobs.params, dtype=spec.dtype.newbyteorder("<"))
        state = None
        if with_state:
            state = await self.offload(
                len(blobs.state) > OFFLOAD_BYTES, OptState.from_bytes, blobs.state
            )
        return Current(meta, spec, params, state, blobs.state)

    async def ping(self) -> None:
        self._round_trip("ping")
        await self.store.ping()

    async def count_sessions(self) -> int:
        self._round_trip("count_sessions")
        return await self.store.count_sessions()

    def summary(self, meta: SessionMeta, spec: Spec) -> dict[str, Any]:
        """One session of the listing: the few fields of its document a table shows."""
        return {
            "id": meta.id,
            "optimizer": spec.hp.name,
            "step": meta.step,
            "version": meta.params_version,
            "lr": current_lr(spec, meta),
            "updated_at": meta.updated_at,
            "federated": spec.federated is not None,
            "lr_finder": spec.lr_finder is not None,
        }

    def document(self, meta: SessionMeta, spec: Spec) -> dict[str, Any]:
        """The session document of docs/api.md (`GET /v1/sessions/{id}`), with extensions."""
        stored = spec.stored()
        return {
            "id": meta.id,
            "step": meta.step,
            "version": meta.params_version,
            "lr": current_lr(spec, meta),
            "optimizer": stored["optimizer"],
            "schedule": stored["schedule"],
            "dtype": stored["dtype"],
            "params": {s.name: {"shape": list(s.shape)} for s in spec.layout.specs},
            "transforms": {k: v for k, v in stored["transforms"].items() if k != "nonfinite"},
            "nonfinite": stored["nonfinite"],
            "skipped": meta.skipped,
            "created_at": meta.created_at,
            "updated_at": meta.updated_at,
            "lr_finder": stored["lr_finder"],
            "ema": stored["ema"],
            "swa": stored["swa"],
            "consistency": stored["consistency"],
            "history": stored["history"],
            "pending": None if spec.sync is None else _pending_doc(spec, meta),
            "federated": stored["federated"],
            "round": None if spec.federated is None else meta.step,
        }


def heavy(spec: Spec) -> bool:
    """Whether NumPy work on a session of `spec` (a step, decoding or encoding its params
    and state) runs in a worker thread: its cost grows with the elements and with the
    tensors (each one a slice, a name and a dict entry to build)."""
    return spec.layout.total > OFFLOAD_ELEMENTS or len(spec.layout.specs) > OFFLOAD_TENSORS


class NothingToCommit(Exception):
    """A transaction found nothing left to do (raised out of its compute)."""


def _pending_doc(spec: Spec, meta: SessionMeta) -> dict[str, Any]:
    """A sync session's open accumulation: its version, gradients in, gradients per step,
    when its first push came and when it is due (Unix times; null when it is empty). A
    deadline in the past means nobody pushed or waited since: the next to do so
    resolves it."""
    assert spec.sync is not None
    pending = pending_of(meta)
    started = pending.started_at
    return {
        "base_version": pending.base_version,
        "count": pending.count,
        "accumulate": spec.sync.accumulate,
        "started_at": None if started is None else float(started),
        "deadline": pending_deadline(spec, meta),
    }
