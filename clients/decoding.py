"""Reading the server's answers: each `parse_*` turns an `httpx.Response` into its
result (clients/results.py), with tensors decoded into NumPy arrays (safetensors, or
JSON nested lists), and raises an `OptserveError` for an answer it cannot read.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
import numpy as np

from clients import errors, tensorfile
from clients.results import (
    HistoryEntry,
    LRFinderResult,
    MetricsResult,
    ParamsResult,
    RoundInfo,
    SchedulePreview,
    Session,
    StepResult,
    Suggestion,
    UpdateResult,
)

#: the media type of tensors as safetensors
BINARY = "application/octet-stream"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")


def _is_binary(response: httpx.Response) -> bool:
    media = str(response.headers.get("content-type", ""))
    return media.split(";", 1)[0].strip().lower() == BINARY


def _decode_tensors(response: httpx.Response) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors answer as writable arrays (copies: the buffer is the response's)."""
    tensors, metadata = tensorfile.decode(response.content)
    return {name: np.array(a) for name, a in tensors.items()}, metadata


def _json_arrays(value: Any) -> dict[str, np.ndarray] | None:
    """Tensors of a JSON answer (nested lists) as float64 arrays (JSON numbers; a
    float32 value comes back exactly when cast to float32)."""
    if value is None:
        return None
    return {str(n): np.asarray(v, dtype=np.float64) for n, v in value.items()}


def _unreadable(response: httpx.Response, exc: Exception) -> errors.OptserveError:
    return errors.OptserveError(
        f"the answer to {response.request.method} {response.request.url.path} could not be "
        f"read: {type(exc).__name__}: {exc}",
        status=response.status_code,
        headers=response.headers,
    )


def _parsing(parse: Callable[[httpx.Response], T]) -> Callable[[httpx.Response], T]:
    """`parse`, raising an `OptserveError` for an answer it cannot read."""

    @functools.wraps(parse)
    def run(response: httpx.Response) -> T:
        try:
            return parse(response)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _unreadable(response, exc) from exc

    return run


@_parsing
def parse_session(response: httpx.Response) -> Session:
    return Session.from_doc(response.json())


def ignore(response: httpx.Response) -> None:
    return None


def _flag(text: str | None) -> bool:
    return text == "true"


def _opt_float(value: Any) -> float | None:
    """A number of an answer (a JSON number, or binary metadata text); None for null."""
    if value is None or value in ("", "null", "none", "None"):
        return None
    return float(value)


def _opt_int(value: Any) -> int | None:
    if value is None or value in ("", "null", "none", "None"):
        return None
    return int(value)


def _opt_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value == "true"
    return bool(value)


@_parsing
def parse_step(response: httpx.Response) -> StepResult:
    replayed = _replayed(response)
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        ret = meta.get("return", "params")
        return StepResult(
            step=int(meta["step"]),
            version=int(meta["version"]),
            lr=float(meta["lr"]),
            params=tensors if ret == "params" else None,
            updates=tensors if ret == "updates" else None,
            skipped=_flag(meta.get("skipped")),
            grad_norm=_opt_float(meta.get("grad_norm")),
            clipped=_flag(meta.get("clipped")),
            replayed=replayed,
            staleness=_opt_int(meta.get("staleness")),
            contributors=_opt_int(meta.get("contributors")) or 1,
        )
    body = response.json()  # a 202 is JSON whatever was asked
    if response.status_code == 202 or body.get("status") == "pending":
        version = int(body["version"])
        wait_for = _opt_int(body.get("wait_for"))
        return StepResult(
            step=-1,
            version=version,
            lr=math.nan,
            replayed=replayed,
            status="pending",
            contributors=0,
            wait_for=version + 1 if wait_for is None else wait_for,
            pending=_opt_int(body.get("pending")),
            accumulate=_opt_int(body.get("accumulate")),
        )
    return StepResult(
        step=int(body["step"]),
        version=int(body["version"]),
        lr=float(body["lr"]),
        params=_json_arrays(body.get("params")),
        updates=_json_arrays(body.get("updates")),
        skipped=bool(body.get("skipped", False)),
        grad_norm=_opt_float(body.get("grad_norm")),
        clipped=bool(body.get("clipped", False)),
        replayed=replayed,
        staleness=_opt_int(body.get("staleness")),
        contributors=_opt_int(body.get("contributors")) or 1,
    )


@_parsing
def parse_params(response: httpx.Response) -> ParamsResult:
    if _is_binary(response):
        tensors, meta = _decode_tensors(response)
        body: Mapping[str, Any] = meta
    else:
        body = response.json()
        tensors = _json_arrays(body["params"]) or {}
    average = body.get("average")
    return ParamsResult(
        int(body["step"]),
        int(body["version"]),
        tensors,
        average=None if average in (None, "", "null") else str(average),
        averaged_steps=_opt_int(body.get("averaged_steps")),
    )


def parse_poll(response: httpx.Response) -> ParamsResult | None:
    """The params of a poll for a version, or None for its 408 (not reached yet)."""
    if response.status_code == 408:
        return None
    return parse_params(response)


def _replayed(response: httpx.Response) -> bool:
    return str(response.headers.get("idempotent-replayed", "")).lower() == "true"


@_parsing
def parse_round(response: httpx.Response) -> RoundInfo:
    """A federated round: JSON, or binary (the params as tensors, the rest as metadata
    strings, `clients` a JSON string)."""
    if _is_binary(response):
        params, meta = _decode_tensors(response)
        body: Mapping[str, Any] = meta
        clients = json.loads(meta["clients"]) if meta.get("clients") else []
    else:
        body = response.json()
        params = _json_arrays(body["params"]) or {}
        clients = body.get("clients") or []
    lr = _opt_float(body.get("lr"))
    return RoundInfo(
        round=int(body["round"]),
        deadline=float(body["deadline"]),
        opened_at=float(body["opened_at"]),
        received=int(body["received"]),
        min_clients=int(body["min_clients"]),
        expected_clients=_opt_int(body.get("expected_clients")),
        clients=[str(c) for c in clients],
        step=int(body["step"]),
        version=int(body["version"]),
        lr=math.nan if lr is None else lr,
        params=params,
    )


@_parsing
def parse_update(response: httpx.Response) -> UpdateResult:
    body = response.json()
    return UpdateResult(
        round=int(body["round"]),
        accepted=bool(body["accepted"]),
        received=int(body["received"]),
        closed=bool(body["closed"]),
        next_round=_opt_int(body.get("next_round")),
        replayed=_replayed(response),
    )


@_parsing
def parse_metrics(response: httpx.Response) -> MetricsResult:
    body = response.json()
    return MetricsResult(
        int(body["step"]), int(body["version"]), float(body["lr"]), bool(body["observed"])
    )


@_parsing
def parse_history(response: httpx.Response) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            kind=str(e["kind"]),
            step=int(e["step"]),
            version=int(e["version"]),
            time=float(e["time"]),
            lr=_opt_float(e.get("lr")),
            loss=_opt_float(e.get("loss")),
            grad_norm=_opt_float(e.get("grad_norm")),
            update_norm=_opt_float(e.get("update_norm")),
            skipped=_opt_bool(e.get("skipped")),
            staleness=_opt_int(e.get("staleness")),
            contributors=_opt_int(e.get("contributors")),
            round=_opt_int(e.get("round")),
            clients=None if e.get("clients") is None else [str(c) for c in e["clients"]],
            num_examples=_opt_int(e.get("num_examples")),
            metrics=None
            if e.get("metrics") is None
            else {str(k): float(v) for k, v in e["metrics"].items()},
        )
        for e in response.json()["entries"]
    ]


@_parsing
def parse_lr_finder(response: httpx.Response) -> LRFinderResult:
    body = response.json()
    suggestions = {
        str(name): Suggestion(
            method=str(s.get("method", name)),
            lr=_opt_float(s.get("lr")),
            index=_opt_int(s.get("index")),
            loss=_opt_float(s.get("loss")),
            reason=None if s.get("reason") is None else str(s["reason"]),
            reference=None if s.get("reference") is None else str(s["reference"]),
        )
        for name, s in (body.get("suggestions") or {}).items()
    }
    stop_reason = body.get("stop_reason")
    return LRFinderResult(
        config=dict(body["config"]),
        lrs=[float(x) for x in body["lrs"]],
        losses=[float(x) for x in body["losses"]],
        smoothed=[float(x) for x in body["smoothed"]],
        best_loss=_opt_float(body.get("best_loss")),
        done=bool(body["done"]),
        stop_reason=None if stop_reason is None else str(stop_reason),
        nonfinite_lr=_opt_float(body.get("nonfinite_lr")),
        next_lr=_opt_float(body.get("next_lr")),
        suggestions=suggestions,
    )


@_parsing
def parse_png(response: httpx.Response) -> bytes:
    content = response.content
    if not content.startswith(PNG_SIGNATURE):
        kind = response.headers.get("content-type", "no Content-Type")
        raise ValueError(f"not a PNG image ({kind}, {len(content)} bytes)")
    return content


@_parsing
def parse_state_file(response: httpx.Response) -> bytes:
    """A state file (docs/state.md): the safetensors bytes as they came (its header is
    checked; the tensors are not decoded)."""
    if not _is_binary(response):
        kind = response.headers.get("content-type", "no Content-Type")
        raise ValueError(f"not a state file ({kind}, {len(response.content)} bytes)")
    tensorfile.decode(response.content)  # a ValueError (TensorFileError) if it is not one
    return response.content


@_parsing
def parse_preview(response: httpx.Response) -> SchedulePreview:
    body = response.json()
    momenta = body.get("momenta")
    return SchedulePreview(
        [float(x) for x in body["lrs"]], None if momenta is None else [float(x) for x in momenta]
    )


__all__ = [
    "BINARY",
    "PNG_SIGNATURE",
    "ignore",
    "parse_history",
    "parse_lr_finder",
    "parse_metrics",
    "parse_params",
    "parse_png",
    "parse_poll",
    "parse_preview",
    "parse_round",
    "parse_session",
    "parse_step",
    "parse_update",
]
