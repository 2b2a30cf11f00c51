"""Federated `num_examples` is bounded (issue 12, item 7), over both stores.

Two JSON updates with `num_examples` 2**63 made the closing request answer 500 (orjson
cannot write the round's sum, 2**64) and left the round unclosable for good; a binary
update with `num_examples: "18446744073709551616"` answered 500. Now either is a 422
naming the field, nothing is recorded, and the round still closes with good updates;
the largest allowed count (10**12, `MAX_EXAMPLES`) closes a full round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.api.support import BINARY, Api, encode

pytestmark = pytest.mark.asyncio

X0 = {"w": [1.0, -2.0, 3.0]}
#: the documented cap on one update's num_examples (README, Limits)
MAX_EXAMPLES = 10**12


async def _create(api: Api, expected: int = 2) -> str:
    doc = await api.create(
        {
            "optimizer": {"name": "fedavg"},
            "params": X0,
            "dtype": "float64",
            "federated": {"min_clients": expected, "expected_clients": expected},
        }
    )
    return str(doc["id"])


async def _json_update(api: Api, sid: str, client: str, n: Any) -> Any:
    body = {"client_id": client, "delta": {"w": [1.0, 1.0, 1.0]}, "num_examples": n}
    return await api.client.post(
        f"/v1/sessions/{sid}/rounds/0/updates", json=body, headers=api.headers
    )


async def _binary_update(api: Api, sid: str, client: str, n: str) -> Any:
    body = encode({"w": np.ones(3)}, {"client_id": client, "num_examples": n, "kind": "delta"})
    return await api.client.post(
        f"/v1/sessions/{sid}/rounds/0/updates",
        content=body,
        headers={**api.headers, "Content-Type": BINARY},
    )


async def _round(api: Api, sid: str) -> dict[str, Any]:
    r = await api.client.get(f"/v1/sessions/{sid}/round", headers=api.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _names_num_examples(r: Any) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    locs = [e["loc"] for e in r.json()["errors"]]
    assert any(loc[-1] == "num_examples" for loc in locs), locs


@pytest.mark.parametrize("n", [2**63, 2**64, MAX_EXAMPLES + 1, 10**30])
async def test_an_overflowing_json_num_examples_is_422_and_the_round_closes(
    api: Api, n: int
) -> None:
    sid = await _create(api)
    before = await _round(api, sid)
    for client in ("a", "b"):
        _names_num_examples(await _json_update(api, sid, client, n))
    assert await _round(api, sid) == before  # nothing recorded
    for client in ("a", "b"):
        r = await _json_update(api, sid, client, 3)
        assert r.status_code == 200, r.text
    assert r.json()["closed"] is True
    info = await _round(api, sid)
    assert (info["round"], info["version"]) == (1, 1)


@pytest.mark.parametrize("n", [str(2**64), str(2**63), "9" * 5000, "1e30", "-1", "0"])
async def test_an_overflowing_binary_num_examples_is_422(api: Api, n: str) -> None:
    sid = await _create(api)
    before = await _round(api, sid)
    _names_num_examples(await _binary_update(api, sid, "a", n))
    assert await _round(api, sid) == before
    r = await _binary_update(api, sid, "a", "7")
    assert r.status_code == 200, r.text


async def test_the_largest_num_examples_closes_a_full_round(api: Api) -> None:
    """Every client at the cap: the round's sum (3 * 10**12) is written and read back."""
    sid = await _create(api, expected=3)
    for client in ("a", "b", "c"):
        r = await _json_update(api, sid, client, MAX_EXAMPLES)
        assert r.status_code == 200, r.text
    assert r.json()["closed"] is True
    r = await api.client.get(f"/v1/sessions/{sid}/history", headers=api.headers)
    assert r.status_code == 200, r.text
    entries = [e for e in r.json()["entries"] if e.get("kind") == "round"]
    assert entries[-1]["num_examples"] == 3 * MAX_EXAMPLES
    doc = await api.get(sid)
    assert doc["round"] == 1
