"""The typed session model (service/sessions/model.py) reads what the code before it
stored and writes the same bytes: no migration (issue 17, item 2). Without HTTP.

The records below are literally what stepping wrote into `meta.extra` before the
models (`{"base_version": ..., "count": ..., "losses": ..., "started_at": ...}` for a
pending accumulation, `{"lr", "grad_norm", "clipped", "skipped", "contributors"}` for
the last step), and what the code before accumulation deadlines wrote (no
`started_at`, no `contributors`).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from service.sessions.accumulation import pending_of
from service.sessions.federation import round_state
from service.sessions.model import LastStep, Pending, RoundRecord, read_last, read_pending
from service.sessions.parsing import parse_create
from service.sessions.spec import Limits
from service.store.base import SessionMeta

PENDING_TODAY = {"base_version": 3, "count": 2, "losses": [0.5, 0.25], "started_at": 1.8e9}
PENDING_EMPTY = {"base_version": 4, "count": 0, "losses": [], "started_at": None}
PENDING_OLD = {"base_version": 3, "count": 1, "losses": None}
LAST_TODAY = {"lr": 0.01, "grad_norm": 1.5, "clipped": False, "skipped": False, "contributors": 2}
LAST_OLD = {"lr": 0.01, "grad_norm": None, "clipped": True, "skipped": False}


def meta(**extra: Any) -> SessionMeta:
    return SessionMeta(
        id="s",
        tenant="t",
        version=7,
        params_version=3,
        step=3,
        skipped=0,
        spec={},
        schedule_state=None,
        extra=extra,
        created_at=1.7e9,
        updated_at=1.9e9,
    )


@pytest.mark.parametrize("record", [PENDING_TODAY, PENDING_EMPTY])
def test_a_pending_record_of_today_round_trips_byte_for_byte(record: dict[str, Any]) -> None:
    got = read_pending(meta(pending=record))
    assert got is not None
    assert orjson.dumps(got.model_dump()) == orjson.dumps(record)


def test_the_empty_record_is_what_stepping_wrote() -> None:
    assert orjson.dumps(Pending.empty(4).model_dump()) == orjson.dumps(PENDING_EMPTY)


def test_a_pending_record_without_started_at_reads_and_counts_from_the_last_change() -> None:
    stored = meta(pending=PENDING_OLD)
    got = read_pending(stored)
    assert got is not None
    assert (got.base_version, got.count, got.losses, got.started_at) == (3, 1, None, None)
    assert pending_of(stored).started_at == stored.updated_at


@pytest.mark.parametrize("record", [LAST_TODAY, LAST_OLD])
def test_a_last_step_record_reads(record: dict[str, Any]) -> None:
    got = read_last(meta(last=record))
    assert got is not None
    dumped = got.model_dump()
    assert {k: dumped[k] for k in record} == record
    if "contributors" in record:
        assert orjson.dumps(dumped) == orjson.dumps(record)
    else:
        assert dumped["contributors"] is None


def test_nothing_stored_reads_as_none() -> None:
    assert read_pending(meta()) is None
    assert read_last(meta()) is None


@pytest.mark.parametrize(
    ("model", "record"),
    [
        (Pending, {**PENDING_TODAY, "count": -1}),
        (Pending, {**PENDING_TODAY, "count": True}),
        (Pending, {**PENDING_TODAY, "started_at": float("inf")}),
        (Pending, {**PENDING_TODAY, "extra": 1}),
        (LastStep, {**LAST_TODAY, "clipped": "no"}),
        (LastStep, {**LAST_TODAY, "contributors": 2**53}),
        (
            RoundRecord,
            {
                "round": 0,
                "opened_at": 1.0,
                "deadline": 2.0,
                "clients": ["a", "a"],
                "num_examples": [1, 1],
                "metrics": [{}, {}],
            },
        ),
    ],
)
def test_a_malformed_record_is_refused(model: Any, record: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(record)


ROUND_TODAY = {
    "round": 3,
    "opened_at": 1.8e9,
    "deadline": 1.8e9 + 30,
    "clients": ["c0", "c1"],
    "num_examples": [10, 20],
    "metrics": [{"loss": 0.5}, {}],
}


def test_a_round_record_round_trips_byte_for_byte() -> None:
    assert orjson.dumps(RoundRecord.model_validate(ROUND_TODAY).model_dump()) == orjson.dumps(
        ROUND_TODAY
    )


def test_the_open_round_is_read_through_its_model() -> None:
    """`round_state` reads a stored round as a RoundRecord (and opens round `step` when
    the stored one is of an earlier round)."""
    body = orjson.dumps(
        {
            "optimizer": {"name": "fedavg"},
            "params": {"w": [1.0, 2.0]},
            "federated": {"min_clients": 2, "round_timeout": 30},
        }
    )
    spec, _ = parse_create(body, False, Limits())
    stored = meta(round=ROUND_TODAY)  # at step 3: round 3 is open
    record = round_state(spec, stored)
    assert record == RoundRecord.model_validate(ROUND_TODAY)
    stored = stored.evolve(step=4)  # round 3 closed; round 4 not written yet
    fresh = round_state(spec, stored)
    assert (fresh.round, fresh.clients, fresh.opened_at) == (4, [], stored.updated_at)
    assert fresh.deadline == stored.updated_at + 30
