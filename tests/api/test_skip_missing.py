"""`"skip_missing": true`: a step may omit tensors, as torch skips a parameter whose
`.grad` is None. An omitted tensor keeps its params and every optimizer state segment
bit for bit; the tensors given are updated as the core updates them; the session's
step counter (and the optimizer's scalar `step`) still advances. Without the flag a
missing tensor is a 422, as before."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from service.core import FlatLayout, OptState, get_optimizer, parse_hyper
from tests.api.support import BINARY, Api, decode, encode

pytestmark = pytest.mark.asyncio

SHAPES: dict[str, tuple[int, ...]] = {"w": (4, 3), "b": (3,), "s": ()}
#: which tensors each step gives a gradient for ("b" first at step 2: SGD's lazy buffer)
PATTERN: list[tuple[str, ...]] = [("w", "s"), ("w", "b", "s"), ("w",), ("b",), ("w", "b", "s")]


def _problem(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    grads = [{n: rng.standard_normal(SHAPES[n]) for n in given} for given in PATTERN]
    return params, grads


def per_tensor_oracle(
    optimizer: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    dtype: str,
) -> list[dict[str, np.ndarray]]:
    """Each tensor as its own core session: updated by the core when it has a gradient,
    left alone (only the scalar `step` advancing, the session's counter) when not.
    Valid for elementwise optimizers (Adam, SGD), where a flat update is the same
    computation tensor by tensor."""
    hp = parse_hyper(optimizer)
    opt = get_optimizer(hp.name)
    flats = {n: np.asarray(v, dtype).reshape(-1) for n, v in params.items()}
    layouts = {n: FlatLayout.single(v.size) for n, v in flats.items()}
    states = {n: opt.init(hp, flats[n], layouts[n]) for n in flats}
    out: list[dict[str, np.ndarray]] = []
    for g in grads:
        for n in flats:
            if n in g:
                grad = np.asarray(g[n], dtype).reshape(-1)
                flats[n], states[n] = opt.update(hp, grad, states[n], flats[n], None, layouts[n])
            else:
                states[n].scalars["step"] = states[n].step + 1
        out.append({n: flats[n].reshape(np.shape(params[n])).copy() for n in flats})
    return out


async def _state(api: Api, sid: str) -> tuple[np.ndarray, OptState, int]:
    """The stored flat params, optimizer state and step of a session."""
    got = await api.store.read(sid)
    assert got is not None
    meta, blobs = got
    return np.frombuffer(blobs.params, dtype="<f4"), OptState.from_bytes(blobs.state), meta.step


async def _step(
    api: Api, sid: str, grads: Mapping[str, np.ndarray], dtype: str, binary: bool, **extra: Any
) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
    """One step; (status, counters or problem, params)."""
    if binary:
        meta = {
            k: ("true" if v is True else "false" if v is False else str(v))
            for k, v in extra.items()
        }
        r = await api.client.post(
            f"/v1/sessions/{sid}/step",
            content=encode({n: np.asarray(v, dtype) for n, v in grads.items()}, meta),
            headers={**api.headers, "Content-Type": BINARY, "Accept": BINARY},
        )
        if r.status_code != 200:
            return r.status_code, r.json(), {}
        tensors, metadata = decode(r.content)
        return 200, dict(metadata), tensors
    body = {"grads": {n: np.asarray(v, dtype).tolist() for n, v in grads.items()}, **extra}
    r = await api.step(sid, body)
    data = r.json()
    if r.status_code != 200:
        return r.status_code, data, {}
    params = {n: np.asarray(v, dtype) for n, v in data.pop("params").items()}
    return 200, data, params


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "adam", "lr": 0.01, "weight_decay": 0.1},
        {"name": "adamw", "lr": 0.01},
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ],
    ids=["adam", "adamw", "sgd-nesterov"],
)
async def test_omitted_tensors_keep_params_and_state(
    api: Api, optimizer: dict[str, Any], binary: bool
) -> None:
    dtype = "float32"
    params, grads = _problem()
    doc = await api.create(
        {"optimizer": optimizer, "params": {n: v.tolist() for n, v in params.items()}}
    )
    sid = doc["id"]
    layout = FlatLayout.from_shapes((n, s) for n, s in SHAPES.items())
    expected = per_tensor_oracle(optimizer, params, grads, dtype)
    before_params, before_state, _ = await _state(api, sid)
    for t, g in enumerate(grads):
        status, counters, got = await _step(api, sid, g, dtype, binary, skip_missing=True)
        assert status == 200, counters
        assert int(counters["step"]) == t + 1
        assert int(counters["version"]) == t + 1
        for n in SHAPES:  # the given tensors as the core computes them, the others as they were
            assert got[n].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got[n], expected[t][n], err_msg=f"step {t + 1}, {n}")
        after_params, after_state, step = await _state(api, sid)
        assert step == t + 1
        assert after_state.step == t + 1  # the optimizer's counter is the session's
        for n in SHAPES:
            if n in g:
                continue
            seg = slice(layout[n].offset, layout[n].stop)
            assert after_params[seg].tobytes() == before_params[seg].tobytes(), (t, n)
            for key, array in after_state.arrays.items():
                if key in before_state.arrays:  # bit for bit
                    assert array[seg].tobytes() == before_state.arrays[key][seg].tobytes(), key
                else:  # a lazy buffer made at this step: nothing from a gradient there
                    assert not np.any(array[seg]), key
        before_params, before_state = after_params, after_state


async def test_sgd_momentum_matches_torch_with_none_grads(api: Api) -> None:
    """SGD keeps no step count, so with skipped tensors it is exactly torch's SGD, the
    momentum buffer of a tensor first skipped made from its first gradient included."""
    optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    params, _ = _problem(seed=1)
    rng = np.random.default_rng(2)
    pattern = [("w",), ("w", "s"), ("b", "s"), ("w", "b", "s"), ("s",), ("w", "b")]
    grads = [{n: rng.standard_normal(SHAPES[n]) for n in given} for given in pattern]
    sid = (
        await api.create(
            {
                "optimizer": optimizer,
                "params": {n: v.tolist() for n, v in params.items()},
                "dtype": "float64",
            }
        )
    )["id"]
    tensors = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in params.items()
    }
    ref = torch.optim.SGD(
        list(tensors.values()), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    )
    for g in grads:
        for n, p in tensors.items():
            p.grad = None if n not in g else torch.tensor(g[n], dtype=torch.float64)
        ref.step()
        status, counters, got = await _step(api, sid, g, "float64", False, skip_missing=True)
        assert status == 200, counters
        for n, p in tensors.items():
            want = p.detach().numpy()
            np.testing.assert_allclose(got[n], want, rtol=1e-12, atol=1e-14, err_msg=n)


async def test_adam_bias_correction_uses_the_session_step(api: Api) -> None:
    """A tensor skipped at step 1 and given at step 2 gets Adam's update for t = 2: its
    moments start from zero, its bias corrections are those of the session's step."""
    lr, (beta1, beta2), eps = 0.01, (0.9, 0.999), 1e-8
    sid = (
        await api.create(
            {
                "optimizer": {"name": "adam", "lr": lr},
                "params": {"a": [1.0, -2.0], "b": [0.5, 3.0]},
                "dtype": "float64",
            }
        )
    )["id"]
    status, _, _ = await _step(
        api, sid, {"a": np.array([0.1, 0.2])}, "float64", False, skip_missing=True
    )
    assert status == 200
    g = np.array([0.3, -0.4])
    status, _, got = await _step(api, sid, {"a": g, "b": g}, "float64", False)
    assert status == 200
    m = (1 - beta1) * g
    v = (1 - beta2) * g * g
    step_size = lr / (1 - beta1**2)
    denom = np.sqrt(v) / np.sqrt(1 - beta2**2) + eps
    np.testing.assert_allclose(got["b"], np.array([0.5, 3.0]) - step_size * m / denom, rtol=1e-14)


async def test_all_tensors_omitted_advances_only_the_counters(api: Api) -> None:
    params = {"w": [[1.0, 2.0]], "b": [0.5]}
    sid = (await api.create({"optimizer": {"name": "adam", "lr": 0.1}, "params": params}))["id"]
    before_params, before_state, _ = await _state(api, sid)
    status, counters, got = await _step(api, sid, {}, "float32", False, skip_missing=True)
    assert status == 200, counters
    assert (counters["step"], counters["version"]) == (1, 1)
    after_params, after_state, _ = await _state(api, sid)
    assert after_params.tobytes() == before_params.tobytes()
    for key, array in after_state.arrays.items():
        assert array.tobytes() == before_state.arrays[key].tobytes()
    np.testing.assert_array_equal(got["w"], np.asarray(params["w"], np.float32))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("flag", [None, False], ids=["absent", "false"])
async def test_missing_tensor_is_422_without_the_flag(
    api: Api, binary: bool, flag: bool | None
) -> None:
    params, grads = _problem()
    sid = (
        await api.create(
            {"optimizer": {"name": "adam"}, "params": {n: v.tolist() for n, v in params.items()}}
        )
    )["id"]
    extra = {} if flag is None else {"skip_missing": flag}
    assert set(grads[2]) == {"w"}
    status, body, _ = await _step(api, sid, grads[2], "float32", binary, **extra)
    assert status == 422, body
    assert ["body", "grads", "b"] in [e["loc"] for e in body["errors"]], body
    assert await api.version(sid) == 0


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_unknown_tensor_is_still_422_with_the_flag(api: Api, binary: bool) -> None:
    sid = (await api.create({"optimizer": {"name": "adam"}, "params": {"w": [1.0, 2.0]}}))["id"]
    grads = {"w": np.array([0.1, 0.2]), "nope": np.array([1.0])}
    status, body, _ = await _step(api, sid, grads, "float32", binary, skip_missing=True)
    assert status == 422, body
    assert ["body", "grads", "nope"] in [e["loc"] for e in body["errors"]], body
    assert await api.version(sid) == 0


async def test_bad_flag_values_are_422(api: Api) -> None:
    sid = (await api.create({"optimizer": {"name": "adam"}, "params": {"w": [1.0, 2.0]}}))["id"]
    r = await api.step(sid, {"grads": {"w": [0.1, 0.2]}, "skip_missing": "true"})
    assert r.status_code == 422, r.text
    assert ["body", "skip_missing"] in [e["loc"] for e in r.json()["errors"]]
    r = await api.client.post(
        f"/v1/sessions/{sid}/step",
        content=encode({"w": np.array([0.1, 0.2], np.float32)}, {"skip_missing": "yes"}),
        headers={"Content-Type": BINARY},
    )
    assert r.status_code == 422, r.text
    assert ["body", "skip_missing"] in [e["loc"] for e in r.json()["errors"]]
    assert await api.version(sid) == 0
