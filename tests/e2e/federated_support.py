"""What the federated demonstrations (tests/e2e/test_federated_*.py) share: clients of
the digits MLP (tests/support/digits.py) with their own slice of the training set, their
local training in NumPy, `FederatedWorker`s run in threads (one per client), the round
entries of a session's history, and a local reference of the server's rounds made of the
core's `aggregate` and server optimizers.

* data: `non_iid_split` (client `k` draws 80% of its samples from digits `k` and `k + 1`
  mod 10, the rest from the other digits) or `iid_split`; the held-out test split is
  digits.py's.
* local training (`local_update`): `LocalConfig.epochs` epochs of minibatch SGD at
  `LocalConfig.lr` on the client's samples, shuffled by a seed made of the run's seed, the
  client and the round: the same global params give the same new weights, so a local
  replay of the rounds (`replay`) follows what the clients sent.
* a straggler (`Client.late_rounds`) sleeps past the round's deadline before answering
  in those rounds; an attacker (`Client.attack`) sends `-scale` times its true delta plus
  Gaussian noise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from clients import FederatedWorker, OptimizerClient, RoundReport
from service.core.federated import (
    aggregate,
    get_server_optimizer,
    parse_federated,
    parse_server_hyper,
)
from tests.support.digits import LAYOUT, accuracy, load_data, loss_and_grad

DIGITS = 10
#: how long the worker threads of one test may run before it gives up on them
WORKER_BUDGET = 150.0


# --- data ----------------------------------------------------------------------------------


def non_iid_split(clients: int = 10, main_fraction: float = 0.8, seed: int = 0) -> list[np.ndarray]:
    """Indices into the training set for each of `clients` (10): client `k` takes
    `main_fraction` of its `len(train) // clients` samples from digits `k` and `k + 1`
    (mod 10), half each, and the rest from the other digits (what is left of them once
    every client took its two digits). Disjoint; seeded."""
    assert clients == DIGITS, "each digit is the main digit of exactly two clients"
    rng = np.random.default_rng(seed)
    y = load_data().y_train
    size = len(y) // clients
    main = round(main_fraction * size)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in range(DIGITS)}
    parts: list[list[int]] = []
    for k in range(clients):
        two = ((k, main // 2), ((k + 1) % DIGITS, main - main // 2))
        parts.append([int(pools[c].pop()) for c, count in two for _ in range(count)])
    leftovers = [int(i) for i in rng.permutation([i for c in range(DIGITS) for i in pools[c]])]
    for k in range(clients):
        own = {k, (k + 1) % DIGITS}
        take = [i for i in leftovers if y[i] not in own][: size - main]
        taken = set(take)
        leftovers = [i for i in leftovers if i not in taken]
        parts[k] += take
    return [np.array(sorted(p)) for p in parts]


def iid_split(clients: int, seed: int = 0) -> list[np.ndarray]:
    """The training set shuffled (seeded) and cut into `clients` nearly equal parts."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(load_data().y_train))
    return [np.sort(p) for p in np.array_split(perm, clients)]


def main_share(indices: np.ndarray, k: int) -> float:
    """The fraction of a client's samples that are digits `k` or `k + 1` (mod 10)."""
    y = load_data().y_train[indices]
    return float(np.isin(y, [k % DIGITS, (k + 1) % DIGITS]).mean())


# --- clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalConfig:
    """A client's local training: minibatch SGD, the same for every client and run."""

    lr: float = 0.1
    epochs: int = 1
    batch: int = 32
    seed: int = 0
    #: an attacker's delta: `-attack_scale * delta + attack_noise * N(0, 1)`
    attack_scale: float = 10.0
    attack_noise: float = 1.0


@dataclass(frozen=True)
class Client:
    """One client: its id, its training samples, the rounds in which it straggles and
    whether it is an attacker."""

    number: int
    indices: np.ndarray = field(repr=False)
    late_rounds: frozenset[int] = frozenset()
    attack: bool = False

    @property
    def id(self) -> str:
        return f"c{self.number}"


def flat(params: Mapping[str, np.ndarray]) -> np.ndarray:
    return LAYOUT.flatten(dict(params), np.float64)


def local_update(
    client: Client, params: np.ndarray, round_number: int, config: LocalConfig
) -> tuple[np.ndarray, float]:
    """The weights `client` sends for a round whose global params are `params` (flat
    float64), and its mean minibatch loss: deterministic in its arguments."""
    data = load_data()
    rng = np.random.default_rng([config.seed, client.number, round_number])
    new = params.copy()
    losses = []
    for _ in range(config.epochs):
        perm = rng.permutation(client.indices)
        for start in range(0, len(perm) - config.batch + 1, config.batch):
            idx = perm[start : start + config.batch]
            loss, grads = loss_and_grad(new, data.x_train[idx], data.y_train[idx])
            new -= config.lr * grads
            losses.append(loss)
    if client.attack:
        noise = rng.standard_normal(params.size) * config.attack_noise
        new = params - config.attack_scale * (new - params) + noise
    return new, float(np.mean(losses))


def train_fn(
    client: Client,
    config: LocalConfig,
    late_sleep: float,
    on_round: Callable[[int, np.ndarray], None] | None = None,
) -> Callable[[dict[str, np.ndarray], int], Any]:
    """`train` of a `FederatedWorker` for `client`: `on_round(round, global params)`
    first (a recorder), then in a round of `late_rounds` a sleep of `late_sleep` seconds
    (past the deadline: the round opened before the worker read it), then
    `local_update`."""

    def train(params: dict[str, np.ndarray], round_number: int) -> Any:
        x = flat(params)
        if on_round is not None:
            on_round(round_number, x)
        if round_number in client.late_rounds:
            time.sleep(late_sleep)
        new, loss = local_update(client, x, round_number, config)
        return LAYOUT.unflatten(new), len(client.indices), {"loss": loss}

    return train


class AccuracyRecorder:
    """`on_round` of one client's `train`: the test accuracy of each round's global
    params (after `round` rounds), and the final params read at the end (`finish`)."""

    def __init__(self) -> None:
        self.by_round: dict[int, float] = {}
        self._lock = threading.Lock()

    def __call__(self, round_number: int, params: np.ndarray) -> None:
        data = load_data()
        value = accuracy(params, data.x_test, data.y_test)
        with self._lock:
            self.by_round.setdefault(round_number, value)

    def finish(self, rounds: int, params: np.ndarray) -> float:
        self(rounds, params)
        return self.by_round[rounds]

    def every(self, step: int, rounds: int) -> str:
        return " ".join(
            f"r{r}:{self.by_round[r]:.3f}"
            for r in range(step, rounds + 1, step)
            if r in self.by_round
        )


# --- running workers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A worker to run: the session, the client, its `train`."""

    session_id: str
    client: Client
    train: Callable[[dict[str, np.ndarray], int], Any]


def run_workers(
    base_url: str, jobs: Sequence[Job], rounds: int, poll_interval: float
) -> dict[tuple[str, str], list[RoundReport]]:
    """A `FederatedWorker` per job, each in its thread with its own client, taking part in
    `rounds` rounds; their reports by (session id, client id). The first error of any
    thread is raised; a thread still running after `WORKER_BUDGET` s fails the test."""
    reports: dict[tuple[str, str], list[RoundReport]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(job: Job) -> None:
        try:
            with OptimizerClient(base_url) as client:
                worker = FederatedWorker(
                    client, job.session_id, job.client.id, job.train, poll_interval=poll_interval
                )
                got = worker.run(rounds)
            with lock:
                reports[(job.session_id, job.client.id)] = got
        except BaseException as exc:  # raised by the test's thread below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WORKER_BUDGET
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"workers still running after {WORKER_BUDGET} s"
    return reports


def round_entries(http: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """The session's history entries of kind `round`, oldest first (raw JSON: the
    client's `HistoryEntry` has no `round` / `clients` / `num_examples`)."""
    r = http.get(f"/v1/sessions/{sid}/history", params={"limit": 10_000})
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"][::-1]
    return [e for e in entries if e["kind"] == "round"]


# --- the server's rounds, locally ----------------------------------------------------------


class Reference:
    """The server's rounds computed locally with the core: `aggregate` with the session's
    aggregator, then the server optimizer on the pseudo-gradient `-delta` at its `lr`."""

    def __init__(
        self, optimizer: Mapping[str, Any], federated: Mapping[str, Any], params: np.ndarray
    ) -> None:
        self.hyper = parse_server_hyper(dict(optimizer))
        self.optimizer = get_server_optimizer(self.hyper.name)
        self.config = parse_federated(dict(federated))
        self.params = params.copy()
        self.state = self.optimizer.init(self.hyper, self.params, LAYOUT)

    def close_round(self, deltas: Sequence[np.ndarray], num_examples: Sequence[int]) -> np.ndarray:
        """Close a round with these updates (in arrival order); the new params."""
        delta = aggregate(self.config.aggregator, list(deltas), list(num_examples))
        self.params, self.state = self.optimizer.update(
            self.hyper, -delta, self.state, self.params, self.hyper.lr, LAYOUT
        )
        return self.params


def replay(
    optimizer: Mapping[str, Any],
    federated: Mapping[str, Any],
    clients: Sequence[Client],
    initial: np.ndarray,
    rounds: int,
    config: LocalConfig,
) -> np.ndarray:
    """The global params after `rounds` rounds taken by every client but the stragglers
    of each round (`late_rounds`), computed locally."""
    ref = Reference(optimizer, federated, initial)
    for r in range(rounds):
        present = [c for c in clients if r not in c.late_rounds]
        deltas = [local_update(c, ref.params, r, config)[0] - ref.params for c in present]
        ref.close_round(deltas, [len(c.indices) for c in present])
    return ref.params
