"""Fuzzing the live server's binary step with safetensors headers and byte layouts
(issue 12, item 4: "fuzz the parser so the class is closed, not the examples").

Hypothesis builds a file from a well-formed step of the session (`w` [2, 2] and `b` [1],
F32) and mutates any part of it: tensor names, dtypes, shapes (huge, negative, floats,
booleans, strings, nested, up to 70 dims), offsets (any integers, wrong counts), extra
members, `__metadata__` (any keys, non-string values, numbers as strings), the JSON text
(whitespace, raw numbers such as 1e400 or 5000 digits, cut short, invalid UTF-8), the
8-byte header length (off by a little, or anything) and the data (cut, extended,
random bytes, NaN). Every answer is a 200 or a 4xx problem+json, never a 5xx, /healthz
answers within 1 s while the request runs, and after a 4xx the session is unchanged.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.hostile.support import (
    BINARY,
    JSON,
    assert_not_5xx,
    assert_unchanged,
    create,
    snapshot,
    while_probing_health,
)
from tests.support.live_server import LiveServer

GOOD_DATA = np.asarray([0.1, -0.2, 0.3, 0.4, -0.5], np.float32).tobytes()
DTYPES = ["F32", "F64", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL", "BF16", "F128", "O", ""]
META_KEYS = ["loss", "return", "skip_missing", "base_version", "wait", "x", "__metadata__"]
_SESSIONS: dict[str, str] = {}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=-(2**64), max_value=2**70),
    st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, 10**30]),
    json_values,
)
shapes = st.one_of(
    st.just([2, 2]),
    st.just([1]),
    st.lists(dims, max_size=6),
    st.lists(st.just(1), min_size=60, max_size=70),
    json_values,
)
offsets = st.one_of(
    st.lists(st.integers(min_value=0, max_value=24), min_size=2, max_size=2),
    st.lists(st.integers(min_value=-(2**64), max_value=2**65), min_size=0, max_size=3),
    json_values,
)
metadata_strings = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0.5", "nan", "inf", "-inf", "1e400", "9" * 5000, "true", "updates", "none"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
)


@st.composite
def entries(draw: st.DrawFn, good: dict[str, Any]) -> Any:
    """A tensor entry: the good one, or one with some members replaced or added."""
    entry = dict(good)
    if draw(st.integers(0, 3)) != 0:  # most entries are left as they are
        return entry
    if draw(st.booleans()):
        entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), json_values))
    if draw(st.booleans()):
        entry["shape"] = draw(shapes)
    if draw(st.booleans()):
        entry["data_offsets"] = draw(offsets)
    if draw(st.integers(0, 5)) == 0:
        entry[draw(st.text(max_size=6))] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        del entry[draw(st.sampled_from(sorted(entry)))]
    if draw(st.integers(0, 7)) == 0:
        return draw(json_values)
    return entry


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    header: dict[str, Any] = {}
    if draw(st.integers(0, 2)) == 0:
        metadata: Any = draw(
            st.dictionaries(
                st.one_of(st.sampled_from(META_KEYS), st.text(max_size=6)),
                st.one_of(metadata_strings, json_values)
                if draw(st.booleans())
                else metadata_strings,
                max_size=4,
            )
        )
        if draw(st.integers(0, 7)) == 0:
            metadata = draw(json_values)
        header["__metadata__"] = metadata
    header["w"] = draw(entries({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}))
    header["b"] = draw(entries({"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}))
    if draw(st.integers(0, 7)) == 0:
        del header[draw(st.sampled_from(["w", "b"]))]
    for _ in range(max(draw(st.integers(0, 5)) - 3, 0)):
        name = draw(
            st.one_of(st.sampled_from(["w", "b", "c", "", "__metadata__"]), st.text(max_size=6))
        )
        header[name] = draw(entries({"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}))
    return header


@st.composite
def header_texts(draw: st.DrawFn) -> bytes:
    header = draw(headers())
    text = json.dumps(header, indent=draw(st.sampled_from([None, None, 0, 2])))
    mutation = draw(st.integers(0, 11))
    if mutation == 0 and text:  # a raw JSON number or token where a value was
        at = draw(st.integers(0, len(text)))
        token = draw(
            st.sampled_from(
                ["1e400", "NaN", "Infinity", "9" * 5000, "[" * 2000, "true", "-0", '"\\ud800"']
            )
        )
        text = text[:at] + token + text[at:]
    elif mutation == 1:  # cut short
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    raw = text.encode()
    if mutation == 2:  # invalid UTF-8 somewhere
        at = draw(st.integers(0, len(raw)))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]))
            + raw[at:]
        )
    elif mutation == 3:  # padding, as some writers align the data
        raw += b" " * draw(st.integers(0, 16))
    return raw


@st.composite
def files(draw: st.DrawFn) -> bytes:
    raw = draw(header_texts())
    length = draw(
        st.one_of(
            st.just(len(raw)),
            st.just(len(raw)),
            st.just(len(raw)),
            st.just(len(raw)),
            st.integers(min_value=-8, max_value=8).map(lambda d: max(len(raw) + d, 0)),
            st.integers(min_value=0, max_value=2**64 - 1),
        )
    )
    data_kind = draw(st.integers(0, 8))
    if data_kind <= 4:
        data = GOOD_DATA
    elif data_kind == 5:
        data = GOOD_DATA[: draw(st.integers(0, len(GOOD_DATA)))]
    elif data_kind == 6:
        data = GOOD_DATA + draw(st.binary(max_size=32))
    elif data_kind == 7:
        data = draw(st.binary(max_size=64))
    else:
        values = draw(
            st.lists(
                st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=5, max_size=5
            )
        )
        data = np.asarray(values, np.float32).tobytes()
    return struct.pack("<Q", length) + raw + data


def session_of(live: LiveServer, client: httpx.Client) -> str:
    """The one session the fuzzing steps (per server): SGD, lr 0.01, float32."""
    if live.base_url not in _SESSIONS:
        _SESSIONS[live.base_url] = create(
            client,
            {
                "optimizer": {"name": "sgd", "lr": 0.01},
                "params": {"w": [[0.5, -1.0], [1.5, 2.0]], "b": [0.25]},
            },
        )
    return _SESSIONS[live.base_url]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(content=files())
def test_fuzzed_binary_steps_are_answered_or_refused(
    live: LiveServer, client: httpx.Client, content: bytes
) -> None:
    sid = session_of(live, client)
    before = snapshot(client, sid)

    def go(c: httpx.Client) -> httpx.Response:
        return c.post(f"/v1/sessions/{sid}/step", content=content, headers={"Content-Type": BINARY})

    r = while_probing_health(live, go)
    event(f"status {r.status_code}")  # shown by --hypothesis-show-statistics
    assert_not_5xx(r)
    if r.status_code >= 400:
        assert_unchanged(client, sid, before)
    else:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == JSON, r.headers
        assert r.json()["version"] == before.version + 1
