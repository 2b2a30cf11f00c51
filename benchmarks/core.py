"""Time one optimizer step: optserve's fused kernels against torch.optim's.

For `adam`, `adamw` and `sgd` (momentum 0.9), at each size N (float32 parameters in one
flat vector / one tensor), in the same process and with the same thread count:

- optserve fused: `opt.update(hp, grads, state, params, inplace=True, impl="fused")`
- optserve numpy: the same with `impl="numpy"` (the reference, for information)
- torch foreach / torch fused: `torch.optim.<Opt>([p], foreach=True)` / `fused=True`

Each implementation runs warm-up steps, then timed steps in a few rounds that alternate
between implementations (so a change in machine load hits them all); the table reports
the median step time. The last line printed is a JSON object of
`optserve fused time / torch fused time` by optimizer and size: the goal sizes 1e6 and
1e7 by default, every size measured when `--sizes` is given.

    python benchmarks/core.py                       # 1e4, 1e5, 1e6, 1e7
    python benchmarks/core.py --sizes 1e4 --repeat 3 --threads 2

The numpy column is for information: that path allocates temporaries every step, and
whether glibc serves them from the heap or from fresh pages (page faults) depends on
the allocator's history, so at 1e6 it varies between about 2 and 10 ms from run to run.

torch is a dev dependency: it is imported here only, never by the service.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = ["1e4", "1e5", "1e6", "1e7"]
GOAL_SIZES = ["1e6", "1e7"]
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adam": {},
    "adamw": {},
    "sgd": {"momentum": 0.9},
}
IMPLS = ["optserve fused", "optserve numpy", "torch foreach", "torch fused"]
WARMUP_STEPS = 3


def parse_size(text: str) -> tuple[str, int]:
    """`"1e6"` -> `("1e6", 1000000)`; the label is kept as written."""
    value = float(text)
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"not a positive whole size: {text!r}")
    return text.strip(), int(value)


def default_repeat(n: int) -> int:
    """Timed steps per implementation: many for short steps, fewer at 1e7."""
    return 30 if n >= 5_000_000 else 200


def make_steppers(name: str, n: int, torch: Any) -> dict[str, Callable[[], None]]:
    """One zero-argument step function per implementation, on its own copy of the data."""
    from service.core.optim import get_optimizer, parse_hyper

    rng = np.random.default_rng(0)
    init = rng.standard_normal(n, dtype=np.float32)
    grads = rng.standard_normal(n, dtype=np.float32)
    extra = OPTIMIZERS[name]
    hp = parse_hyper({"name": name, **extra})
    opt = get_optimizer(name)

    def ours(impl: str) -> Callable[[], None]:
        params = init.copy()
        state = opt.init(hp, params)

        def step() -> None:
            opt.update(hp, grads, state, params, inplace=True, impl=impl)

        return step

    torch_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}

    def theirs(mode: str) -> Callable[[], None]:
        p = torch.tensor(init, requires_grad=True)
        p.grad = torch.from_numpy(grads.copy())
        topt = torch_cls[name]([p], lr=hp.lr, **extra, **{mode: True})
        return topt.step  # type: ignore[no-any-return]

    return {
        "optserve fused": ours("fused"),
        "optserve numpy": ours("numpy"),
        "torch foreach": theirs("foreach"),
        "torch fused": theirs("fused"),
    }


def time_steps(steppers: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Median seconds per step of each implementation, over `repeat` timed steps."""
    rounds = max(1, min(3, repeat))
    samples: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(rounds):
        count = repeat // rounds + (1 if r < repeat % rounds else 0)
        for impl, step in steppers.items():
            for _ in range(WARMUP_STEPS):
                step()
            for _ in range(count):
                start = time.perf_counter()
                step()
                samples[impl].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        help="comma-separated parameter counts (default: 1e4,1e5,1e6,1e7)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="timed steps per implementation and size (default: 200, 30 from 5e6 up)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    sizes = [parse_size(s) for s in (args.sizes.split(",") if args.sizes else DEFAULT_SIZES)]

    sys.path.insert(0, str(ROOT))
    import numba
    import torch

    from service.core.optim import kernels

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)  # numba.set_num_threads, and kept per call
    compile_s = kernels.warm_up()
    if not kernels.AVAILABLE:
        print("numba kernels unavailable: nothing to compare", file=sys.stderr)
        return 1

    print(
        f"optserve core benchmark: float32, one step, median of timed steps "
        f"(warm-up {WARMUP_STEPS} steps per round)\n"
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"numba {numba.__version__} ({numba.threading_layer()} threads: "
        f"{numba.get_num_threads()}), torch {torch.__version__} "
        f"(threads: {torch.get_num_threads()}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()})\n"
        f"{platform.machine()}, {os.cpu_count()} cpus, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"kernels.warm_up(): {compile_s:.2f} s"
    )
    header = (
        f"{'optimizer':<9} {'N':>5} {'repeat':>6} "
        + " ".join(f"{k:>15}" for k in IMPLS)
        + f" {'fused/torch':>12} {'numpy/torch':>12}"
    )
    print(f"\ntimes in ms; ratios are against torch fused\n{header}\n{'-' * len(header)}")

    ratios: dict[str, dict[str, float]] = {name: {} for name in OPTIMIZERS}
    for label, n in sizes:
        repeat = args.repeat or default_repeat(n)
        for name in OPTIMIZERS:
            steppers = make_steppers(name, n, torch)
            times = time_steps(steppers, repeat)
            del steppers
            fused = times["optserve fused"] / times["torch fused"]
            numpy_ratio = times["optserve numpy"] / times["torch fused"]
            ratios[name][label] = round(fused, 3)
            print(
                f"{name:<9} {label:>5} {repeat:>6} "
                + " ".join(f"{1e3 * times[k]:>15.4f}" for k in IMPLS)
                + f" {fused:>12.2f} {numpy_ratio:>12.2f}",
                flush=True,
            )

    reported = [label for label, _ in sizes]
    if not args.sizes:
        reported = [s for s in reported if s in GOAL_SIZES]
    result = {name: {s: ratios[name][s] for s in reported} for name in OPTIMIZERS}
    assert all(math.isfinite(r) and r > 0 for by in result.values() for r in by.values())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
