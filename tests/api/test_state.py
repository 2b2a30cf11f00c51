"""A session's state file (docs/state.md), in process over both stores: export, import
as a new session, replace; the round trip is bit for bit (averages, a pending sync
accumulation, a range test, a federated round, skipped steps included) and the copy
continues exactly as the original; every refusal names what is at fault and changes
nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from service.app import create_app
from service.store.base import StateStore
from service.store.memory import MemoryStore
from tests.api.support import BINARY, Api, decode, encode, make_settings, open_api

pytestmark = pytest.mark.asyncio

W = {"w": [[0.5, -1.0], [1.5, 2.0]], "b": [0.25, -0.75, 0.0]}
INFO = ("id", "created_at", "updated_at")
Tensors = dict[str, np.ndarray]


def grads(step: int, scale: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "w": (scale * rng.standard_normal((2, 2))).tolist(),
        "b": (scale * rng.standard_normal(3)).tolist(),
    }


async def create(api: Api, optimizer: dict[str, Any], **extra: Any) -> str:
    body = {"optimizer": optimizer, "params": W, "dtype": "float64", **extra}
    return str((await api.create(body))["id"])


async def steps(api: Api, sid: str, count: int, start: int = 0, **extra: Any) -> None:
    for t in range(start, start + count):
        r = await api.step(sid, {"grads": grads(t), "loss": 1.0 / (t + 1), **extra})
        assert r.status_code in (200, 202), r.text


async def export(api: Api, sid: str) -> bytes:
    r = await api.client.get(f"/v1/sessions/{sid}/state", headers=api.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == BINARY
    return r.content


async def import_(api: Api, data: bytes, **headers: str) -> Any:
    return await api.client.post(
        "/v1/sessions/import",
        content=data,
        headers={"Content-Type": BINARY, **api.headers, **headers},
    )


async def put(api: Api, sid: str, data: bytes, **headers: str) -> Any:
    return await api.client.put(
        f"/v1/sessions/{sid}/state",
        content=data,
        headers={"Content-Type": BINARY, **api.headers, **headers},
    )


def same_file(a: bytes, b: bytes, ignore: tuple[str, ...] = INFO) -> None:
    """Two state files hold the same tensors bit for bit (names, order, dtypes, shapes,
    bytes) and the same metadata but for `ignore`."""
    ta, ma = decode(a)
    tb, mb = decode(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert ta[name].shape == tb[name].shape, name
        assert ta[name].tobytes() == tb[name].tobytes(), name
    assert {k: v for k, v in ma.items() if k not in ignore} == {
        k: v for k, v in mb.items() if k not in ignore
    }
    assert set(ma) == set(mb)


async def same_params(api: Api, a: str, b: str) -> None:
    pa, pb = await api.params(a), await api.params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].tobytes() == pb[name].tobytes(), name


# --- sessions of every kind, and how each continues ------------------------------------------


async def _adam_averages(api: Api) -> str:
    sid = await create(
        api,
        {"name": "adam", "lr": 0.01, "amsgrad": True},
        schedule={"name": "plateau", "patience": 1},
        ema={"decay": 0.9},
        swa={"start": 2},
    )
    await steps(api, sid, 4)
    return sid


async def _sgd_lazy_buffer(api: Api) -> str:
    sid = await api.create(
        {
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
            "schedule": {"name": "one_cycle", "max_lr": 0.1, "total_steps": 20},
            "params": W,
            "dtype": "float32",
            "transforms": {"clip_norm": 1.0},
        }
    )
    await steps(api, str(sid["id"]), 3)
    return str(sid["id"])


async def _nadam_float32(api: Api) -> str:
    body = {"optimizer": {"name": "nadam"}, "params": W, "dtype": "float32"}
    sid = str((await api.create(body))["id"])
    await steps(api, sid, 3)
    return sid


async def _swats_skipped(api: Api) -> str:
    sid = await create(api, {"name": "swats", "lr": 0.01}, nonfinite="skip")
    await steps(api, sid, 2)
    bad = grads(9)
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode({"w": np.full((2, 2), np.nan), "b": np.asarray(bad["b"])}),
        headers={"Content-Type": BINARY},
    )
    assert r.json()["skipped"] is True
    return sid


async def _sync_pending(api: Api) -> str:
    sid = await create(
        api, {"name": "rmsprop", "lr": 0.01}, consistency={"mode": "sync", "accumulate": 3}
    )
    for t in range(4):  # one step of 3, then 1 of 3 pending
        version = (await api.get(sid))["version"]
        r = await api.step(sid, {"grads": grads(t), "loss": 0.5, "base_version": version})
        assert r.status_code in (200, 202), r.text
    pending = (await api.get(sid))["pending"]
    assert pending.pop("deadline") == pytest.approx(pending.pop("started_at") + 60)
    assert pending == {"base_version": 1, "count": 1, "accumulate": 3}
    return sid


async def _range_test(api: Api) -> str:
    sid = await create(api, {"name": "adam"}, lr_finder={"num_steps": 20})
    await steps(api, sid, 5)
    return sid


async def _federated(api: Api) -> str:
    body = {
        "optimizer": {"name": "fedadam", "lr": 0.1},
        "params": W,
        "dtype": "float64",
        "federated": {"min_clients": 2, "expected_clients": 2, "round_timeout": 600},
    }
    sid = str((await api.create(body))["id"])
    for rnd, clients in ((0, ("a", "b")), (1, ("a",))):
        for c in clients:
            r = await api.client.post(
                f"/v1/sessions/{sid}/rounds/{rnd}/updates",
                json={"client_id": c, "delta": grads(rnd + ord(c), 0.1), "num_examples": 2},
            )
            assert r.status_code == 200, r.text
    return sid


async def _next_step(api: Api, sid: str) -> None:
    await steps(api, sid, 1, start=7)


async def _next_sync_push(api: Api, sid: str) -> None:
    version = (await api.get(sid))["version"]
    for t in (7, 8):
        r = await api.step(sid, {"grads": grads(t), "loss": 0.5, "base_version": version})
        assert r.status_code in (200, 202), r.text
    assert (await api.get(sid))["version"] == version + 1


async def _next_update(api: Api, sid: str) -> None:
    r = await api.client.post(
        f"/v1/sessions/{sid}/rounds/1/updates",
        json={"client_id": "b", "delta": grads(11, 0.1), "num_examples": 3},
    )
    assert r.json()["closed"] is True, r.text


KINDS: dict[str, tuple[Callable[[Api], Any], Callable[[Api, str], Any]]] = {
    "adam_plateau_ema_swa": (_adam_averages, _next_step),
    "sgd_lazy_buffer_one_cycle": (_sgd_lazy_buffer, _next_step),
    "nadam_float32": (_nadam_float32, _next_step),
    "swats_skipped_step": (_swats_skipped, _next_step),
    "sync_pending_accumulation": (_sync_pending, _next_sync_push),
    "range_test": (_range_test, _next_step),
    "federated_open_round": (_federated, _next_update),
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_export_import_export_is_bit_for_bit(api: Api, kind: str) -> None:
    make, advance = KINDS[kind]
    sid = await make(api)
    first = await export(api, sid)
    r = await import_(api, first)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["id"] != sid
    assert r.headers["location"] == f"/v1/sessions/{doc['id']}"
    original = await api.get(sid)
    ignore = {"id", "created_at", "updated_at"}
    assert {k: v for k, v in doc.items() if k not in ignore} == {
        k: v for k, v in original.items() if k not in ignore
    }
    again = await export(api, doc["id"])
    same_file(first, again)
    assert decode(again)[1]["id"] == doc["id"]
    # the copy continues exactly as the original
    await advance(api, sid)
    await advance(api, doc["id"])
    await same_params(api, sid, doc["id"])
    # (a federated round opened by the next update records when it opened)
    clock = ("extra",) if kind == "federated_open_round" else ()
    same_file(await export(api, sid), await export(api, doc["id"]), ignore=(*INFO, *clock))


async def test_the_file_holds_what_docs_state_md_says(api: Api) -> None:
    sid = await _adam_averages(api)
    tensors, metadata = decode(await export(api, sid))
    assert list(tensors) == [
        "params/w",
        "params/b",
        *(
            f"state/{k}/{n}"
            for k in ("ema.avg", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "swa.avg")
            for n in ("w", "b")
        ),
        "scalar/ema.n",
        "scalar/step",
        "scalar/swa.n",
    ]
    assert tensors["params/w"].shape == (2, 2)
    assert tensors["state/exp_avg/b"].dtype == np.float64
    assert tensors["scalar/step"].dtype == np.int64
    assert int(tensors["scalar/step"]) == 4
    assert int(tensors["scalar/swa.n"]) == 3  # steps 2, 3, 4
    params = await api.params(sid)
    assert tensors["params/w"].tobytes() == params["w"].tobytes()
    assert metadata["format"] == "optserve.session/1"
    assert (metadata["step"], metadata["version"], metadata["skipped"]) == ("4", "4", "0")
    spec = json.loads(metadata["spec"])
    assert spec["layout"] == [["w", [2, 2]], ["b", [3]]]
    assert spec["optimizer"]["amsgrad"] is True
    assert spec["ema"] == {"decay": 0.9, "bias_correction": True}
    assert set(json.loads(metadata["schedule_state"])) == {
        *("lr", "best", "num_bad_epochs", "cooldown_counter", "last_epoch"),
    }
    assert json.loads(metadata["extra"]) == {}
    assert float(metadata["lr"]) == (await api.get(sid))["lr"]
    assert metadata["id"] == sid


async def test_a_short_spec_takes_the_defaults(api: Api) -> None:
    """A converter may write only optimizer, dtype and layout (as a create request)."""
    zeros = {n: np.zeros_like(np.asarray(v, dtype=np.float64)) for n, v in W.items()}
    params = {n: np.asarray(v, dtype=np.float64) for n, v in W.items()}
    spec = {
        "optimizer": {"name": "adam", "lr": 0.01},
        "dtype": "float64",
        "layout": [["w", [2, 2]], ["b", [3]]],
    }
    data = encode(
        {
            **{f"params/{n}": v for n, v in params.items()},
            **{f"state/{k}/{n}": v for k in ("exp_avg", "exp_avg_sq") for n, v in zeros.items()},
            "scalar/step": np.array(0, dtype=np.int64),
        },
        {
            "format": "optserve.session/1",
            "spec": json.dumps(spec),
            "step": "0",
            "version": "0",
            "skipped": "0",
        },
    )
    r = await import_(api, data)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["optimizer"]["betas"] == [0.9, 0.999]
    assert doc["history"] == 1000
    created = await create(api, {"name": "adam", "lr": 0.01})
    await steps(api, created, 3)
    await steps(api, doc["id"], 3)
    await same_params(api, created, doc["id"])


async def test_a_session_moves_between_deployments(api: Api) -> None:
    """Exported from one server (its own in-process store), imported into another (each
    store), it goes on there exactly as it would have at home."""
    async with open_api(MemoryStore()) as home:
        sid = await _adam_averages(home)
        moved = await import_(api, await export(home, sid))
        assert moved.status_code == 201, moved.text
        there = moved.json()["id"]
        await steps(home, sid, 3, start=10)
        await steps(api, there, 3, start=10)
        same_file(await export(home, sid), await export(api, there))


# --- replace ------------------------------------------------------------------------------------


async def test_put_replaces_the_state_and_bumps_the_version(api: Api) -> None:
    sid = await _adam_averages(api)
    at_4 = await export(api, sid)
    copy = (await import_(api, at_4)).json()["id"]
    await steps(api, sid, 3, start=4)
    assert (await api.get(sid))["version"] == 7
    r = await put(api, sid, at_4)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["id"], doc["step"], doc["version"]) == (sid, 4, 8)
    assert doc == await api.get(sid)
    after = await export(api, sid)
    same_file(at_4, after, ignore=(*INFO, "version"))
    assert decode(after)[1]["version"] == "8"
    # the history is the session's own: the steps it took are still listed
    history = (await api.client.get(f"/v1/sessions/{sid}/history")).json()["entries"]
    assert [e["version"] for e in history] == [7, 6, 5, 4, 3, 2, 1]
    # it continues as the file does
    await steps(api, sid, 2, start=20)
    await steps(api, copy, 2, start=20)
    await same_params(api, sid, copy)
    # the same file again: the same state, the next version
    r = await put(api, sid, at_4)
    assert r.json()["version"] == 11
    same_file(at_4, await export(api, sid), ignore=(*INFO, "version"))


async def test_put_carries_a_pending_accumulation_to_the_new_version(api: Api) -> None:
    sid = await _sync_pending(api)
    pending = await export(api, sid)
    copy = (await import_(api, pending)).json()["id"]
    await _next_sync_push(api, sid)  # completes the step: version 2
    r = await put(api, sid, pending)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3
    carried = r.json()["pending"]
    assert carried.pop("deadline") == pytest.approx(carried.pop("started_at") + 60)
    assert carried == {"base_version": 3, "count": 1, "accumulate": 3}
    # the push computed on version 3 completes the accumulation the file holds
    for target, version in ((sid, 3), (copy, 1)):
        for t in (7, 8):
            body = {"grads": grads(t), "loss": 0.5, "base_version": version}
            r = await api.step(target, body)
            assert r.status_code in (200, 202), r.text
    await same_params(api, sid, copy)


# --- refusals --------------------------------------------------------------------------------


def tamper(
    data: bytes,
    tensors: Callable[[Tensors], None] | None = None,
    metadata: Callable[[dict[str, str]], None] | None = None,
) -> bytes:
    t, m = decode(data)
    if tensors is not None:
        tensors(t)
    if metadata is not None:
        metadata(m)
    return encode(t, m)


def _spec(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, str]], None]:
    def edit(m: dict[str, str]) -> None:
        spec = json.loads(m["spec"])
        change(spec)
        m["spec"] = json.dumps(spec)

    return edit


def _set(key: str, value: Any) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[key] = np.asarray(value)

    return edit


def _drop(*keys: str) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        for key in keys:
            del t[key]

    return edit


def _add(**arrays: Any) -> Callable[[Tensors], None]:
    """Add each tensor of `arrays` (`name_with_slashes_as__` is spelled with `__`)."""

    def edit(t: Tensors) -> None:
        for key, value in arrays.items():
            t[key.replace("__", "/")] = np.asarray(value)

    return edit


def _meta(key: str, value: str | None) -> Callable[[dict[str, str]], None]:
    def edit(m: dict[str, str]) -> None:
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value

    return edit


#: (what, tensors edit, metadata edit, the loc of the refusal)
BAD_FILES: list[tuple[str, Any, Any, list[Any]]] = [
    ("wrong format", None, _meta("format", "optserve.state/1"), ["body", "__metadata__", "format"]),
    ("no format", None, _meta("format", None), ["body", "__metadata__", "format"]),
    ("spec not JSON", None, _meta("spec", "{"), ["body", "__metadata__", "spec"]),
    (
        "bad hyperparameter",
        None,
        _spec(lambda s: s["optimizer"].update(betas=[1.2, 0.999])),
        ["body", "__metadata__", "spec", "optimizer", "betas", 0],
    ),
    (
        "unknown spec field",
        None,
        _spec(lambda s: s.update(colour="blue")),
        ["body", "__metadata__", "spec", "colour"],
    ),
    (
        "bad layout",
        None,
        _spec(lambda s: s.update(layout=[["w", [-1]]])),
        ["body", "__metadata__", "spec", "layout", 0],
    ),
    ("step not a count", None, _meta("step", "4.0"), ["body", "__metadata__", "step"]),
    ("no version", None, _meta("version", None), ["body", "__metadata__", "version"]),
    (
        "extra unknown",
        None,
        _meta("extra", '{"pending": {}}'),
        ["body", "__metadata__", "extra", "pending"],
    ),
    (
        "schedule state wrong",
        None,
        _meta("schedule_state", '{"lr": 0.1}'),
        ["body", "__metadata__", "schedule_state"],
    ),
    ("wrong dtype", _set("params/w", np.zeros((2, 2), np.float32)), None, ["body", "params/w"]),
    ("wrong shape", _set("params/b", np.zeros(4)), None, ["body", "params/b"]),
    ("missing param", _drop("params/b"), None, ["body", "params/b"]),
    ("non-finite param", _set("params/w", [[0.0, np.inf], [0.0, 0.0]]), None, ["body", "params/w"]),
    (
        "non-finite state",
        _set("state/exp_avg/b", [0.0, np.nan, 0.0]),
        None,
        ["body", "state/exp_avg/b"],
    ),
    ("missing state tensor", _drop("state/exp_avg_sq/w"), None, ["body", "state/exp_avg_sq/w"]),
    (
        "missing state array",
        _drop("state/exp_avg/w", "state/exp_avg/b"),
        None,
        ["body", "state/exp_avg/w"],
    ),
    (
        "foreign state array",
        _add(state__momentum_buffer__w=np.zeros((2, 2)), state__momentum_buffer__b=np.zeros(3)),
        None,
        ["body", "state/momentum_buffer/w"],
    ),
    (
        "half an array",
        _set("state/momentum_buffer/w", np.zeros((2, 2))),
        None,
        ["body", "state/momentum_buffer/b"],
    ),
    ("unknown tensor", _set("optimizer/w", np.zeros((2, 2))), None, ["body", "optimizer/w"]),
    (
        "unknown layout tensor",
        _set("state/exp_avg/c", np.zeros(2)),
        None,
        ["body", "state/exp_avg/c"],
    ),
    ("step as a real", _set("scalar/step", np.array(4.0)), None, ["body", "scalar/step"]),
    ("negative step", _set("scalar/step", np.array(-1)), None, ["body", "scalar/step"]),
    ("missing scalar", _drop("scalar/step"), None, ["body", "scalar/step"]),
    (
        "foreign scalar",
        _set("scalar/mu_product", np.array(1.0)),
        None,
        ["body", "scalar/mu_product"],
    ),
    ("average without count", _set("scalar/ema.n", np.array(0)), None, ["body", "state/ema.avg/w"]),
    (
        "accumulation without pending",
        _add(**{"state__acc.sum__w": np.zeros((2, 2)), "state__acc.sum__b": np.zeros(3)}),
        None,
        ["body", "state/acc.sum/w"],
    ),
]


@pytest.mark.parametrize(
    ("what", "tensors", "metadata", "loc"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
async def test_a_bad_file_is_refused_naming_what(
    api: Api, what: str, tensors: Any, metadata: Any, loc: list[Any]
) -> None:
    sid = await _adam_averages(api)
    good = await export(api, sid)
    bad = tamper(good, tensors, metadata)
    for r in (await import_(api, bad), await put(api, sid, bad)):
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["type"] == "urn:optserve:problem:validation-error"
        assert r.headers["content-type"] == "application/problem+json"
        assert problem["errors"][0]["loc"] == loc, problem
    assert (await api.get(sid))["version"] == 4
    same_file(good, await export(api, sid))


async def test_malformed_bodies(api: Api) -> None:
    sid = await _adam_averages(api)
    for r in (await import_(api, b"not a file"), await put(api, sid, b"\x00" * 3)):
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "urn:optserve:problem:malformed-body"
    data = await export(api, sid)
    for content_type in ("application/json", "text/plain"):
        for r in (
            await import_(api, data, **{"Content-Type": content_type}),
            await put(api, sid, data, **{"Content-Type": content_type}),
        ):
            assert r.status_code == 415, r.text
            assert r.json()["errors"][0]["loc"] == ["header", "Content-Type"]
    assert (await api.get(sid))["version"] == 4


async def test_put_keeps_the_sessions_configuration(api: Api) -> None:
    sid = await create(api, {"name": "adam", "lr": 0.01})
    other_shape = await api.create(
        {
            "optimizer": {"name": "adam", "lr": 0.01},
            "params": {"w": [1.0, 2.0, 3.0], "b": W["b"]},
            "dtype": "float64",
        }
    )
    fewer = await api.create(
        {"optimizer": {"name": "adam", "lr": 0.01}, "params": {"w": W["w"]}, "dtype": "float64"}
    )
    more = await api.create(
        {"optimizer": {"name": "adam", "lr": 0.01}, "params": {**W, "c": 1.0}, "dtype": "float64"}
    )
    other_lr = await create(api, {"name": "adam", "lr": 0.02})
    float32 = await api.create({"optimizer": {"name": "adam", "lr": 0.01}, "params": W})
    reordered = await api.create(
        {
            "optimizer": {"name": "adam", "lr": 0.01},
            "params": {"b": W["b"], "w": W["w"]},
            "dtype": "float64",
        }
    )
    cases = [
        (other_shape["id"], ["body", "params/w"], "shape [3] in the file, [2, 2] in the session"),
        (fewer["id"], ["body", "params/b"], "the session has tensor 'b'"),
        (more["id"], ["body", "params/c"], "the session has no tensor 'c'"),
        (other_lr, ["body", "__metadata__", "spec", "optimizer"], "a PUT replaces the state"),
        (float32["id"], ["body", "__metadata__", "spec", "dtype"], "a PUT replaces the state"),
    ]
    for source, loc, msg in cases:
        r = await put(api, sid, await export(api, source))
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == loc
        assert msg in r.json()["errors"][0]["msg"]
    assert (await api.get(sid))["version"] == 0
    # the same tensors in another order: taken, laid out as the session's
    await steps(api, reordered["id"], 2)
    r = await put(api, sid, await export(api, reordered["id"]))
    assert r.status_code == 200, r.text
    await same_params(api, sid, reordered["id"])
    spec = json.loads(decode(await export(api, sid))[1]["spec"])
    assert spec["layout"] == [["w", [2, 2]], ["b", [3]]]


async def test_limits_of_a_creation_apply(api: Api) -> None:
    sid = await create(api, {"name": "sgd", "lr": 0.1}, history=10)
    data = await export(api, sid)
    async with open_api(MemoryStore(), make_settings(max_params=4, max_history=5)) as small:
        r = await import_(small, data)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "__metadata__", "spec", "layout"]
        r = await import_(
            small, tamper(data, metadata=_spec(lambda s: s.update(layout=[["w", [4]]])))
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "__metadata__", "spec", "history"]


@pytest_asyncio.fixture
async def tenants(store: StateStore) -> AsyncIterator[tuple[Api, Api]]:
    settings = make_settings(api_keys={"key-a": "alpha", "key-b": "beta"})
    async with open_api(store, settings, headers={"Authorization": "Bearer key-a"}) as a:
        b = Api(a.client, a.app, a.store, a.settings, {"Authorization": "Bearer key-b"})
        yield a, b


async def test_another_tenants_session_is_not_found(tenants: tuple[Api, Api]) -> None:
    alpha, beta = tenants
    sid = await create(alpha, {"name": "adam", "lr": 0.01})
    await steps(alpha, sid, 1)
    data = await export(alpha, sid)
    for r in (
        await beta.client.get(f"/v1/sessions/{sid}/state", headers=beta.headers),
        await put(beta, sid, data),
        await alpha.client.get("/v1/sessions/nope/state", headers=alpha.headers),
        await put(alpha, "nope", data),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["type"] == "urn:optserve:problem:session-not-found"
    r = await alpha.client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 401
    # a tenant imports into its own sessions
    r = await import_(beta, data)
    assert r.status_code == 201, r.text
    copy = r.json()["id"]
    assert (
        await alpha.client.get(f"/v1/sessions/{copy}", headers=alpha.headers)
    ).status_code == 404
    same_file(data, await export(beta, copy))
    assert (await alpha.get(sid))["version"] == 1


async def test_import_takes_only_post(api: Api) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = await api.client.request(method, "/v1/sessions/import")
        assert r.status_code == 405, (method, r.text)
        assert r.headers["allow"] == "POST"
        assert r.json()["type"] == "urn:optserve:problem:method-not-allowed"
    r = await api.client.post(f"/v1/sessions/{await create(api, {'name': 'sgd'})}/state")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, PUT"


# --- the OpenAPI examples are real answers -----------------------------------------------------


async def test_the_openapi_examples_are_real_answers(api: Api) -> None:
    doc = create_app(make_settings()).openapi()

    def example(path: str, method: str, status: str, name: str) -> dict[str, Any]:
        content = doc["paths"][path][method]["responses"][status]["content"]
        value: dict[str, Any] = content["application/json"]["examples"][name]["value"]
        return value

    create_body = doc["paths"]["/v1/sessions"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]["adam_cosine"]["value"]
    step_body = {"grads": {"w": [[0.01, 0.02], [0.03, 0.04]], "b": [0.1, -0.1]}, "loss": 0.73}
    sid = (await api.create(create_body))["id"]
    for _ in range(3):
        assert (await api.step(sid, step_body)).status_code == 200
    at_3 = await export(api, sid)
    imported = (await import_(api, at_3)).json()
    like(imported, example("/v1/sessions/import", "post", "201", "imported"))
    assert (await api.step(sid, step_body)).status_code == 200
    replaced = (await put(api, sid, at_3)).json()
    like(replaced, example("/v1/sessions/{session_id}/state", "put", "200", "replaced"))


def like(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same session document but for id and times (and `lr` to rounding)."""
    moments = {"id", "created_at", "updated_at", "lr"}
    assert {k: v for k, v in got.items() if k not in moments} == {
        k: v for k, v in want.items() if k not in moments
    }
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
