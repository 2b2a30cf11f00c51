"""`clients.torch_state`: a session's state file to and from a torch optimizer's
`state_dict`, both ways, for every optimizer torch has, against a live `optserve serve`
(the shared in-process `memory_server` of tests/support/live_fixtures.py).

Both ways run the same small least-squares model (a 3x4 weight, a bias, a 0-d scale)
in float64, whose gradients torch's autograd computes from the current params on either
side:

* **server to torch**: `N` steps on the server, export, `to_torch_state_dict`,
  `load_state_dict` into a fresh torch optimizer, then `M` more steps locally and on the
  server: params (and the optimizer state, exported and converted again) agree;
* **torch to server**: `N` steps in torch, `from_torch_state_dict`, `import_state`,
  then `M` more steps locally and over HTTP: the same.

Tolerance: `max|server - torch| / max|torch|` per tensor <= 1e-12 (float64; the
optimizers' own parity tests, tests/core/test_torch_parity.py, allow 1e-10 over 200
steps; these runs are 8 steps), and 1e-5 in float32 as there. As there, torch's default
dtype is the session's (torch keeps `step` and NAdam's `mu_product` in it). Also: the conversion
itself loses nothing (server -> torch -> server is the same file bit for bit), and what
cannot be converted is refused with a ValueError saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from clients import OptimizerClient, ValidationError
from clients.state_file import StateFile
from clients.torch_state import TORCH_OPTIMIZERS, from_torch_state_dict, to_torch_state_dict
from tests.support.live_server import LiveServer

N, M = 3, 5
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ("weight", "bias", "scale")

#: (session optimizer name, options as torch and the session both name them)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.02, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.01}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "betas": (0.8, 0.95)}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "eps": 1e-6}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("adagrad", {"lr": 0.05, "weight_decay": 0.01, "eps": 1e-6}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    ("adadelta", {}),
    ("adadelta", {"lr": 0.5, "rho": 0.95, "weight_decay": 0.01}),
    ("adamax", {}),
    ("adamax", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.01}),
    ("nadam", {}),
    (
        "nadam",
        {"lr": 0.01, "momentum_decay": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.01},
    ),
    ("radam", {"lr": 0.01}),
    ("radam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]

_gen = torch.Generator().manual_seed(0)
X = torch.randn(8, 4, generator=_gen, dtype=torch.float64)
Y = torch.randn(8, 3, generator=_gen, dtype=torch.float64)
START = {
    "weight": torch.randn(3, 4, generator=_gen, dtype=torch.float64),
    "bias": torch.randn(3, generator=_gen, dtype=torch.float64),
    "scale": torch.tensor(1.5, dtype=torch.float64),
}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def float64_default() -> Iterator[None]:
    """torch's default dtype is the session's, as in the parity tests: torch keeps
    `step` and NAdam's `mu_product` in it (the server, in the session's dtype)."""
    with default_dtype(torch.float64):
        yield


@pytest.fixture(scope="module")
def client(memory_server: LiveServer) -> Iterator[OptimizerClient]:
    with OptimizerClient(memory_server.base_url) as c:
        yield c


def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
    x, y = X.to(params["weight"].dtype), Y.to(params["weight"].dtype)
    return (((x @ params["weight"].T + params["bias"]) * params["scale"] - y) ** 2).mean()


def leaves(values: dict[str, Any], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {
        n: torch.tensor(np.asarray(v), dtype=dtype).requires_grad_(True) for n, v in values.items()
    }


def grads_at(params: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, np.ndarray]:
    """The gradient of the loss at `params` (what the server is sent)."""
    ts = leaves(params, dtype)
    loss_of(ts).backward()
    return {n: t.grad.numpy() for n, t in ts.items() if t.grad is not None}


def torch_steps(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor], count: int) -> None:
    for _ in range(count):
        opt.zero_grad()
        loss_of(params).backward()
        opt.step()


def server_steps(
    client: OptimizerClient, sid: str, params: dict[str, np.ndarray], count: int, dtype: torch.dtype
) -> dict[str, np.ndarray]:
    for _ in range(count):
        params = client.step(sid, grads_at(params, dtype)).params or {}
    return params


def close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    scale = max(float(np.max(np.abs(want))), 1e-300)
    error = float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:g}"


def session_spec(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}


def compare_state(
    client: OptimizerClient, sid: str, opt: torch.optim.Optimizer, tol: float
) -> None:
    """The session's optimizer state, converted, is torch's (every entry of every param)."""
    _, converted = to_torch_state_dict(client.export_state(sid), list(NAMES))
    local = opt.state_dict()
    assert converted["state"].keys() == local["state"].keys()
    for i, entry in local["state"].items():
        assert converted["state"][i].keys() == entry.keys(), i
        for key, value in entry.items():
            close(converted["state"][i][key].numpy(), value.numpy(), tol, f"{NAMES[i]} {key}")
    group = {k: v for k, v in local["param_groups"][0].items()}
    assert converted["param_groups"][0] == group


# --- server to torch ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_server_to_torch(client: OptimizerClient, name: str, options: dict[str, Any]) -> None:
    start = {n: t.numpy() for n, t in START.items()}
    sid = client.create_session(start, session_spec(name, options), dtype="float64").id
    on_server = server_steps(client, sid, start, N, torch.float64)
    data = client.export_state(sid)
    params, state_dict = to_torch_state_dict(data, list(NAMES))
    assert list(params) == list(NAMES)
    for n in NAMES:
        assert params[n].numpy().tobytes() == on_server[n].tobytes()
    local = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    opt = TORCH_OPTIMIZERS[name](list(local.values()))  # its own defaults, replaced below
    opt.load_state_dict(state_dict)
    for key, value in options.items():
        assert opt.param_groups[0][key] == value, key
    torch_steps(opt, local, M)
    on_server = server_steps(client, sid, on_server, M, torch.float64)
    for n in NAMES:
        close(on_server[n], local[n].detach().numpy(), TOL[torch.float64], n)
    compare_state(client, sid, opt, TOL[torch.float64])
    client.delete_session(sid)


# --- torch to server --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_torch_to_server(client: OptimizerClient, name: str, options: dict[str, Any]) -> None:
    local = {n: t.clone().requires_grad_(True) for n, t in START.items()}
    opt = TORCH_OPTIMIZERS[name](list(local.values()), **options)
    torch_steps(opt, local, N)
    data = from_torch_state_dict(opt, local.items(), step=N if name == "sgd" else None)
    session = client.import_state(data)
    assert (session.step, session.version) == (N, N)
    for key, value in options.items():
        want = list(value) if isinstance(value, tuple) else value
        assert session.optimizer[key] == want, key
    on_server = {n: p.detach().numpy().copy() for n, p in local.items()}
    assert {n: a.tobytes() for n, a in client.get_params(session.id).params.items()} == {
        n: a.tobytes() for n, a in on_server.items()
    }
    torch_steps(opt, local, M)
    on_server = server_steps(client, session.id, on_server, M, torch.float64)
    for n in NAMES:
        close(on_server[n], local[n].detach().numpy(), TOL[torch.float64], n)
    compare_state(client, session.id, opt, TOL[torch.float64])
    client.delete_session(session.id)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_the_conversion_loses_nothing(
    client: OptimizerClient, name: str, options: dict[str, Any]
) -> None:
    """server -> torch -> server: the same state file bit for bit (but id and times)."""
    start = {n: t.numpy() for n, t in START.items()}
    sid = client.create_session(start, session_spec(name, options), dtype="float64").id
    server_steps(client, sid, start, N, torch.float64)
    data = client.export_state(sid)
    params, state_dict = to_torch_state_dict(data)
    local = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    opt = TORCH_OPTIMIZERS[name](list(local.values()))
    opt.load_state_dict(state_dict)
    back = from_torch_state_dict(opt, local, step=N if name == "sgd" else None)
    copy = client.import_state(back).id
    first, again = StateFile.from_bytes(data), StateFile.from_bytes(client.export_state(copy))
    assert again.to_bytes() == client.export_state(copy)
    informational = {"id", "created_at", "updated_at"}
    assert {k: v for k, v in first.metadata.items() if k not in informational} == {
        k: v for k, v in again.metadata.items() if k not in informational
    }
    assert list(first.params) == list(again.params)
    for n in first.params:
        assert first.params[n].tobytes() == again.params[n].tobytes()
    assert first.arrays.keys() == again.arrays.keys()
    for key, arrays in first.arrays.items():
        for n, array in arrays.items():
            assert array.tobytes() == again.arrays[key][n].tobytes(), (key, n)
    assert first.scalars == again.scalars
    for sid_ in (sid, copy):
        client.delete_session(sid_)


# --- float32, a fresh optimizer, a schedule --------------------------------------------------


def test_float32_both_ways(client: OptimizerClient) -> None:
    with default_dtype(torch.float32):
        float32_both_ways(client)


def float32_both_ways(client: OptimizerClient) -> None:
    start = {n: t.numpy().astype(np.float32) for n, t in START.items()}
    sid = client.create_session(start, {"name": "nadam", "lr": 0.01}, dtype="float32").id
    on_server = server_steps(client, sid, start, N, torch.float32)
    params, state_dict = to_torch_state_dict(client.export_state(sid), list(NAMES))
    assert all(p.dtype == torch.float32 for p in params.values())
    assert state_dict["state"][0]["step"].dtype == torch.float32  # torch's scalar dtype
    local = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    opt = torch.optim.NAdam(list(local.values()))
    opt.load_state_dict(state_dict)
    torch_steps(opt, local, M)
    on_server = server_steps(client, sid, on_server, M, torch.float32)
    for n in NAMES:
        close(on_server[n], local[n].detach().numpy(), TOL[torch.float32], n)
    copy = client.import_state(from_torch_state_dict(opt, local.items()))
    assert copy.dtype == "float32"
    assert (copy.step, copy.version) == (N + M, N + M)


def test_a_fresh_torch_optimizer(client: OptimizerClient) -> None:
    """No step yet: torch keeps no state (Adagrad excepted); the session starts at 0."""
    for name in ("adam", "adagrad", "sgd"):
        local = {n: t.clone().requires_grad_(True) for n, t in START.items()}
        opt = TORCH_OPTIMIZERS[name](list(local.values()), lr=0.01)
        session = client.import_state(from_torch_state_dict(opt, local.items()))
        assert (session.step, session.version) == (0, 0)
        fresh = client.create_session(
            {n: t.numpy() for n, t in START.items()}, {"name": name, "lr": 0.01}, dtype="float64"
        )
        a = server_steps(
            client, session.id, {n: t.numpy() for n, t in START.items()}, 2, torch.float64
        )
        b = server_steps(
            client, fresh.id, {n: t.numpy() for n, t in START.items()}, 2, torch.float64
        )
        assert {n: v.tobytes() for n, v in a.items()} == {n: v.tobytes() for n, v in b.items()}


def test_a_schedule_places_the_rate(client: OptimizerClient) -> None:
    """With a schedule, the param group's `lr` is the rate of the session's next step."""
    start = {n: t.numpy() for n, t in START.items()}
    schedule = {"name": "step", "step_size": 2, "gamma": 0.5}
    sid = client.create_session(start, {"name": "adam", "lr": 0.1}, schedule, dtype="float64").id
    server_steps(client, sid, start, N, torch.float64)
    _, state_dict = to_torch_state_dict(client.export_state(sid))
    assert state_dict["param_groups"][0]["lr"] == pytest.approx(client.get_session(sid).lr)
    assert state_dict["param_groups"][0]["lr"] == pytest.approx(0.05)
    # and back: the session's schedule goes with the file when given
    local = {n: t.clone().requires_grad_(True) for n, t in START.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.1)
    torch_steps(opt, local, N)
    session = client.import_state(from_torch_state_dict(opt, local.items(), schedule=schedule))
    assert session.lr == pytest.approx(0.05)


# --- refusals ----------------------------------------------------------------------------------


def _opt(
    cls: Callable[..., torch.optim.Optimizer], **kw: Any
) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    local = {n: t.clone().requires_grad_(True) for n, t in START.items()}
    return cls(list(local.values()), **kw), local


def test_what_cannot_be_converted() -> None:
    opt, local = _opt(torch.optim.ASGD)
    with pytest.raises(ValueError, match="not ASGD"):
        from_torch_state_dict(opt, local.items())
    two = torch.optim.Adam(
        [{"params": [local["weight"]]}, {"params": [local["bias"], local["scale"]], "lr": 0.1}]
    )
    with pytest.raises(ValueError, match="2 param groups"):
        from_torch_state_dict(two, local.items())
    opt, local = _opt(torch.optim.Adam)
    torch_steps(opt, local, 1)
    with pytest.raises(ValueError, match="not one of the optimizer's"):
        from_torch_state_dict(opt, {"other": torch.zeros(2, requires_grad=True)})
    with pytest.raises(ValueError, match="has state but is not in named_params"):
        from_torch_state_dict(opt, {"weight": local["weight"]})
    with pytest.raises(ValueError, match="the optimizer's state says 1"):
        from_torch_state_dict(opt, local.items(), step=4)
    # a parameter that never had a gradient, beside others that did
    opt, local = _opt(torch.optim.Adam)
    opt.zero_grad()
    loss_of(local).backward()
    local["scale"].grad = None
    opt.step()
    with pytest.raises(ValueError, match="'scale' has no optimizer state"):
        from_torch_state_dict(opt, local.items())
    opt, local = _opt(torch.optim.SGD, lr=0.1, momentum=0.9)
    torch_steps(opt, local, 2)
    with pytest.raises(ValueError, match="give step="):
        from_torch_state_dict(opt, local.items())


def test_a_session_torch_cannot_hold(client: OptimizerClient) -> None:
    start = {n: t.numpy() for n, t in START.items()}
    sid = client.create_session(start, {"name": "lion", "lr": 0.01}, dtype="float64").id
    data = client.export_state(sid)
    with pytest.raises(ValueError, match=r"torch\.optim has no 'lion'"):
        to_torch_state_dict(data)
    sid = client.create_session(start, {"name": "adam"}, dtype="float64").id
    data = client.export_state(sid)
    with pytest.raises(ValueError, match="must name each tensor"):
        to_torch_state_dict(data, ["weight", "bias"])
    with pytest.raises(ValueError, match="must name each tensor"):
        to_torch_state_dict(data, ["weight", "bias", "bias"])


def test_the_server_validates_a_converted_file(client: OptimizerClient) -> None:
    """A hand-edited conversion is refused by the server, naming what is wrong."""
    opt, local = _opt(torch.optim.Adam, lr=0.01)
    torch_steps(opt, local, 2)
    file = StateFile.from_bytes(from_torch_state_dict(opt, local.items()))
    del file.arrays["exp_avg_sq"]
    with pytest.raises(ValidationError) as info:
        client.import_state(file.to_bytes())
    assert info.value.errors[0].loc == ("body", "state/exp_avg_sq/weight")
