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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from service.core import find_nonfinite, tensorfile
from service.core.averaging import EMA_AVG, EMA_N, SWA_AVG, SWA_N
from service.core.consistency import parse_consistency
from service.core.errors import CoreError
from service.core.lr_finder import LRFinderState
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.errors import (
    Invalid,
    Loc,
    UnsupportedMediaType,
    field_error,
    invalid,
)
from service.sessions.federation import UPDATE_PREFIX
from service.sessions.model import MAX_SAFE_INT, LastStep, Pending, RoundRecord
from service.sessions.parsing import build_spec, validate_model
from service.sessions.requests import CreateSession
from service.sessions.spec import (
    SPEC_FORMAT,
    Limits,
    Spec,
    decode_schedule_state,
    encode_schedule_state,
)
from service.sessions.stepping import ACC_SUM, current_lr, split_state
from service.store.base import SessionBlobs, SessionMeta

#: the `format` of a state file
FORMAT = "optserve.session/1"
PARAMS = "params/"
STATE = "state/"
SCALAR = "scalar/"
#: what a scalar of each Python type is written as (OptState's convention)
_SCALAR_DTYPES: dict[type, np.dtype[Any]] = {
    bool: np.dtype("?"),
    int: np.dtype("<i8"),
    float: np.dtype("<f8"),
}
_SCALAR_TYPES = {dtype: kind for kind, dtype in _SCALAR_DTYPES.items()}
_KIND_NAMES = {bool: "a flag (BOOL)", int: "an integer (I64)", float: "a real number (F64)"}
_META = ["body", "__metadata__"]
# MAX_SAFE_INT (model.py): the largest counter (and integer of the JSON metadata) a file
# may hold: JSON clients in JavaScript read numbers as doubles, exact up to there
#: digits of a counter: 16 hold MAX_SAFE_INT (9007199254740991)
_COUNTER_DIGITS = 16
#: the most dimensions a layout shape may have (NumPy's maximum)
_MAX_DIMS = tensorfile.MAX_DIMS
#: tensors of a file per tensor of the layout: params/<t> and the state/<key>/<t>
#: arrays (the optimizer's and the session's own), with room to spare
_TENSORS_PER_TENSOR = 16
#: tensors of a file besides those: the scalar/<key> entries
_EXTRA_TENSORS = 64
#: how deep the JSON of spec, schedule state and `extra` may nest (they need a few levels)
_MAX_DEPTH = 32


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


# --- writing -------------------------------------------------------------------------------


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
        tensors[SCALAR + key] = np.array(value, dtype=_SCALAR_DTYPES[type(value)])
    metadata = {
        "format": FORMAT,
        "spec": _dumps(spec.stored()),
        "step": str(meta.step),
        "version": str(meta.params_version),
        "skipped": str(meta.skipped),
        "schedule_state": _dumps(meta.schedule_state),
        "extra": _dumps(meta.extra),
        "id": meta.id,
        "created_at": repr(float(meta.created_at)),
        "updated_at": repr(float(meta.updated_at)),
        "lr": repr(current_lr(spec, meta)),
    }
    return tensorfile.encode(tensors, metadata)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- reading -------------------------------------------------------------------------------


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
            [*_META, "format"], f"must be {FORMAT!r} (a session state file): got {_short(found)}"
        )
    spec = _parse_spec(metadata, limits)
    if session is not None:
        _check_same_configuration(session, spec)
        spec = session  # the same, with the session's tensor order
    step, version, skipped = (_counter(metadata, key) for key in ("step", "version", "skipped"))
    schedule_state = _schedule_state(spec, metadata, step)
    extra = _extra(spec, metadata)
    _check_next_rate(spec, step, version, skipped, schedule_state, extra)
    params, state = _tensors(spec, tensors)
    _check_params(spec, params)
    _check_optimizer_state(spec, state)
    _check_own_state(spec, state, extra, step, version)
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
    return codecs.load_binary(body, limits.max_tensors * _TENSORS_PER_TENSOR + _EXTRA_TENSORS)


def _short(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message, shortened (a metadata string may be megabytes long; a
    list or an object is named by its kind, not printed)."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f" (+{len(value) - limit} characters)"
    return repr(value)


# --- the metadata ------------------------------------------------------------------------


def _json(metadata: Mapping[str, str], key: str, default: Any = None, ints: bool = True) -> Any:
    """A metadata entry's JSON, nested at most `_MAX_DEPTH` levels and, with `ints`, with
    every integer within +-MAX_SAFE_INT (`_check_json`)."""
    text = metadata.get(key)
    if text is None:
        return default
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid([*_META, key], f"must be JSON written as a string: {exc}") from None
    _check_json(value, [*_META, key], ints)
    return value


def _check_json(value: Any, at: Loc, ints: bool = True) -> None:
    """A JSON value nested at most `_MAX_DEPTH` levels (orjson reads 1024, deeper than
    Python's repr, comparisons and validators recurse), and, with `ints`, every integer
    within +-MAX_SAFE_INT (orjson reads integers up to 64 bits: a counter growing from
    one could overflow what the store writes). Iterative, so any depth is checked."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, (dict, list)) and len(path) >= _MAX_DEPTH:
            raise invalid([*at, *path], f"nests deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, [*path, str(k)]) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(item))
        elif ints and _is_int(item) and abs(item) > MAX_SAFE_INT:
            raise invalid(
                [*at, *path],
                f"{item} is beyond +-(2**53 - 1) = {MAX_SAFE_INT}: JSON clients in "
                "JavaScript read numbers as doubles, exact only up to there",
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _counter(metadata: Mapping[str, str], key: str) -> int:
    text = metadata.get(key)
    if text is None:
        raise invalid([*_META, key], "is required (an integer >= 0 written as a string)")
    if not (text.isascii() and text.isdigit()):
        msg = f"must be an integer >= 0 written as a string (decimal digits): {_short(text)}"
        raise invalid([*_META, key], msg)
    if len(text) > _COUNTER_DIGITS:
        raise invalid(
            [*_META, key],
            f"has {len(text)} digits: at most {_COUNTER_DIGITS} (a counter is at most 2**53 - 1 "
            f"= {MAX_SAFE_INT}, the largest integer JSON clients in JavaScript read exactly "
            "as doubles)",
        )
    value = int(text)  # at most 16 ASCII digits: safe and quick
    if value > MAX_SAFE_INT:
        raise invalid(
            [*_META, key],
            f"must be at most 2**53 - 1 = {MAX_SAFE_INT} (JSON clients in JavaScript read "
            f"numbers as doubles, exact only up to there): got {value}",
        )
    return value


def _parse_spec(metadata: Mapping[str, str], limits: Limits) -> Spec:
    """The file's spec, checked as a creation request is (same rules and limits)."""
    at = [*_META, "spec"]
    data = _json(metadata, "spec", ints=False)  # the layout's are checked first, by _layout
    if not isinstance(data, dict):
        raise invalid(at, "is required: the session's configuration as a JSON object")
    if data.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise invalid([*at, "format"], f"must be {SPEC_FORMAT}: got {_short(data['format'])}")
    for key in ("optimizer", "dtype", "layout"):
        if key not in data:
            raise invalid([*at, key], "is required")
    shapes = _layout(data["layout"], [*at, "layout"], limits)
    _check_json(data, at)
    fields = {k: v for k, v in data.items() if k not in ("format", "layout") and v is not None}
    default = parse_consistency(None).model_dump(mode="json")
    if fields.get("federated") is not None and fields.get("consistency") == default:
        del fields["consistency"]  # what a federated session stores; not given at creation
    # the layout's tensors as zero-memory arrays of their shapes (build_spec reads shapes)
    stand_ins: dict[str, np.ndarray] = {}
    for i, (name, shape) in enumerate(shapes):
        try:
            stand_ins[name] = np.broadcast_to(np.zeros((), np.float32), shape)
        except (ValueError, TypeError, OverflowError) as exc:  # _layout checked; a safety net
            raise invalid(
                [*at, "layout", i], f"shape {list(shape)} cannot be made: {exc}"
            ) from None
    try:
        request = validate_model(CreateSession, {**fields, "params": {}})
        spec = build_spec(request, stand_ins, limits)
    except Invalid as exc:
        raise _under(exc, at) from None
    except CoreError as exc:  # what build_spec does not name itself: still a 422 here
        raise invalid(at, f"not a valid configuration: {exc}") from None
    _check_json(spec.stored(), at)  # what is stored: no integer a float became (1e30)
    return spec


def _layout(data: Any, at: Loc, limits: Limits) -> list[tuple[str, tuple[int, ...]]]:
    """The layout's `(name, shape)` pairs, within `limits` and what NumPy can shape: the
    sizes are Python integers here, checked before any NumPy call."""
    if not isinstance(data, list):
        raise invalid(at, "must be a list of [name, shape] pairs")
    if len(data) > limits.max_tensors:
        raise invalid(
            [*at, limits.max_tensors],
            f"{len(data)} tensors, over this server's limit of {limits.max_tensors}",
        )
    shapes: list[tuple[str, tuple[int, ...]]] = []
    seen: set[str] = set()
    total = 0
    over: int | None = None  # the entry whose tensor takes the total past max_params
    for i, entry in enumerate(data):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        dims = entry[1] if ok else None
        if not (
            isinstance(dims, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
        ):
            raise invalid([*at, i], "must be [name, shape]: a string and a list of integers >= 0")
        if len(dims) > _MAX_DIMS:
            raise invalid(
                [*at, i], f"has {len(dims)} dimensions, more than the {_MAX_DIMS} NumPy allows"
            )
        count = 1
        extent = 8  # bytes NumPy must address for the non-zero dims, at the widest dtype
        for d in dims:
            if d >= 2**63:
                raise invalid([*at, i], f"dimension {d} is not below 2**63")
            count *= d
            extent *= d or 1
        if extent >= 2**63:
            raise invalid(
                [*at, i],
                f"shape {dims} is too large for NumPy (its non-zero dimensions must span "
                "fewer than 2**63 bytes)",
            )
        total += count
        if total > limits.max_params and over is None:
            over = i
        name = entry[0]
        if name in seen:
            raise invalid([*at, i], f"tensor {_short(name)} is named twice")
        seen.add(name)
        shapes.append((name, tuple(dims)))
    if over is not None:  # as a creation says it (at the layout), and the tensor at fault
        msg = f"{total} parameters in all, over this server's limit of {limits.max_params}"
        raise Invalid(
            f"spec: layout: {msg}",
            [
                field_error(at, msg),
                field_error([*at, over], f"brings the parameters past {limits.max_params}"),
            ],
        )
    return shapes


def _under(exc: Invalid, at: Loc) -> Invalid:
    """A creation refusal (locs `["body", ...]`) moved under the file's spec; the
    creation's `params` is the spec's `layout`."""
    errors = []
    for error in exc.errors:
        loc = list(error["loc"])[1:]
        if loc[:1] == ["params"]:
            loc[0] = "layout"
        errors.append(field_error([*at, *loc], error["msg"]))
    return Invalid(f"spec: {exc.detail}", errors)


def _check_same_configuration(session: Spec, file: Spec) -> None:
    """A PUT keeps the session's configuration: the file's must be the same (tensors and
    shapes first, in any order, then each field with defaults filled)."""
    mine = {s.name: s.shape for s in session.layout.specs}
    theirs = {s.name: s.shape for s in file.layout.specs}
    for name, shape in mine.items():
        if name not in theirs:
            raise invalid(["body", PARAMS + name], f"the session has tensor {name!r}; the file not")
        if theirs[name] != shape:
            raise invalid(
                ["body", PARAMS + name],
                f"tensor {name!r} has shape {list(theirs[name])} in the file, "
                f"{list(shape)} in the session",
            )
    for name in theirs:
        if name not in mine:
            raise invalid(["body", PARAMS + name], f"the session has no tensor {_short(name)}")
    ours, given = session.stored(), file.stored()
    for key, value in ours.items():
        if key != "layout" and given.get(key) != value:
            raise invalid(
                [*_META, "spec", key],
                f"the file's {key} ({_dumps(given.get(key))}) is not the session's "
                f"({_dumps(value)}): a PUT replaces the state, not the configuration (import "
                "the file as a new session instead)",
            )


def _schedule_state(spec: Spec, metadata: Mapping[str, str], step: int) -> dict[str, Any] | None:
    """The schedule state, with the fields and types of the schedule's own (JSON-safe)."""
    at = [*_META, "schedule_state"]
    data = _json(metadata, "schedule_state")
    expected = None if spec.schedule is None else spec.schedule.initial_state(spec.hp.lr)
    if expected is None:
        if data is not None:
            raise invalid(at, "must be null: this session's schedule keeps no state")
        return None
    if not isinstance(data, dict) or set(data) != set(expected):
        raise invalid(at, f"must be an object of exactly {sorted(expected)}")
    state: dict[str, float | int | bool] = {}
    for key, want in expected.items():
        value = data[key]
        if isinstance(value, str) and value in ("inf", "-inf", "nan"):
            value = float(value)
        kind = type(want)
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise invalid([*at, key], f"must be {_KIND_NAMES[kind]}: got {_short(value)}")
        state[key] = value
    decoded = decode_schedule_state(encode_schedule_state(state))
    try:
        rate = spec.lr(step, decoded)
    except (ArithmeticError, ValueError) as exc:  # OverflowError, a math domain error
        raise invalid(at, f"gives no rate for the next step: {exc}") from None
    if not (math.isfinite(rate) and rate >= 0):
        raise invalid(at, f"gives the rate {rate} for the next step, not a finite number >= 0")
    return encode_schedule_state(state)


def _check_next_rate(
    spec: Spec,
    step: int,
    version: int,
    skipped: int,
    schedule_state: dict[str, Any] | None,
    extra: dict[str, Any],
) -> None:
    """The rate of the next step, as the session document reports it (`current_lr`),
    can be computed at the file's `step`: a schedule whose rate overflows there (a
    `gamma` above 1 raised to a large step) is refused here, not met as an error later."""
    meta = SessionMeta(
        id="",
        tenant="",
        version=0,
        step=step,
        spec={},
        schedule_state=schedule_state,
        skipped=skipped,
        extra=extra,
        params_version=version,
    )
    try:
        rate = current_lr(spec, meta)
    except (ArithmeticError, ValueError) as exc:  # OverflowError, a math domain error
        raise invalid(
            [*_META, "step"], f"the schedule gives no rate for the step after {step}: {exc}"
        ) from None
    if not math.isfinite(rate):
        raise invalid(
            [*_META, "step"], f"the schedule gives the rate {rate} for the step after {step}"
        )


def _extra(spec: Spec, metadata: Mapping[str, str]) -> dict[str, Any]:
    """`extra`: only what the session's features keep, each well formed."""
    at = [*_META, "extra"]
    data = _json(metadata, "extra", {})
    if not isinstance(data, dict):
        raise invalid(at, "must be a JSON object")
    kept: dict[str, type[BaseModel]] = {}
    if spec.lr_finder is not None:
        kept["lr_finder"] = LRFinderState
    if spec.sync is not None:
        kept.update(pending=Pending, last=LastStep)
    if spec.federated is not None:
        kept["round"] = RoundRecord
    for key, value in data.items():
        model = kept.get(key)
        if model is None:
            raise invalid([*at, key], "is not kept by a session of this configuration")
        try:
            model.model_validate(value)
        except ValidationError as exc:
            errors = [field_error([*at, key, *e["loc"]], e["msg"]) for e in exc.errors()]
            raise Invalid(f"extra.{key}: {errors[0]['msg']}", errors) from None
    pending = data.get("pending")
    if spec.sync is not None and pending is not None and pending["count"] >= spec.sync.accumulate:
        raise invalid(
            [*at, "pending", "count"],
            f"must be below accumulate ({spec.sync.accumulate}): got {pending['count']}",
        )
    return data


# --- the tensors ----------------------------------------------------------------------------


def _tensors(spec: Spec, tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, OptState]:
    """The flat params and the state, each tensor checked against layout and dtype."""
    params: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    scalars: dict[str, float | int | bool] = {}
    for name, value in tensors.items():
        at = ["body", name]
        if name.startswith(PARAMS):
            params[name[len(PARAMS) :]] = _array(spec, name[len(PARAMS) :], value, at)
        elif name.startswith(STATE):
            key, sep, tensor = name[len(STATE) :].partition("/")
            if not key or not sep:
                raise invalid(at, "a state array is named state/<key>/<tensor>")
            arrays.setdefault(key, {})[tensor] = _array(spec, tensor, value, at)
        elif name.startswith(SCALAR) and name[len(SCALAR) :] and "/" not in name[len(SCALAR) :]:
            kind = _SCALAR_TYPES.get(value.dtype) if value.ndim == 0 else None
            if kind is None:
                raise invalid(
                    at, f"a scalar is 0-d, I64, F64 or BOOL: got {value.dtype}{list(value.shape)}"
                )
            scalars[name[len(SCALAR) :]] = kind(value.item())
        else:
            raise invalid(
                at,
                "is not a state file's tensor (params/<tensor>, state/<key>/<tensor>, "
                "scalar/<key>)",
            )
    flat = _flatten(spec, params, PARAMS)
    state = OptState({k: _flatten(spec, v, f"{STATE}{k}/") for k, v in arrays.items()}, scalars)
    clash = sorted(set(state.arrays) & set(state.scalars))
    if clash:
        raise invalid(
            ["body", SCALAR + clash[0]], f"{_short(clash[0])} is both an array and a scalar"
        )
    return flat, state


def _array(spec: Spec, tensor: str, value: np.ndarray, at: Loc) -> np.ndarray:
    if tensor not in spec.layout:
        raise invalid(at, f"the session's layout has no tensor {_short(tensor)}")
    shape = spec.layout[tensor].shape
    if value.dtype != spec.dtype:
        raise invalid(at, f"must be {spec.dtype.name} (the session's dtype), not {value.dtype}")
    if value.shape != shape:
        raise invalid(at, f"has shape {list(value.shape)}, expected {list(shape)}")
    return value


def _flatten(spec: Spec, parts: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    """The tensors `prefix<name>` of every layout tensor, end to end (a new array)."""
    out = np.empty(spec.layout.total, dtype=spec.dtype)
    for segment in spec.layout.specs:
        if segment.name not in parts:
            raise invalid(
                ["body", prefix + segment.name], f"missing tensor {prefix + segment.name!r}"
            )
        out[segment.offset : segment.stop] = parts[segment.name].reshape(-1)
    return out


def _check_finite(spec: Spec, values: np.ndarray, prefix: str, what: str) -> None:
    if np.isfinite(values).all():
        return
    count, names = find_nonfinite(values, spec.layout)
    msg = f"{what} must be finite (holds NaN or inf)"
    raise Invalid(
        f"{count} non-finite values in {', '.join(repr(prefix + n) for n in names)}",
        [field_error(["body", prefix + n], msg) for n in names],
    )


def _check_params(spec: Spec, params: np.ndarray) -> None:
    _check_finite(spec, params, PARAMS, "params")


def _first(spec: Spec, key: str) -> Loc:
    """The loc of a state array's first tensor (where a whole array is at fault)."""
    return ["body", f"{STATE}{key}/{spec.layout.names[0]}"]


def _check_optimizer_state(spec: Spec, state: OptState) -> None:
    """The optimizer's entries (names without a dot): the arrays and scalars it keeps
    for this configuration, of their types, finite."""
    opt, _ = split_state(state)
    optimizer, hp = spec.optimizer, spec.hp
    required = optimizer.state_arrays(hp)
    allowed = {*required, *optimizer.lazy_arrays}
    for key in required:
        if key not in opt.arrays:
            raise invalid(_first(spec, key), f"missing: {optimizer.name} keeps {key!r} here")
    for key in sorted(opt.arrays):
        if key not in allowed:
            raise invalid(
                _first(spec, key),
                f"{optimizer.name} keeps no {_short(key)} (it keeps {sorted(allowed)})",
            )
        _check_finite(spec, opt.arrays[key], f"{STATE}{key}/", "optimizer state")
    expected = optimizer.initial_scalars(hp)
    for key, want in expected.items():
        if key not in opt.scalars:
            raise invalid(["body", SCALAR + key], f"missing: {optimizer.name} keeps {key!r}")
        _check_scalar(key, opt.scalars[key], type(want))
    for key in sorted(set(opt.scalars) - set(expected)):
        raise invalid(["body", SCALAR + key], f"{optimizer.name} keeps no scalar {_short(key)}")


def _check_scalar(key: str, value: float | int | bool, kind: type) -> None:
    at = ["body", SCALAR + key]
    if type(value) is not kind:
        raise invalid(at, f"must be {_KIND_NAMES[kind]}: got {value!r}")
    if kind is int and not 0 <= int(value) <= MAX_SAFE_INT:
        raise invalid(at, f"must be in [0, 2**53 - 1 = {MAX_SAFE_INT}]: got {value}")
    if kind is float and not math.isfinite(value):
        raise invalid(at, f"must be finite: got {value}")


def _check_own_state(
    spec: Spec, state: OptState, extra: Mapping[str, Any], step: int, version: int
) -> None:
    """The session's own entries: exactly those its features keep now."""
    _, own = split_state(state)
    arrays, scalars = dict(own.arrays), dict(own.scalars)
    for config, count_key, avg_key in ((spec.ema, EMA_N, EMA_AVG), (spec.swa, SWA_N, SWA_AVG)):
        if config is None:
            continue
        if count_key not in scalars:
            raise invalid(["body", SCALAR + count_key], "missing: the session keeps this average")
        count = scalars.pop(count_key)
        _check_scalar(count_key, count, int)
        average = arrays.pop(avg_key, None)
        if (average is not None) != (count > 0):
            raise invalid(
                _first(spec, avg_key),
                f"{avg_key!r} is there exactly when {count_key} > 0 ({count_key} is {count})",
            )
        if average is not None:
            _check_finite(spec, average, f"{STATE}{avg_key}/", "an average")
    pending = extra.get("pending")
    active = (
        spec.sync is not None
        and pending is not None
        and pending["base_version"] == version
        and pending["count"] > 0
    )
    accumulated = arrays.pop(ACC_SUM, None)
    if (accumulated is not None) != active:
        raise invalid(
            _first(spec, ACC_SUM),
            f"{ACC_SUM!r} is there exactly when a sync session's extra.pending holds "
            f"gradients on its version ({version})",
        )
    if accumulated is not None and spec.transforms.nonfinite != "skip":
        _check_finite(spec, accumulated, f"{STATE}{ACC_SUM}/", "the accumulated gradient")
    record = extra.get("round")
    clients = len(record["clients"]) if record is not None and record["round"] == step else 0
    for i in range(clients if spec.federated is not None else 0):
        update = arrays.pop(f"{UPDATE_PREFIX}{i}", None)
        if update is None:
            raise invalid(_first(spec, f"{UPDATE_PREFIX}{i}"), "missing: a client's update")
        _check_finite(spec, update, f"{STATE}{UPDATE_PREFIX}{i}/", "an update")
    for key in sorted(arrays):
        raise invalid(
            _first(spec, key), f"{_short(key)} is not kept by a session of this configuration"
        )
    for key in sorted(scalars):
        raise invalid(["body", SCALAR + key], f"{_short(key)} is not kept by this configuration")


__all__ = [
    "FORMAT",
    "SessionFile",
    "decode_session",
    "encode_session",
    "replaced_meta",
    "require_binary",
]
