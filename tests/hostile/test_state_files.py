"""Hostile state files against a live server's `POST /v1/sessions/import` and
`PUT /v1/sessions/{id}/state` (issue 12, item 4; docs/state.md).

Each file is a real export of a live session with its safetensors header edited:
counters of 5000 digits, 2**64 or 1e30 (`step`, `version`, `skipped`), layout dims that
are huge or 70 long, JSON nested deep or holding numbers no float holds, an unknown
format, tensors missing, extra, misshapen or non-finite, and headers whose length runs
past the body. 7 of 49 such files once answered 500. Each is a 4xx problem+json (400
or 422), nothing imported (the listing's head is the same), and the session the PUT
targets unchanged; /healthz answers within 1 s meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from tests.hostile.support import (
    BINARY,
    PARAMS,
    assert_no_new_session,
    assert_unchanged,
    create,
    decode_file,
    deep,
    listing_head,
    refused,
    snapshot,
    split_file,
    st_file,
)
from tests.support.live_server import LiveServer
from tests.support.safetensors_files import with_meta

DIGITS_5000 = "9" * 5000
HOLE = "@@hole@@"
SESSION = {
    "optimizer": {"name": "adam", "lr": 0.01},
    "schedule": {"name": "exponential", "gamma": 0.5},
    "ema": {"decay": 0.9},
    "params": PARAMS,
    "dtype": "float64",
}
GRADS = [
    {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [0.5]},
    {"w": [[-0.1, 0.2], [0.3, -0.4]], "b": [-0.5]},
    {"w": [[0.2, 0.2], [-0.3, 0.1]], "b": [0.25]},
]
_EXPORTS: dict[str, bytes] = {}


def stepped_session(client: httpx.Client) -> str:
    sid = create(client, SESSION)
    for g in GRADS:
        r = client.post(f"/v1/sessions/{sid}/step", json={"grads": g, "loss": 1.0})
        assert r.status_code == 200, r.text
    return sid


def good_export(live: LiveServer, client: httpx.Client) -> bytes:
    """A real export of a session with state of every sort (Adam's moments and step, an
    EMA, a schedule), made once per server."""
    if live.base_url not in _EXPORTS:
        sid = stepped_session(client)
        r = client.get(f"/v1/sessions/{sid}/state")
        assert r.status_code == 200, r.text
        _EXPORTS[live.base_url] = r.content
    return _EXPORTS[live.base_url]


# --- edits -----------------------------------------------------------------------------------


def spec_with(data: bytes, change: Callable[[dict[str, Any]], Any], raw: str) -> bytes:
    """The file whose `spec` metadata is changed by `change` (which puts HOLE where the
    JSON text `raw` goes)."""
    header, _ = split_file(data)
    spec = json.loads(header["__metadata__"]["spec"])
    changed = change(spec)
    text = json.dumps(spec if changed is None else changed)
    assert text.count(json.dumps(HOLE)) == 1
    return with_meta(data, spec=text.replace(json.dumps(HOLE), raw))


def layout_dims(raw: str) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        def change(spec: dict[str, Any]) -> None:
            spec["layout"][0][1] = HOLE

        return spec_with(data, change, raw)

    return edit


def spec_field(path: tuple[Any, ...], raw: str) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        def change(spec: dict[str, Any]) -> None:
            node = spec
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = HOLE

        return spec_with(data, change, raw)

    return edit


def meta(**values: str | None) -> Callable[[bytes], bytes]:
    return lambda data: with_meta(data, **values)


def tensors_edit(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        tensors, metadata = decode_file(data)
        change(tensors)
        return encode_mixed(tensors, metadata)

    return edit


def encode_mixed(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A file of tensors of their own dtypes (F64, I64, BOOL)."""
    codes = {np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("bool"): "BOOL"}
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": codes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return st_file(header, b"".join(chunks))


def set_value(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = value

    return change


def header_length(delta: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        header, body = split_file(data)
        raw = json.dumps(header).encode()
        return st_file(raw, body, length=len(raw) + delta)

    return edit


def nested_schedule(depth: int) -> str:
    """JSON text of `depth` sequential schedules one inside the other."""
    text = json.dumps({"name": "cosine", "T_max": 10})
    for _ in range(depth):
        text = (
            '{"name": "sequential", "milestones": [2], "schedulers": ['
            + text
            + ', {"name": "constant"}]}'
        )
    return text


EDITS: dict[str, Callable[[bytes], bytes]] = {
    # counters
    "step 5000 digits": meta(step=DIGITS_5000),
    "step 2**64": meta(step=str(2**64)),
    "step 1e30": meta(step="1e30"),
    "step -1": meta(step="-1"),
    "step empty": meta(step=""),
    "step missing": meta(step=None),
    "version 5000 digits": meta(version=DIGITS_5000),
    "version 2**64": meta(version=str(2**64)),
    "skipped 1e30": meta(skipped="1e30"),
    "skipped 2**64": meta(skipped=str(2**64)),
    "skipped NaN": meta(skipped="NaN"),
    # the layout
    "layout dims 2**40": layout_dims(f"[{2**40}]"),
    "layout dims 10**30": layout_dims(f"[2, {10**30}]"),
    "layout dims 1e30": layout_dims("[0, 1e30]"),
    "layout dims 2**64": layout_dims(f"[0, {2**64}]"),
    "layout 70 dims": layout_dims(json.dumps([1] * 70)),
    "layout dims 5000 digits": layout_dims(f"[{DIGITS_5000}]"),
    "layout dims negative": layout_dims("[-2, -2]"),
    "layout dims deep": layout_dims(deep(1000)),
    "layout dims booleans": layout_dims("[true, true]"),
    "layout dims zero": layout_dims("[0, 2]"),
    "layout not a list": spec_field(("layout",), '{"w": [2, 2]}'),
    "layout too many tensors": spec_field(
        ("layout",), json.dumps([[f"t{i}", [1]] for i in range(10_001)])
    ),
    # the rest of the spec
    "spec deep": meta(spec=deep(10_000)),
    "spec not JSON": meta(spec="{"),
    "spec lr 1e400": spec_field(("optimizer", "lr"), "1e400"),
    "spec lr 5000 digits": spec_field(("optimizer", "lr"), DIGITS_5000),
    "spec gamma 1e300": spec_field(("schedule", "gamma"), "1e300"),
    "spec schedule nested 30 deep": spec_field(("schedule",), nested_schedule(30)),
    "spec history 2**64": spec_field(("history",), str(2**64)),
    "spec ema decay 1e400": spec_field(("ema", "decay"), "1e400"),
    "format unknown": meta(format="optserve.session/999"),
    "schedule_state deep": meta(schedule_state=deep(10_000)),
    "extra deep": meta(extra=deep(10_000)),
    "extra 5000 digits": meta(extra='{"x": ' + DIGITS_5000 + "}"),
    # tensors
    "a param NaN": tensors_edit(set_value("params/w", float("nan"))),
    "a param inf": tensors_edit(set_value("params/b", float("inf"))),
    "a state array NaN": tensors_edit(set_value("state/exp_avg/w", float("nan"))),
    "a param missing": tensors_edit(lambda t: t.pop("params/b")),
    "an extra tensor": tensors_edit(lambda t: t.update({"junk": np.zeros(3)})),
    "a param misshapen": tensors_edit(lambda t: t.update({"params/w": np.zeros((4,))})),
    "scalar step 2**62": tensors_edit(
        lambda t: t.update({"scalar/step": np.array(2**62, np.int64)})
    ),
    # the header
    "header length past the body": header_length(10_000),
    "header length short": header_length(-1),
    "not safetensors": lambda data: data[8:],
    "empty": lambda data: b"",
}


def put(sid: str, content: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def go(client: httpx.Client) -> httpx.Response:
        return client.put(
            f"/v1/sessions/{sid}/state", content=content, headers={"Content-Type": BINARY}
        )

    return go


def import_(content: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def go(client: httpx.Client) -> httpx.Response:
        return client.post("/v1/sessions/import", content=content, headers={"Content-Type": BINARY})

    return go


@pytest.mark.parametrize("case", list(EDITS))
def test_hostile_state_files_are_refused_by_import_and_put(
    live: LiveServer, client: httpx.Client, case: str
) -> None:
    data = EDITS[case](good_export(live, client))
    sid = stepped_session(client)
    before = snapshot(client, sid)
    head = listing_head(client)
    problem = refused(live, import_(data))
    assert problem["status"] in (400, 413, 422), problem
    assert_no_new_session(client, head)
    problem = refused(live, put(sid, data))
    assert problem["status"] in (400, 413, 422), problem
    assert_unchanged(client, sid, before)


def test_the_unedited_export_is_taken(live: LiveServer, client: httpx.Client) -> None:
    """The hostile files are refused for their edits: the real export imports, and goes
    through the test's own decode and encode unchanged in meaning."""
    data = good_export(live, client)
    for content in (data, tensors_edit(lambda t: None)(data)):
        r = client.post("/v1/sessions/import", content=content, headers={"Content-Type": BINARY})
        assert r.status_code == 201, r.text
