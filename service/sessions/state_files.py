"""State files through the engine (`StateFiles`): export, import, replace (PUT).

**State files** (docs/state.md; `service.sessions.state_io` reads and writes them): an export
is a read of one version; an import validates the whole file, then stores a new session
(as create does); a replacement (PUT) validates it against the session's configuration,
then commits it through `_transact` like a step (version-checked, `version` + 1). No
Idempotency-Key: replacing by the same file twice leaves the same state.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service.core.state import OptState
from service.sessions import codecs, state_io
from service.sessions.cache import Cached
from service.sessions.codecs import Reply
from service.sessions.engine_base import OFFLOAD_BYTES, StepCall, heavy, new_session_id
from service.sessions.spec import Spec
from service.sessions.stepping import Computed
from service.sessions.transactions import Transactions
from service.store.base import SessionMeta


class StateFiles(Transactions):
    """Export, import and replace a session's state file."""

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
