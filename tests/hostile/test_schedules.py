"""Hostile schedules against a live server (issue 12, items 1 and 3).

* Size: `sequential` schedules nested 9 to 200 deep, or holding thousands of schedules
  (flat or as a wide tree), sent to session create, `POST /v1/schedules/preview` and
  `preview.png`. Evaluating such a spec once cost time exponential in its depth on the
  event loop (depth 23: /healthz blocked 48.7 s; depth 200: the server hung). Each must
  be a 4xx problem+json, quickly, with /healthz answering within 1 s meanwhile, and no
  session made.
* Rate overflow: `exponential` with `gamma: 1e300`, or `lr: 1e308` with `gamma: 10`,
  at the same three places: refused (they used to brick the session at the step where
  the rate overflowed, and preview answered `null` rates).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.hostile.support import PARAMS, SGD, assert_no_new_session, listing_head, refused
from tests.support.live_server import LiveServer
from tests.support.schedule_specs import flat, nested

ENDPOINTS = ["create", "preview", "preview.png"]


def tree(fanout: int, depth: int) -> dict[str, Any]:
    """A sequential schedule of `fanout` sequential schedules ..., `depth` levels: about
    `fanout ** depth` schedules, each level within any depth limit of 8."""
    if depth == 0:
        return {"name": "exponential", "gamma": 0.9}
    return {
        "name": "sequential",
        "schedulers": [tree(fanout, depth - 1) for _ in range(fanout)],
        "milestones": list(range(1, fanout)),
    }


TOO_BIG: dict[str, dict[str, Any]] = {
    "depth 9": nested(9),
    "depth 23": nested(23),
    "depth 60": nested(60),
    "depth 200": nested(200),
    "2000 schedules, flat": flat(2000),
    "4**5 schedules, a tree": tree(4, 5),
    "8**3 schedules, a wide tree": tree(8, 3),
}

#: (optimizer lr, schedule): a rate that passes the largest float at some reachable step
OVERFLOWING: dict[str, tuple[float, dict[str, Any]]] = {
    "exponential gamma 1e300": (0.1, {"name": "exponential", "gamma": 1e300}),
    "lr 1e308, exponential gamma 10": (1e308, {"name": "exponential", "gamma": 10.0}),
    "lr 1e308, step gamma 10": (1e308, {"name": "step", "step_size": 1, "gamma": 10.0}),
    "gamma 1e300 after a milestone": (
        0.1,
        {
            "name": "sequential",
            "schedulers": [
                {"name": "cosine", "T_max": 10},
                {"name": "exponential", "gamma": 1e300},
            ],
            "milestones": [3],
        },
    ),
    "gamma 1e300 with warm-up": (
        0.1,
        {"name": "exponential", "gamma": 1e300, "warmup": {"steps": 2}},
    ),
}


def send(endpoint: str, lr: float, schedule: dict[str, Any]) -> Any:
    def go(client: httpx.Client) -> httpx.Response:
        if endpoint == "create":
            optimizer = {**SGD, "lr": lr}
            body = {"optimizer": optimizer, "params": PARAMS, "schedule": schedule}
            return client.post("/v1/sessions", json=body)
        body = {"lr": lr, "schedule": schedule, "steps": 1000}
        return client.post(f"/v1/schedules/{endpoint}", json=body)

    return go


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(TOO_BIG))
def test_schedules_too_deep_or_too_large_are_refused_without_blocking(
    live: LiveServer, client: httpx.Client, case: str, endpoint: str
) -> None:
    head = listing_head(client)
    problem = refused(live, send(endpoint, 0.1, TOO_BIG[case]))
    assert problem["status"] in (413, 422), problem
    assert_no_new_session(client, head)  # no session made


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(OVERFLOWING))
def test_schedules_whose_rate_overflows_are_refused(
    live: LiveServer, client: httpx.Client, case: str, endpoint: str
) -> None:
    head = listing_head(client)
    lr, schedule = OVERFLOWING[case]
    problem = refused(live, send(endpoint, lr, schedule))
    assert problem["status"] == 422, problem
    assert_no_new_session(client, head)
