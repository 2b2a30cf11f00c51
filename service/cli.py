"""The `optserve` command.

optserve optimizers               list every optimizer with its defaults
optserve demo [--optimizer adam]  train a small regression with the core, print the loss
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from service.core import OPTIMIZERS, FlatLayout, HyperparameterError, parse_hyper


def _optimizers(_: argparse.Namespace) -> int:
    for name in sorted(OPTIMIZERS):
        opt = OPTIMIZERS[name]
        defaults = opt.hyper().model_dump(exclude={"name"})
        print(f"{name:10s} {opt.reference:32s} {json.dumps(defaults)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Least-squares regression y = X w + b + noise, trained with the chosen optimizer."""
    try:
        hp = parse_hyper({"name": args.optimizer, **json.loads(args.hyper)})
    except (HyperparameterError, json.JSONDecodeError) as exc:
        print(f"optserve demo: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    n, d = 512, 20
    x = rng.standard_normal((n, d))
    true_w = rng.standard_normal(d)
    y = x @ true_w + 0.5 + 0.01 * rng.standard_normal(n)
    layout = FlatLayout.from_shapes([("w", (d,)), ("b", ())])
    params = layout.flatten({"w": np.zeros(d), "b": np.zeros(())}, args.dtype)
    opt = OPTIMIZERS[hp.name]
    state = opt.init(hp, params, layout)
    print(f"optimizer {hp.name}: {hp.model_dump(exclude={'name'})}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        view = layout.unflatten(params)
        residual = x @ view["w"] + view["b"] - y
        loss = float(np.mean(residual**2))
        grads = layout.flatten(
            {"w": 2 * x.T @ residual / n, "b": np.asarray(2 * residual.mean())}, args.dtype
        )
        params, state = opt.update(hp, grads, state, params, layout=layout, inplace=True)
        if step == 1 or step % max(1, args.steps // 10) == 0:
            print(f"step {step:5d}  loss {loss:.6f}")
    elapsed = time.perf_counter() - start
    print(
        f"{args.steps} steps in {elapsed * 1e3:.1f} ms; |w - w_true| = "
        f"{np.linalg.norm(layout.unflatten(params)['w'] - true_w):.4f}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("optimizers", help="list optimizers and their defaults").set_defaults(
        func=_optimizers
    )
    demo = sub.add_parser("demo", help="train a small regression with the core")
    demo.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    demo.add_argument("--hyper", default='{"lr": 0.05}', help="hyperparameters as JSON")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
