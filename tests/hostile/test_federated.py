"""Hostile federated updates against a live server (issue 12, item 7; docs/federated.md).

Two updates with `num_examples` 2**63 once made the closing request answer 500 (orjson
could not write the sum) and left the round stuck for good; a binary update with
`num_examples: "18446744073709551616"` answered 500. Every such update is a 4xx
problem+json that changes nothing (the round's updates received, the session), and the
round still closes afterwards with valid updates; the largest accepted `num_examples`
closes a round whose session then reads, lists and exports (and the export imports).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from service.core.federated.aggregators import MAX_EXAMPLES
from tests.hostile.support import (
    BINARY,
    JSON,
    PARAMS,
    assert_readable,
    assert_unchanged,
    create,
    encode_file,
    refused,
    snapshot,
)
from tests.support.live_server import LiveServer

DELTA = {"w": [[0.01, -0.02], [0.03, 0.0]], "b": [0.1]}
FEDERATED = {
    "optimizer": {"name": "fedavg"},
    "params": PARAMS,
    "federated": {"min_clients": 2, "expected_clients": 2, "round_timeout": 600},
}
HOLE = "@@hole@@"

#: raw JSON values of `num_examples`
BAD_NUM_EXAMPLES = [
    str(2**63),
    str(2**63 - 1),
    str(2**64),
    str(MAX_EXAMPLES + 1),
    str(10**400),
    '"18446744073709551616"',
    '"120"',
    "1e30",
    "1e400",
    "120.0",
    "0",
    "-1",
    "true",
    "null",
    "[1]",
]
#: `num_examples` strings of a binary update
BAD_NUM_EXAMPLES_BINARY = [
    "18446744073709551616",
    str(2**63),
    str(MAX_EXAMPLES + 1),
    "9" * 5000,
    "1e30",
    "120.0",
    "0",
    "-1",
    "nan",
    "",
]
#: what Python's int() reads but is no decimal integer string (docs/state.md refuses the
#: same in a state file's counters): a binary `num_examples` must be digits only
NOT_PLAIN_DIGITS = [" 120", "120\n", "١٢٠", "1_20", "+120"]
BAD_CLIENT_IDS = [
    '""',
    json.dumps("c" * 129),
    json.dumps("c" * 100_000),
    '"a\\u0000b"',
    "7",
    "null",
]


def round_of(client: httpx.Client, sid: str) -> dict[str, Any]:
    r = client.get(f"/v1/sessions/{sid}/round")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def update_json(
    sid: str, rnd: int, client_id: str = '"c1"', num_examples: str = "10"
) -> Callable[[httpx.Client], httpx.Response]:
    body = {"client_id": HOLE + "1", "delta": DELTA, "num_examples": HOLE + "2"}
    text = (
        json.dumps(body)
        .replace(json.dumps(HOLE + "1"), client_id)
        .replace(json.dumps(HOLE + "2"), num_examples)
    )

    def go(c: httpx.Client) -> httpx.Response:
        return c.post(
            f"/v1/sessions/{sid}/rounds/{rnd}/updates",
            content=text.encode(),
            headers={"Content-Type": JSON},
        )

    return go


def update_binary(
    sid: str, rnd: int, client_id: str, num_examples: str
) -> Callable[[httpx.Client], httpx.Response]:
    content = encode_file(
        DELTA, {"client_id": client_id, "num_examples": num_examples, "kind": "delta"}
    )

    def go(c: httpx.Client) -> httpx.Response:
        return c.post(
            f"/v1/sessions/{sid}/rounds/{rnd}/updates",
            content=content,
            headers={"Content-Type": BINARY},
        )

    return go


@pytest.mark.parametrize("form", ["json", "binary", "binary, not plain digits", "client_id"])
def test_hostile_updates_are_refused_and_the_round_still_closes(
    live: LiveServer, client: httpx.Client, form: str
) -> None:
    sid = create(client, FEDERATED)
    rnd = round_of(client, sid)["round"]
    # one valid update in: the round holds state a bad update could spoil
    r = update_json(sid, rnd, '"c0"', "5")(client)
    assert r.status_code == 200, r.text
    before = snapshot(client, sid)
    received = round_of(client, sid)["received"]
    if form == "json":
        sends = [update_json(sid, rnd, f'"bad{i}"', n) for i, n in enumerate(BAD_NUM_EXAMPLES)]
    elif form == "binary":
        sends = [
            update_binary(sid, rnd, f"bad{i}", n) for i, n in enumerate(BAD_NUM_EXAMPLES_BINARY)
        ]
    elif form == "binary, not plain digits":
        sends = [update_binary(sid, rnd, f"bad{i}", n) for i, n in enumerate(NOT_PLAIN_DIGITS)]
    else:
        sends = [update_json(sid, rnd, cid, "10") for cid in BAD_CLIENT_IDS]
    for send in sends:
        refused(live, send)
        assert_unchanged(client, sid, before)
        assert round_of(client, sid)["received"] == received
    r = update_json(sid, rnd, '"c1"', "7")(client)
    assert r.status_code == 200, r.text
    assert r.json()["closed"] is True, r.json()
    assert round_of(client, sid)["round"] == rnd + 1
    assert_readable(client, sid)


def test_the_largest_num_examples_close_a_round_that_reads(client: httpx.Client) -> None:
    sid = create(client, FEDERATED)
    rnd = round_of(client, sid)["round"]
    for i, send in enumerate(
        [
            update_json(sid, rnd, '"c0"', str(MAX_EXAMPLES)),
            update_binary(sid, rnd, "c1", str(MAX_EXAMPLES)),
        ]
    ):
        r = send(client)
        assert r.status_code == 200, r.text
        assert r.json()["closed"] is (i == 1), r.json()
    assert round_of(client, sid)["round"] == rnd + 1
    r = client.get(f"/v1/sessions/{sid}/history")
    assert r.status_code == 200, r.text
    assert_readable(client, sid)
