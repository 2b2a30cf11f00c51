"""Wire codecs: JSON (orjson, tensors as nested lists) and binary (safetensors).

Requests: `Content-Type: application/octet-stream` is a safetensors file (tensors by
name, scalars as strings in `__metadata__`); `application/json` (or `+json`, or no
Content-Type at all) is a JSON object; anything else is 415.

Responses: `Accept` picks the format of a tensor-bearing response (`wants_binary`):
binary when `application/octet-stream` is acceptable with a higher quality than JSON,
JSON otherwise (also when neither is named: JSON is the default). Session documents
and problems are always JSON.

Nothing here imports FastAPI: the engine uses these to build the exact bytes an
idempotent replay sends again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse

from service.api.errors import BadRequest, Invalid, Loc, UnsupportedMediaType, field_error, invalid
from service.core import tensorfile

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


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (NumPy arrays and scalars included)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


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


def load_binary(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors body: `(tensors, metadata)`; 400 when it is not one."""
    try:
        return tensorfile.decode(body)
    except tensorfile.TensorFileError as exc:
        raise BadRequest(
            f"the body is not a valid safetensors file: {exc}", [field_error(["body"], str(exc))]
        ) from None


def json_tensor(value: Any, loc: Loc) -> np.ndarray:
    """A tensor from JSON: a number (shape []) or a nested list of numbers (its shape).

    Refused with 422 naming `loc`: ragged lists, anything but numbers (strings, booleans,
    null, objects). Integers are accepted. Non-finite values cannot occur in JSON; the
    caller checks finiteness after casting to the session's dtype (float32 overflow).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise invalid(loc, f"must be a number or a nested list of numbers, not {_kind(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:
        raise invalid(loc, f"not a rectangular nested list of numbers: {_short(exc)}") from None
    if array.dtype.kind not in "iuf":
        if array.dtype.kind == "O" and _all_numbers(value):  # ints beyond int64
            array = np.asarray(value, dtype=np.float64)
        else:
            raise invalid(loc, _element_problem(value, array))
    return array


def binary_tensor(array: np.ndarray, loc: Loc) -> np.ndarray:
    """A tensor from a safetensors body: any integer or float dtype (bool refused)."""
    if array.dtype.kind not in "iuf":
        raise invalid(loc, f"must hold numbers, not {array.dtype}")
    return array


def metadata_number(metadata: Mapping[str, str], key: str, loc: Loc) -> float | None:
    """A number carried as a string in safetensors `__metadata__` (None if absent)."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise invalid(loc, f"must be a number written as a string, not {text!r}") from None


def metadata_int(metadata: Mapping[str, str], key: str, loc: Loc) -> int | None:
    """An integer carried as a string in safetensors `__metadata__` (None if absent)."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        msg = f"must be an integer written as a string, not {text!r}"
        raise invalid(loc, msg) from None


def metadata_bool(metadata: Mapping[str, str], key: str, loc: Loc) -> bool:
    """A flag carried as `"true"` / `"false"` in safetensors `__metadata__` (absent: false)."""
    text = metadata.get(key)
    if text is None or text == "false":
        return False
    if text == "true":
        return True
    raise invalid(loc, f'must be "true" or "false", not {text!r}')


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(exc: Exception) -> str:
    text = str(exc)
    return text.split(" after ", 1)[0] if "inhomogeneous" in text else text


def _all_numbers(value: Any) -> bool:
    if isinstance(value, list):
        return all(_all_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _element_problem(value: Any, array: np.ndarray) -> str:
    if array.dtype.kind == "b":
        return "must hold numbers, not booleans"
    bad = _first_non_number(value)
    if bad is not None:
        return f"must hold only numbers, found {_kind(bad)}"
    return "not a rectangular nested list of numbers"


def _first_non_number(value: Any) -> Any:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
    return None


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


__all__ = [
    "BINARY",
    "JSON",
    "FastJSONResponse",
    "Invalid",
    "Reply",
    "binary_reply",
    "binary_tensor",
    "dumps",
    "fmt_scalar",
    "is_binary",
    "json_reply",
    "json_tensor",
    "load_binary",
    "load_json",
    "metadata_bool",
    "metadata_int",
    "metadata_number",
    "wants_binary",
]
