"""Federated rounds through the engine (`Rounds`): updates in, rounds closed and read
(docs/federated.md; what a round computes is `service.sessions.federation`). A
client's update is idempotent per round and client (`federation.update_key`).
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import replace

import numpy as np

from service.core.state import OptState
from service.sessions import codecs
from service.sessions.codecs import Reply
from service.sessions.engine_base import OFFLOAD_BYTES, Compute, NothingToCommit, StepCall, heavy
from service.sessions.errors import IdempotencyMismatch, NotFederated
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
from service.sessions.spec import Spec
from service.sessions.stepping import Computed
from service.sessions.transactions import Transactions
from service.store.base import SessionMeta


class Rounds(Transactions):
    """Federated updates and rounds."""

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
                    raise NothingToCommit()
                return done

            with suppress(NothingToCommit):
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
