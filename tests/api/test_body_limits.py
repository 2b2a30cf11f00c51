"""Limits on what a request body may cost before it is parsed, and what JSON tensors may
hold (issue 12, items 6 and 8).

- A JSON body (any Content-Type but safetensors' `application/octet-stream`) over
  `max_json_body_bytes` is refused 413 before anything parses it, whether
  `Content-Length` says so or a chunked body streams past the limit; its problem names
  the JSON limit and the binary encoding. Safetensors bodies keep `max_body_bytes`.
- A safetensors create or step body is decoded within a budget of tensors and header
  bytes (`codecs.header_budget`): 200,000 tensor entries or a 50 MB header are refused
  400 before any tensor is built.
- A boolean anywhere in a JSON tensor is refused 422 naming the tensor (create params,
  step grads, federated updates); deeply nested JSON (in a tensor or in any other field)
  is a 4xx problem, never a 500 or a RecursionError.

Every refusal changes nothing: no session is created, the version stays.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.config import MiB, Settings
from service.core import tensorfile
from service.sessions import codecs
from service.sessions.errors import Invalid
from service.store.base import StateStore
from service.store.memory import MemoryStore
from tests.api.support import BINARY, Api, encode, make_settings, open_api

JSON = "application/json"
PROBLEM = "application/problem+json"
ADAM = {"name": "adam", "lr": 0.001}
PARAMS = {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.0, 0.0]}
GRADS = {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}
#: the JSON body limit of the small-limit app
LIMIT = 4096


def problem(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The problem+json body of a refusal (of `status`, or any 4xx)."""
    if status is None:
        assert 400 <= r.status_code < 500, r.text[:500]
    else:
        assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == r.status_code
    assert body["type"].startswith("urn:optserve:problem:")
    return body


def locs(body: dict[str, Any]) -> list[list[Any]]:
    return [e["loc"] for e in body["errors"]]


async def session_count(api: Api) -> int:
    r = await api.client.get("/v1/sessions", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json()["sessions"])


def padded(body: bytes, size: int) -> bytes:
    """`body` (a JSON document) padded with trailing whitespace to exactly `size` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def json_create(size: int) -> bytes:
    return padded(orjson.dumps({"optimizer": ADAM, "params": PARAMS}), size)


def chunks(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    return gen()


def open_small(store: StateStore, **overrides: Any) -> AbstractAsyncContextManager[Api]:
    """The app with a JSON body limit of `LIMIT` bytes."""
    return open_api(store, make_settings(max_json_body_bytes=LIMIT, **overrides))


# --- A. the JSON body limit --------------------------------------------------------------


def test_setting_default_env_and_clamp(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_json_body_bytes == 64 * MiB
    assert Settings().max_json_body_bytes <= Settings().max_body_bytes
    # never over the body limit: lowered to it
    assert Settings(max_body_bytes=8192).max_json_body_bytes == 8192
    assert Settings(max_body_bytes=8192, max_json_body_bytes=4096).max_json_body_bytes == 4096
    monkeypatch.setenv("OPTSERVE_MAX_JSON_BODY_BYTES", "123456")
    assert Settings().max_json_body_bytes == 123456


@pytest.mark.asyncio
async def test_json_body_over_the_json_limit_413_by_content_length(store: StateStore) -> None:
    async with open_small(store) as api:
        at_limit = await api.client.post(
            "/v1/sessions", content=json_create(LIMIT), headers={"Content-Type": JSON}
        )
        assert at_limit.status_code == 201, at_limit.text
        count = await session_count(api)
        r = await api.client.post(
            "/v1/sessions", content=json_create(LIMIT + 1), headers={"Content-Type": JSON}
        )
        body = problem(r, 413)
        assert body["type"] == "urn:optserve:problem:payload-too-large"
        assert str(LIMIT) in body["detail"]
        assert "max_json_body_bytes" in body["detail"]
        assert BINARY in body["detail"]
        assert "safetensors" in body["detail"]
        assert await session_count(api) == count


@pytest.mark.asyncio
async def test_json_body_streaming_past_the_json_limit_413(store: StateStore) -> None:
    async with open_small(store) as api:
        count = await session_count(api)
        r = await api.client.post(
            "/v1/sessions", content=chunks(json_create(LIMIT + 1)), headers={"Content-Type": JSON}
        )
        assert "content-length" not in r.request.headers
        body = problem(r, 413)
        assert str(LIMIT) in body["detail"]
        assert BINARY in body["detail"]
        assert await session_count(api) == count
        ok = await api.client.post(  # at the limit, chunked: accepted
            "/v1/sessions", content=chunks(json_create(LIMIT)), headers={"Content-Type": JSON}
        )
        assert ok.status_code == 201, ok.text


@pytest.mark.asyncio
async def test_json_step_over_the_json_limit_changes_nothing(store: StateStore) -> None:
    async with open_small(store) as api:
        sid = (await api.create({"optimizer": ADAM, "params": PARAMS}))["id"]
        step = padded(orjson.dumps({"grads": GRADS}), LIMIT + 1)
        path = f"/v1/sessions/{sid}/step"
        r = await api.client.post(path, content=step, headers={"Content-Type": JSON})
        assert str(LIMIT) in problem(r, 413)["detail"]
        r = await api.client.post(path, content=chunks(step), headers={"Content-Type": JSON})
        assert str(LIMIT) in problem(r, 413)["detail"]
        assert await api.version(sid) == 0
        at_limit = padded(orjson.dumps({"grads": GRADS}), LIMIT)
        ok = await api.client.post(path, content=at_limit, headers={"Content-Type": JSON})
        assert ok.status_code == 200, ok.text
        assert await api.version(sid) == 1


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/merge-patch+json"])
@pytest.mark.asyncio
async def test_any_non_safetensors_body_is_held_to_the_json_limit(
    store: StateStore, content_type: str | None
) -> None:
    async with open_small(store) as api:
        headers = {} if content_type is None else {"Content-Type": content_type}
        r = await api.client.post("/v1/sessions", content=json_create(LIMIT + 1), headers=headers)
        assert str(LIMIT) in problem(r, 413)["detail"]
        assert await session_count(api) == 0


@pytest.mark.asyncio
async def test_safetensors_body_keeps_the_body_limit(store: StateStore) -> None:
    """A binary body over the JSON limit (and under `max_body_bytes`) is accepted; over
    `max_body_bytes` it is refused with the general 413."""
    async with open_small(store, max_body_bytes=64 * 1024) as api:
        w = np.arange(4096, dtype=np.float32)  # 16 KiB of data, over the JSON limit
        body = encode({"w": w}, {"optimizer": orjson.dumps(ADAM).decode()})
        assert LIMIT < len(body) < 64 * 1024
        r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        grads = encode({"w": np.ones(4096, np.float32)})
        r = await api.client.post(
            f"/v1/sessions/{sid}/step", content=grads, headers={"Content-Type": BINARY}
        )
        assert r.status_code == 200, r.text
        big = encode({"w": np.arange(32 * 1024, dtype=np.float32)}, {"optimizer": "{}"})
        r = await api.client.post("/v1/sessions", content=big, headers={"Content-Type": BINARY})
        body413 = problem(r, 413)
        assert "max_json_body_bytes" not in body413["detail"]
        assert str(64 * 1024) in body413["detail"]


# --- B. budgets of a safetensors body ------------------------------------------------------


def many_tensors(count: int, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of `count` one-element float32 tensors (header written directly:
    encoding this many arrays one by one is slow)."""
    header: dict[str, Any] = {
        f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(count)
    }
    if metadata:
        header["__metadata__"] = metadata
    text = orjson.dumps(header)
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + bytes(4 * count)


def big_header(size: int, metadata: dict[str, str]) -> bytes:
    """A safetensors file of one tensor `w` (2 floats) whose header is `size` bytes long
    (a `pad` metadata string)."""
    tensors = {"w": np.zeros(2, np.float32)}
    small = encode(tensors, {**metadata, "pad": ""})
    header_now = int.from_bytes(small[:8], "little")
    return encode(tensors, {**metadata, "pad": "x" * (size - header_now)})


SGD_META = {"optimizer": '{"name": "sgd", "lr": 0.1}'}


@pytest.mark.asyncio
async def test_binary_create_with_200000_tensor_entries_is_refused_unbuilt(api: Api) -> None:
    body = many_tensors(200_000, SGD_META)
    r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    found = problem(r, 400)
    assert found["type"] == "urn:optserve:problem:malformed-body"
    assert "over the limit" in found["detail"]
    assert await session_count(api) == 0


@pytest.mark.asyncio
async def test_binary_create_over_max_tensors_is_refused_before_decoding(
    store: StateStore,
) -> None:
    """The tensor budget is the server's `max_tensors`: at it a create is fine, past it
    the header is refused before a tensor is built."""
    async with open_api(store, make_settings(max_tensors=50)) as api:
        ok = await api.client.post(
            "/v1/sessions", content=many_tensors(50, SGD_META), headers={"Content-Type": BINARY}
        )
        assert ok.status_code == 201, ok.text
        r = await api.client.post(
            "/v1/sessions", content=many_tensors(51, SGD_META), headers={"Content-Type": BINARY}
        )
        found = problem(r, 400)
        assert "51 tensors, over the limit of 50" in found["detail"]
        assert await session_count(api) == 1


@pytest.mark.asyncio
async def test_binary_create_with_a_50_mb_header_is_refused(api: Api) -> None:
    body = big_header(50_000_000, SGD_META)
    r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    found = problem(r, 400)
    assert found["type"] == "urn:optserve:problem:malformed-body"
    assert "header" in found["detail"]
    assert await session_count(api) == 0


@pytest.mark.asyncio
async def test_binary_step_with_200000_tensor_entries_or_a_50_mb_header_is_refused(
    api: Api,
) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": {"w": [1.0, 2.0]}}))["id"]
    path = f"/v1/sessions/{sid}/step"
    r = await api.client.post(path, content=many_tensors(200_000), headers={"Content-Type": BINARY})
    assert problem(r, 400)["type"] == "urn:optserve:problem:malformed-body"
    r = await api.client.post(
        path, content=big_header(50_000_000, {}), headers={"Content-Type": BINARY}
    )
    assert "header" in problem(r, 400)["detail"]
    assert await api.version(sid) == 0
    # a few unknown tensors are still refused by name (422), within the spare budget
    grads = encode({"w": np.ones(2, np.float32), "nope": np.ones(1, np.float32)})
    r = await api.client.post(path, content=grads, headers={"Content-Type": BINARY})
    assert ["body", "grads", "nope"] in locs(problem(r, 422))
    ok = await api.client.post(
        path, content=encode({"w": np.ones(2, np.float32)}), headers={"Content-Type": BINARY}
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.asyncio
async def test_binary_federated_update_with_200000_tensor_entries_is_refused(api: Api) -> None:
    doc = await api.create(
        {
            "optimizer": {"name": "fedavg"},
            "params": {"w": [1.0, 2.0]},
            "federated": {"min_clients": 1, "expected_clients": 2},
        }
    )
    path = f"/v1/sessions/{doc['id']}/rounds/0/updates"
    meta = {"client_id": "c0", "num_examples": "1", "kind": "delta"}
    for body in (many_tensors(200_000, meta), big_header(50_000_000, meta)):
        r = await api.client.post(path, content=body, headers={"Content-Type": BINARY})
        assert problem(r, 400)["type"] == "urn:optserve:problem:malformed-body"
    r = await api.client.get(f"/v1/sessions/{doc['id']}/round", headers=api.headers)
    assert r.json()["clients"] == []


def test_header_budget() -> None:
    assert codecs.header_budget(0) == codecs.HEADER_BYTES_BASE
    assert (
        codecs.header_budget(10) == codecs.HEADER_BYTES_BASE + 10 * codecs.HEADER_BYTES_PER_TENSOR
    )
    assert codecs.header_budget(10**9) == tensorfile.MAX_HEADER_BYTES


# --- C. booleans and deep nesting in JSON tensors --------------------------------------------

BOOLEAN_TENSORS = [
    ("[[true, 2], [3, 4]]", "[0][0]"),
    ("[1, false]", "[1]"),
    ("[1.5, true]", "[1]"),
    ("[[[[1, true]]]]", "[0][0][0][1]"),
    ("[[1, 2], [3, [[false]]]]", None),  # ragged as well: refused either way
    ("true", None),
]


@pytest.mark.parametrize(("tensor", "where"), BOOLEAN_TENSORS)
@pytest.mark.asyncio
async def test_booleans_in_create_params_are_refused(
    api: Api, tensor: str, where: str | None
) -> None:
    body = fill('{"optimizer": {"name": "adam"}, "params": {"w": @}}', tensor)
    r = await api.client.post("/v1/sessions", content=body, headers={"Content-Type": JSON})
    found = problem(r, 422)
    assert locs(found) == [["body", "params", "w"]]
    if where is not None:
        assert "boolean" in found["errors"][0]["msg"]
        assert where in found["errors"][0]["msg"]
    assert await session_count(api) == 0


@pytest.mark.parametrize(("tensor", "where"), BOOLEAN_TENSORS)
@pytest.mark.asyncio
async def test_booleans_in_step_grads_are_refused(api: Api, tensor: str, where: str | None) -> None:
    sid = (await api.create({"optimizer": ADAM, "params": {"w": [[1.0, 2.0], [3.0, 4.0]]}}))["id"]
    body = fill('{"grads": {"w": @}}', tensor)
    r = await api.client.post(
        f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": JSON}
    )
    found = problem(r, 422)
    assert locs(found) == [["body", "grads", "w"]]
    if where is not None:
        assert "boolean" in found["errors"][0]["msg"]
    assert await api.version(sid) == 0


FEDAVG = {"optimizer": {"name": "fedavg"}, "federated": {"min_clients": 2}}


@pytest.mark.parametrize("kind", ["delta", "weights"])
@pytest.mark.asyncio
async def test_booleans_in_a_federated_update_are_refused(api: Api, kind: str) -> None:
    sid = (await api.create({**FEDAVG, "params": {"w": [[1.0, 2.0], [3.0, 4.0]]}}))["id"]
    path = f"/v1/sessions/{sid}/rounds/0/updates"
    for tensor, _ in BOOLEAN_TENSORS:
        body = fill('{"client_id": "c1", "num_examples": 1, "@": {"w": @}}', kind, tensor)
        r = await api.client.post(path, content=body, headers={"Content-Type": JSON})
        assert locs(problem(r, 422)) == [["body", kind, "w"]], tensor
    ok = await api.client.post(
        path,
        json={"client_id": "c1", "num_examples": 1, kind: {"w": [[0.0, 0.0], [0.0, 0.0]]}},
    )
    assert ok.status_code in (200, 201, 202), ok.text
    assert ok.json()["received"] == 1  # no refused update was counted


@pytest.mark.asyncio
async def test_json_import_is_not_accepted(api: Api) -> None:
    """Import takes a safetensors state file only: a JSON body (booleans or not) is 415."""
    body = '{"params": {"w": [true, 1]}}'
    r = await api.client.post("/v1/sessions/import", content=body, headers={"Content-Type": JSON})
    problem(r, 415)
    assert await session_count(api) == 0


def test_json_tensor_values() -> None:
    """What `json_tensor` accepts (float64 of the nested list's shape) and refuses."""
    at = ["body", "params", "w"]
    ok = codecs.json_tensor(orjson.loads("[[1, 2.5], [3, 4]]"), at)
    assert ok.dtype == np.float64
    np.testing.assert_array_equal(ok, [[1.0, 2.5], [3.0, 4.0]])
    assert codecs.json_tensor(7, at).shape == ()
    assert codecs.json_tensor(orjson.loads("[[], []]"), at).shape == (2, 0)
    assert codecs.json_tensor(orjson.loads("[18446744073709551616]"), at)[0] == 2.0**64
    for bad, words in [
        ("[[1, 2], [3]]", "1 elements at [1]"),
        ("[[1, 2], 3]", "a number at [1]"),
        ("[1, [2]]", "a list at [1]"),
        ('[[1, 2], [3, "x"]]', "a string at [1][1]"),
        ("[[1, 2], [3, null]]", "null at [1][1]"),
        ("[[1, 2], [3, {}]]", "an object at [1][1]"),
        ("[0, 0, 0, true]", "a boolean at [3]"),
    ]:
        with pytest.raises(Invalid) as caught:
            codecs.json_tensor(orjson.loads(bad), at)
        assert caught.value.errors == [{"loc": at, "msg": caught.value.errors[0]["msg"]}], bad
        assert words in caught.value.errors[0]["msg"], (bad, caught.value.errors)


def test_json_tensors_frees_each_list() -> None:
    values: dict[str, Any] = {"a": [1.0, 2.0], "b": [[3.0]]}
    arrays = codecs.json_tensors(values, ["body", "grads"])
    assert values == {}
    assert {k: v.shape for k, v in arrays.items()} == {"a": (2,), "b": (1, 1)}


def fill(template: str, *parts: str) -> str:
    """`template` with each `@` replaced by the next of `parts` (JSON text has no `@`)."""
    pieces = template.split("@")
    assert len(pieces) == len(parts) + 1
    return pieces[0] + "".join(part + piece for part, piece in zip(parts, pieces[1:], strict=True))


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [65, 100, 1000, 10_000])
@pytest.mark.asyncio
async def test_deeply_nested_tensors_are_4xx(depth: int) -> None:
    async with open_api(MemoryStore()) as api:
        sid = (await api.create({"optimizer": ADAM, "params": {"w": [1.0]}}))["id"]
        fed = (await api.create({**FEDAVG, "params": {"w": [1.0]}}))["id"]
        t = nested(depth)
        for path, body in [
            ("/v1/sessions", fill('{"optimizer": {"name": "adam"}, "params": {"w": @}}', t)),
            (f"/v1/sessions/{sid}/step", fill('{"grads": {"w": @}}', t)),
            (
                f"/v1/sessions/{fed}/rounds/0/updates",
                fill('{"client_id": "c", "num_examples": 1, "delta": {"w": @}}', t),
            ),
        ]:
            r = await api.client.post(path, content=body, headers={"Content-Type": JSON})
            found = problem(r)
            if depth < 1024:  # parsed: the tensor is named
                assert r.status_code == 422, (path, r.text[:300])
                assert found["errors"][0]["loc"][-1] == "w"
                assert "deeper than 64" in found["errors"][0]["msg"]
        assert await api.version(sid) == 0
        assert await session_count(api) == 2


CREATE_FIELDS = [
    "optimizer",
    "schedule",
    "transforms",
    "ema",
    "swa",
    "lr_finder",
    "consistency",
    "federated",
    "history",
    "dtype",
    "nonfinite",
    "unknown_field",
]


@pytest.mark.parametrize("depth", [1000, 10_000])
@pytest.mark.parametrize("shape", ["object", "list"])
@pytest.mark.asyncio
async def test_deep_json_in_any_field_is_4xx(depth: int, shape: str) -> None:
    deep = deep_object(depth) if shape == "object" else nested(depth)
    async with open_api(MemoryStore()) as api:
        sid = (await api.create({"optimizer": ADAM, "params": {"w": [1.0]}}))["id"]
        fed = (await api.create({**FEDAVG, "params": {"w": [1.0]}}))["id"]
        requests = [
            ("/v1/sessions", fill('{"optimizer": @, "params": {"w": [1.0]}}', deep)),
            ("/v1/sessions", fill('{"optimizer": {"name": "adam"}, "params": @}', deep)),
            ("/v1/sessions", fill('{"optimizer": {"name": "adam"}, "params": {"w": @}}', deep)),
            *[
                (
                    "/v1/sessions",
                    fill(
                        '{"optimizer": {"name": "adam"}, "params": {"w": [1.0]}, "@": @}',
                        name,
                        deep,
                    ),
                )
                for name in CREATE_FIELDS[1:]
            ],
            (f"/v1/sessions/{sid}/step", fill('{"grads": @}', deep)),
            (f"/v1/sessions/{sid}/step", fill('{"grads": {"w": [1.0]}, "loss": @}', deep)),
            (f"/v1/sessions/{sid}/step", fill('{"grads": {"w": [1.0]}, "base_version": @}', deep)),
            (f"/v1/sessions/{sid}/step", fill('{"grads": {"w": [1.0]}, "other": @}', deep)),
            (
                f"/v1/sessions/{fed}/rounds/0/updates",
                fill(
                    '{"client_id": "c", "num_examples": 1, "delta": {"w": [1.0]}, "metrics": @}',
                    deep,
                ),
            ),
            (
                f"/v1/sessions/{fed}/rounds/0/updates",
                fill('{"client_id": @, "num_examples": 1, "delta": {"w": [1.0]}}', deep),
            ),
            ("/v1/schedules/preview", fill('{"schedule": @, "steps": 10}', deep)),
            ("/v1/schedules/preview", deep),
            ("/v1/sessions", deep),
            (f"/v1/sessions/{sid}/step", deep),
        ]
        for path, body in requests:
            r = await api.client.post(path, content=body, headers={"Content-Type": JSON})
            problem(r)  # any 4xx problem+json, never a 500
        for meta_name in ("optimizer", "schedule", "transforms", "ema", "federated"):
            meta = {**SGD_META, meta_name: deep}
            r = await api.client.post(
                "/v1/sessions",
                content=encode({"w": np.ones(2, np.float32)}, meta),
                headers={"Content-Type": BINARY},
            )
            problem(r)
        assert await api.version(sid) == 0
        assert await session_count(api) == 2
