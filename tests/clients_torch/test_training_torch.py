"""`RemoteOptimizer`'s training extensions and `clients.torch.lr_find`, against scripted
transports and a fake range-test server (tests/clients/support.py): `base_version` and
`wait` sent, a pending sync push waited for, stale gradients pulled, averaged params as
tensors, and a range test that leaves the model as it was."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from clients import OptimizerClient, StaleGradientError, tensorfile
from clients.torch import RemoteOptimizer, lr_find
from tests.clients.support import PROBLEM, FakeRangeTestServer, FakeSleep, Script, session_doc

SHAPES = {"weight": [1, 2], "bias": [1]}


def model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def created(**overrides: Any) -> httpx.Response:
    params = {n: {"shape": s} for n, s in SHAPES.items()}
    doc = session_doc(dtype="float32", params=params, version=3, step=3, **overrides)
    return httpx.Response(201, json=doc)


def tensors(value: float) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, dtype=np.float32) for n, s in SHAPES.items()}


def binary(meta: dict[str, str], value: float) -> httpx.Response:
    return httpx.Response(
        200,
        content=tensorfile.encode(tensors(value), meta),
        headers={"Content-Type": "application/octet-stream"},
    )


def applied(version: int, value: float, lr: float = 0.1) -> httpx.Response:
    meta = {"step": str(version), "version": str(version), "lr": repr(lr), "return": "params"}
    return binary(meta, value)


def params_at(version: int, value: float) -> httpx.Response:
    return binary({"step": str(version), "version": str(version)}, value)


def problem(status: int, slug: str, **members: Any) -> httpx.Response:
    body = {"type": f"urn:optserve:problem:{slug}", "title": slug, "status": status}
    body |= {"detail": slug, "errors": [], **members}
    return httpx.Response(status, json=body, headers={"Content-Type": PROBLEM})


def client_of(script: Script) -> OptimizerClient:
    return OptimizerClient("http://optserve.test", transport=script.sync(), sleep=FakeSleep().sync)


def backward(m: nn.Linear) -> None:
    m.zero_grad()
    m(torch.ones(4, 2)).sum().backward()


def assert_model_is(m: nn.Linear, value: float) -> None:
    for p in m.parameters():
        assert torch.equal(p.detach(), torch.full_like(p, value))


def test_steps_send_base_version_and_no_wait_in_async_sessions() -> None:
    script = Script([created(), applied(4, 0.5), applied(5, 0.25, lr=0.05)])
    m = model()
    with client_of(script) as client:
        opt = RemoteOptimizer(m.named_parameters(), {"name": "sgd", "lr": 0.1}, client=client)
        assert opt.version == 3
        for _ in range(2):
            backward(m)
            opt.step()
    sent = [tensorfile.decode(r.content)[1] for r in script.requests[1:]]
    assert [meta["base_version"] for meta in sent] == ["3", "4"]
    assert all("wait" not in meta for meta in sent)
    assert (opt.version, opt.server_step, opt.param_groups[0]["lr"]) == (5, 5, 0.05)
    assert_model_is(m, 0.25)
    create = json.loads(tensorfile.decode(script.requests[0].content)[1]["optimizer"])
    assert create == {"name": "sgd", "lr": 0.1}


def test_a_pending_sync_push_ends_with_the_applied_params() -> None:
    consistency = {"mode": "sync", "accumulate": 2, "reduce": "mean"}
    pending = httpx.Response(
        202, json={"status": "pending", "version": 3, "wait_for": 4, "pending": 1, "accumulate": 2}
    )
    script = Script(
        [
            created(consistency=consistency),
            pending,
            problem(408, "wait-timeout", version=3),
            params_at(4, 0.75),
        ]
    )
    m = model()
    with client_of(script) as client:
        opt = RemoteOptimizer(
            m.named_parameters(),
            {"name": "sgd", "lr": 0.1},
            client=client,
            consistency="sync",
            ema={"decay": 0.9},
            wait=5.0,
        )
        backward(m)
        opt.step(loss=1.0)
    create_meta = tensorfile.decode(script.requests[0].content)[1]
    assert json.loads(create_meta["consistency"]) == {"mode": "sync"}
    assert json.loads(create_meta["ema"]) == {"decay": 0.9}
    step_meta = tensorfile.decode(script.requests[1].content)[1]
    assert (step_meta["base_version"], step_meta["wait"]) == ("3", "5.0")
    assert [r.url.params.get("min_version") for r in script.requests[2:]] == ["4", "4"]
    assert_model_is(m, 0.75)
    assert (opt.version, opt.server_step) == (4, 4)
    assert opt.param_groups[0]["lr"] == 0.1  # the poll told no rate: kept


def test_a_stale_gradient_pulls_the_current_params() -> None:
    stale = problem(409, "stale-gradient", version=7, base_version=3)
    script = Script([created(), stale, params_at(7, 2.0), applied(8, 1.5)])
    m = model()
    with client_of(script) as client:
        opt = RemoteOptimizer(m.named_parameters(), {"name": "sgd", "lr": 0.1}, client=client)
        backward(m)
        assert opt.step(lambda: 3.0) == 3.0  # no exception: the closure's value
        assert (opt.stale_refusals, opt.version, opt.server_step) == (1, 7, 7)
        assert_model_is(m, 2.0)
        backward(m)
        opt.step()
    assert tensorfile.decode(script.requests[3].content)[1]["base_version"] == "7"
    assert (opt.stale_refusals, opt.version) == (1, 8)
    assert_model_is(m, 1.5)
    assert len(script.requests) == 4  # the stale step was not retried


def test_raise_on_stale() -> None:
    stale = problem(409, "stale-gradient", version=7, base_version=3)
    script = Script([created(), stale, params_at(7, 2.0)])
    m = model()
    with client_of(script) as client:
        opt = RemoteOptimizer(
            m.named_parameters(), {"name": "sgd", "lr": 0.1}, client=client, raise_on_stale=True
        )
        backward(m)
        with pytest.raises(StaleGradientError) as info:
            opt.step()
    assert info.value.current_version == 7
    assert (opt.stale_refusals, opt.version) == (1, 7)  # pulled all the same
    assert_model_is(m, 2.0)


def test_averaged_state() -> None:
    meta = {"step": "3", "version": "3", "average": "ema", "averaged_steps": "3"}
    script = Script([created(ema={"decay": 0.9, "bias_correction": True}), binary(meta, 0.125)])
    m = model().double()
    with client_of(script) as client:
        opt = RemoteOptimizer(
            m.named_parameters(), {"name": "sgd", "lr": 0.1}, client=client, dtype="float32"
        )
        state = opt.averaged_state("ema")
    assert script.requests[1].url.params["average"] == "ema"
    assert set(state) == {"weight", "bias"}
    for name, p in m.named_parameters():
        assert state[name].shape == p.shape
        assert state[name].dtype == torch.float64  # the parameter's
        assert torch.equal(state[name], torch.full_like(p, 0.125))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.load_state_dict(state, strict=False)
    assert not torch.equal(before["weight"], m.weight.detach())


# --- lr_find -------------------------------------------------------------------------------


def regression_data(batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        x = torch.randn(16, 2, generator=g)
        out.append((x, x @ torch.tensor([[2.0], [-1.0]]) + 0.5))
    return out


def test_lr_find_restores_the_model() -> None:
    server = FakeRangeTestServer()
    m = model()
    m.eval()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    data = regression_data(3)  # fewer batches than steps: cycled
    seen: list[int] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(id(y))
        assert m.training  # the test runs in train mode
        return nn.functional.mse_loss(out, y)

    with OptimizerClient("http://optserve.test", transport=server.transport()) as client:
        result = lr_find(m, loss_fn, data, client=client, num_steps=30, end_lr=1.0)
    assert (result.done, result.stop_reason, len(result.lrs)) == (True, "completed", 30)
    assert result.losses[-1] < result.losses[0]  # it trained (at growing rates)
    assert len(seen) == 30
    assert seen[:6] == [id(y) for _, y in data] * 2
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert not m.training
    assert all(p.grad is None for p in m.parameters())
    assert server.sessions == {}
    assert server.requests.count(("POST", "/v1/sessions")) == 1


def test_lr_find_diverges_and_restores() -> None:
    server = FakeRangeTestServer()
    m = model()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    with OptimizerClient("http://optserve.test", transport=server.transport()) as client:
        result = lr_find(
            m, nn.functional.mse_loss, regression_data(2), client=client, start_lr=1e-3,
            end_lr=100.0, num_steps=50,
        )  # fmt: skip
    assert result.stop_reason == "diverged"
    assert len(result.lrs) < 50
    assert math.isfinite(result.losses[-1])
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_lr_find_data_errors() -> None:
    server = FakeRangeTestServer()
    m = model()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    with OptimizerClient("http://optserve.test", transport=server.transport()) as client:
        with pytest.raises(ValueError, match="cannot be cycled"):
            lr_find(m, nn.functional.mse_loss, iter(regression_data(2)), client=client)
        with pytest.raises(ValueError, match="gave no batch"):
            lr_find(m, nn.functional.mse_loss, [], client=client)
        with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
            lr_find(m, nn.functional.mse_loss, [torch.zeros(2)], client=client)
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert server.sessions == {}
