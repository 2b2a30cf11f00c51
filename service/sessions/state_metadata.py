"""Reading a state file's `__metadata__` (docs/state.md): its format, counters, spec
(checked as a create is, and against the session a PUT replaces), schedule state and
`extra` (each entry through its model, `service.sessions.model`), every JSON value
bounded in depth and size before it is trusted. Used by `state_io.decode_session`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from service.core.consistency import parse_consistency
from service.core.errors import CoreError
from service.core.lr_finder import LRFinderState
from service.sessions.errors import (
    Invalid,
    Loc,
    field_error,
    invalid,
)
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
from service.sessions.state_format import (
    COUNTER_DIGITS,
    KIND_NAMES,
    MAX_DEPTH,
    MAX_DIMS,
    META,
    PARAMS,
)
from service.sessions.stepping import current_lr
from service.store.base import SessionMeta


def short(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message, shortened (a metadata string may be megabytes long; a
    list or an object is named by its kind, not printed)."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f" (+{len(value) - limit} characters)"
    return repr(value)


def _json(metadata: Mapping[str, str], key: str, default: Any = None, ints: bool = True) -> Any:
    """A metadata entry's JSON, nested at most `MAX_DEPTH` levels and, with `ints`, with
    every integer within +-MAX_SAFE_INT (`_check_json`)."""
    text = metadata.get(key)
    if text is None:
        return default
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid([*META, key], f"must be JSON written as a string: {exc}") from None
    _check_json(value, [*META, key], ints)
    return value


def _check_json(value: Any, at: Loc, ints: bool = True) -> None:
    """A JSON value nested at most `MAX_DEPTH` levels (orjson reads 1024, deeper than
    Python's repr, comparisons and validators recurse), and, with `ints`, every integer
    within +-MAX_SAFE_INT (orjson reads integers up to 64 bits: a counter growing from
    one could overflow what the store writes). Iterative, so any depth is checked."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, (dict, list)) and len(path) >= MAX_DEPTH:
            raise invalid([*at, *path], f"nests deeper than {MAX_DEPTH} levels")
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


def read_counter(metadata: Mapping[str, str], key: str) -> int:
    text = metadata.get(key)
    if text is None:
        raise invalid([*META, key], "is required (an integer >= 0 written as a string)")
    if not (text.isascii() and text.isdigit()):
        msg = f"must be an integer >= 0 written as a string (decimal digits): {short(text)}"
        raise invalid([*META, key], msg)
    if len(text) > COUNTER_DIGITS:
        raise invalid(
            [*META, key],
            f"has {len(text)} digits: at most {COUNTER_DIGITS} (a counter is at most 2**53 - 1 "
            f"= {MAX_SAFE_INT}, the largest integer JSON clients in JavaScript read exactly "
            "as doubles)",
        )
    value = int(text)  # at most 16 ASCII digits: safe and quick
    if value > MAX_SAFE_INT:
        raise invalid(
            [*META, key],
            f"must be at most 2**53 - 1 = {MAX_SAFE_INT} (JSON clients in JavaScript read "
            f"numbers as doubles, exact only up to there): got {value}",
        )
    return value


def parse_file_spec(metadata: Mapping[str, str], limits: Limits) -> Spec:
    """The file's spec, checked as a creation request is (same rules and limits)."""
    at = [*META, "spec"]
    data = _json(metadata, "spec", ints=False)  # the layout's are checked first, by _layout
    if not isinstance(data, dict):
        raise invalid(at, "is required: the session's configuration as a JSON object")
    if data.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise invalid([*at, "format"], f"must be {SPEC_FORMAT}: got {short(data['format'])}")
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
        if len(dims) > MAX_DIMS:
            raise invalid(
                [*at, i], f"has {len(dims)} dimensions, more than the {MAX_DIMS} NumPy allows"
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
            raise invalid([*at, i], f"tensor {short(name)} is named twice")
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


def check_same_configuration(session: Spec, file: Spec) -> None:
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
            raise invalid(["body", PARAMS + name], f"the session has no tensor {short(name)}")
    ours, given = session.stored(), file.stored()
    for key, value in ours.items():
        if key != "layout" and given.get(key) != value:
            raise invalid(
                [*META, "spec", key],
                f"the file's {key} ({json_text(given.get(key))}) is not the session's "
                f"({json_text(value)}): a PUT replaces the state, not the configuration (import "
                "the file as a new session instead)",
            )


def read_schedule_state(
    spec: Spec, metadata: Mapping[str, str], step: int
) -> dict[str, Any] | None:
    """The schedule state, with the fields and types of the schedule's own (JSON-safe)."""
    at = [*META, "schedule_state"]
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
            raise invalid([*at, key], f"must be {KIND_NAMES[kind]}: got {short(value)}")
        state[key] = value
    decoded = decode_schedule_state(encode_schedule_state(state))
    try:
        rate = spec.lr(step, decoded)
    except (ArithmeticError, ValueError) as exc:  # OverflowError, a math domain error
        raise invalid(at, f"gives no rate for the next step: {exc}") from None
    if not (math.isfinite(rate) and rate >= 0):
        raise invalid(at, f"gives the rate {rate} for the next step, not a finite number >= 0")
    return encode_schedule_state(state)


def check_next_rate(
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
            [*META, "step"], f"the schedule gives no rate for the step after {step}: {exc}"
        ) from None
    if not math.isfinite(rate):
        raise invalid(
            [*META, "step"], f"the schedule gives the rate {rate} for the step after {step}"
        )


def read_extra(spec: Spec, metadata: Mapping[str, str]) -> dict[str, Any]:
    """`extra`: only what the session's features keep, each well formed."""
    at = [*META, "extra"]
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


def json_text(value: Any) -> str:
    """`value` as compact JSON text (the metadata's encoding)."""
    return orjson.dumps(value).decode()
