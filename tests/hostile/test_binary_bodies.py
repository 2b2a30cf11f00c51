"""Malformed safetensors bodies against a live server's binary create and binary step
(issue 12, items 4 and 6): shapes `[0, 1e30]`, 70 dimensions, 5000-digit integers,
JSON nested deep in the header, a header length past the body (or absurd), offsets that
overlap, leave gaps, run backwards or point outside the data, sizes that do not match,
unknown dtypes, metadata that is not strings, and more tensors than the server's
`max_tensors` (default 10,000). Each is a 4xx problem+json, the session unchanged, no
session made, and /healthz answering within 1 s while it runs.

Overlapping offsets, gaps between tensors and bytes after the last tensor are malformed
by the safetensors format itself ("the byte buffer needs to be entirely indexed, and
cannot contain holes. This prevents the creation of polyglot files": the reference
implementation refuses them), and docs/api.md's binary tensor set is one safetensors file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.hostile.support import (
    BINARY,
    GRADS,
    JSON,
    PARAMS,
    assert_no_new_session,
    assert_unchanged,
    create,
    deep,
    encode_file,
    listing_head,
    refused,
    snapshot,
    st_encode,
    st_file,
)
from tests.hostile.test_schedules import flat, nested
from tests.support.live_server import MAX_BODY_BYTES, LiveServer

DIGITS_5000 = "9" * 5000
OPTIMIZER = json.dumps({"name": "sgd", "lr": 0.1})
#: the live servers run with the default max_tensors (tests/support/live_server.py)
MAX_TENSORS = int(Settings.model_fields["max_tensors"].default)

W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}
DATA = np.asarray([0.1, 0.2, -0.3, 0.4, -0.5], np.float32).tobytes()


def header_with(meta: dict[str, str], **entries: Any) -> dict[str, Any]:
    return {"__metadata__": meta, "w": W, "b": B, **entries}


def text_header(meta: dict[str, str], w_entry: str, b_entry: str | None = None) -> str:
    """A header written as text (for what json.dumps cannot write)."""
    b_text = json.dumps(B) if b_entry is None else b_entry
    return '{"__metadata__": ' + json.dumps(meta) + ', "w": ' + w_entry + ', "b": ' + b_text + "}"


def entry(shape: str, offsets: str = "[0, 16]", dtype: str = '"F32"') -> str:
    return '{"dtype": ' + dtype + ', "shape": ' + shape + ', "data_offsets": ' + offsets + "}"


def bodies(meta: dict[str, str]) -> dict[str, bytes]:
    """Malformed safetensors files whose metadata is `meta` (and whose tensors are `w`
    of shape [2, 2] and `b` of shape [1] where they are well formed)."""
    good = header_with(meta)
    good_raw = json.dumps(good).encode()
    cases: dict[str, bytes] = {
        # shapes
        "shape [0, 1e30]": st_file(
            text_header(meta, entry("[0, 1e30]", "[0, 0]"), entry("[1]", "[0, 4]")), DATA[:4]
        ),
        "shape [1e30]": st_file(text_header(meta, entry("[1e30]")), DATA),
        "shape 70 dims": st_file(text_header(meta, entry(json.dumps([1] * 70), "[0, 4]")), DATA),
        "shape 5000 digits": st_file(text_header(meta, entry(f"[{DIGITS_5000}]")), DATA),
        "shape 2**64": st_file(text_header(meta, entry(f"[{2**64}, 0]", "[0, 0]")), DATA),
        "shape product over 2**63": st_file(
            text_header(meta, entry(f"[{2**31}, {2**31}, {2**31}]")), DATA
        ),
        "shape [0, 2**62, 4]": st_file(
            text_header(meta, entry(f"[0, {2**62}, 4]", "[0, 0]")), DATA
        ),
        "shape negative": st_file(text_header(meta, entry("[-1, 4]")), DATA),
        "shape float": st_file(text_header(meta, entry("[2.0, 2]")), DATA),
        "shape booleans": st_file(text_header(meta, entry("[true, 2]")), DATA),
        "shape NaN": st_file(text_header(meta, entry("[NaN, 2]")), DATA),
        "shape string": st_file(text_header(meta, entry('"2,2"')), DATA),
        "shape deep": st_file(text_header(meta, entry(deep(10_000))), DATA),
        # offsets
        "offsets 5000 digits": st_file(
            text_header(meta, entry("[2, 2]", f"[0, {DIGITS_5000}]")), DATA
        ),
        "offsets 2**64": st_file(
            text_header(meta, entry("[2, 2]", f"[{2**64}, {2**64 + 16}]")), DATA
        ),
        "offsets 1e400": st_file(text_header(meta, entry("[2, 2]", "[0, 1e400]")), DATA),
        "offsets overlapping": st_file(header_with(meta, b={**B, "data_offsets": [12, 16]}), DATA),
        # b's 4 bytes lie inside w's 16 (and the last 4 bytes are left unindexed)
        "offsets overlapping, inside": st_file(
            header_with(meta, b={**B, "data_offsets": [8, 12]}), DATA
        ),
        "offsets outside the data": st_file(
            header_with(meta, b={**B, "data_offsets": [16, 1_000_020]}), DATA
        ),
        "offsets past the end by 4": st_file(
            header_with(meta, b={**B, "data_offsets": [20, 24]}), DATA
        ),
        "offsets backwards": st_file(header_with(meta, w={**W, "data_offsets": [16, 0]}), DATA),
        "offsets negative": st_file(header_with(meta, w={**W, "data_offsets": [-4, 12]}), DATA),
        "offsets three": st_file(header_with(meta, w={**W, "data_offsets": [0, 8, 16]}), DATA),
        "offsets missing": st_file(header_with(meta, w={"dtype": "F32", "shape": [2, 2]}), DATA),
        "offsets with a gap": st_file(
            header_with(meta, b={**B, "data_offsets": [20, 24]}), DATA + b"\0" * 4
        ),
        "size not the shape's": st_file(header_with(meta, w={**W, "shape": [2, 3]}), DATA),
        "trailing bytes": st_file(good, DATA + b"\0" * 64),
        "data cut short": st_file(good, DATA[:10]),
        # dtypes
        "dtype unknown": st_file(header_with(meta, w={**W, "dtype": "F128"}), DATA),
        "dtype not a string": st_file(header_with(meta, w={**W, "dtype": 32}), DATA),
        "dtype object (pickle)": st_file(header_with(meta, w={**W, "dtype": "O"}), DATA),
        # the header
        "header length past the body": st_file(good, DATA, length=len(good_raw) + 1000),
        "header length 2**64 - 1": st_file(good, DATA, length=2**64 - 1),
        "header length 2**63": st_file(good, DATA, length=2**63),
        "header length over the body limit": st_file(good, DATA, length=MAX_BODY_BYTES * 4),
        "header length 0": st_file(b"", DATA + good_raw, length=0),
        "header length short by one": st_file(good, DATA, length=len(good_raw) - 1),
        "header deep array": st_file(deep(10_000), DATA),
        "header deep object": st_file('{"a": ' * 10_000 + "1" + "}" * 10_000, DATA),
        "header deep in an entry": st_file(header_with(meta, w={**W, "extra": "@@"}), DATA).replace(
            b'"@@"', deep(5_000).encode()
        ),
        "header deep in metadata": st_file(
            text_header({}, json.dumps(W)).replace(
                '"__metadata__": {}', '"__metadata__": ' + deep(10_000)
            ),
            DATA,
        ),
        "header 5000-digit metadata value": st_file(
            text_header({}, json.dumps(W)).replace(
                '"__metadata__": {}', '"__metadata__": {"loss": ' + DIGITS_5000 + "}"
            ),
            DATA,
        ),
        "header not JSON": st_file(b"\xff\xfe not json", DATA),
        "header not UTF-8": st_file(b'{"w": "\xff"}', DATA),
        "header JSON array": st_file("[1, 2, 3]", DATA),
        "header JSON number": st_file("1e400", DATA),
        "header duplicate names": st_file(
            text_header(meta, json.dumps(W))[:-1] + ', "w": ' + json.dumps(W) + "}", DATA
        ),
        "metadata not strings": st_file(
            {**good, "__metadata__": {**meta, "loss": 0.5, "x": [1, 2]}}, DATA
        ),
        "metadata a list": st_file({**good, "__metadata__": ["loss", "0.5"]}, DATA),
        "an entry not an object": st_file({**good, "w": [1, 2, 3]}, DATA),
        # bodies too short to hold a header
        "empty body": b"",
        "3 bytes": b"\x01\x02\x03",
        "8 bytes, length 0": struct.pack("<Q", 0),
        "8 bytes, length 1": struct.pack("<Q", 1),
        "a JSON body sent as binary": json.dumps({"grads": GRADS}).encode(),
    }
    return cases


CREATE_META = {"optimizer": OPTIMIZER}
STEP_META = {"loss": "0.5"}
CREATE_CASES = bodies(CREATE_META)
STEP_CASES = bodies(STEP_META)

#: well-formed files whose metadata or values a create must refuse
CREATE_CASES.update(
    {
        "create: optimizer missing": encode_file(PARAMS, {}),
        "create: optimizer deep": encode_file(PARAMS, {"optimizer": deep(10_000)}),
        "create: optimizer lr 1e400": encode_file(
            PARAMS, {"optimizer": '{"name": "sgd", "lr": 1e400}'}
        ),
        "create: optimizer lr 10**400": encode_file(
            PARAMS, {"optimizer": '{"name": "sgd", "lr": ' + str(10**400) + "}"}
        ),
        "create: optimizer not JSON": encode_file(PARAMS, {"optimizer": "{sgd"}),
        "create: schedule deep": encode_file(
            PARAMS, {"optimizer": OPTIMIZER, "schedule": deep(5000)}
        ),
        "create: schedule nested 40 deep": encode_file(
            PARAMS, {"optimizer": OPTIMIZER, "schedule": json.dumps(nested(40))}
        ),
        "create: schedule of 2000 schedules": encode_file(
            PARAMS, {"optimizer": OPTIMIZER, "schedule": json.dumps(flat(2000))}
        ),
        "create: schedule gamma 1e300": encode_file(
            PARAMS,
            {"optimizer": OPTIMIZER, "schedule": '{"name": "exponential", "gamma": 1e300}'},
        ),
        "create: dtype float16": encode_file(PARAMS, {"optimizer": OPTIMIZER, "dtype": "float16"}),
        "create: NaN param": encode_file(
            {"w": [[np.nan, 1.0], [2.0, 3.0]], "b": [0.0]}, CREATE_META
        ),
        "create: inf param": encode_file(
            {"w": [[np.inf, 1.0], [2.0, 3.0]], "b": [0.0]}, CREATE_META
        ),
    }
)
#: well-formed files a step must refuse
STEP_CASES.update(
    {
        "step: NaN grad": encode_file({"w": [[np.nan, 1.0], [2.0, 3.0]], "b": [0.0]}, STEP_META),
        "step: inf grad": encode_file({"w": [[1.0, -np.inf], [2.0, 3.0]], "b": [0.0]}, STEP_META),
        "step: an unknown grad": encode_file({**GRADS, "c": [1.0]}, STEP_META),
        "step: a grad missing": encode_file({"w": GRADS["w"]}, STEP_META),
        "step: wrong shape": encode_file({"w": [1.0, 2.0, 3.0, 4.0], "b": [0.0]}, STEP_META),
        "step: loss 1e400": encode_file(GRADS, {"loss": "1e400"}),
        "step: loss 5000 digits": encode_file(GRADS, {"loss": DIGITS_5000 * 2}),
        "step: loss not a number": encode_file(GRADS, {"loss": "abc"}),
        "step: return bogus": encode_file(GRADS, {"return": "everything"}),
        "step: base_version 5000 digits": encode_file(GRADS, {"base_version": DIGITS_5000}),
        "step: base_version 2**64": encode_file(GRADS, {"base_version": str(2**64)}),
        "step: wait 1e400": encode_file(GRADS, {"wait": "1e400"}),
        "step: skip_missing maybe": encode_file(GRADS, {"skip_missing": "maybe"}),
    }
)


def post_binary(path: str, content: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def go(client: httpx.Client) -> httpx.Response:
        return client.post(path, content=content, headers={"Content-Type": BINARY})

    return go


@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_malformed_binary_create_is_refused(
    live: LiveServer, client: httpx.Client, case: str
) -> None:
    head = listing_head(client)
    refused(live, post_binary("/v1/sessions", CREATE_CASES[case]))
    assert_no_new_session(client, head)


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_malformed_binary_step_is_refused(
    live: LiveServer, client: httpx.Client, case: str
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    refused(live, post_binary(f"/v1/sessions/{sid}/step", STEP_CASES[case]))
    assert_unchanged(client, sid, before)


def test_the_well_formed_files_of_these_tests_are_taken(client: httpx.Client) -> None:
    """The malformed files are refused for what is wrong with them: the same file well
    formed is taken (binary create 201, binary step 200)."""
    header, data = st_encode(PARAMS, CREATE_META)
    r = client.post("/v1/sessions", content=st_file(header, data), headers={"Content-Type": BINARY})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = client.post(
        f"/v1/sessions/{sid}/step",
        content=st_file(header_with(STEP_META), DATA),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 200, r.text


# --- too many tensors ------------------------------------------------------------------------


def many(n: int) -> dict[str, float]:
    return {f"t{i}": 0.0 for i in range(n)}


@pytest.mark.parametrize("where", ["json create", "binary create", "json step", "binary step"])
def test_more_tensors_than_max_tensors_are_refused(
    live: LiveServer, client: httpx.Client, where: str
) -> None:
    """MAX_TENSORS + 1 tensors (scalars: ~10 bytes each in JSON, within the body limit;
    in binary the header alone is over the live servers' 256 KiB body limit, so a 413
    is a fine refusal too)."""
    sid = create(client)
    before = snapshot(client, sid)
    head = listing_head(client)
    tensors = many(MAX_TENSORS + 1)
    if where == "json create":
        body = json.dumps({"optimizer": {"name": "sgd", "lr": 0.1}, "params": tensors})
        problem = refused(live, post_json("/v1/sessions", body.encode()))
        assert problem["status"] in (413, 422), problem
        assert str(MAX_TENSORS) in json.dumps(problem), problem
    elif where == "json step":
        body = json.dumps({"grads": {**GRADS, **tensors}})
        refused(live, post_json(f"/v1/sessions/{sid}/step", body.encode()))
    else:
        content = encode_file(tensors, CREATE_META if where == "binary create" else STEP_META)
        path = "/v1/sessions" if where == "binary create" else f"/v1/sessions/{sid}/step"
        refused(live, post_binary(path, content))
    assert_unchanged(client, sid, before)
    assert_no_new_session(client, head)


def post_json(path: str, content: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def go(client: httpx.Client) -> httpx.Response:
        return client.post(path, content=content, headers={"Content-Type": JSON})

    return go
