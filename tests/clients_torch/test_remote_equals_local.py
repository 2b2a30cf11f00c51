"""`RemoteOptimizer` trains a model as the local torch optimizer and scheduler do.

Against a live `optserve serve` (in-process store: the shared `memory_server` of
tests/support/live_fixtures.py, as in tests/e2e): a 64-32-10 MLP (float32) on
scikit-learn's bundled digits (`load_digits`: 1,797 8x8 images; stratified 75/25
split, random_state 0; standardized with the training set's statistics), minibatches
of 64 in a fixed order (seeded permutation per epoch, last partial batch dropped: 21
steps an epoch), 4 epochs.
Each case trains the same initial weights on the same batches twice:

(a) with `RemoteOptimizer` and a server-side schedule,
(b) with the local `torch.optim` optimizer and `torch.optim.lr_scheduler`,

for Adam + cosine with linear warmup (SequentialLR of LinearLR and CosineAnnealingLR),
SGD with Nesterov momentum + StepLR, and AdamW + OneCycleLR (which also cycles beta1).

Tolerance. The forward and backward passes are the same torch code on both sides; the
only difference is the optimizer's arithmetic (NumPy / numba on the server, torch's
kernels locally), which agrees to float32 rounding per step and drifts a little over
84 steps. For every tensor, ``max|remote - local| / max|local| <= REL_TOL`` (2e-6,
17 times float32's machine epsilon, relative to the tensor's largest element; the
worst seen is 2.9e-7, and each case prints its own).
The rate in `param_groups[0]["lr"]` after each remote step equals the rate torch's
scheduler gave that step, to 1e-12 relative. Both reach the same test accuracy
(printed; >= 0.9).

Also: a checkpoint (`state_dict()`, through `torch.save` / `torch.load`) resumed into
a fresh model and optimizer mid-training continues bit for bit as the uninterrupted
run; a frozen bias (`.grad` None) is left unchanged, as torch leaves it; and
examples/train_digits.py, run as a script against the server, reaches >= 0.9 accuracy.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients import NotFoundError, OptimizerClient
from clients.torch import RemoteOptimizer
from tests.support.live_server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 32
BATCH = 64
EPOCHS = 4
SEED = 0
#: max|remote - local| / max|local|, per tensor, after the whole run (worst seen: 3e-7)
REL_TOL = 2e-6
#: the rate of each step, remote vs torch's scheduler (relative)
LR_TOL = 1e-12


# --- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    #: the minibatches (index arrays into the training set), in training order
    batches: tuple[np.ndarray, ...]

    @property
    def steps(self) -> int:
        return len(self.batches)


@pytest.fixture
def server(memory_server: LiveServer) -> LiveServer:
    """The shared `optserve serve` with the in-process store (tests/support/live_fixtures.py,
    the e2e tests' `memory_server`)."""
    assert memory_server.proc.poll() is None, memory_server.log_tail()
    return memory_server


@pytest.fixture
def client(server: LiveServer) -> Iterator[OptimizerClient]:
    with OptimizerClient(server.base_url, api_key="") as c:
        yield c


@pytest.fixture(scope="module")
def data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank
    rng = np.random.default_rng(SEED)
    batches = []
    for _ in range(EPOCHS):
        order = rng.permutation(len(x_train))
        batches += [order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
    return Data(
        torch.tensor((x_train - mean) / std, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.long),
        torch.tensor((x_test - mean) / std, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.long),
        tuple(batches),
    )


def make_model(seed: int = SEED) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def accuracy(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        return float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())


# --- training loops ------------------------------------------------------------------------


def _loss(model: nn.Module, data: Data, idx: np.ndarray) -> torch.Tensor:
    i = torch.from_numpy(idx)
    return nn.functional.cross_entropy(model(data.x_train[i]), data.y_train[i])


def train_remote(
    model: nn.Module, opt: RemoteOptimizer, data: Data, start: int = 0, stop: int | None = None
) -> list[float]:
    """Steps `start .. stop-1` with `RemoteOptimizer`; the rate each step used."""
    lrs = []
    for idx in data.batches[start:stop]:
        opt.zero_grad()
        loss = _loss(model, data, idx)
        loss.backward()
        opt.step(loss=loss.item())
        lrs.append(opt.param_groups[0]["lr"])  # the rate the server used for this step
    return lrs


def train_local(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    data: Data,
) -> list[float]:
    """Every step with a torch optimizer and scheduler; the rate each step used."""
    lrs = []
    for idx in data.batches:
        opt.zero_grad()
        loss = _loss(model, data, idx)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step uses
        opt.step()
        sched.step()
    return lrs


# --- the cases -----------------------------------------------------------------------------

LocalFactory = Callable[
    [list[nn.Parameter], int],
    tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
]


@dataclass(frozen=True)
class Case:
    optimizer: dict[str, Any]
    schedule: Callable[[int], dict[str, Any]]  # total steps -> schedule spec
    local: LocalFactory


WARMUP, START_FACTOR = 8, 0.1


def _adam_cosine(params: list[nn.Parameter], total: int) -> Any:
    opt = torch.optim.Adam(params, lr=0.01)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(
                opt, start_factor=START_FACTOR, end_factor=1.0, total_iters=WARMUP
            ),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - WARMUP),
        ],
        milestones=[WARMUP],
    )
    return opt, sched


def _sgd_step(params: list[nn.Parameter], total: int) -> Any:
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.3)


def _adamw_one_cycle(params: list[nn.Parameter], total: int) -> Any:
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=total)


CASES = {
    "adam+cosine-warmup": Case(
        {"name": "adam", "lr": 0.01},
        lambda total: {
            "name": "cosine",
            "T_max": total - WARMUP,
            "warmup": {"steps": WARMUP, "start_factor": START_FACTOR},
        },
        _adam_cosine,
    ),
    "sgd-nesterov+step": Case(
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        lambda total: {"name": "step", "step_size": 30, "gamma": 0.3},
        _sgd_step,
    ),
    "adamw+one-cycle": Case(
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        lambda total: {"name": "one_cycle", "max_lr": 0.01, "total_steps": total},
        _adamw_one_cycle,
    ),
}


def rel_errors(remote: nn.Module, local: nn.Module) -> dict[str, float]:
    """max|remote - local| / max|local| for each tensor."""
    want = {n: p.detach() for n, p in local.named_parameters()}
    return {
        name: float((p.detach() - want[name]).abs().max() / want[name].abs().max())
        for name, p in remote.named_parameters()
    }


def run_both(
    case: Case, data: Data, client: OptimizerClient, freeze: str | None = None
) -> tuple[nn.Module, nn.Module, list[float], list[float]]:
    """The case trained remotely and locally from the same weights; `freeze` names a
    parameter given `requires_grad=False` in both (its `.grad` stays None)."""
    remote_model = make_model()
    local_model = copy.deepcopy(remote_model)
    if freeze is not None:
        for model in (remote_model, local_model):
            model.get_parameter(freeze).requires_grad_(False)
    opt = RemoteOptimizer(
        remote_model.named_parameters(),
        case.optimizer,
        case.schedule(data.steps),
        client=client,
    )
    remote_lrs = train_remote(remote_model, opt, data)
    opt.delete_session()
    local_opt, sched = case.local(list(local_model.parameters()), data.steps)
    local_lrs = train_local(local_model, local_opt, sched, data)
    return remote_model, local_model, remote_lrs, local_lrs


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_remote_training_equals_local(name: str, data: Data, client: OptimizerClient) -> None:
    remote, local, remote_lrs, local_lrs = run_both(CASES[name], data, client)
    assert len(remote_lrs) == len(local_lrs) == data.steps == EPOCHS * 21
    for t, (got, want) in enumerate(zip(remote_lrs, local_lrs, strict=True)):
        assert math.isclose(got, want, rel_tol=LR_TOL, abs_tol=0.0), (t, got, want)
    errors = rel_errors(remote, local)
    worst = max(errors, key=errors.__getitem__)
    acc_remote, acc_local = accuracy(remote, data), accuracy(local, data)
    print(
        f"\n{name}: test accuracy remote {acc_remote:.4f}, local {acc_local:.4f}; "
        f"worst max|diff|/max|param| {errors[worst]:.2e} ({worst}), tolerance {REL_TOL:g}"
    )
    assert all(e <= REL_TOL for e in errors.values()), errors
    assert acc_remote >= 0.9, acc_remote
    assert abs(acc_remote - acc_local) <= 1 / len(data.y_test) + 1e-9, (acc_remote, acc_local)


def test_frozen_bias_is_left_unchanged(data: Data, client: OptimizerClient) -> None:
    """`.grad` None (a frozen bias): skipped by the server (`skip_missing`) as by torch."""
    frozen = "0.bias"
    initial = make_model().get_parameter(frozen).detach().clone()
    remote, local, _, _ = run_both(CASES["adam+cosine-warmup"], data, client, freeze=frozen)
    assert torch.equal(remote.get_parameter(frozen), initial)
    assert torch.equal(local.get_parameter(frozen), initial)
    errors = rel_errors(remote, local)
    print(f"\nfrozen {frozen}: worst max|diff|/max|param| {max(errors.values()):.2e}")
    assert all(e <= REL_TOL for e in errors.values()), errors


def test_state_dict_resumes_mid_training(data: Data, client: OptimizerClient) -> None:
    """A checkpoint taken mid-training, loaded into a new model and optimizer, continues
    the same session: the end result is bit for bit the uninterrupted run's."""
    case = CASES["adamw+one-cycle"]
    schedule = case.schedule(data.steps)
    half = data.steps // 2

    straight = make_model()
    opt = RemoteOptimizer(straight.named_parameters(), case.optimizer, schedule, client=client)
    straight_lrs = train_remote(straight, opt, data)

    first = make_model()
    opt1 = RemoteOptimizer(first.named_parameters(), case.optimizer, schedule, client=client)
    lrs = train_remote(first, opt1, data, stop=half)
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    del opt1, first  # the job ends

    resumed = make_model(seed=123)  # other weights: they come from the server
    opt2 = RemoteOptimizer(resumed.named_parameters(), case.optimizer, schedule, client=client)
    unused = opt2.session_id
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.server_step == half
    assert opt2.param_groups[0]["lr"] == straight_lrs[half]  # the next step's rate
    with pytest.raises(NotFoundError):  # the session made by __init__, never stepped
        client.get_session(unused)
    lrs += train_remote(resumed, opt2, data, start=half)

    assert lrs == straight_lrs
    for name, p in straight.named_parameters():
        assert torch.equal(resumed.get_parameter(name), p), name
    assert opt2.state_dict()["optserve"]["step"] == data.steps

    # the same session by id, in the constructor: the model gets its params
    again = make_model(seed=7)
    opt3 = RemoteOptimizer(again.named_parameters(), session_id=opt2.session_id, client=client)
    assert opt3.server_step == data.steps
    for name, p in straight.named_parameters():
        assert torch.equal(again.get_parameter(name), p), name
    opt.delete_session()
    opt3.delete_session()


def test_closure_loss_drives_a_plateau_schedule(data: Data, client: OptimizerClient) -> None:
    """`step(closure)` sends the closure's loss: the server's plateau schedule (mode
    "max" on a falling loss: no improvement, so it cuts the rate) gives the rates torch's
    ReduceLROnPlateau gives for the same losses."""
    model = make_model()
    schedule = {"name": "plateau", "mode": "max", "factor": 0.5, "patience": 2}
    opt = RemoteOptimizer(
        model.named_parameters(), {"name": "sgd", "lr": 0.05}, schedule, client=client
    )
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(dummy, mode="max", factor=0.5, patience=2)
    for idx in data.batches[:12]:

        def closure(idx: np.ndarray = idx) -> torch.Tensor:
            opt.zero_grad()
            loss = _loss(model, data, idx)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        assert opt.param_groups[0]["lr"] == dummy.param_groups[0]["lr"]
        plateau.step(loss.item())
    assert dummy.param_groups[0]["lr"] < 0.05  # the rate was cut
    opt.delete_session()


def test_clients_do_not_import_torch() -> None:
    code = (
        "import sys, clients, clients.sync, clients.async_client, clients.errors; "
        "from clients import OptimizerClient; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_example_script_reaches_90_percent(server: LiveServer) -> None:
    script = ROOT / "examples" / "train_digits.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env["OPTSERVE_URL"] = server.base_url
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print("\n" + done.stdout)
    epochs = re.findall(r"^epoch\s+\d+.*accuracy ([0-9.]+)", done.stdout, re.MULTILINE)
    assert epochs, done.stdout
    found = re.search(r"^final test accuracy: ([0-9.]+)$", done.stdout, re.MULTILINE)
    assert found is not None, done.stdout
    assert float(found.group(1)) >= 0.9, done.stdout
