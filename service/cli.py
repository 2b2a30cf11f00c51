"""The `optserve` command.

optserve serve [--host H] [--port P] [--workers N] [--redis-url URL] [--allow-unauthenticated]
               [--log-level L]    run the HTTP server (uvicorn; flags override OPTSERVE_*)
optserve optimizers               list every optimizer with its defaults
optserve demo [--optimizer adam]  train a small regression with the core, print the loss
optserve schedule preview --lr 0.1 --spec '{"name": "step", "step_size": 30}' --steps 100
                                  print a schedule's rates (and momenta) per step [--json]
optserve schedule plot --lr 0.1 --spec '...' --steps 100 -o schedule.png
                                  write the schedule as a PNG plot [--current-step N]
optserve openapi [-o openapi.yaml]
                                  print (or write) the OpenAPI document as YAML
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.core import OPTIMIZERS, CoreError, FlatLayout, HyperparameterError, parse_hyper
from service.core.schedules import Schedule, parse_schedule

if TYPE_CHECKING:
    from service.config import Settings


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: got {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: got {text}")
    return value


def _load_schedule(args: argparse.Namespace) -> Schedule | None:
    """The schedule of `--spec`, or None after printing why it is invalid."""
    prog = f"optserve schedule {args.action}"
    try:
        data = json.loads(args.spec)
    except json.JSONDecodeError as exc:
        print(f"{prog}: --spec is not valid JSON: {exc}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(
            f'{prog}: --spec must be a JSON object, e.g. \'{{"name": "step", "step_size": 30}}\'',
            file=sys.stderr,
        )
        return None
    try:
        return parse_schedule(data)
    except CoreError as exc:
        print(f"{prog}: invalid schedule spec: {exc}", file=sys.stderr)
        return None


def _schedule_preview(args: argparse.Namespace) -> int:
    schedule = _load_schedule(args)
    if schedule is None:
        return 2
    try:
        rates = schedule.lrs(args.steps, args.lr)
        momenta = schedule.momenta(args.steps)
    except CoreError as exc:
        print(f"optserve schedule preview: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "schedule": schedule.model_dump(mode="json"),
            "base_lr": args.lr,
            "steps": args.steps,
            "lrs": rates.tolist(),
            "momenta": None if momenta is None else momenta.tolist(),
        }
        print(json.dumps(out))
        return 0
    print(f"# {json.dumps(schedule.model_dump(mode='json'))}, base lr {args.lr:g}")
    print(f"{'step':>6s}  {'lr':>14s}" + ("" if momenta is None else f"  {'momentum':>10s}"))
    for t, rate in enumerate(rates):
        line = f"{t:6d}  {rate:14.8g}"
        if momenta is not None:
            line += f"  {momenta[t]:10.6g}"
        print(line)
    return 0


def _schedule_plot(args: argparse.Namespace) -> int:
    schedule = _load_schedule(args)
    if schedule is None:
        return 2
    if args.current_step is not None and not 0 <= args.current_step < args.steps:
        print(
            f"optserve schedule plot: --current-step must be in [0, {args.steps}): "
            f"got {args.current_step}",
            file=sys.stderr,
        )
        return 2
    from service.core.plots import schedule_png

    try:
        png = schedule_png(schedule, args.lr, args.steps, args.current_step)
    except CoreError as exc:
        print(f"optserve schedule plot: {exc}", file=sys.stderr)
        return 2
    try:
        Path(args.output).write_bytes(png)
    except OSError as exc:
        print(f"optserve schedule plot: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(png)} bytes)")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    """The app's OpenAPI document as YAML (sorted keys: the same document, the same bytes)."""
    if importlib.util.find_spec("yaml") is None:
        print("optserve openapi: needs PyYAML (pip install pyyaml)", file=sys.stderr)
        return 1
    from service.api.openapi import to_yaml
    from service.app import create_app
    from service.config import Settings

    # the document does not depend on the settings: take the defaults, not the environment
    text = to_yaml(create_app(Settings.model_construct()).openapi())
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_bytes(text.encode("utf-8"))
    except OSError as exc:
        print(f"optserve openapi: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(text.encode('utf-8'))} bytes)")
    return 0


_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings the `serve` flags give (the ones left out are not overrides)."""
    overrides: dict[str, object] = {}
    for name in ("host", "port", "workers", "redis_url", "log_level"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.allow_unauthenticated:
        overrides["allow_unauthenticated"] = True
    return overrides


def _serve_refusal(settings: Settings) -> str | None:
    """Why `serve` refuses these settings (several workers on the in-process store, or a
    public address without API keys), or None."""
    if settings.workers > 1 and not settings.redis_url:
        return (
            f"optserve serve: --workers {settings.workers} needs a Redis URL (--redis-url or "
            "OPTSERVE_REDIS_URL): each worker is its own process, and the in-process "
            "store would give each one its own sessions"
        )
    if (
        not _is_loopback(settings.host)
        and not settings.api_keys
        and not settings.allow_unauthenticated
    ):
        return (
            f"optserve serve: refusing to serve on {settings.host} without API keys: set "
            "OPTSERVE_API_KEYS (a JSON object of key -> tenant), or pass "
            "--allow-unauthenticated if anyone who can reach this address may use it"
        )
    return None


def _run_uvicorn(settings: Settings) -> None:
    """Say where the state lives, then run uvicorn on `service.app:app_factory`."""
    import uvicorn

    from service.app import redact_url
    from service.logs import log_config

    # the first line a user sees says where the state lives
    store = (
        f"redis at {redact_url(settings.redis_url)}"
        if settings.redis_url
        else "in-process (embedded default; state is lost on exit)"
    )
    print(
        f"optserve: store: {store}; serving on http://{settings.host}:{settings.port} "
        f"with {settings.workers} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        "service.app:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level, settings.log_format),
        proxy_headers=False,
    )


def _serve(args: argparse.Namespace) -> int:
    """Run uvicorn on `service.app:app_factory`; workers read the settings from env."""
    from pydantic import ValidationError

    from service.config import Settings

    overrides = _serve_overrides(args)
    try:
        base = Settings()
        settings = Settings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        print(f"optserve serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    refusal = _serve_refusal(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    # uvicorn's workers import the app afresh: hand them the settings through the env
    for name, value in overrides.items():
        os.environ[f"OPTSERVE_{name.upper()}"] = "true" if value is True else str(value)
    _run_uvicorn(settings)
    return 0


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description=(
            "Run the optserve HTTP API with uvicorn. Every flag overrides its OPTSERVE_* "
            "environment variable (OPTSERVE_HOST, OPTSERVE_PORT, OPTSERVE_WORKERS, "
            "OPTSERVE_REDIS_URL, OPTSERVE_ALLOW_UNAUTHENTICATED, OPTSERVE_LOG_LEVEL); API "
            "keys come from OPTSERVE_API_KEYS only (a JSON object of key -> tenant). "
            "Without a Redis URL sessions live in this process and are lost on exit. "
            "With several workers, set PROMETHEUS_MULTIPROC_DIR to an empty directory "
            "so that /metrics adds up every worker."
        ),
    )
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (needs Redis if > 1)"
    )
    serve.add_argument(
        "--redis-url",
        default=None,
        help=(
            "redis://host:port/db, or redis+cluster://host:port[,host:port...] for a Redis "
            "Cluster (default: none, the in-process store)"
        ),
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a non-loopback --host without API keys",
    )
    serve.add_argument(
        "--log-level",
        default=None,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (default info)",
    )
    serve.set_defaults(func=_serve)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="train a small regression with the core")
    demo.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    demo.add_argument("--hyper", default='{"lr": 0.05}', help="hyperparameters as JSON")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)


def _add_schedule(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schedule = sub.add_parser("schedule", help="preview or plot a learning-rate schedule")
    actions = schedule.add_subparsers(dest="action", required=True)
    for action, func, help_text in (
        ("preview", _schedule_preview, "print the rate (and momentum) of every step"),
        ("plot", _schedule_plot, "write the schedule as a PNG plot"),
    ):
        p = actions.add_parser(action, help=help_text)
        p.add_argument("--lr", type=_rate, required=True, help="base learning rate")
        p.add_argument(
            "--spec", required=True, help='schedule spec as JSON, e.g. \'{"name": "step", ...}\''
        )
        p.add_argument("--steps", type=_positive_int, default=100, help="steps to show")
        p.set_defaults(func=func)
        if action == "preview":
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            p.add_argument("-o", "--output", required=True, help="PNG file to write")
            p.add_argument("--current-step", type=int, default=None, help="step to mark")


def _parser() -> argparse.ArgumentParser:
    """The `optserve` argument parser and its subcommands."""
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    sub.add_parser("optimizers", help="list optimizers and their defaults").set_defaults(
        func=_optimizers
    )
    _add_demo(sub)
    _add_schedule(sub)
    spec = sub.add_parser("openapi", help="print or write the OpenAPI document (YAML)")
    spec.add_argument(
        "-o", "--output", default="-", help="file to write (default: standard output)"
    )
    spec.set_defaults(func=_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
