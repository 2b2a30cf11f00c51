"""Hostile state files (docs/state.md): whatever a file holds, `POST /v1/sessions/import`
and `PUT /v1/sessions/{id}/state` answer 400 or 422 problem+json (never 5xx), a refused
PUT changes nothing, and `state_io.decode_session` raises nothing but `SessionError`s.

Real files are exported from sessions made in process, then mutated: counters far beyond
what JSON clients read exactly, layouts NumPy cannot shape or the limits do not allow,
JSON nested 100000 deep or holding 5000-digit integers, broken safetensors headers, and
hypothesis-generated edits of metadata values and tensor entries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.sessions.errors import SessionError
from service.sessions.spec import Limits, Spec
from service.sessions.state_io import SessionFile, decode_session
from service.store.memory import MemoryStore
from tests.api.support import BINARY, Api, decode, encode, make_settings, open_api
from tests.support.safetensors_files import split_file, st_file, with_meta

PROBLEM = "application/problem+json"
META = ["body", "__metadata__"]
W = {"w": [[0.5, -1.0], [1.5, 2.0]], "b": [0.25, -0.75, 0.0]}
DIGITS_5000 = "9" * 5000
#: a placeholder replaced, in JSON text, by raw JSON (json.dumps cannot write every value)
HOLE = "@@hole@@"
HOLE_JSON = json.dumps(HOLE)

# --- sessions and files ----------------------------------------------------------------------


def grads(t: int) -> dict[str, Any]:
    rng = np.random.default_rng(t)
    return {"w": rng.standard_normal((2, 2)).tolist(), "b": rng.standard_normal(3).tolist()}


async def make_session(api: Api, kind: str) -> str:
    """A session with state of every sort: `plateau` (Adam, a stateful schedule, an EMA:
    schedule state and integer scalars), `sync` (a pending accumulation in `extra`),
    `exponential` (a decaying exponential schedule)."""
    body: dict[str, Any] = {"params": W, "dtype": "float64"}
    if kind == "plateau":
        body.update(
            optimizer={"name": "adam", "lr": 0.01},
            schedule={"name": "plateau", "patience": 1},
            ema={"decay": 0.9},
        )
    elif kind == "sync":
        body.update(
            optimizer={"name": "rmsprop", "lr": 0.01},
            consistency={"mode": "sync", "accumulate": 3},
        )
    else:
        body.update(
            optimizer={"name": "sgd", "lr": 1e-3},
            schedule={"name": "exponential", "gamma": 0.5},
        )
    sid = str((await api.create(body))["id"])
    for t in range(4):
        step: dict[str, Any] = {"grads": grads(t), "loss": 1.0 / (t + 1)}
        if kind == "sync":
            step["base_version"] = (await api.get(sid))["version"]
        r = await api.step(sid, step)
        assert r.status_code in (200, 202), r.text
    return sid


async def export(api: Api, sid: str) -> bytes:
    r = await api.client.get(f"/v1/sessions/{sid}/state", headers=api.headers)
    assert r.status_code == 200, r.text
    return r.content


async def import_(api: Api, data: bytes) -> Any:
    headers = {"Content-Type": BINARY, **api.headers}
    return await api.client.post("/v1/sessions/import", content=data, headers=headers)


async def put(api: Api, sid: str, data: bytes) -> Any:
    headers = {"Content-Type": BINARY, **api.headers}
    return await api.client.put(f"/v1/sessions/{sid}/state", content=data, headers=headers)


def json_with(value: Any, raw: str) -> str:
    """`json.dumps(value)` with the one `HOLE` in it replaced by the JSON text `raw`."""
    text = json.dumps(value)
    assert text.count(HOLE_JSON) == 1, text
    return text.replace(HOLE_JSON, raw)


def edit_json(data: bytes, key: str, change: Callable[[Any], Any], raw: str) -> bytes:
    """The file with metadata `key` (JSON) changed by `change` (which puts `HOLE` where
    `raw` goes, or returns a new value holding it)."""
    header, _ = split_file(data)
    value = json.loads(header["__metadata__"][key])
    changed = change(value)
    return with_meta(data, **{key: json_with(value if changed is None else changed, raw)})


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


async def state_of(api: Api, sid: str) -> tuple[int, dict[str, bytes]]:
    params = await api.params(sid)
    return await api.version(sid), {k: v.tobytes() for k, v in params.items()}


def assert_problem(r: Any, statuses: tuple[int, ...] = (400, 422)) -> dict[str, Any]:
    assert r.status_code in statuses, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    problem: dict[str, Any] = r.json()
    assert problem["status"] == r.status_code
    return problem


async def refused_everywhere(
    api: Api, sid: str, data: bytes, status: int, loc: list[Any] | None = None
) -> list[dict[str, Any]]:
    """`data` refused by import and by PUT with `status` (the first error at `loc`, or
    some error under it); the session unchanged by the PUT."""
    before = await state_of(api, sid)
    problems = []
    for r in (await import_(api, data), await put(api, sid, data)):
        problem = assert_problem(r, (status,))
        if loc is not None:
            locs = [e["loc"] for e in problem["errors"]]
            assert any(got[: len(loc)] == loc for got in locs), (loc, problem)
        problems.append(problem)
    assert await state_of(api, sid) == before
    return problems


# --- counters --------------------------------------------------------------------------------

BAD_COUNTERS = {
    "5000 digits": DIGITS_5000,
    "2**64": str(2**64),
    "2**53": str(2**53),
    "17 digits": "0" * 17,
    "1e30": "1e30",
    "-1": "-1",
    "empty": "",
    "unicode digits": "١٢٣",
    "superscript": "²",
    "spaces": " 1",
    "float": "3.0",
}


@pytest.mark.parametrize("key", ["step", "version", "skipped"])
@pytest.mark.asyncio
async def test_counters_out_of_range_are_422(api: Api, key: str) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    for what, text in BAD_COUNTERS.items():
        problems = await refused_everywhere(
            api, sid, with_meta(good, **{key: text}), 422, [*META, key]
        )
        if what in ("5000 digits", "2**64", "2**53", "17 digits"):
            assert "2**53 - 1" in problems[0]["detail"], problems[0]
            assert "JavaScript" in problems[0]["detail"], problems[0]
        assert len(problems[0]["detail"]) < 400  # a 5000-digit value is not echoed whole


@pytest.mark.asyncio
async def test_counters_up_to_2_53_minus_1_are_taken(api: Api) -> None:
    sid = await make_session(api, "plateau")
    biggest = str(2**53 - 1)
    data = with_meta(await export(api, sid), version=biggest, skipped=biggest)
    r = await import_(api, data)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2**53 - 1
    r = await put(api, sid, data)
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] == 2**53 - 1


@pytest.mark.asyncio
async def test_a_schedule_that_overflows_at_the_files_step_is_422(api: Api) -> None:
    sid = await make_session(api, "exponential")
    good = await export(api, sid)
    r = await import_(api, with_meta(good, step="5000"))  # lr * 0.5 ** 5000: 0.0
    assert r.status_code == 201, r.text
    # lr * 2.0 ** 5000 overflows: the file's step (or the schedule itself) is refused
    growing = edit_json(good, "spec", lambda s: s["schedule"].update(gamma=HOLE), "2.0")
    await refused_everywhere(api, sid, with_meta(growing, step="5000"), 422, META)
    for step in ("50", str(2**53 - 1)):
        r = await import_(api, with_meta(growing, step=step))
        if r.status_code != 201:
            assert_problem(r, (422,))


@pytest.mark.asyncio
async def test_integer_scalars_beyond_2_53_are_422(api: Api) -> None:
    sid = await make_session(api, "plateau")
    tensors, meta = decode(await export(api, sid))
    for key in ("scalar/step", "scalar/ema.n"):
        for value in (2**53, 2**63 - 1):
            bad = encode({**tensors, key: np.array(value, dtype=np.int64)}, meta)
            await refused_everywhere(api, sid, bad, 422, ["body", key])


# --- the layout ------------------------------------------------------------------------------


def layout_with(data: bytes, entry: str, index: int = 0) -> bytes:
    """The file whose spec layout has the raw JSON `entry` at `index`."""

    def change(spec: dict[str, Any]) -> None:
        spec["layout"][index] = HOLE

    return edit_json(data, "spec", change, entry)


@pytest.mark.asyncio
async def test_layouts_numpy_cannot_shape_are_422(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    at = [*META, "spec", "layout"]
    cases = {
        "70 dims": ('["w", ' + json.dumps([1] * 70) + "]", "70 dimensions, more than the 64"),
        "65 dims": ('["w", ' + json.dumps([1] * 65) + "]", "65 dimensions"),
        "10**30": (f'["w", [0, {10**30}]]', "list of integers >= 0"),
        "1e30": ('["w", [0, 1e30]]', "list of integers >= 0"),
        "2**63": (f'["w", [0, {2**63}]]', "not below 2**63"),
        "2**64 - 1": (f'["w", [0, {2**64 - 1}]]', "not below 2**63"),
        "5000 digits": (f'["w", [0, {DIGITS_5000}]]', "must be JSON"),
        "zero size, too wide": (f'["w", [0, {2**62}, 4]]', "too large for NumPy"),
        "over max_params": (f'["w", [{2**40}]]', "over this server's limit"),
        "over max_params, 3 dims": (f'["w", [{2**20}, {2**20}, 1]]', "over this server's"),
        "negative": ('["w", [-1]]', "list of integers >= 0"),
        "shape deep": ('["w", ' + deep(1000) + "]", "nests deeper"),
    }
    for what, (entry, message) in cases.items():
        loc = [*META, "spec"] if what == "5000 digits" else [*at, 0]
        problems = await refused_everywhere(api, sid, layout_with(good, entry), 422, loc)
        assert message in json.dumps(problems[0]), (what, problems[0])


@pytest.mark.asyncio
async def test_a_layout_over_max_params_names_the_tensor(api: Api) -> None:
    sid = await make_session(api, "plateau")
    data = layout_with(await export(api, sid), f'["b", [{2**40}]]', 1)
    problems = await refused_everywhere(api, sid, data, 422)
    locs = [e["loc"] for e in problems[0]["errors"]]
    assert locs[0] == [*META, "spec", "layout"]  # as a creation over max_params says
    assert [*META, "spec", "layout", 1] in locs


@pytest.mark.asyncio
async def test_a_layout_over_max_tensors_is_422(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    limit = api.settings.max_tensors

    def change(spec: dict[str, Any]) -> Any:
        spec["layout"] = [[f"t{i}", [1]] for i in range(limit + 1)]
        spec["history"] = HOLE

    data = edit_json(good, "spec", change, "10")
    problems = await refused_everywhere(api, sid, data, 422, [*META, "spec", "layout", limit])
    assert f"over this server's limit of {limit}" in problems[0]["detail"]


@pytest.mark.asyncio
async def test_more_tensors_than_a_session_can_hold_is_400() -> None:
    async with open_api(MemoryStore(), make_settings(max_tensors=2)) as api:
        sid = await make_session(api, "plateau")
        tensors, meta = decode(await export(api, sid))
        allowed = 2 * 16 + 64
        extra = {f"junk/{i}": np.zeros(1) for i in range(allowed + 1 - len(tensors))}
        data = encode({**tensors, **extra}, meta)
        problems = await refused_everywhere(api, sid, data, 400, ["body"])
        assert f"over the limit of {allowed}" in problems[0]["detail"]
        # one fewer is read, and refused for what it holds
        fewer = encode({**tensors, **dict(list(extra.items())[1:])}, meta)
        await refused_everywhere(api, sid, fewer, 422, ["body"])


# --- JSON metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plateau", "sync"])
@pytest.mark.asyncio
async def test_deep_and_huge_json_metadata_is_422(api: Api, kind: str) -> None:
    sid = await make_session(api, kind)
    good = await export(api, sid)
    header, _ = split_file(good)
    meta = header["__metadata__"]
    keys = ["spec", "extra", "schedule_state"] if kind == "plateau" else ["spec", "extra"]
    for key in keys:
        at = [*META, key]
        for depth in (100_000, 2_000, 1_000, 33):
            await refused_everywhere(api, sid, with_meta(good, **{key: deep(depth)}), 422, at)
            nested = '{"pending": ' + deep(depth) + "}"
            await refused_everywhere(api, sid, with_meta(good, **{key: nested}), 422, at)
        for raw in (DIGITS_5000, "-" + DIGITS_5000, str(2**64 - 1), str(2**63), str(2**53)):
            value = json.loads(meta[key])
            target = value if isinstance(value, dict) else {}
            first = next(iter(target), "x")
            for edit in ({**target, first: HOLE}, {**target, "zz": [1, HOLE]}, HOLE):
                data = with_meta(good, **{key: json_with(edit, raw)})
                await refused_everywhere(api, sid, data, 422, at)


@pytest.mark.asyncio
async def test_schedule_state_with_huge_counters_is_422(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    at = [*META, "schedule_state"]
    for field in ("num_bad_epochs", "cooldown_counter", "last_epoch", "lr", "best"):
        for raw in (DIGITS_5000, str(2**64 - 1), str(2**53), deep(50)):

            def change(state: dict[str, Any], field: str = field) -> None:
                state[field] = HOLE

            data = edit_json(good, "schedule_state", change, raw)
            await refused_everywhere(api, sid, data, 422, at)


@pytest.mark.asyncio
async def test_extra_with_huge_counters_is_422(api: Api) -> None:
    sid = await make_session(api, "sync")
    good = await export(api, sid)
    at = [*META, "extra"]
    for field in ("base_version", "count"):
        for raw in (DIGITS_5000, str(2**64 - 1), str(2**63), str(2**53), "1e30"):

            def change(extra: dict[str, Any], field: str = field) -> None:
                extra["pending"][field] = HOLE

            data = edit_json(good, "extra", change, raw)
            await refused_everywhere(api, sid, data, 422, at)


@pytest.mark.asyncio
async def test_spec_with_huge_values_is_422(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    at = [*META, "spec"]
    for path in (("history",), ("schedule", "patience"), ("optimizer", "lr"), ("ema", "decay")):

        def change(spec: dict[str, Any], path: tuple[str, ...] = path) -> None:
            node = spec
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = HOLE

        for raw in (DIGITS_5000, str(2**64 - 1), str(2**63), str(2**53), "1e400", deep(40)):
            await refused_everywhere(api, sid, edit_json(good, "spec", change, raw), 422, at)
        # a large float may be a valid value (a rate of 1e30): taken or refused, never 5xx
        data = edit_json(good, "spec", change, "1e30")
        r = await import_(api, data)
        if r.status_code != 201:
            assert_problem(r, (422,))
    for format_ in (deep(1_000), deep(100_000), json.dumps("x" * 10_000)):
        data = edit_json(good, "spec", lambda s: s.update(format=HOLE), format_)
        await refused_everywhere(api, sid, data, 422, at)


@pytest.mark.asyncio
async def test_informational_metadata_is_ignored_whatever_it_holds(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    for value in (DIGITS_5000, "nan", "-inf", deep(100_000), "", "١٢٣"):
        data = with_meta(good, created_at=value, updated_at=value, id=value, lr=value)
        r = await import_(api, data)
        assert r.status_code == 201, r.text
        r = await put(api, sid, data)
        assert r.status_code == 200, r.text


# --- broken safetensors headers ------------------------------------------------------------


def header_edit(data: bytes, change: Callable[[dict[str, Any]], None], raw: str) -> bytes:
    header, body = split_file(data)
    change(header)
    return st_file(json_with(header, raw), body)


@pytest.mark.asyncio
async def test_broken_headers_are_400(api: Api) -> None:
    sid = await make_session(api, "plateau")
    good = await export(api, sid)
    header, body = split_file(good)
    name = next(k for k in header if k.startswith("params/"))

    def field(key: str) -> Callable[[dict[str, Any]], None]:
        def change(h: dict[str, Any]) -> None:
            h[name][key] = HOLE

        return change

    cases = {
        "shape [0, 1e30]": (field("shape"), "[0, 1e30]"),
        "shape [0, 10**30]": (field("shape"), f"[0, {10**30}]"),
        "70 dims": (field("shape"), json.dumps([1] * 70)),
        "5000-digit offset": (field("data_offsets"), f"[0, {DIGITS_5000}]"),
        "5000-digit dtype": (field("dtype"), DIGITS_5000),
        "deep dtype": (field("dtype"), deep(100_000)),
        "deep metadata": (lambda h: h.update(__metadata__=HOLE), deep(100_000)),
        "nested metadata": (lambda h: h.update(__metadata__=HOLE), '{"a": {"b": "c"}}'),
    }
    for what, (change, raw) in cases.items():
        problems = await refused_everywhere(api, sid, header_edit(good, change, raw), 400)
        assert problems[0]["type"] == "urn:optserve:problem:malformed-body", what
    # a tensor named twice (a JSON object with a duplicate key)
    text = json.dumps(header)
    duplicate = text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    problems = await refused_everywhere(api, sid, st_file(duplicate, body), 400)
    assert "twice" in problems[0]["detail"]
    # nesting 100000 deep as the whole header
    await refused_everywhere(api, sid, st_file(deep(100_000), body), 400)
    # lone surrogates (not Unicode text: no problem document could name them)
    for key, value in ((name + "\ud800", header[name]), ("__metadata__", {"format": "\udfff"})):
        problems = await refused_everywhere(api, sid, st_file({**header, key: value}, body), 400)
        assert "lone surrogate" in problems[0]["detail"]


# --- hypothesis: mutated files ---------------------------------------------------------------

#: names and strings, with lone surrogates now and then
texts = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(["params/", "a", "\ud800", "\udfff"]), max_size=3).map("".join),
)
#: JSON text (not values: json.dumps cannot write 5000-digit integers)
json_scalars = st.one_of(
    st.sampled_from(["null", "true", "false", "0", "-1", "1e30", "-1e30", "1e400", "0.5"]),
    st.integers(-(2**70), 2**70).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    texts.map(json.dumps),
)
json_texts = st.one_of(
    st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
            st.dictionaries(texts, inner, max_size=4).map(
                lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}"
            ),
        ),
        max_leaves=10,
    ),
    st.integers(1, 3000).map(deep),
    st.sampled_from([deep(100_000), '{"a":' * 5000 + "1" + "}" * 5000]),
)
counter_texts = st.one_of(
    st.integers(0, 2**70).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    texts,
    st.sampled_from(["", "-1", "1e30", "١٢٣", "0" * 17, str(2**53), str(2**53 - 1)]),
)
META_KEYS = ["format", "spec", "step", "version", "skipped", "schedule_state", "extra", "id"]


@st.composite
def mutations(draw: st.DrawFn) -> Callable[[bytes], bytes]:
    """An edit of a valid file: a metadata value, a field of its JSON metadata, a tensor
    entry of its header, or a tensor."""
    kind = draw(
        st.sampled_from(["meta", "counter", "json field", "layout", "entry", "tensor", "rename"])
    )
    if kind == "meta":
        key = draw(st.sampled_from([*META_KEYS, "created_at", "other"]))
        value = draw(st.one_of(json_texts, counter_texts))
        return lambda data: with_meta(data, **{key: value})
    if kind == "counter":
        key = draw(st.sampled_from(["step", "version", "skipped"]))
        value = draw(counter_texts)
        return lambda data: with_meta(data, **{key: value})
    if kind in ("json field", "layout"):
        key = (
            "spec"
            if kind == "layout"
            else draw(st.sampled_from(["spec", "extra", "schedule_state"]))
        )
        raw = draw(json_texts)
        pick = draw(st.integers(0, 50))
        sub = draw(st.integers(0, 3))

        def json_field(data: bytes) -> bytes:
            header, _ = split_file(data)
            value = json.loads(header["__metadata__"].get(key, "null"))
            if kind == "layout":
                entry = value["layout"][pick % len(value["layout"])]
                if sub < 2:  # the name or the shape
                    entry[sub] = HOLE
                elif sub == 2:  # the last dim
                    entry[1] = [*entry[1][:-1], HOLE]
                else:  # one dim more
                    entry[1] = [*entry[1], HOLE]
                return with_meta(data, **{key: json_with(value, raw)})
            if isinstance(value, dict) and value:
                field = sorted(value)[pick % len(value)] if sub else f"new{pick}"
                inner = value.get(field)
                if isinstance(inner, dict) and inner and sub == 3:
                    inner[sorted(inner)[pick % len(inner)]] = HOLE
                else:
                    value[field] = HOLE
                return with_meta(data, **{key: json_with(value, raw)})
            return with_meta(data, **{key: raw})

        return json_field
    if kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        raw = draw(json_texts)
        pick = draw(st.integers(0, 50))

        def entry_field(data: bytes) -> bytes:
            header, body = split_file(data)
            names = sorted(k for k in header if k != "__metadata__")
            header[names[pick % len(names)]][field] = HOLE
            return st_file(json_with(header, raw), body)

        return entry_field
    if kind == "tensor":
        dtype = draw(st.sampled_from(["f8", "f4", "i8", "i4", "u1", "?"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        fill = draw(st.sampled_from([0.0, 1.0, -1.0, np.inf, np.nan, 2**62]))
        pick = draw(st.integers(0, 50))
        new_name = draw(st.one_of(st.none(), texts))

        def tensor(data: bytes) -> bytes:
            tensors, meta = decode(data)
            names = sorted(tensors)
            name = new_name if new_name not in (None, "__metadata__") else names[pick % len(names)]
            with np.errstate(invalid="ignore", over="ignore"):
                array = np.full(shape, fill).astype(dtype)
            return encode({**tensors, str(name): array}, meta)

        return tensor
    drop = draw(st.booleans())
    pick = draw(st.integers(0, 50))
    new_name = draw(texts)

    def rename(data: bytes) -> bytes:
        tensors, meta = decode(data)
        names = sorted(tensors)
        old = names[pick % len(names)]
        array = tensors.pop(old)
        if not drop and new_name != "__metadata__":
            tensors[new_name] = array
        return encode(tensors, meta)

    return rename


@cache
def base_file(kind: str) -> tuple[bytes, Spec]:
    """A state file exported from a session made in process (once per process), and the
    spec a PUT of it checks it against."""

    async def build() -> bytes:
        async with open_api(MemoryStore()) as api:
            return await export(api, await make_session(api, kind))

    data = asyncio.run(build())
    return data, decode_session(data, Limits()).spec


def decode_or_api_error(data: bytes, limits: Limits, session: Spec | None) -> SessionFile | None:
    error: SessionError | None = None
    try:
        return decode_session(data, limits, session)
    except SessionError as exc:  # anything else fails the test
        error = exc
    assert error.status in (400, 422), error
    assert error.errors, error
    assert isinstance(error.detail, str)
    return None


@pytest.mark.parametrize("kind", ["plateau", "sync"])
def test_decode_session_raises_only_api_errors(kind: str) -> None:
    data, spec = base_file(kind)
    assert decode_or_api_error(data, Limits(), None) is not None
    small = Limits(max_params=5, max_history=10, max_tensors=1)

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(mutations(), min_size=1, max_size=3))
    def check(edits: list[Callable[[bytes], bytes]]) -> None:
        mutated = data
        for edit in edits:
            try:
                mutated = edit(mutated)
            except (
                ValueError,
                RecursionError,
                LookupError,
                TypeError,
                ArithmeticError,
                AttributeError,
            ):
                break  # an earlier edit left nothing this one can edit (the test's own JSON)
        for limits in (Limits(), small):
            decode_or_api_error(mutated, limits, None)
            decode_or_api_error(mutated, limits, spec)

    check()


@pytest_asyncio.fixture(params=["plateau", "sync"])
async def session(api: Api, request: pytest.FixtureRequest) -> tuple[str, bytes]:
    """A session of each kind and its exported file (shared by a test's examples)."""
    sid = await make_session(api, request.param)
    return sid, await export(api, sid)


@pytest.mark.asyncio
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(edit=mutations())
async def test_mutated_files_are_never_a_server_error(
    api: Api, session: tuple[str, bytes], edit: Callable[[bytes], bytes]
) -> None:
    sid, good = session
    data = edit(good)
    r = await import_(api, data)
    if r.status_code != 201:
        assert_problem(r)
    before = await state_of(api, sid)
    r = await put(api, sid, data)
    if r.status_code != 200:
        assert_problem(r)
        assert await state_of(api, sid) == before
