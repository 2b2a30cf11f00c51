"""The domain flow of the API: create, read, step, delete, preview (no FastAPI here).

Routes hand the engine a tenant, a session id and the raw body; the engine validates,
talks to the store, calls the core and returns the encoded answer (`codecs.Reply`) or
raises an `SessionError`. It owns three concerns the routes should not see:

**Validation before any write** (docs/design.md, decision 5). Create parses the optimizer
(`parse_hyper`), the schedule (`parse_schedule`), the training settings of
docs/training.md, checks that a schedule cycling the momentum has a momentum or beta1
to cycle, that the params are finite and within `settings.max_params`, before anything
is stored. A step checks its gradients against the session's layout (names, shapes,
numbers, finiteness unless the session skips non-finite steps), its loss and what the
session's features ask of it (`parsing._check_features`) before it claims an
idempotency key or opens a transaction.

**The transaction** (decision 3), shared by steps and reported losses (`_transact`): up
to `settings.max_commit_retries` times, inside `store.transaction(id)`, `load()` the
session, passing the revision this replica holds in its cache (`cache.SessionCache`,
an LRU bounded by count and bytes) so that the blobs are not read again when it is
current; compute (`stepping.compute_step` / `compute_metrics`: pure, see that module
for what a step does); `commit()` meta, blobs, the idempotency record and the history
entry at once, if the revision is still the loaded one. On a conflict, load and compute
again. The cache is refreshed only after a commit succeeded. NumPy work on a large
session (decoding, the update, encoding the answer) runs in a worker thread, so the
event loop keeps serving. A sync push answered 202 may then wait (`wait`) for the step
that completes its accumulation, by polling the session's version (`wait_version`, also
behind `GET .../params?min_version=`); a waiter that finds the accumulation past its
deadline (`timeout`) resolves it (`close_accumulation`), as `read_round` closes a
federated round, so a session whose worker never pushes cannot wedge.

**Tensors without a gradient** (`"skip_missing": true`; PyTorch skips a parameter whose
`.grad` is None). `grads` may then omit tensors: the flat update runs with zeros in
their segments, after which their segments of the params and of every optimizer state
array are put back as they were, bit for bit, so an omitted tensor is not touched at
all (no weight decay, no momentum decay). The update itself is elementwise per
segment for every optimizer here, or per tensor (LAMB's trust ratio), and clipping
norms see zeros there, so the tensors given are updated exactly as torch updates the
parameters that have a gradient. The session's counters still advance: `step` and
every scalar state (Adam's `step`, NAdam's `mu_product`, ...) are per session, not per
tensor as in torch, so a tensor skipped at some steps later gets bias corrections for
the session's step count, where torch would use the count of its own updates. A state
array made lazily on first use (SGD's `momentum_buffer`) that does not exist before
the step is made for every tensor, zeros in an omitted one; torch makes it later,
from that tensor's first gradient, which is the same buffer unless `dampening` > 0.
Without the flag a missing tensor is refused (422), as docs/api.md says.

**State files** (docs/state.md; `service.sessions.state_io` reads and writes them): an export
is a read of one version; an import validates the whole file, then stores a new session
(as create does); a replacement (PUT) validates it against the session's configuration,
then commits it through `_transact` like a step (version-checked, `version` + 1). No
Idempotency-Key: replacing by the same file twice leaves the same state.

**Idempotency** (decision 4; docs/references.md). With an `Idempotency-Key`, the request's
fingerprint is sha256 over method, path and body. A stored record with the same
fingerprint is replayed byte for byte (status, headers, body, plus
`Idempotent-Replayed: true`), except that a step's `200` answer follows the retry's
`Accept`: recorded in the other format, it is re-encoded as a fresh answer would be
(`codecs.reencode_step`; 406 if it cannot be); a different fingerprint is 422. A
federated update is keyed internally per client and round (`federation.update_key`, a
namespace no header key can reach; a different body again is 422 on its `client_id`).
Otherwise the key is claimed (in flight for `idempotency_lock_ttl` s; held by another
request: 409) and the successful answer is recorded in the step's own commit, so a step
and its record exist together or not at all. A refused request is never recorded (its
claim is released).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import orjson

from service.config import Settings
from service.core.averaging import init_averages
from service.core.errors import SpecError
from service.core.schedules import parse_schedule
from service.core.state import OptState
from service.sessions import codecs, state_io
from service.sessions import metrics as m
from service.sessions.cache import Cached, SessionCache
from service.sessions.codecs import Reply
from service.sessions.errors import (
    IdempotencyInFlight,
    IdempotencyMismatch,
    NotFederated,
    SessionNotFound,
    VersionConflict,
    invalid,
    spec_error,
)
from service.sessions.federation import (
    closable,
    compute_close,
    compute_update,
    legacy_update_key,
    parse_update,
    resubmitted,
    round_answer,
    round_state,
    update_key,
)
from service.sessions.parsing import (
    StepInput,
    check_preview,
    parse_create,
    parse_step,
    validate_model,
)
from service.sessions.requests import MetricsRequest, PreviewRequest
from service.sessions.spec import Limits, Spec, encode_schedule_state
from service.sessions.stepping import (
    Computed,
    accumulation_due,
    close_expired,
    compute_metrics,
    compute_step,
    current_lr,
    join_state,
    pending_deadline,
    pending_of,
    waited_reply,
)
from service.store.base import (
    IdempotencyRecord,
    SessionBlobs,
    SessionMeta,
    StateStore,
    StoreUnavailable,
)

T = TypeVar("T")

#: session ids this server makes (token_urlsafe) and accepts: anything else is 404
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Idempotency-Key: 1 to 255 printable ASCII characters
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
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


# --- requests as the engine sees them ----------------------------------------------------


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


# --- the engine --------------------------------------------------------------------------


class Engine:
    """The API's domain logic over one store; one per application."""

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.cache = SessionCache(settings.cache_sessions, settings.cache_bytes)
        self.limits = Limits(settings.max_params, settings.max_history, settings.max_tensors)
        #: session id -> (tenant, parsed spec): neither ever changes for an id (ids are
        #: random and never reused), so a step needs no meta read to validate its body
        self._specs: OrderedDict[str, tuple[str, Spec]] = OrderedDict()

    # sessions -----------------------------------------------------------------------

    async def create(self, tenant: str, body: bytes, content_type: str | None) -> dict[str, Any]:
        """Validate a creation request, store the session, return its document."""
        binary = codecs.is_binary(content_type)
        spec, params = await self.offload(
            len(body) > OFFLOAD_BYTES,
            parse_create,
            body,
            binary,
            self.limits,
        )

        def init() -> OptState:
            state = spec.optimizer.init(spec.hp, params, spec.layout)
            if spec.averaging:
                state = join_state(state, init_averages(spec.ema, spec.swa, params))
            return state

        state = await self.offload(heavy(spec), init)
        now = time.time()
        schedule_state = None if spec.schedule is None else spec.schedule.initial_state(spec.hp.lr)
        meta = SessionMeta(
            id=new_session_id(),
            tenant=tenant,
            version=0,
            step=0,
            spec=spec.stored(),
            schedule_state=encode_schedule_state(schedule_state),
            created_at=now,
            updated_at=now,
        )
        blobs = await self.offload(
            heavy(spec),
            lambda: SessionBlobs(params.tobytes(), state.to_bytes()),
        )
        self._round_trip("create")
        await self.store.create(meta, blobs, self.settings.session_ttl)
        self.cache.put(meta.id, Cached(0, params, state))
        self._remember_spec(meta.id, tenant, spec)
        return self.document(meta, spec)

    async def get(self, tenant: str, session_id: str) -> dict[str, Any]:
        meta = await self.owned_meta(tenant, session_id, refresh=True)
        spec = await self.load_spec(meta)
        return await self.offload(heavy(spec), self.document, meta, spec)

    async def delete(self, tenant: str, session_id: str) -> None:
        await self.owned_meta(tenant, session_id)
        self._round_trip("delete")
        deleted = await self.store.delete(session_id)
        self.cache.pop(session_id)
        self._specs.pop(session_id, None)
        if not deleted:
            raise SessionNotFound()

    async def list_sessions(self, tenant: str, limit: int) -> dict[str, Any]:
        """`GET /v1/sessions`: a summary of the tenant's `limit` most recently updated
        sessions, newest first; `truncated` when the tenant has more."""
        self._round_trip("list_sessions")
        metas = await self.store.list_sessions(tenant, limit + 1)
        shown = metas[:limit]
        specs = [await self.load_spec(meta) for meta in shown]
        return {
            "sessions": [self.summary(meta, spec) for meta, spec in zip(shown, specs, strict=True)],
            "truncated": len(metas) > limit,
        }

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

    # step ---------------------------------------------------------------------------

    async def step(self, call: StepCall) -> Reply:
        """Apply one step (or replay its recorded answer); see the module docstring."""
        start = time.perf_counter()
        outcome = "refused"
        try:
            reply, outcome = await self._idempotent(call, self._prepare_step)
            if outcome == "replayed" and reply.status == 200:
                reply = await self._replayed_as_asked(call, reply)
            if reply.status == 202:  # a sync push, pending: wait for its step if asked
                reply = await self._wait_for_step(call, reply)
            return reply
        finally:
            m.STEP_SECONDS.labels(outcome).observe(time.perf_counter() - start)

    async def _replayed_as_asked(self, call: StepCall, reply: Reply) -> Reply:
        """A replayed step answer in the format this retry asks for (`Accept`): the
        recorded one, re-encoded when it was sent in the other format (406 if it cannot
        be), with the recorded status and headers."""
        if reply.media_type == (codecs.BINARY if call.binary_response else codecs.JSON):
            return reply
        spec = await self._spec(call.tenant, call.session_id)
        shapes = {s.name: s.shape for s in spec.layout.specs}
        big = heavy(spec) or len(reply.body) > OFFLOAD_BYTES
        return await self.offload(
            big, codecs.reencode_step, reply, call.binary_response, shapes, spec.dtype
        )

    async def metrics(self, call: StepCall) -> Reply:
        """Take a loss reported without a step (`POST .../metrics`)."""
        reply, _ = await self._idempotent(call, self._prepare_metrics)
        return reply

    async def _prepare_step(self, call: StepCall, spec: Spec) -> tuple[Compute, bool]:
        step_input = await self._parse_step(call, spec)

        def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
            return compute_step(spec, meta, params, state, step_input, call.binary_response)

        return compute, heavy(spec)

    async def _prepare_metrics(self, call: StepCall, spec: Spec) -> tuple[Compute, bool]:
        if codecs.is_binary(call.content_type):
            raise invalid(["body"], "metrics are JSON: send Content-Type: application/json")
        loss = validate_model(MetricsRequest, codecs.load_json(call.body)).loss

        def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
            return compute_metrics(spec, meta, params, state, loss)

        return compute, heavy(spec)  # decoding the stored state is the work

    async def _parse_step(self, call: StepCall, spec: Spec) -> StepInput:
        binary = codecs.is_binary(call.content_type)
        big = len(call.body) > OFFLOAD_BYTES
        return await self.offload(big, parse_step, spec, call.body, binary)

    async def _idempotent(
        self,
        call: StepCall,
        prepare: Callable[[StepCall, Spec], Awaitable[tuple[Compute, bool]]],
        legacy_key: str | None = None,
    ) -> tuple[Reply, str]:
        """Validate (`prepare`), then commit what the returned function computes, at most
        once per Idempotency-Key (see the module docstring). With `legacy_key`, the key
        is a federated update's internal one (not a header's: not checked as one), and a
        record under `legacy_key` (its key before the namespaces were split: a round
        open across an upgrade) is replayed when no record has the key, but only if it
        has this request's fingerprint (a header key's record is of another path)."""
        sid, key = call.session_id, call.idempotency_key
        spec = await self._spec(call.tenant, sid)
        fp = None
        if key is not None:
            if legacy_key is None and not _IDEMPOTENCY_KEY.fullmatch(key):
                raise invalid(
                    ["header", "Idempotency-Key"], "must be 1 to 255 printable ASCII characters"
                )
            fp = fingerprint(call.method, call.path, call.body)
            record = await self._record(sid, key)
            if record is None and legacy_key is not None:
                old = await self._record(sid, legacy_key)
                record = old if old is not None and old.fingerprint == fp else None
            if record is not None:
                return self._replay(record, fp), "replayed"
        compute, big = await prepare(call, spec)
        if key is None or fp is None:
            return await self._transact(call, spec, compute, big, fp)
        token = secrets.token_hex(16)
        lease = float(self.settings.idempotency_lock_ttl)
        self._round_trip("claim_idempotency")
        left = await self.store.claim_idempotency(sid, key, lease, token)
        if left is not None:
            record = await self._record(sid, key)
            if record is not None:
                return self._replay(record, fp), "replayed"
            retry_after = max(1, math.ceil(left))
            raise IdempotencyInFlight(retry_after, federated=legacy_key is not None)
        # a first request that committed between our look and our claim is found inside
        # the transaction (`tx.recorded`), which also covers a lease that lapsed
        committed = False
        renewals = asyncio.create_task(self._renew_claim(sid, key, token, lease))
        try:
            reply, outcome = await self._transact(call, spec, compute, big, fp)
            committed = outcome != "replayed"  # a replay leaves our claim to release
            return reply, outcome
        finally:
            renewals.cancel()
            if not committed:
                self._round_trip("release_idempotency")
                with suppress(StoreUnavailable), anyio.CancelScope(shield=True):
                    await self.store.release_idempotency(sid, key, token)

    async def _renew_claim(self, sid: str, key: str, token: str, lease: float) -> None:
        """Keep our claim of `key` alive while the request works: renew the lease every
        third of it (a holder killed mid-request leaves a claim that lapses within one
        lease). Gives up quietly when the claim is no longer ours or the store is down:
        the commit's own check of the record (`tx.recorded`) keeps the step single."""
        while True:
            await anyio.sleep(lease / 3)
            self._round_trip("renew_idempotency")
            try:
                if not await self.store.renew_idempotency(sid, key, token, lease):
                    return
            except StoreUnavailable:
                return

    async def _transact(
        self, call: StepCall, spec: Spec, compute: Compute, big: bool, fp: str | None
    ) -> tuple[Reply, str]:
        sid, key = call.session_id, call.idempotency_key
        for _ in range(self.settings.max_commit_retries):
            async with self.store.transaction(sid, self.settings.session_ttl) as tx:
                cached = self.cache.get(sid)
                self._round_trip("load")
                loaded = await tx.load(None if cached is None else cached.version)
                if loaded is None or loaded[0].tenant != call.tenant:
                    raise SessionNotFound()
                meta, blobs = loaded
                if blobs is None and (cached is None or cached.version != meta.version):
                    raise RuntimeError(f"store returned no blobs for version {meta.version}")
                if key is not None and fp is not None:
                    # our claim may have expired while we ran and a retry committed the
                    # key: answer from its record rather than apply the gradient twice
                    recorded = await tx.recorded(key)
                    if recorded is not None:
                        return self._replay(recorded, fp), "replayed"
                done = await self.offload(big, _run, compute, spec, meta, blobs, cached)
                record = None
                if key is not None and fp is not None:
                    headers = {"content-type": done.reply.media_type, **done.reply.headers}
                    record = IdempotencyRecord(key, fp, done.reply.status, headers, done.reply.body)
                self._round_trip("commit")
                ok = await tx.commit(
                    done.meta,
                    done.blobs,
                    record,
                    self.settings.idempotency_ttl if record is not None else None,
                    history=done.history,
                    history_limit=spec.history,
                )
            if ok:
                self.cache.put(sid, done.cached)
                return done.reply, done.outcome
            m.VERSION_CONFLICTS.inc()
        raise VersionConflict(
            f"the session changed under this step {self.settings.max_commit_retries} times "
            "in a row; nothing was applied, retry"
        )

    async def _wait_for_step(self, call: StepCall, pending: Reply) -> Reply:
        """A sync push answered 202: wait up to its `wait` seconds for the step, then
        answer that step (`waited_reply`), or the 202 if it did not happen in time. An
        accumulation whose deadline passes meanwhile is resolved by the wait itself
        (`wait_version`), so a `wait` beyond the session's `timeout` always ends on a
        step: flushed, or skipped when the session drops."""
        spec = await self._spec(call.tenant, call.session_id)
        step_input = await self._parse_step(call, spec)  # a replayed 202 was not parsed
        wait = min(step_input.wait, self.settings.max_wait)
        if wait <= 0:
            return pending
        target = int(orjson.loads(pending.body)["wait_for"])
        if await self.wait_version(call.tenant, call.session_id, target, wait) is None:
            return pending
        current = await self.load_current(call.tenant, call.session_id)
        reply = await self.offload(
            heavy(current.spec),
            waited_reply,
            current.spec,
            current.meta,
            current.params,
            step_input.ret,
            call.binary_response,
        )
        if "Idempotent-Replayed" in pending.headers:  # a retry: say so, as a replay does
            reply.headers["Idempotent-Replayed"] = "true"
        return reply

    # the state file (docs/state.md) ---------------------------------------------------

    async def export_state(self, tenant: str, session_id: str) -> bytes:
        """The session's state file, of one version."""
        current = await self.load_current(tenant, session_id, with_state=True)
        assert current.state is not None
        return await self.offload(
            heavy(current.spec),
            state_io.encode_session,
            current.spec,
            current.meta,
            current.params,
            current.state,
        )

    async def import_state(
        self, tenant: str, body: bytes, content_type: str | None
    ) -> dict[str, Any]:
        """A new session from a state file (validated before anything is stored)."""
        file = await self._read_state_file(body, content_type, None)
        now = time.time()
        meta = SessionMeta(
            id=new_session_id(),
            tenant=tenant,
            version=0,
            step=file.step,
            spec=file.spec.stored(),
            schedule_state=file.schedule_state,
            skipped=file.skipped,
            created_at=now,
            updated_at=now,
            extra=file.extra,
            params_version=file.version,
        )
        blobs = await self.offload(heavy(file.spec), file.blobs)
        self._round_trip("create")
        await self.store.create(meta, blobs, self.settings.session_ttl)
        self.cache.put(meta.id, Cached(0, file.params, file.state))
        self._remember_spec(meta.id, tenant, file.spec)
        return self.document(meta, file.spec)

    async def replace_state(
        self, tenant: str, session_id: str, body: bytes, content_type: str | None
    ) -> Reply:
        """Replace the session's state by a state file of its configuration, in one
        transaction (`version` + 1); answers the session document."""
        spec = await self._spec(tenant, session_id)
        file = await self._read_state_file(body, content_type, spec)

        def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
            new_meta = state_io.replaced_meta(meta, file, time.time())
            return Computed(
                new_meta,
                file.blobs(),
                codecs.json_reply(self.document(new_meta, spec)),
                Cached(new_meta.version, file.params, file.state),
                "replaced",
            )

        call = StepCall(tenant, session_id, b"", content_type, False, method="PUT")
        big = heavy(spec)
        reply, _ = await self._transact(call, spec, compute, big, None)
        return reply

    async def _read_state_file(
        self, body: bytes, content_type: str | None, session: Spec | None
    ) -> state_io.SessionFile:
        state_io.require_binary(content_type)
        return await self.offload(
            len(body) > OFFLOAD_BYTES,
            state_io.decode_session,
            body,
            self.limits,
            session,
        )

    # federated rounds -----------------------------------------------------------------

    async def submit_update(self, call: StepCall, round_number: int) -> Reply:
        """A client's update for a round (docs/federated.md): idempotent per client and
        round through the idempotency record of its internal key (`update_key`; rounds
        open across an upgrade also find the record of `legacy_update_key`). A different
        body again is 422 on its `client_id`: the key is no header of the request."""
        spec = await self._federated_spec(call.tenant, call.session_id)
        binary = codecs.is_binary(call.content_type)
        update = await self.offload(
            len(call.body) > OFFLOAD_BYTES, parse_update, spec, call.body, binary
        )
        keyed = replace(call, idempotency_key=update_key(round_number, update.client_id))

        async def prepare(_: StepCall, spec: Spec) -> tuple[Compute, bool]:
            def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
                return compute_update(spec, meta, params, state, update, round_number)

            return compute, heavy(spec)

        legacy = legacy_update_key(round_number, update.client_id)
        try:
            reply, _ = await self._idempotent(keyed, prepare, legacy)
        except IdempotencyMismatch:
            raise resubmitted(update.client_id, round_number) from None
        return reply

    async def read_round(self, tenant: str, session_id: str, binary: bool) -> Reply:
        """`GET .../round`, closing the round first if its deadline passed with enough
        updates (nobody else may come to close it)."""
        spec = await self._federated_spec(tenant, session_id)
        meta = await self.owned_meta(tenant, session_id)
        if closable(spec, round_state(spec, meta), time.time()):
            call = StepCall(tenant, session_id, b"", None, False)

            def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
                done = compute_close(spec, meta, params, state)
                if done is None:  # closed by someone else meanwhile
                    raise _NothingToCommit()
                return done

            with suppress(_NothingToCommit):
                await self._transact(call, spec, compute, heavy(spec), None)
        current = await self.load_current(tenant, session_id)
        return await self.offload(
            heavy(current.spec),
            round_answer,
            current.spec,
            current.meta,
            current.params,
            binary,
        )

    async def _federated_spec(self, tenant: str, session_id: str) -> Spec:
        spec = await self._spec(tenant, session_id)
        if spec.federated is None:
            raise NotFederated("this session is not federated (create it with 'federated')")
        return spec

    # reads ----------------------------------------------------------------------------

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

    async def wait_version(
        self, tenant: str, session_id: str, target: int, timeout: float
    ) -> SessionMeta | None:
        """Poll the session's meta until its `version` (params_version) is at least
        `target`: that meta, or None after `timeout` seconds. A sync accumulation found
        past its deadline is resolved on the way (`close_accumulation`), so a push that
        waits gets its step at the deadline even when nobody else pushes."""
        deadline = time.monotonic() + timeout
        delay = WAIT_POLL_FIRST
        while True:
            meta = await self.owned_meta(tenant, session_id)
            if meta.params_version < target and await self.close_accumulation(meta):
                meta = await self.owned_meta(tenant, session_id)
            if meta.params_version >= target:
                return meta
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await anyio.sleep(min(delay, left))
            delay = min(delay * 1.5, WAIT_POLL_MAX)

    async def close_accumulation(self, meta: SessionMeta) -> bool:
        """Resolve the sync accumulation of `meta`'s session if its deadline passed
        (`stepping.close_expired`: flush or drop, as the session says), in a transaction
        as a step is; whether one was due. Someone else resolving it first (or pushing
        the last gradient) leaves nothing to commit; so does a transaction that keeps
        conflicting: the session is moving, the next look sees where it went."""
        spec = await self.load_spec(meta)
        if not accumulation_due(spec, meta):
            return False
        call = StepCall(meta.tenant, meta.id, b"", None, False)

        def compute(meta: SessionMeta, params: np.ndarray, state: OptState) -> Computed:
            done = close_expired(spec, meta, params, state)
            if done is None:  # resolved by someone else meanwhile
                raise _NothingToCommit()
            return done

        with suppress(_NothingToCommit, VersionConflict):
            await self._transact(call, spec, compute, heavy(spec), None)
        return True

    def _replay(self, record: IdempotencyRecord, fp: str) -> Reply:
        if record.fingerprint != fp:
            raise IdempotencyMismatch()
        m.IDEMPOTENT_REPLAYS.inc()
        headers = {k: v for k, v in record.headers.items() if k.lower() != "content-type"}
        media = next(
            (v for k, v in record.headers.items() if k.lower() == "content-type"), codecs.JSON
        )
        headers["Idempotent-Replayed"] = "true"
        return Reply(record.status, record.body, media, headers)

    async def _record(self, session_id: str, key: str) -> IdempotencyRecord | None:
        self._round_trip("get_idempotency")
        return await self.store.get_idempotency(session_id, key)

    # preview --------------------------------------------------------------------------

    async def preview(self, request: PreviewRequest) -> dict[str, Any]:
        """The rates (and cycled momenta) of `request.schedule` on `request.lr`, refused
        (422) as a session would refuse the schedule or past `MAX_PREVIEW_COST`
        (`check_preview`). Parsing, checking and evaluating all run in a worker thread:
        their cost grows with the request (a spec of 32 schedules with 10,000 milestones
        each takes about 20 ms to parse, 100,000 steps up to a second to evaluate)."""

        def run() -> dict[str, Any]:
            try:
                schedule = parse_schedule(request.schedule)
            except SpecError as exc:
                raise spec_error(exc, ["body", "schedule"]) from None
            check_preview(schedule, request.lr, request.steps)
            lrs = schedule.lrs(request.steps, request.lr)
            bad = np.flatnonzero(~np.isfinite(lrs) | (lrs < 0))
            if len(bad):  # check_rates rules it out; JSON would say null
                raise invalid(
                    ["body", "schedule"],
                    f"the rate at step {bad[0]} is {lrs[bad[0]]!r}, not a finite number >= 0",
                )
            momenta = schedule.momenta(request.steps)
            return {
                "lrs": lrs.tolist(),
                "momenta": None if momenta is None else momenta.tolist(),
            }

        return await self.offload(True, run)

    # health -----------------------------------------------------------------------------

    async def ping(self) -> None:
        self._round_trip("ping")
        await self.store.ping()

    async def count_sessions(self) -> int:
        self._round_trip("count_sessions")
        return await self.store.count_sessions()

    # helpers ----------------------------------------------------------------------------

    async def owned_meta(self, tenant: str, session_id: str, refresh: bool = False) -> SessionMeta:
        """The session's meta if it exists and is `tenant`'s; 404 (the same) otherwise."""
        if not _SESSION_ID.fullmatch(session_id):
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
        """`spec_of(meta)`, parsed in a worker thread when this replica has not parsed it
        yet and its layout is large (10,000 tensors take about 15 ms to parse)."""
        known = self._specs.get(meta.id)
        if known is not None and known[0] == meta.tenant:
            self._specs.move_to_end(meta.id)
            return known[1]
        layout = meta.spec.get("layout")
        big = isinstance(layout, list) and len(layout) > OFFLOAD_TENSORS
        spec = await self.offload(big, Spec.load, meta.spec)
        self._remember_spec(meta.id, meta.tenant, spec)
        return spec

    def spec_of(self, meta: SessionMeta) -> Spec:
        """The parsed spec of `meta`'s session: from memory when this replica parsed it
        before (a session's spec never changes), else parsed and remembered."""
        known = self._specs.get(meta.id)
        if known is not None and known[0] == meta.tenant:
            self._specs.move_to_end(meta.id)
            return known[1]
        spec = Spec.load(meta.spec)
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


def heavy(spec: Spec) -> bool:
    """Whether NumPy work on a session of `spec` (a step, decoding or encoding its params
    and state) runs in a worker thread: its cost grows with the elements and with the
    tensors (each one a slice, a name and a dict entry to build)."""
    return spec.layout.total > OFFLOAD_ELEMENTS or len(spec.layout.specs) > OFFLOAD_TENSORS


def _run(
    compute: Compute,
    spec: Spec,
    meta: SessionMeta,
    blobs: SessionBlobs | None,
    cached: Cached | None,
) -> Computed:
    """`compute` on the loaded blobs (or on the cached arrays when the blobs were not read)."""
    if blobs is not None:
        params = np.frombuffer(blobs.params, dtype=spec.dtype.newbyteorder("<"))
        state = OptState.from_bytes(blobs.state)
    else:
        assert cached is not None
        params, state = cached.params, cached.state
    return compute(meta, params, state)


class _NothingToCommit(Exception):
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
