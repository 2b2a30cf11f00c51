"""A large session end to end: create, step and read back N float32 params in binary.

Issue 8: a 100M-parameter float32 session (400 MB per array) can be created, stepped
and read in binary without any single Redis value over the chunk limit, with the
server's peak memory bounded.

One run starts, as subprocesses of its own (and stops them by their pid):

- a private redis-server on a free port of 127.0.0.1: no persistence (`--save ""
  --appendonly no`), no `maxmemory`;
- `optserve serve --workers 1 --redis-url URL --port P --log-level warning` (run as
  `python -m service.cli serve ...`) with `OPTSERVE_MAX_PARAMS` (at least N),
  `OPTSERVE_MAX_BODY_BYTES` (at least the largest body plus a margin) and
  `OPTSERVE_CHUNK_BYTES` (`--chunk-bytes`, default 64 MiB, the server's default; 1 MiB
  with `--quick`, so that its 8 MB blobs are cut into several chunks too); every
  other setting is the server's default (so the worker's session cache, 2048 MiB by
  default, keeps the latest state of the session in memory, as in production).

and, with `clients.OptimizerClient(binary=True)` (safetensors both ways):

1. creates a session of N params ("w", shape (N,), float32): SGD with momentum (one
   state array, `momentum_buffer`) or with `--optimizer adam` Adam (two);
2. applies K steps of the same gradient with `return_="none"`;
3. reads the params back (`GET .../params`, binary) and checks every element against
   the closed form of K steps on a constant gradient g (float64, in slices):
   - SGD, momentum mu, no dampening: p_K = p_0 - lr * g * sum_{t=1..K} (1 - mu^t) / (1 - mu)
   - Adam: m_t / (1 - b1^t) = g and sqrt(v_t / (1 - b2^t)) = |g| exactly, so
     p_K = p_0 - K * lr * g / (|g| + eps)
   p_0 and g follow index patterns of periods 1009 and 13 (primes: a chunk put back in
   the wrong place, or a shifted one, cannot match);
4. lists every Redis key of the session (SCAN) and checks that no string value is over
   `chunk_bytes` (STRLEN); reports the largest value, MEMORY USAGE (which includes the
   allocator's rounding) and the number of chunks of each blob;
5. deletes the session.

Meanwhile a thread samples the RSS of the server's process tree (the `optserve serve`
process and the uvicorn worker it spawns; psutil, every `--interval` s, 50 ms by
default) and keeps the peak of each phase. `state bytes` below is the session's
params plus optimizer state as stored (meta `pb + sb`); the ratio is peak RSS over
it, and over it once the baseline RSS (the idle server before the session) is
subtracted.

Prints a report; the LAST line is a JSON object with `params`, `optimizer`, `steps`,
`chunk_bytes`, `state_bytes`, `largest_value_bytes`, `largest_memory_usage_bytes`,
`chunks`, `params_chunks`, `state_chunks`, `baseline_rss_bytes`, `peak_rss_bytes`,
`peak_rss_ratio`, `peak_rss_over_baseline_ratio`, `peak_rss_by_phase`, `create_s`,
`step_s` (one per step), `read_s`, `redis_used_memory_peak_bytes`, `max_abs_error`.

    python benchmarks/large_session.py                      # 100M params, SGD momentum
    python benchmarks/large_session.py --optimizer adam
    python benchmarks/large_session.py --quick              # 2M params, 1 MiB chunks (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients import OptimizerClient  # noqa: E402

MiB = 1024 * 1024
MB = 1_000_000
KEY_PREFIX = "optserve"  # the server's default (service/store/keys.py)
P0_PERIOD = 1009
G_PERIOD = 13
SLICE = 10_000_000  # elements per slice of the checks (float64 temporaries)


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to a process we started, SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server without persistence nor maxmemory on a free port; its URL."""
    import redis

    port = free_port()
    log = workdir / "redis.log"
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--logfile", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{tail}") from None
                time.sleep(0.02)
            finally:
                client.close()
        yield url
    finally:
        stop(proc, timeout=10)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cmd: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def optserve(redis_url: str, settings: dict[str, str], workdir: Path) -> Iterator[Server]:
    """`optserve serve --workers 1` on a free port, with `settings` (OPTSERVE_*)."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--workers", "1"]
    cmd += ["--redis-url", redis_url, "--port", str(port), "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update(settings)
    log = workdir / "optserve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log, cmd, settings)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optserve exited ({proc.returncode}):\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"optserve did not become ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)


# --- RSS of the server's process tree ------------------------------------------------------------


class RssSampler:
    """Samples the summed RSS of `pid` and its descendants every `interval` s in a thread;
    keeps the overall peak and the peak of each phase (`phase(name)` switches)."""

    def __init__(self, pid: int, interval: float) -> None:
        import psutil  # type: ignore[import-untyped]

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.by_phase: dict[str, int] = {}
        self.samples = 0
        self._phase = "idle"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss(self) -> int:
        psutil = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _record(self, value: int) -> None:
        with self._lock:
            self.samples += 1
            self.peak = max(self.peak, value)
            self.by_phase[self._phase] = max(self.by_phase.get(self._phase, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record(self.rss())
            self._stop.wait(self.interval)

    def phase(self, name: str) -> None:
        """Start phase `name` (a sample is taken at each switch)."""
        self._record(self.rss())
        with self._lock:
            self._phase = name
        self._record(self.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record(self.rss())


# --- data and the closed forms ----------------------------------------------------------------


def initial_params(n: int) -> np.ndarray:
    """p_0[i] = ((i mod 1009) - 504) / 504 as float32 (in [-1, 1])."""
    out = np.empty(n, np.float32)
    for lo in range(0, n, SLICE):
        i = np.arange(lo, min(n, lo + SLICE), dtype=np.int64)
        out[lo : lo + len(i)] = ((i % P0_PERIOD) - (P0_PERIOD // 2)) / (P0_PERIOD // 2)
    return out


def gradient(n: int) -> np.ndarray:
    """g[i] = ((i mod 13) - 6) * 1e-3 as float32 (zero at every 13th element)."""
    out = np.empty(n, np.float32)
    for lo in range(0, n, SLICE):
        i = np.arange(lo, min(n, lo + SLICE), dtype=np.int64)
        out[lo : lo + len(i)] = ((i % G_PERIOD) - (G_PERIOD // 2)) * 1e-3
    return out


def optimizer_spec(name: str, lr: float, momentum: float) -> dict[str, Any]:
    if name == "sgd":
        return {"name": "sgd", "lr": lr, "momentum": momentum}
    return {"name": "adam", "lr": lr}


def max_abs_error(
    got: np.ndarray, p0: np.ndarray, g: np.ndarray, spec: dict[str, Any], steps: int
) -> float:
    """Largest |got - closed form| over all elements (float64, in slices)."""
    lr = float(spec["lr"])
    worst = 0.0
    for lo in range(0, len(got), SLICE):
        hi = min(len(got), lo + SLICE)
        p = p0[lo:hi].astype(np.float64)
        gg = g[lo:hi].astype(np.float64)
        if spec["name"] == "sgd":
            mu = float(spec["momentum"])
            factor = sum((1 - mu**t) / (1 - mu) for t in range(1, steps + 1))
            want = p - lr * factor * gg
        else:
            want = p - steps * lr * gg / (np.abs(gg) + 1e-8)
        worst = max(worst, float(np.max(np.abs(got[lo:hi].astype(np.float64) - want))))
    return worst


# --- the Redis keys of the session ------------------------------------------------------------


@dataclass
class KeyReport:
    keys: int = 0
    chunks: int = 0
    params_chunks: int = 0
    state_chunks: int = 0
    largest_value: int = 0
    largest_value_key: str = ""
    largest_memory_usage: int = 0
    stored_params_bytes: int = 0
    stored_state_bytes: int = 0
    over_limit: list[str] = field(default_factory=list)
    others: dict[str, str] = field(default_factory=dict)


def inspect_keys(redis_url: str, session_id: str, chunk_bytes: int) -> KeyReport:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    report = KeyReport()
    start = f"{KEY_PREFIX}:{{{session_id}}}:"
    try:
        meta = client.hgetall(f"{start}meta")
        report.stored_params_bytes = int(meta[b"pb"])
        report.stored_state_bytes = int(meta[b"sb"])
        meta_chunks = int(meta[b"pn"]) + int(meta[b"sn"])
        for raw in client.scan_iter(match=f"{start}*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            report.keys += 1
            kind = client.type(raw)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            usage = int(client.memory_usage(raw, samples=0) or 0)
            report.largest_memory_usage = max(report.largest_memory_usage, usage)
            rest = key[len(start) :]
            if kind != "string":
                report.others[rest] = kind
                continue
            size = int(client.strlen(raw))
            if rest.startswith("params:"):
                report.params_chunks += 1
            elif rest.startswith("state:"):
                report.state_chunks += 1
            else:
                report.others[rest] = kind
            if size > report.largest_value:
                report.largest_value, report.largest_value_key = size, rest
            if size > chunk_bytes:
                report.over_limit.append(f"{rest} ({size} bytes)")
        report.chunks = report.params_chunks + report.state_chunks
        if report.chunks != meta_chunks:
            raise AssertionError(f"{report.chunks} chunk keys, meta names {meta_chunks}")
    finally:
        client.close()
    return report


def redis_memory(redis_url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("memory")
    finally:
        client.close()
    return {k: int(info[k]) for k in ("used_memory", "used_memory_peak", "used_memory_rss")}


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    n = args.params
    spec = optimizer_spec(args.optimizer, args.lr, args.momentum)
    settings = {
        "OPTSERVE_MAX_PARAMS": str(max(n, 100_000_000)),
        # the largest body is the create or a step: N float32 plus a small header
        "OPTSERVE_MAX_BODY_BYTES": str(max(512 * MiB, 4 * n + 64 * MiB)),
        "OPTSERVE_CHUNK_BYTES": str(args.chunk_bytes),
    }
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    p0 = initial_params(n)
    g = gradient(n)
    timings["make_arrays_s"] = time.perf_counter() - t0

    with (
        tempfile.TemporaryDirectory(prefix="optserve-large-") as tmp,
        private_redis(Path(tmp)) as redis_url,
        optserve(redis_url, settings, Path(tmp)) as server,
        RssSampler(server.proc.pid, args.interval) as rss,
        OptimizerClient(
            server.url,
            api_key="",
            binary=True,
            timeout=httpx.Timeout(args.timeout, connect=10.0),
            max_retries=0,
        ) as client,
    ):
        time.sleep(max(0.5, 4 * args.interval))  # a few idle samples
        baseline = rss.rss()
        stage = "create"
        try:
            rss.phase("create")
            t0 = time.perf_counter()
            session = client.create_session({"w": p0}, spec, dtype="float32")
            timings["create_s"] = time.perf_counter() - t0
            timings["step_s"] = []
            for k in range(args.steps):
                stage = f"step {k + 1}"
                rss.phase(f"step_{k + 1}")
                t0 = time.perf_counter()
                result = client.step(session.id, {"w": g}, return_="none")
                timings["step_s"].append(time.perf_counter() - t0)
                if result.step != k + 1 or result.params:
                    raise AssertionError(f"step {k + 1}: unexpected answer {result}")
            stage = "read"
            rss.phase("read")
            t0 = time.perf_counter()
            got = client.get_params(session.id)
            timings["read_s"] = time.perf_counter() - t0
            rss.phase("after")
            time.sleep(max(0.3, 4 * args.interval))
            settled = rss.rss()
            stage = "check"
            w = got.params["w"]
            if w.dtype != np.float32 or w.shape != (n,) or got.step != args.steps:
                raise AssertionError(f"read back {w.dtype} {w.shape} at step {got.step}")
            error = max_abs_error(w, p0, g, spec, args.steps)
            del w, got
            keys = inspect_keys(redis_url, session.id, args.chunk_bytes)
            memory = redis_memory(redis_url)
            stage = "delete"
            client.delete_session(session.id)
        except Exception as exc:
            tail = server.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"failed at {stage} ({type(exc).__name__}: {exc}); server RSS peak "
                f"{rss.peak / MB:.0f} MB, now {rss.rss() / MB:.0f} MB; "
                f"server log tail:\n{tail}"
            ) from exc
    state_bytes = keys.stored_params_bytes + keys.stored_state_bytes
    return {
        "n": n,
        "spec": spec,
        "settings": settings,
        "timings": timings,
        "baseline": baseline,
        "settled": settled,
        "rss": rss,
        "keys": keys,
        "memory": memory,
        "error": error,
        "state_bytes": state_bytes,
    }


def report(args: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    rss: RssSampler = r["rss"]
    keys: KeyReport = r["keys"]
    t = r["timings"]
    state_bytes = r["state_bytes"]
    baseline = r["baseline"]
    tolerance = 1e-5 * max(1, args.steps)
    print(
        f"optserve large session: {r['n']:,} float32 params, {args.optimizer} "
        f"({json.dumps(r['spec'])}), {args.steps} steps, binary both ways\n"
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpus, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
        f"server: optserve serve --workers 1 "
        f"({' '.join(f'{k}={v}' for k, v in r['settings'].items())}); private redis-server"
    )
    print(
        f"\nstate bytes (params + optimizer state, as stored): {state_bytes / MB:,.1f} MB "
        f"(params {keys.stored_params_bytes / MB:,.1f}, state {keys.stored_state_bytes / MB:,.1f})"
    )
    print(f"{'phase':<12} {'time s':>8} {'peak RSS MB':>12}")
    rows = [("idle", None), ("create", t["create_s"])]
    rows += [(f"step_{i + 1}", s) for i, s in enumerate(t["step_s"])]
    rows += [("read", t["read_s"]), ("after", None)]
    for name, seconds in rows:
        peak = rss.by_phase.get(name, 0)
        shown = "" if seconds is None else f"{seconds:.2f}"
        print(f"{name:<12} {shown:>8} {peak / MB:>12,.0f}")
    print(
        f"baseline RSS {baseline / MB:,.0f} MB, "
        f"settled after the read {r['settled'] / MB:,.0f} MB, "
        f"peak {rss.peak / MB:,.0f} MB ({rss.samples} samples every {args.interval * 1e3:.0f} ms)\n"
        f"peak / state bytes {rss.peak / state_bytes:.2f}; "
        f"(peak - baseline) / state bytes {(rss.peak - baseline) / state_bytes:.2f}"
    )
    print(
        f"\nRedis: {keys.keys} keys; {keys.chunks} chunks (params {keys.params_chunks}, "
        f"state {keys.state_chunks}) of at most {args.chunk_bytes:,} bytes; largest value "
        f"{keys.largest_value:,} bytes ({keys.largest_value_key}), largest MEMORY USAGE "
        f"{keys.largest_memory_usage:,} bytes; other keys {keys.others or 'none'}\n"
        f"redis used_memory {r['memory']['used_memory'] / MB:,.0f} MB, peak "
        f"{r['memory']['used_memory_peak'] / MB:,.0f} MB, rss "
        f"{r['memory']['used_memory_rss'] / MB:,.0f} MB"
    )
    print(f"\nread back: max |error| vs the closed form {r['error']:.3g} (tolerance {tolerance:g})")
    if keys.over_limit:
        raise AssertionError(f"values over chunk_bytes: {keys.over_limit}")
    if not r["error"] <= tolerance:
        raise AssertionError(f"params read back differ from the closed form by {r['error']}")
    return {
        "params": r["n"],
        "optimizer": args.optimizer,
        "steps": args.steps,
        "chunk_bytes": args.chunk_bytes,
        "state_bytes": state_bytes,
        "largest_value_bytes": keys.largest_value,
        "largest_memory_usage_bytes": keys.largest_memory_usage,
        "chunks": keys.chunks,
        "params_chunks": keys.params_chunks,
        "state_chunks": keys.state_chunks,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": rss.peak,
        "peak_rss_ratio": round(rss.peak / state_bytes, 3),
        "peak_rss_over_baseline_ratio": round((rss.peak - baseline) / state_bytes, 3),
        "peak_rss_by_phase": dict(rss.by_phase),
        "create_s": round(t["create_s"], 3),
        "step_s": [round(s, 3) for s in t["step_s"]],
        "read_s": round(t["read_s"], 3),
        "redis_used_memory_peak_bytes": r["memory"]["used_memory_peak"],
        "max_abs_error": r["error"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, help="parameters (default 100_000_000; quick 2M)")
    ap.add_argument("--quick", action="store_true", help="2M params (a smoke run)")
    ap.add_argument("--steps", type=int, default=2, help="steps (default 2)")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    ap.add_argument(
        "--chunk-bytes",
        type=int,
        help="OPTSERVE_CHUNK_BYTES (default 64 MiB, the server's; quick 1 MiB: several chunks)",
    )
    ap.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, s")
    ap.add_argument("--timeout", type=float, default=900.0, help="HTTP timeout per call, s")
    args = ap.parse_args(argv)
    if args.params is None:
        args.params = 2_000_000 if args.quick else 100_000_000
    if args.chunk_bytes is None:
        args.chunk_bytes = MiB if args.quick else 64 * MiB
    if args.params < 1 or args.steps < 1:
        ap.error("--params and --steps must be >= 1")
    if not 0 < args.momentum < 1:
        ap.error("--momentum must be in (0, 1)")
    result = report(args, run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
