"""Wire codecs: JSON (orjson, tensors as nested lists) and binary (safetensors).

Requests: `Content-Type: application/octet-stream` is a safetensors file (tensors by
name, scalars as strings in `__metadata__`); `application/json` (or `+json`, or no
Content-Type at all) is a JSON object; anything else is 415.

Responses: `Accept` picks the format of a tensor-bearing response (`wants_binary`):
binary when `application/octet-stream` is acceptable with a higher quality than JSON,
JSON otherwise (also when neither is named: JSON is the default). Session documents
and problems are always JSON. An idempotent replay of a step answers in the format its
own `Accept` asks for: the recorded answer is re-encoded (`reencode_step`) when it was
sent in the other one.

Nothing here imports FastAPI: the engine uses these to build the exact bytes an
idempotent replay sends again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

from service.core import tensorfile
from service.sessions.errors import (
    BadRequest,
    Invalid,
    Loc,
    NotAcceptable,
    UnsupportedMediaType,
    field_error,
    invalid,
)

JSON = "application/json"
BINARY = "application/octet-stream"

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class Reply:
    """An encoded response: what is sent, and what an idempotency record replays."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def dumps(obj: Any) -> bytes:
    """orjson with NumPy support; 0-d arrays become scalars (orjson refuses them)."""
    return orjson.dumps(obj, default=_default, option=_JSON_OPTIONS)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and obj.ndim == 0:
        return obj[()]
    if isinstance(obj, np.ndarray):  # non-contiguous or byte-swapped: make it plain
        return np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("="))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


# --- request bodies ----------------------------------------------------------------------


def is_binary(content_type: str | None) -> bool:
    """Whether a request body is safetensors (True) or JSON (False); 415 for other types."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    if media == BINARY:
        return True
    if media == JSON or (media.startswith("application/") and media.endswith("+json")):
        return False
    raise UnsupportedMediaType(
        f"Content-Type must be {JSON} or {BINARY}, not {media!r}",
        [field_error(["header", "Content-Type"], f"unsupported media type {media!r}")],
    )


def load_json(body: bytes) -> dict[str, Any]:
    """A JSON object body (400 if it is not JSON, 422 if it is not an object)."""
    if not body:
        raise BadRequest("the body is empty", [field_error(["body"], "a JSON object is required")])
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "infinity" in text:  # 1e999: valid JSON syntax, a non-finite value
            raise invalid(["body"], f"non-finite number (JSON cannot hold one): {text}") from None
        raise BadRequest(
            f"the body is not valid JSON: {text}", [field_error(["body"], text)]
        ) from None
    if not isinstance(data, dict):
        raise invalid(["body"], f"the body must be a JSON object, not {type(data).__name__}")
    return data


#: header bytes a safetensors body may spend per tensor it may hold (its entry and name)
HEADER_BYTES_PER_TENSOR = 1024
#: header bytes a safetensors body may spend besides (`__metadata__`: spec, counters, ...)
HEADER_BYTES_BASE = 1024 * 1024
#: tensors a step or update body may hold beyond the session's own (unknown names are
#: then refused by name, 422; past this, the body is refused before it is decoded, 400)
SPARE_TENSORS = 64


def header_budget(max_tensors: int) -> int:
    """The most header bytes a safetensors body of at most `max_tensors` tensors may have:
    `HEADER_BYTES_BASE + max_tensors * HEADER_BYTES_PER_TENSOR`, at most the codec's own
    `tensorfile.MAX_HEADER_BYTES`."""
    return min(
        tensorfile.MAX_HEADER_BYTES, HEADER_BYTES_BASE + max_tensors * HEADER_BYTES_PER_TENSOR
    )


def load_binary(
    body: bytes, max_tensors: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors body: `(tensors, metadata)`; 400 when it is not one, or when its header
    names more than `max_tensors` tensors or is longer than `header_budget(max_tensors)`
    (checked before any tensor is built). `max_tensors` None: the codec's own limits."""
    try:
        if max_tensors is None:
            return tensorfile.decode(body)
        return tensorfile.decode(
            body, max_header_bytes=header_budget(max_tensors), max_tensors=max_tensors
        )
    except tensorfile.TensorFileError as exc:
        raise BadRequest(
            f"the body is not a valid safetensors file: {exc}", [field_error(["body"], str(exc))]
        ) from None


def json_tensor(value: Any, loc: Loc) -> np.ndarray:
    """A tensor from JSON: a number (shape []) or a nested list of numbers (its shape), as
    float64 (what every session dtype is cast from without loss).

    Refused with 422 naming `loc` (and, in the message, the index of the first bad
    element): ragged lists, nesting deeper than NumPy's `MAX_DIMS` dimensions, anything
    but numbers (strings, booleans, null, objects, at any depth). Integers are accepted.
    Non-finite values cannot occur in JSON; the caller checks finiteness after casting
    to the session's dtype (float32 overflow). The structure is checked without
    recursion, a level at a time, before NumPy builds the array in one pass.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise invalid(loc, f"must be a number or a nested list of numbers, not {_kind(value)}")
    if isinstance(value, list):
        _check_nested(value, loc)
    try:
        return np.array(value, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range
        raise invalid(loc, "holds a number too large for float64 (non-finite)") from None


def json_tensors(values: dict[str, Any], loc: Loc) -> dict[str, np.ndarray]:
    """`json_tensor` of each entry of `values` (loc `[*loc, name]`), emptying `values` as
    it goes: each tensor's nested list (a Python object per number, several times the
    size of its array) is freed as soon as its array is built."""
    arrays: dict[str, np.ndarray] = {}
    for name in list(values):
        arrays[name] = json_tensor(values.pop(name), [*loc, name])
    return arrays


_NUMBER_TYPES = frozenset((int, float))


def _check_nested(value: list[Any], loc: Loc) -> None:
    """Refuse (422) a nested list that is not a rectangular array of numbers: its shape is
    read along the first elements, then each level is checked in bulk (C loops over the
    lengths and types of its items; no recursion, no copy of the numbers)."""
    shape: list[int] = []
    first: Any = value
    while isinstance(first, list):
        if len(shape) == tensorfile.MAX_DIMS:
            raise invalid(loc, f"is nested deeper than {tensorfile.MAX_DIMS} levels")
        shape.append(len(first))
        first = first[0] if first else None
    level: list[Any] = [value]
    for depth, size in enumerate(shape):
        if set(map(len, level)) - {size}:
            raise invalid(loc, _nested_problem(value, shape))
        kinds: set[type] = set()
        for row in level:
            kinds.update(map(type, row))
        if depth + 1 < len(shape):
            if kinds - {list}:
                raise invalid(loc, _nested_problem(value, shape))
            level = list(chain.from_iterable(level))
        elif kinds - _NUMBER_TYPES:
            raise invalid(loc, _nested_problem(value, shape))


def _nested_problem(value: list[Any], shape: list[int]) -> str:
    """What is wrong with `value` against `shape`, at the first element at fault: a walk
    in index order, without recursion and in memory of the depth only."""
    stack: list[tuple[list[Any], int]] = [(value, 0)]
    path: list[int] = []  # path[k]: the index of stack[k + 1] in stack[k]
    while stack:
        node, i = stack[-1]
        depth = len(stack) - 1
        if i == 0 and len(node) != shape[depth]:
            return (
                f"not a rectangular nested list of numbers: {len(node)} elements at "
                f"{_where(path)}, where {shape[depth]} belong (shape {tuple(shape)})"
            )
        if i == len(node):
            stack.pop()
            if path:
                path.pop()
            continue
        stack[-1] = (node, i + 1)
        child = node[i]
        if depth + 1 < len(shape):
            if not isinstance(child, list):
                return (
                    f"not a rectangular nested list of numbers: {_kind(child)} at "
                    f"{_where([*path, i])}, where a list of {shape[depth + 1]} belongs"
                )
            stack.append((child, 0))
            path.append(i)
        elif isinstance(child, list):
            return (
                f"not a rectangular nested list of numbers: a list at {_where([*path, i])}, "
                "where a number belongs"
            )
        elif type(child) not in _NUMBER_TYPES:
            return f"must hold only numbers, found {_kind(child)} at {_where([*path, i])}"
    return "not a rectangular nested list of numbers"


def _where(path: list[int]) -> str:
    return "".join(f"[{i}]" for i in path)


def binary_tensor(array: np.ndarray, loc: Loc) -> np.ndarray:
    """A tensor from a safetensors body: any integer or float dtype (bool refused)."""
    if array.dtype.kind not in "iuf":
        raise invalid(loc, f"must hold numbers, not {array.dtype}")
    return array


def metadata_number(metadata: Mapping[str, str], key: str, loc: Loc) -> float | None:
    """A number carried as a string in safetensors `__metadata__` (None if absent): ASCII
    decimal or exponent notation, or `nan` / `inf` (a loss may be non-finite); no
    spaces, underscores or other digits, which Python's float() would take."""
    text = metadata.get(key)
    if text is None:
        return None
    if len(text) > _MAX_NUMBER_TEXT or not _NUMBER_TEXT.fullmatch(text):
        raise invalid(loc, f"must be a number written as a string, not {_clip(text)}")
    return float(text)


def metadata_int(metadata: Mapping[str, str], key: str, loc: Loc) -> int | None:
    """An integer carried as a string in safetensors `__metadata__` (None if absent):
    ASCII digits with an optional `-`, at most 19 of them (what a counter can need; the
    caller checks the range). No spaces, `+`, underscores or other digits, which
    Python's int() would take."""
    text = metadata.get(key)
    if text is None:
        return None
    if not _INT_TEXT.fullmatch(text):
        msg = (
            f"must be an integer of at most 19 ASCII digits written as a string, not {_clip(text)}"
        )
        raise invalid(loc, msg)
    return int(text)


def _clip(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


#: metadata numbers: what JSON writes, plus float()'s nan / inf spellings
_NUMBER_TEXT = re.compile(
    r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)",
    re.IGNORECASE,
)
_MAX_NUMBER_TEXT = 1000
_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


def metadata_bool(metadata: Mapping[str, str], key: str, loc: Loc) -> bool:
    """A flag carried as `"true"` / `"false"` in safetensors `__metadata__` (absent: false)."""
    text = metadata.get(key)
    if text is None or text == "false":
        return False
    if text == "true":
        return True
    raise invalid(loc, f'must be "true" or "false", not {text!r}')


def _kind(value: Any) -> str:
    if type(value) in _NUMBER_TYPES:
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- response bodies ---------------------------------------------------------------------


def wants_binary(accept: str | None) -> bool:
    """Whether `Accept` prefers `application/octet-stream` to JSON (JSON on a tie)."""
    if not accept:
        return False
    binary_q = json_q = -1.0
    for part in accept.split(","):
        items = [p.strip() for p in part.split(";")]
        media = items[0].lower()
        q = 1.0
        for param in items[1:]:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media == BINARY:
            binary_q = max(binary_q, q)
        elif media == JSON:
            json_q = max(json_q, q)
        elif media in ("application/*", "*/*"):
            json_q = max(json_q, q * 0.999)  # a wildcard is less specific than a name
    return binary_q > 0 and binary_q > json_q


def json_reply(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, dumps(content), JSON, dict(headers or {}))


def binary_reply(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, object], status: int = 200
) -> Reply:
    """A safetensors response; `metadata` values are written as strings (`fmt_scalar`)."""
    meta = {k: fmt_scalar(v) for k, v in metadata.items() if v is not None}
    return Reply(status, tensorfile.encode(dict(tensors), meta), BINARY)


def fmt_scalar(value: object) -> str:
    """A metadata scalar as a string: floats with repr (round-trips), bools as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def parse_scalar(text: str | None) -> bool | int | float | str | None:
    """A metadata string read back as `fmt_scalar` wrote it: `true` / `false` a bool, an
    integer an int, any other number a float (a float's repr always has a `.`, an `e`,
    `inf` or `nan`), anything else the string itself."""
    if text is None:
        return None
    if text in ("true", "false"):
        return text == "true"
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


_INTEGER = re.compile(r"-?[0-9]+")

#: the counters of a step answer, in the order a step writes them (`stepping`); a binary
#: answer leaves out those that are null, the JSON answer made from it puts them back
STEP_COUNTERS = (
    "step",
    "version",
    "lr",
    "skipped",
    "grad_norm",
    "clipped",
    "staleness",
    "contributors",
)
_RETURNS = ("params", "updates")


def reencode_step(
    reply: Reply, binary: bool, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype[Any]
) -> Reply:
    """A recorded `200` step answer in the format asked for (`binary`), as a fresh answer
    in that format is encoded (`json_reply` / `binary_reply`): the same counters, the same
    tensors (`shapes`, the session's layout in order, in its `dtype`), the same status and
    headers. An idempotent replay follows the retry's `Accept` this way. Unchanged when it
    already is in that format; 406 when it cannot be read as a step answer."""
    asked = BINARY if binary else JSON
    recorded = reply.media_type.split(";", 1)[0].strip().lower()
    if recorded == asked:
        return reply
    try:
        if recorded not in (JSON, BINARY):
            raise ValueError(f"it is {recorded!r}")
        if binary:
            made = _step_to_binary(reply.body, shapes, dtype)
        else:
            made = _step_to_json(reply.body, shapes)
    except (ValueError, TypeError) as exc:
        raise NotAcceptable(
            f"the answer recorded for this Idempotency-Key is {recorded} and cannot be "
            f"re-encoded as {asked} ({exc}); ask for {recorded} (Accept), or send the step "
            "with a new key"
        ) from None
    return Reply(reply.status, made.body, made.media_type, dict(reply.headers))


def _step_to_binary(
    body: bytes, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype[Any]
) -> Reply:
    data = orjson.loads(body)
    if not isinstance(data, dict) or "step" not in data or "version" not in data:
        raise ValueError("not a step answer")
    given = [k for k in _RETURNS if k in data]
    if len(given) > 1:
        raise ValueError("both params and updates")
    ret = given[0] if given else "none"
    tensors: dict[str, np.ndarray] = {}
    if given:
        values = data[ret]
        if not isinstance(values, dict) or set(values) != set(shapes):
            raise ValueError(f"its {ret} are not the session's tensors")
        for name, shape in shapes.items():
            tensors[name] = np.asarray(values[name], dtype=dtype).reshape(shape)
    counters = {k: v for k, v in data.items() if k != ret}
    for key, value in counters.items():
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{key!r} is not a scalar")
    return binary_reply(tensors, {**counters, "return": ret})


def _step_to_json(body: bytes, shapes: Mapping[str, tuple[int, ...]]) -> Reply:
    tensors, metadata = tensorfile.decode(body)
    ret = metadata.get("return", "params" if tensors else "none")
    if "step" not in metadata or "version" not in metadata or ret not in (*_RETURNS, "none"):
        raise ValueError("not a step answer")
    if ret == "none" and tensors:
        raise ValueError("tensors with return none")
    content: dict[str, Any] = {k: parse_scalar(metadata.get(k)) for k in STEP_COUNTERS}
    for key, text in metadata.items():
        if key not in content and key != "return":
            content[key] = parse_scalar(text)
    if ret != "none":
        if set(tensors) != set(shapes):
            raise ValueError(f"its {ret} are not the session's tensors")
        content[ret] = {name: tensors[name].reshape(shape) for name, shape in shapes.items()}
    return json_reply(content)


__all__ = [
    "BINARY",
    "JSON",
    "Invalid",
    "Reply",
    "binary_reply",
    "binary_tensor",
    "dumps",
    "fmt_scalar",
    "header_budget",
    "is_binary",
    "json_reply",
    "json_tensor",
    "json_tensors",
    "load_binary",
    "load_json",
    "metadata_bool",
    "metadata_int",
    "metadata_number",
    "parse_scalar",
    "reencode_step",
    "wants_binary",
]
