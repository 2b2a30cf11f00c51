"""A session's state file (docs/state.md): written from a loaded session, read back and
validated entirely before anything is stored (pure: no store, no FastAPI).

`encode_session` writes the file of one version of a session: `params/<name>`,
`state/<key>/<name>` (every array of the state blob, the optimizer's and the session's
own, split per tensor), `scalar/<key>` (0-d), and the counters, spec, schedule state and
`extra` as `__metadata__` strings. `decode_session` reads one into a `SessionFile`,
checking it as docs/state.md says (the spec as a creation request is checked, the
tensors against the layout and the dtype, the state entries against what the optimizer
and the session's features keep, `extra` and the schedule state against the spec);
given the session a PUT replaces, it also checks that the file's configuration is that
session's. Every refusal is an `SessionError` naming the tensor or metadata key at fault.

A round trip is exact: arrays are copied as their bytes, scalars keep their type
(int64, float64, bool), and the JSON of spec, schedule state and `extra` is what the
store holds, written by orjson (shortest round-trip floats) in the same key order.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import tensorfile
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.errors import (
    UnsupportedMediaType,
    field_error,
    invalid,
)
from service.sessions.spec import (
    Limits,
    Spec,
)
from service.sessions.state_format import (
    EXTRA_TENSORS,
    FORMAT,
    META,
    PARAMS,
    SCALAR,
    SCALAR_DTYPES,
    STATE,
    TENSORS_PER_TENSOR,
)
from service.sessions.state_metadata import (
    check_next_rate,
    check_same_configuration,
    json_text,
    parse_file_spec,
    read_counter,
    read_extra,
    read_schedule_state,
    short,
)
from service.sessions.state_tensors import (
    check_optimizer_state,
    check_own_state,
    check_params,
    read_tensors,
)
from service.sessions.stepping import current_lr
from service.store.base import SessionBlobs, SessionMeta


@dataclass(frozen=True, slots=True)
class SessionFile:
    """A state file, validated: what a session made from it (or replaced by it) holds."""

    spec: Spec
    params: np.ndarray
    state: OptState
    step: int
    version: int
    skipped: int
    #: JSON-safe, as `SessionMeta.schedule_state` holds it
    schedule_state: dict[str, Any] | None
    extra: dict[str, Any]

    def blobs(self) -> SessionBlobs:
        return SessionBlobs(self.params.tobytes(), self.state.to_bytes())


def encode_session(spec: Spec, meta: SessionMeta, params: np.ndarray, state: OptState) -> bytes:
    """The state file of a session at one version (docs/state.md)."""
    layout = spec.layout
    tensors: dict[str, np.ndarray] = {
        PARAMS + name: view for name, view in layout.unflatten(params).items()
    }
    for key in sorted(state.arrays):
        for name, view in layout.unflatten(state.arrays[key]).items():
            tensors[f"{STATE}{key}/{name}"] = view
    for key in sorted(state.scalars):
        value = state.scalars[key]
        tensors[SCALAR + key] = np.array(value, dtype=SCALAR_DTYPES[type(value)])
    metadata = {
        "format": FORMAT,
        "spec": json_text(spec.stored()),
        "step": str(meta.step),
        "version": str(meta.params_version),
        "skipped": str(meta.skipped),
        "schedule_state": json_text(meta.schedule_state),
        "extra": json_text(meta.extra),
        "id": meta.id,
        "created_at": repr(float(meta.created_at)),
        "updated_at": repr(float(meta.updated_at)),
        "lr": repr(current_lr(spec, meta)),
    }
    return tensorfile.encode(tensors, metadata)


def require_binary(content_type: str | None) -> None:
    """A state file travels as `application/octet-stream` only (415 otherwise)."""
    if not codecs.is_binary(content_type):  # 415 for types neither JSON nor binary
        media = (content_type or "").split(";", 1)[0].strip() or "none"
        msg = f"a state file is sent as {codecs.BINARY}, not {media}"
        raise UnsupportedMediaType(msg, [field_error(["header", "Content-Type"], msg)])


def decode_session(body: bytes, limits: Limits, session: Spec | None = None) -> SessionFile:
    """A state file, validated (docs/state.md); `session`: the spec of the session a PUT
    replaces, which the file's configuration must match."""
    tensors, metadata = _load(body, limits)
    found = metadata.get("format")
    if found != FORMAT:
        raise invalid(
            [*META, "format"], f"must be {FORMAT!r} (a session state file): got {short(found)}"
        )
    spec = parse_file_spec(metadata, limits)
    if session is not None:
        check_same_configuration(session, spec)
        spec = session  # the same, with the session's tensor order
    step, version, skipped = (read_counter(metadata, key) for key in ("step", "version", "skipped"))
    schedule_state = read_schedule_state(spec, metadata, step)
    extra = read_extra(spec, metadata)
    check_next_rate(spec, step, version, skipped, schedule_state, extra)
    params, state = read_tensors(spec, tensors)
    check_params(spec, params)
    check_optimizer_state(spec, state)
    check_own_state(spec, state, extra, step, version)
    return SessionFile(spec, params, state, step, version, skipped, schedule_state, extra)


def replaced_meta(meta: SessionMeta, file: SessionFile, now: float) -> SessionMeta:
    """The meta of a session whose state `file` replaces (PUT): the file's counters,
    schedule state and `extra`, the next store revision and params version; a sync
    accumulation pending on the file's version moves to the new version."""
    version = meta.params_version + 1
    extra = dict(file.extra)
    pending = extra.get("pending")
    if isinstance(pending, dict) and pending.get("base_version") == file.version:
        extra["pending"] = {**pending, "base_version": version}
    return meta.evolve(
        version=meta.version + 1,
        params_version=version,
        step=file.step,
        skipped=file.skipped,
        schedule_state=file.schedule_state,
        extra=extra,
        updated_at=now,
    )


def _load(body: bytes, limits: Limits) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's tensors and metadata, within what a session of `limits` can need (400
    when it is not a safetensors file, or its header is over that budget, as
    `codecs.load_binary` answers)."""
    return codecs.load_binary(body, limits.max_tensors * TENSORS_PER_TENSOR + EXTRA_TENSORS)
