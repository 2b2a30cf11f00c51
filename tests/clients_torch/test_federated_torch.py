"""`clients.torch.torch_train` and `numpy_params`: a torch model as the local training of
a `FederatedWorker`, against the fake federation of tests/clients/support.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clients import FederatedWorker, LocalResult, OptimizerClient
from clients.federated import TrainFn
from clients.torch import numpy_params, torch_train
from tests.clients.support import FakeFederation

X = torch.linspace(-1, 1, 16).reshape(8, 2)
Y = X @ torch.tensor([[2.0], [-1.0]]) + 0.5


def model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


class Fit:
    """Two SGD steps of least squares on (X, Y); records the weights before and after."""

    def __init__(self, with_metrics: bool = True) -> None:
        self.with_metrics = with_metrics
        self.before: list[dict[str, np.ndarray]] = []
        self.after: list[dict[str, np.ndarray]] = []
        self.rounds: list[int] = []

    def __call__(self, m: nn.Module, round: int) -> int | tuple[int, dict[str, float]]:
        self.rounds.append(round)
        self.before.append(numpy_params(m))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = ((m(X) - Y) ** 2).mean()
            loss.backward()
            opt.step()
        self.after.append(numpy_params(m))
        return (len(X), {"loss": float(loss.detach())}) if self.with_metrics else len(X)


def worker_for(server: FakeFederation, train: TrainFn) -> FederatedWorker:
    client = OptimizerClient(
        "http://optserve.test", transport=server.transport(), sleep=server.sleep
    )
    worker = FederatedWorker(client, server.SID, "torch-1", train)
    worker._now = server.clock
    return worker


def test_numpy_params() -> None:
    m = model()
    params = numpy_params(m)
    assert list(params) == ["weight", "bias"]
    assert params["weight"].dtype == np.float32
    assert params["weight"].shape == (1, 2)
    params["bias"][0] = 42.0  # a copy: the model is unchanged
    assert float(m.bias.detach()[0]) != 42.0


def test_a_torch_model_trains_in_rounds() -> None:
    m = model()
    start = {n: a + 0.25 for n, a in numpy_params(m).items()}  # the session's, not the model's
    server = FakeFederation(start, expected_clients=1)  # each update closes its round
    fit = Fit()
    reports = worker_for(server, torch_train(m, fit)).run(2)
    assert fit.rounds == [0, 1]
    # round 0 trained from the session's params (copied into the model), ...
    for name, value in start.items():
        np.testing.assert_array_equal(fit.before[0][name], value)
    # ... and sent the delta of its training, which fedavg (lr 1) adds: round 1 starts
    # where round 0 ended
    for r, sent in enumerate(server.taken):
        assert sent.num_examples == 8
        for name in start:
            expected = fit.after[r][name] - fit.before[r][name]
            np.testing.assert_allclose(np.asarray(sent.tensors[name]), expected, atol=1e-7)
    for name in start:
        np.testing.assert_allclose(fit.before[1][name], fit.after[0][name], atol=1e-6)
        np.testing.assert_allclose(server.params[name], fit.after[1][name], atol=1e-6)
    assert reports[1].metrics is not None
    assert reports[0].metrics is not None
    assert reports[1].metrics["loss"] < reports[0].metrics["loss"]


def test_torch_train_returns_copies_and_takes_a_bare_count() -> None:
    m = model()
    train = torch_train(m, Fit(with_metrics=False))
    params = {n: a.astype(np.float64) for n, a in numpy_params(m).items()}  # a JSON client's
    result = train(params, 0)
    assert isinstance(result, LocalResult)
    assert (result.num_examples, result.metrics) == (8, None)
    kept = {n: np.array(a) for n, a in result.weights.items()}
    with torch.no_grad():
        m.weight.add_(1.0)  # the model moves on: the result does not
    for name, value in result.weights.items():
        np.testing.assert_array_equal(value, kept[name])
        assert np.asarray(value).dtype == np.float32  # the model's dtype


def test_session_tensors_the_model_has_not() -> None:
    m = model()
    train = torch_train(m, Fit())
    with pytest.raises(ValueError, match=r"tensors the model has not: \['extra'\]"):
        train({**numpy_params(m), "extra": np.zeros(2)}, 0)
