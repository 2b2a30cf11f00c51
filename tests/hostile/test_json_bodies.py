"""Hostile JSON bodies against a live server (issue 12, items 4, 6 and 8; docs/api.md: a JSON
tensor holds finite numbers only, booleans are not numbers).

* Numbers JSON cannot hold or a float cannot: `1e400`, `NaN` / `Infinity` literals,
  the same as strings, integers of 400 digits, in params, grads, every sort of
  hyperparameter, losses, preview fields and federated updates.
* Wrong types: strings, objects, booleans (`[[true, 2], [3, 4]]`), null, ragged lists.
* Bodies nested 10,000 levels deep (arrays, objects, and deep inside a tensor).

Each is a 4xx problem+json with the session (or the listing) unchanged, and /healthz
answering within 1 s while it runs.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.hostile.support import (
    GRADS,
    JSON,
    PARAMS,
    assert_no_new_session,
    assert_unchanged,
    create,
    deep,
    listing_head,
    refused,
    snapshot,
)
from tests.support.live_server import LiveServer

HOLE = "@@hole@@"

#: numbers no float64 holds, and what JSON cannot write
NON_FINITE = [
    "1e400",
    "-1e400",
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "inf",
    '"NaN"',
    '"Infinity"',
    '"-inf"',
    '"1e400"',
    str(10**400),
    "-" + str(10**400),
    "1" + "0" * 5000 + ".0",
]
#: what is not a number where a number goes (in a tensor, a list would be a deeper tensor)
NOT_A_NUMBER = ['"abc"', '"0.5"', "true", "false", '{"x": 1}', "[[true, 2]]"]
NOT_A_SCALAR = [*NOT_A_NUMBER, "[1, 2]", "[]", "[0.5]"]
#: what is not a tensor of shape [2, 2] where one goes
NOT_A_TENSOR = [
    '"abc"',
    "true",
    "null",
    '{"x": 1}',
    "[[true, 2], [3, 4]]",
    "[[1, 2], [3, false]]",
    "[[1, 2], [3, true]]",
    '[[1, 2], [3, "4"]]',
    "[[1, 2], [3, null]]",
    '[[1, 2], [3, {"x": 4}]]',
    "[[1, 2], [3]]",
    "[[1, 2], 3]",
    "[true, false]",
]
#: a tensor of another shape than the session's [2, 2] (a step only: a create sets it)
WRONG_SHAPE = ["[[[1, 2]], [[3, 4]]]", "[1, 2, 3, 4]", "[[1, 2, 3, 4]]", "1.0", "[]"]

ADAM_EXP = {
    "optimizer": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
    "params": PARAMS,
    "schedule": {"name": "exponential", "gamma": 0.9, "warmup": {"steps": 2}},
}
STEP = {"grads": GRADS, "loss": 0.5}
PREVIEW = {"lr": 0.1, "schedule": {"name": "exponential", "gamma": 0.9}, "steps": 10}

#: (endpoint, body, path of a number in it)
NUMBER_AT: dict[str, tuple[str, dict[str, Any], tuple[Any, ...]]] = {
    "create params": ("create", ADAM_EXP, ("params", "w", 1, 0)),
    "create scalar-like param": ("create", ADAM_EXP, ("params", "b", 0)),
    "create lr": ("create", ADAM_EXP, ("optimizer", "lr")),
    "create betas": ("create", ADAM_EXP, ("optimizer", "betas", 1)),
    "create eps": ("create", ADAM_EXP, ("optimizer", "eps")),
    "create gamma": ("create", ADAM_EXP, ("schedule", "gamma")),
    "create warmup steps": ("create", ADAM_EXP, ("schedule", "warmup", "steps")),
    "step grads": ("step", STEP, ("grads", "w", 0, 1)),
    "step grads b": ("step", STEP, ("grads", "b", 0)),
    "step loss": ("step", STEP, ("loss",)),
    "metrics loss": ("metrics", {"loss": 0.5}, ("loss",)),
    "preview lr": ("preview", PREVIEW, ("lr",)),
    "preview steps": ("preview", PREVIEW, ("steps",)),
    "preview gamma": ("preview", PREVIEW, ("schedule", "gamma")),
}
#: (endpoint, body, path of a tensor of shape [2, 2] in it)
TENSOR_AT: dict[str, tuple[str, dict[str, Any], tuple[Any, ...]]] = {
    "create params": ("create", ADAM_EXP, ("params", "w")),
    "step grads": ("step", STEP, ("grads", "w")),
}


def with_raw(body: dict[str, Any], path: tuple[Any, ...], raw: str) -> bytes:
    """`body` as JSON text with the value at `path` replaced by the JSON text `raw`."""
    copy = json.loads(json.dumps(body))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = HOLE
    text = json.dumps(copy)
    assert text.count(json.dumps(HOLE)) == 1
    return text.replace(json.dumps(HOLE), raw).encode()


def url(endpoint: str, sid: str) -> str:
    return {
        "create": "/v1/sessions",
        "step": f"/v1/sessions/{sid}/step",
        "metrics": f"/v1/sessions/{sid}/metrics",
        "preview": "/v1/schedules/preview",
        "preview.png": "/v1/schedules/preview.png",
    }[endpoint]


def post_raw(path: str, content: bytes) -> Any:
    def go(client: httpx.Client) -> httpx.Response:
        return client.post(path, content=content, headers={"Content-Type": JSON})

    return go


def refuse_all(
    live: LiveServer, client: httpx.Client, endpoint: str, bodies: list[bytes]
) -> list[dict[str, Any]]:
    """Each body refused (4xx problem+json, /healthz answering meanwhile) by `endpoint` of
    a fresh SGD session, which is unchanged afterwards; no session made."""
    sid = create(client)
    before = snapshot(client, sid)
    head = listing_head(client)
    problems = []
    for content in bodies:
        problem = refused(live, post_raw(url(endpoint, sid), content))
        assert problem["status"] != 413, problem  # all of these are small
        problems.append(problem)
        assert_unchanged(client, sid, before)
        if endpoint == "create":
            assert_no_new_session(client, head)
    return problems


@pytest.mark.parametrize("target", list(NUMBER_AT))
def test_non_finite_and_overflowing_numbers_are_refused(
    live: LiveServer, client: httpx.Client, target: str
) -> None:
    endpoint, body, path = NUMBER_AT[target]
    bodies = [with_raw(body, path, raw) for raw in NON_FINITE]
    refuse_all(live, client, endpoint, bodies)


@pytest.mark.parametrize("target", list(NUMBER_AT))
def test_wrong_types_where_a_number_goes_are_refused(
    live: LiveServer, client: httpx.Client, target: str
) -> None:
    endpoint, body, path = NUMBER_AT[target]
    in_tensor = path[0] in ("params", "grads")
    bodies = [with_raw(body, path, raw) for raw in NOT_A_NUMBER if in_tensor]
    bodies += [with_raw(body, path, raw) for raw in NOT_A_SCALAR if not in_tensor]
    refuse_all(live, client, endpoint, bodies)


@pytest.mark.parametrize("target", list(TENSOR_AT))
@pytest.mark.parametrize("raw", NOT_A_TENSOR)
def test_wrong_types_where_a_tensor_goes_are_refused(
    live: LiveServer, client: httpx.Client, target: str, raw: str
) -> None:
    endpoint, body, path = TENSOR_AT[target]
    refuse_all(live, client, endpoint, [with_raw(body, path, raw)])


@pytest.mark.parametrize("raw", WRONG_SHAPE)
def test_grads_of_another_shape_are_refused(
    live: LiveServer, client: httpx.Client, raw: str
) -> None:
    refuse_all(live, client, "step", [with_raw(STEP, ("grads", "w"), raw)])


def deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


DEEP_BODIES: dict[str, str] = {
    "array 10000": deep(10_000),
    "object 10000": deep_object(10_000),
    "mixed 10000": '{"a": [' * 5_000 + "1" + "]}" * 5_000,
    "array 100000": deep(100_000),
    "open, never closed": "[" * 100_000,
}
#: bodies of each endpoint whose one field holds JSON nested 10,000 deep
DEEP_FIELD: dict[str, tuple[dict[str, Any], tuple[Any, ...]]] = {
    "create": (ADAM_EXP, ("params", "w")),
    "step": (STEP, ("grads", "w")),
    "metrics": ({"loss": 0.5}, ("loss",)),
    "preview": (PREVIEW, ("schedule", "gamma")),
    "preview.png": (PREVIEW, ("schedule",)),
}


@pytest.mark.parametrize("endpoint", list(DEEP_FIELD))
def test_deeply_nested_json_bodies_are_refused(
    live: LiveServer, client: httpx.Client, endpoint: str
) -> None:
    body, path = DEEP_FIELD[endpoint]
    bodies = [text.encode() for text in DEEP_BODIES.values()]
    bodies.append(with_raw(body, path, deep(10_000)))
    bodies.append(with_raw(body, path, deep_object(10_000)))
    problems = refuse_all(live, client, endpoint, bodies)
    for problem in problems:
        assert problem["status"] in (400, 422), problem


@pytest.mark.parametrize("endpoint", ["create", "step", "metrics", "preview"])
def test_bodies_that_are_not_json_objects_are_refused(
    live: LiveServer, client: httpx.Client, endpoint: str
) -> None:
    bodies = [
        b"",
        b"null",
        b"[]",
        b"1e400",
        b'"text"',
        b"{",
        b'{"a": 1}}',
        b"\xff\xfe{}",
        b'{"a": "\xff"}',
        b"{}" * 1000,
        b'{"a": 1, "a": 2}',
    ]
    refuse_all(live, client, endpoint, bodies)
