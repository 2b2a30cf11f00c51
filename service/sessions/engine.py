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

The engine is built in layers: `engine_base.EngineBase` (store, specs, cache,
offloading), `transactions.Transactions` (the step transaction and idempotency),
`state_files.StateFiles` and `rounds.Rounds`, and `Engine` here (sessions, steps, waits,
previews).
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import orjson

from service.core.averaging import init_averages
from service.core.errors import SpecError
from service.core.schedules import parse_schedule
from service.core.state import OptState
from service.sessions import codecs
from service.sessions import metrics as m
from service.sessions.accumulation import accumulation_due, close_expired, waited_reply
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.engine_base import (
    OFFLOAD_BYTES,
    WAIT_POLL_FIRST,
    WAIT_POLL_MAX,
    Compute,
    NothingToCommit,
    StepCall,
    heavy,
    new_session_id,
)
from service.sessions.errors import SessionNotFound, VersionConflict, invalid, spec_error
from service.sessions.parsing import (
    StepInput,
    check_preview,
    parse_create,
    parse_step,
    validate_model,
)
from service.sessions.requests import MetricsRequest, PreviewRequest
from service.sessions.rounds import Rounds
from service.sessions.spec import Spec, encode_schedule_state
from service.sessions.state_files import StateFiles
from service.sessions.stepping import Computed, join_state
from service.sessions.steps import compute_metrics, compute_step
from service.store.base import SessionBlobs, SessionMeta


class Engine(StateFiles, Rounds):
    """The sessions layer's entry point over one store; one per application."""

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
        (`accumulation.close_expired`: flush or drop, as the session says), in a transaction
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
                raise NothingToCommit()
            return done

        with suppress(NothingToCommit, VersionConflict):
            await self._transact(call, spec, compute, heavy(spec), None)
        return True

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
