"""Compare optserve's federated rounds with Flower's strategies on the same client results.

Flower (`flwr`) is not a dependency of optserve: install it in a separate venv and run
this file with that venv's Python and the repository on the path::

    python3.11 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install flwr numpy pydantic numba
    /tmp/flwr-venv/bin/python benchmarks/federated_flower.py
    /tmp/flwr-venv/bin/python benchmarks/federated_flower.py --dtype float32 --rounds 50

(the script puts the repository on `sys.path` itself; `PYTHONPATH=.` does no harm).

Without `flwr` it prints how to install it and exits with status 0.

For each strategy, a model of tensors (7, 5), (5,), (3, 4, 2) and () runs `--rounds`
rounds. In each round `--clients` clients make the same seeded random changes, with random
`num_examples`, each to its server's current global model: Flower's strategy gets the new
weights (its global model plus the change, in a `FitRes`) through
`aggregate_fit(server_round, results, [])` (server_round from 1, as Flower's server loop
counts); optserve gets the changes as deltas (the API's default update kind), aggregates
them with `service.core.federated.aggregate` and applies the server optimizer with
`g = -delta`. (Feeding optserve Flower's weights instead, turned into deltas against its own
model, would feed the two models' rounding differences back as a change: FedAdagrad
without momentum multiplies such a difference by about `eta / (sqrt(v) + tau)`, ~25 here,
each round.) After every round the two global models are compared; the
table and the JSON on the last line give, per strategy, the largest absolute difference
and the largest difference relative to the model's largest magnitude, over all rounds.

optserve is configured to reproduce Flower (see service/core/federated/server_optim.py):

* FedAdagrad: `fedadagrad` with `betas=(0, 0)` (Flower passes `beta_1=0`) and
  `initial_accumulator=0` (Flower's `v` starts at 0);
* FedAdam: `fedadam` with `initial_accumulator=0`, `bias_correction=False`, and in round
  `r` the rate `eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1))` passed as `lr` (Flower's
  bias correction, one round ahead of Kingma & Ba's). The line `FedAdam (ours
  bias_correction=True)` shows how far our own correction (exponent `r`) lands from it;
* FedYogi: `fedyogi` with `initial_accumulator=0`;
* FedAvgM: `fedavgm` (lr 1, momentum 0.9); FedAvg: `fedavg` (lr 1);
* FedMedian, FedTrimmedAvg (beta 0.2), Krum (f = 1) and Multi-Krum (f = 1, m = 3):
  `fedavg` (lr 1) with the `median`, `trimmed_mean`, `krum` aggregators.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the repository first: benchmarks/service.py would otherwise shadow the `service` package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES: list[tuple[int, ...]] = [(7, 5), (5,), (3, 4, 2), ()]
ETA = 0.05
BETAS = (0.9, 0.99)
TAU = 1e-3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        import flwr  # type: ignore[import-not-found]
    except ImportError:
        print(
            "flwr is not installed here; it is not an optserve dependency. Install it into a "
            "separate venv and run this file with it:\n"
            "    python3.11 -m venv /tmp/flwr-venv\n"
            "    /tmp/flwr-venv/bin/pip install flwr numpy pydantic numba\n"
            "    /tmp/flwr-venv/bin/python benchmarks/federated_flower.py"
        )
        print(json.dumps({"skipped": "flwr not installed"}))
        return 0

    logging.getLogger("flwr").setLevel(logging.ERROR)
    dtype = np.dtype(args.dtype)
    results: dict[str, dict[str, float]] = {}
    for label, make_flower, ours in cases():
        results[label] = compare(
            make_flower, ours, rounds=args.rounds, clients=args.clients, dtype=dtype, seed=args.seed
        )

    width = max(len(k) for k in results)
    print(f"flwr {flwr.__version__}, {args.rounds} rounds, {args.clients} clients, {dtype}")
    print(f"{'strategy':<{width}}  {'max abs diff':>12}  {'max rel diff':>12}")
    for label, r in results.items():
        print(f"{label:<{width}}  {r['max_abs']:12.3e}  {r['max_rel']:12.3e}")
    print(
        json.dumps(
            {
                "flwr": flwr.__version__,
                "dtype": str(dtype),
                "rounds": args.rounds,
                "clients": args.clients,
                "results": results,
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------


def flower_adam_rate(r: int) -> float:
    """Flower's FedAdam rate in round r (fedadam.py: exponent server_round + 1)."""
    b1, b2 = BETAS
    return float(ETA * math.sqrt(1 - b2 ** (r + 1.0)) / (1 - b1 ** (r + 1.0)))


Ours = tuple[dict[str, Any], dict[str, Any], Callable[[int], float] | None]


def cases() -> list[tuple[str, Callable[[Any], Any], Ours]]:
    """(label, Flower strategy from initial Parameters, (server optimizer spec, aggregator
    spec, per-round rate or None))."""
    from flwr.server.strategy import (  # type: ignore[import-not-found]
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedMedian,
        FedTrimmedAvg,
        FedYogi,
        Krum,
    )

    b1, b2 = BETAS
    mean = {"name": "mean"}
    fedavg = {"name": "fedavg", "lr": 1.0}
    return [
        (
            "FedAdagrad",
            lambda p: FedAdagrad(initial_parameters=p, eta=ETA, tau=TAU),
            (
                {
                    "name": "fedadagrad",
                    "lr": ETA,
                    "betas": [0.0, 0.0],
                    "tau": TAU,
                    "initial_accumulator": 0.0,
                },
                mean,
                None,
            ),
        ),
        (
            "FedAdam",
            lambda p: FedAdam(initial_parameters=p, eta=ETA, beta_1=b1, beta_2=b2, tau=TAU),
            (
                {
                    "name": "fedadam",
                    "lr": ETA,
                    "betas": list(BETAS),
                    "tau": TAU,
                    "initial_accumulator": 0.0,
                },
                mean,
                flower_adam_rate,
            ),
        ),
        (
            "FedAdam (ours bias_correction=True)",
            lambda p: FedAdam(initial_parameters=p, eta=ETA, beta_1=b1, beta_2=b2, tau=TAU),
            (
                {
                    "name": "fedadam",
                    "lr": ETA,
                    "betas": list(BETAS),
                    "tau": TAU,
                    "initial_accumulator": 0.0,
                    "bias_correction": True,
                },
                mean,
                None,
            ),
        ),
        (
            "FedYogi",
            lambda p: FedYogi(initial_parameters=p, eta=ETA, beta_1=b1, beta_2=b2, tau=TAU),
            (
                {
                    "name": "fedyogi",
                    "lr": ETA,
                    "betas": list(BETAS),
                    "tau": TAU,
                    "initial_accumulator": 0.0,
                },
                mean,
                None,
            ),
        ),
        (
            "FedAvgM",
            lambda p: FedAvgM(initial_parameters=p, server_learning_rate=1.0, server_momentum=0.9),
            ({"name": "fedavgm", "lr": 1.0, "momentum": 0.9}, mean, None),
        ),
        ("FedAvg", lambda p: FedAvg(initial_parameters=p), (fedavg, mean, None)),
        (
            "FedMedian",
            lambda p: FedMedian(initial_parameters=p),
            (fedavg, {"name": "median"}, None),
        ),
        (
            "FedTrimmedAvg",
            lambda p: FedTrimmedAvg(initial_parameters=p, beta=0.2),
            (fedavg, {"name": "trimmed_mean", "beta": 0.2}, None),
        ),
        (
            "Krum",
            lambda p: Krum(initial_parameters=p, num_malicious_clients=1),
            (fedavg, {"name": "krum", "num_malicious": 1}, None),
        ),
        (
            "MultiKrum",
            lambda p: Krum(initial_parameters=p, num_malicious_clients=1, num_clients_to_keep=3),
            (fedavg, {"name": "krum", "num_malicious": 1, "num_to_keep": 3}, None),
        ),
    ]


def dummy_proxy() -> Any:
    """A ClientProxy whose methods are never called (aggregate_fit reads only FitRes)."""
    from flwr.server.client_proxy import ClientProxy  # type: ignore[import-not-found]

    def unused(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    cls = type("DummyProxy", (ClientProxy,), dict.fromkeys(ClientProxy.__abstractmethods__, unused))
    return cls("dummy")


def compare(
    make_flower: Callable[[Any], Any],
    ours: Ours,
    *,
    rounds: int,
    clients: int,
    dtype: np.dtype[Any],
    seed: int,
) -> dict[str, float]:
    from flwr.common import (  # type: ignore[import-not-found]
        Code,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )

    from service.core.federated import (
        aggregate,
        get_server_optimizer,
        parse_federated,
        parse_server_hyper,
    )
    from service.core.layout import FlatLayout

    spec, aggregator_spec, rate = ours
    layout = FlatLayout.from_shapes([(f"t{i}", s) for i, s in enumerate(SHAPES)])
    rng = np.random.default_rng(seed)
    x0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]

    strategy = make_flower(ndarrays_to_parameters(x0))
    flower_x = [a.copy() for a in x0]

    min_clients = max(clients, 3)
    config = parse_federated({"min_clients": min_clients, "aggregator": aggregator_spec})
    hp = parse_server_hyper(spec)
    opt = get_server_optimizer(hp.name)
    x = layout.flatten({f"t{i}": a for i, a in enumerate(x0)}, dtype)
    state = opt.init(hp, x, layout)

    proxy = dummy_proxy()
    max_abs = max_rel = 0.0
    for r in range(1, rounds + 1):
        scale = 10.0 ** rng.uniform(-3, -1)
        changes = [
            [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(clients)
        ]
        # Flower's clients send new weights: Flower's global model plus their change
        weights = [
            [(w + c).astype(dtype) for w, c in zip(flower_x, change, strict=True)]
            for change in changes
        ]
        num_examples = [int(n) for n in rng.integers(10, 1000, clients)]
        fit_results = [
            (proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, {}))
            for w, n in zip(weights, num_examples, strict=True)
        ]
        params, _ = strategy.aggregate_fit(r, fit_results, [])
        flower_x = parameters_to_ndarrays(params)

        # ours send the same changes as deltas (the API's default update kind)
        deltas = [layout.flatten({f"t{i}": a for i, a in enumerate(c)}, dtype) for c in changes]
        delta = aggregate(config.aggregator, deltas, num_examples)
        lr = rate(r) if rate is not None else None
        x, state = opt.update(hp, -delta, state, x, lr, layout)

        ref = np.concatenate([a.reshape(-1) for a in flower_x]).astype(np.float64)
        diff = float(np.max(np.abs(x.astype(np.float64) - ref)))
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / float(np.max(np.abs(ref))))
    return {"max_abs": max_abs, "max_rel": max_rel}


if __name__ == "__main__":
    sys.exit(main())
