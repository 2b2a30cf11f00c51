"""Federated rounds (docs/federated.md): what a client's update or a look at the round
does to a loaded federated session (pure, like `stepping`).

**The round** is the session's step count: round `r` is open while `meta.step == r`.
`meta.extra["round"]` records who reported in it (`clients`, in arrival order, with
their `num_examples` and `metrics`), when it opened and its deadline; each update's
delta is kept in the state blob as `fed.u.<i>` (`i`: its arrival index), so updates
survive a restart with everything else. An update for another round is refused (409
round-closed, with the current round).

**Closing** (when `min_clients` updates are in and either `expected_clients` reported or
the deadline passed): the deltas are aggregated (`service.core.federated.aggregate`),
and `-delta`, the pseudo-gradient, is applied as the session's next step
(`stepping.apply_step`: the server rate from the schedule at `t = r`, the server
optimizer, the averages, a history entry of kind `round`), the updates are dropped and
round `r + 1` opens with a new deadline, all in the one commit of the request that
closed it. The step's loss is the clients' `loss` metric averaged by `num_examples`
(when every client reported one), so a `plateau` schedule can drive the server rate.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.core import find_nonfinite
from service.core.errors import LayoutError
from service.core.federated import aggregate
from service.core.state import OptState
from service.sessions import codecs
from service.sessions.cache import Cached
from service.sessions.errors import Invalid, SessionError, field_error, invalid, layout_error
from service.sessions.model import RoundRecord
from service.sessions.parsing import StepInput, validate_model
from service.sessions.requests import UpdateRequest
from service.sessions.spec import Spec
from service.sessions.stepping import (
    Computed,
    Loaded,
    StepArgs,
    apply_step,
    current_lr,
    join_state,
    split_state,
)
from service.store.base import SessionBlobs, SessionMeta

#: the state entries holding the round's updates: `fed.u.<arrival index>`
UPDATE_PREFIX = "fed.u."
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")
#: starts and separates the internal idempotency key of an update (`update_key`): a
#: control character, which no `Idempotency-Key` header can hold (printable ASCII only)
_KEY_SEP = "\x1f"


def update_key(round_number: int, client_id: str) -> str:
    """The idempotency key an update is recorded under: one per client and round, in a
    namespace of its own (`\\x1ffed\\x1f<round>\\x1f<client_id>`), so that no request's
    `Idempotency-Key` header can take it or be taken by it."""
    return f"{_KEY_SEP}fed{_KEY_SEP}{round_number}{_KEY_SEP}{client_id}"


def legacy_update_key(round_number: int, client_id: str) -> str:
    """The key servers before `update_key` recorded an update under (`fed:<round>:<id>`,
    among header keys): looked up for rounds open across an upgrade, and only taken when
    its record is of the same update (a header key's record is of another path)."""
    return f"fed:{round_number}:{client_id}"


def resubmitted(client_id: str, round_number: int) -> Invalid:
    """422: the client already sent a different update for this round."""
    return invalid(
        ["body", "client_id"],
        f"client {client_id!r} already sent a different update for round {round_number} "
        "(the same body again gets the first answer)",
    )


class RoundClosed(SessionError):
    """409: an update for a round that is not the current one; member `round`."""

    status, slug, title = 409, "round-closed", "Round closed"

    def __init__(self, detail: str, current: int) -> None:
        super().__init__(
            detail, [field_error(["path", "round"], detail)], members={"round": current}
        )


@dataclass(frozen=True, slots=True)
class Update:
    """One client's update for one round, validated against the session."""

    client_id: str
    kind: str
    tensors: np.ndarray
    num_examples: int
    metrics: dict[str, float]


# --- parsing -------------------------------------------------------------------------------


def parse_update(spec: Spec, body: bytes, binary: bool) -> Update:
    """An update body (JSON or binary) checked against the session's layout."""
    assert spec.federated is not None
    if binary:
        raw, metadata = codecs.load_binary(body, len(spec.layout.names) + codecs.SPARE_TENSORS)
        data: dict[str, Any] = {
            "client_id": metadata.get("client_id"),
            "num_examples": codecs.metadata_int(metadata, "num_examples", ["body", "num_examples"]),
        }
        kind = metadata.get("kind", spec.federated.update)
        if kind not in ("delta", "weights"):
            raise invalid(["body", "kind"], f"must be delta or weights: got {kind!r}")
        data[kind] = {}
        if "metrics" in metadata:
            data["metrics"] = codecs.load_json(metadata["metrics"].encode())
        request = validate_model(UpdateRequest, data)
        arrays = {n: codecs.binary_tensor(a, ["body", kind, n]) for n, a in raw.items()}
    else:
        request = validate_model(UpdateRequest, codecs.load_json(body))
        given = request.delta if request.delta is not None else request.weights
        kind = "delta" if request.delta is not None else "weights"
        assert given is not None
        arrays = {n: codecs.json_tensor(v, ["body", kind, n]) for n, v in given.items()}
    if not _CLIENT_ID.fullmatch(request.client_id):
        raise invalid(["body", "client_id"], "must be 1 to 128 printable ASCII characters")
    try:
        with np.errstate(over="ignore"):
            flat = spec.layout.flatten(arrays, spec.dtype)
    except LayoutError as exc:
        raise layout_error(exc, ["body", kind]) from None
    if not np.isfinite(flat).all():
        count, names = find_nonfinite(flat, spec.layout)
        msg = "holds non-finite values (NaN or inf, or too large for the session's dtype)"
        raise Invalid(
            f"{count} non-finite values in {', '.join(map(repr, names))}",
            [field_error(["body", kind, n], msg) for n in names],
        )
    metrics = {k: float(v) for k, v in (request.metrics or {}).items()}
    return Update(request.client_id, kind, flat, request.num_examples, metrics)


# --- the round -----------------------------------------------------------------------------


def round_state(spec: Spec, meta: SessionMeta) -> RoundRecord:
    """The open round's record (a fresh one if none was written yet)."""
    assert spec.federated is not None
    data = meta.extra.get("round")
    record = None if data is None else RoundRecord.model_validate(data)
    if record is None or record.round != meta.step:
        opened = float(meta.updated_at or meta.created_at or time.time())
        return _fresh(meta.step, opened, spec.federated.round_timeout)
    return record


def _fresh(number: int, opened: float, timeout: float) -> RoundRecord:
    """Round `number`, opened at `opened`, nobody in yet."""
    return RoundRecord(
        round=number,
        opened_at=opened,
        deadline=opened + timeout,
        clients=[],
        num_examples=[],
        metrics=[],
    )


def closable(spec: Spec, record: RoundRecord, now: float) -> bool:
    """Whether the round holds enough updates to close now."""
    assert spec.federated is not None
    config = spec.federated
    received = len(record.clients)
    if received < config.min_clients:
        return False
    if config.expected_clients is not None and received >= config.expected_clients:
        return True
    return now >= record.deadline


def compute_update(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    state: OptState,
    update: Update,
    round_number: int,
) -> Computed:
    """Take one client's update for `round_number`; close the round if it can."""
    now = time.time()
    if round_number != meta.step:
        when = "is closed" if round_number < meta.step else "has not opened"
        raise RoundClosed(
            f"round {round_number} {when}; the current round is {meta.step}", meta.step
        )
    record = round_state(spec, meta)
    if update.client_id in record.clients:
        raise resubmitted(update.client_id, round_number)
    delta = update.tensors if update.kind == "delta" else np.subtract(update.tensors, params)
    opt, own = split_state(state)
    own.arrays[f"{UPDATE_PREFIX}{len(record.clients)}"] = delta
    record = record.model_copy(
        update={
            "clients": [*record.clients, update.client_id],
            "num_examples": [*record.num_examples, update.num_examples],
            "metrics": [*record.metrics, update.metrics],
        }
    )
    answer: dict[str, Any] = {
        "round": round_number,
        "accepted": True,
        "received": len(record.clients),
        "closed": False,
    }
    if closable(spec, record, now):
        done = close_round(spec, meta, params, opt, own, record, now)
        answer.update(closed=True, next_round=round_number + 1)
        done.reply = codecs.json_reply(answer)
        return done
    new_state = join_state(opt, own)
    new_meta = meta.evolve(
        version=meta.version + 1,
        extra={**meta.extra, "round": record.model_dump()},
        updated_at=now,
    )
    return Computed(
        new_meta,
        SessionBlobs(params.tobytes(), new_state.to_bytes()),
        codecs.json_reply(answer),
        Cached(new_meta.version, params, new_state),
        "update",
    )


def compute_close(
    spec: Spec, meta: SessionMeta, params: np.ndarray, state: OptState
) -> Computed | None:
    """Close the open round if its deadline passed with enough updates (a look at the
    round does this); None when it cannot close yet."""
    now = time.time()
    record = round_state(spec, meta)
    if not closable(spec, record, now):
        return None
    opt, own = split_state(state)
    return close_round(spec, meta, params, opt, own, record, now)


def close_round(
    spec: Spec,
    meta: SessionMeta,
    params: np.ndarray,
    opt: OptState,
    own: OptState,
    record: RoundRecord,
    now: float,
) -> Computed:
    """Aggregate the round's updates and apply the server optimizer (one step)."""
    assert spec.federated is not None
    count = len(record.clients)
    keys = [f"{UPDATE_PREFIX}{i}" for i in range(count)]
    deltas = [own.arrays[k] for k in keys]
    examples = list(record.num_examples)
    combined = aggregate(spec.federated.aggregator, deltas, examples)
    for key in keys:
        own.arrays.pop(key)
    metrics = _mean_metrics(record.metrics, examples)
    loss = metrics.get("loss") if all("loss" in m for m in record.metrics) else None
    next_record = _fresh(meta.step + 1, now, spec.federated.round_timeout)
    extra = {**meta.extra, "round": next_record.model_dump()}
    step_input = StepInput(np.negative(combined), loss, "none")
    history = {
        "kind": "round",
        "round": meta.step,
        "clients": list(record.clients),
        "num_examples": sum(examples),
        "metrics": metrics,
    }
    # lenient: a round always closes (a non-finite result is skipped, not refused)
    close = StepArgs(
        step_input.grads, loss, step_input, None, count, history_extra=history, lenient=True
    )
    done = apply_step(Loaded(spec, meta, params, opt, own, extra), close)
    done.outcome = "round"
    return done


def _mean_metrics(metrics: list[dict[str, float]], examples: list[int]) -> dict[str, float]:
    """Each metric averaged over the clients that reported it, weighted by num_examples."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for reported, n in zip(metrics, examples, strict=True):
        for name, value in reported.items():
            sums[name] = sums.get(name, 0.0) + n * float(value)
            weights[name] = weights.get(name, 0) + n
    return {name: sums[name] / weights[name] for name in sums if math.isfinite(sums[name])}


def round_answer(spec: Spec, meta: SessionMeta, params: np.ndarray, binary: bool) -> codecs.Reply:
    """`GET .../round`: the round's record and the global params."""
    assert spec.federated is not None
    record = round_state(spec, meta)
    info: dict[str, Any] = {
        "round": meta.step,
        "deadline": record.deadline,
        "opened_at": record.opened_at,
        "received": len(record.clients),
        "min_clients": spec.federated.min_clients,
        "expected_clients": spec.federated.expected_clients,
        "clients": list(record.clients),
        "step": meta.step,
        "version": meta.params_version,
        "lr": current_lr(spec, meta),
    }
    tensors = spec.layout.unflatten(params)
    if binary:
        meta_strings = {**info, "clients": orjson.dumps(info["clients"]).decode()}
        return codecs.binary_reply(tensors, meta_strings)
    return codecs.json_reply({**info, "params": tensors})
