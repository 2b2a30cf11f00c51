"""The step transaction and idempotency of the engine (`Transactions`).

**The transaction** (decision 3), shared by steps and reported losses (`_transact`): up
to `settings.max_commit_retries` times, inside `store.transaction(id)`, `load()` the
session, passing the revision this replica holds in its cache (`cache.SessionCache`,
an LRU bounded by count and bytes) so that the blobs are not read again when it is
current; compute (`steps.compute_step` / `compute_metrics`: pure, see that module
for what a step does); `commit()` meta, blobs, the idempotency record and the history
entry at once, if the revision is still the loaded one. On a conflict, load and compute
again. The cache is refreshed only after a commit succeeded. NumPy work on a large
session (decoding, the update, encoding the answer) runs in a worker thread, so the
event loop keeps serving. A sync push answered 202 may then wait (`wait`) for the step
that completes its accumulation, by polling the session's version (`wait_version`, also
behind `GET .../params?min_version=`); a waiter that finds the accumulation past its
deadline (`timeout`) resolves it (`close_accumulation`), as `read_round` closes a
federated round, so a session whose worker never pushes cannot wedge.

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
import math
import secrets
from collections.abc import Awaitable, Callable
from contextlib import suppress

import anyio
import anyio.to_thread
import numpy as np

from service.core.state import OptState
from service.sessions import codecs
from service.sessions import metrics as m
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.engine_base import (
    IDEMPOTENCY_KEY,
    OFFLOAD_BYTES,
    Compute,
    EngineBase,
    StepCall,
    fingerprint,
    heavy,
)
from service.sessions.errors import (
    IdempotencyInFlight,
    IdempotencyMismatch,
    SessionNotFound,
    VersionConflict,
    invalid,
)
from service.sessions.spec import Spec
from service.sessions.stepping import Computed
from service.store.base import IdempotencyRecord, SessionBlobs, SessionMeta, StoreUnavailable


class Transactions(EngineBase):
    """Commit what a step computes, at most once per Idempotency-Key."""

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
            if legacy_key is None and not IDEMPOTENCY_KEY.fullmatch(key):
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
