"""Time the HTTP service end to end: one large step against its floor, and many small ones.

One run starts its own servers as subprocesses (and stops them):

- optserve itself: `optserve serve --workers 2 --redis-url URL --port P` (run as
  `python -m service.cli serve ...`, with `--log-level warning`: no access log);
- an echo server for the floor: uvicorn with the same defaults as optserve (uvloop,
  httptools), one worker, running a bare ASGI app (no FastAPI, no Starlette, no
  middleware) that reads the whole request body and answers a body of the size named
  by the request's `X-Reply-Bytes` header.

and measures:

(a) A 1M-parameter float32 Adam session stepped in binary over loopback (the grads as a
    safetensors body, `Accept: application/octet-stream`: the new params come back as
    safetensors), end to end per step as a client sees it: send the pre-encoded body,
    read the whole response. Against the floor measured in the same run, the sum of
    the medians of:
    - an HTTP round trip of the same bytes to the echo server (same request body, a
      response of the size of the step's), with the same client;
    - a pipelined SET of the params and the state blobs (the sizes a session of 1M
      float32 Adam parameters stores) on a connection of `RedisStore`'s own pool, so
      with its redis-py configuration (hiredis parser, redis-py's packer);
    - the core update alone, in this process:
      `get_optimizer("adam").update(hp, grads, state, params, inplace=True)`.
    The cases alternate in rounds (a change in machine load hits them all);
    ratio = median step / floor.
(b) The same step in JSON: nested lists in and out (the body pre-encoded by orjson; the
    response read whole, not parsed).
(c) Throughput of small steps: 64 sessions of 1K float32 Adam parameters, 64 concurrent
    keep-alive clients for a fixed duration after a warm-up run: steps/s and latency
    percentiles. Each client has its own session and its own keep-alive connection (so
    a session's steps stay on the worker whose cache holds it, as for a real client).
    The load generator is `wrk` when it is on PATH (`-t64 -c64`: one thread and one
    connection per client; a Lua script sends one pre-built binary request per thread),
    else a lean asyncio client in this process (raw streams, uvloop when available).
    The CPU it took is measured (getrusage of the wrk child, or os.times of this
    process) and reported with that of the server workers (/proc), of Redis (INFO cpu)
    and of the whole machine (/proc/stat: other processes compete for the same cores)
    over the same window.

The client of (a) and (b) is a minimal blocking HTTP/1.1 client over one keep-alive
socket (TCP_NODELAY), written here: no httpx, so its own cost is small and the same for
the step and the echo.

Prints a table; the LAST line is a JSON object:
`{"step_1m_binary_ms", "floor_1m_ms", "ratio", "step_1m_json_ms", "small_steps_per_s",
"small_p99_ms"}`.

    python benchmarks/service.py
    python benchmarks/service.py --quick            # a smoke run: few steps, 3 s of load
    python benchmarks/service.py --generator asyncio --duration 20

Measured (2-core VM shared with other work, Python 3.11, uvicorn 0.54, FastAPI 0.165,
redis-py 8.1, Redis 7.0; two runs with the machine otherwise idle): (a) 34.2 and 35.7 ms
per 1M binary step against floors of 26.3 and 26.5 ms (echo 7.6-8.0, Redis SETs
18.3-18.5, core 0.22): ratio 1.30 and 1.35; (b) 151 and 155 ms in JSON; (c) 1119 and
1222 steps/s, p99 150 and 156 ms, both cores saturated by the two workers at about
1500 CPU-us per step (wrk: 7 % of one core; Redis: 11 %). py-spy on a worker (--gil)
puts about 39 % of its Python time in FastAPI's `solve_dependencies`: because the app
registers a `dependency_overrides` entry, FastAPI rebuilds every sub-dependency with
`get_dependant` (inspect.signature) on every request (18 %), and the three plain `def`
dependencies (settings override, tenant, engine) each go through the thread pool
(12 %). With those two removed and `gc.freeze()` plus a gen-0 threshold of 20000 after
start-up (the cyclic GC cost about 85 CPU-us per step), an experiment outside the
repository reached 1936-1997 steps/s with p99 46-48 ms at about 860 CPU-us per step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.core import tensorfile  # noqa: E402

MB = 1_000_000
BINARY = "application/octet-stream"
JSON = "application/json"
BIG_SHAPE = (1000, 1000)
SMALL_SIZE = 1000
ADAM = {"name": "adam", "lr": 1e-3}
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- a minimal HTTP/1.1 client -------------------------------------------------------------


class HttpError(RuntimeError):
    pass


class HttpConn:
    """One keep-alive connection to 127.0.0.1:`port`; `request()` sends and reads whole."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HttpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, dict[str, str], bytes | bytearray]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.sock.sendall(head.encode("latin-1"))
        if body:
            self.sock.sendall(body)
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HttpError("connection closed before the response headers")
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        got = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            got[name.strip().lower()] = value.strip()
        rest = buf[end + 4 :]
        if "content-length" in got:
            n = int(got["content-length"])
        elif status in (204, 304) or 100 <= status < 200:
            n = 0
        else:
            raise HttpError(f"no Content-Length in a {status} response: {got}")
        if len(rest) >= n:
            data: bytes | bytearray = rest[:n]
            self._buf = rest[n:]
        else:
            data = bytearray(n)
            view = memoryview(data)
            view[: len(rest)] = rest
            pos = len(rest)
            while pos < n:
                got_n = self.sock.recv_into(view[pos:], n - pos)
                if not got_n:
                    raise HttpError("connection closed in the middle of a response body")
                pos += got_n
            self._buf = b""
        return status, got, data


def expect(status: int, data: bytes | bytearray, wanted: int, what: str) -> None:
    if status != wanted:
        raise HttpError(f"{what}: HTTP {status}: {bytes(data[:500])!r}")


# --- the echo server (run by this script with --serve-echo PORT) ----------------------------

_REPLIES: dict[int, bytes] = {}


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Read the whole body (as Starlette's `request.body()` does: chunks, then one join);
    answer `X-Reply-Bytes` bytes (default: as many as were received)."""
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    size = len(body)
    for name, value in scope["headers"]:
        if name == b"x-reply-bytes":
            size = int(value)
    reply = _REPLIES.get(size)
    if reply is None:
        reply = _REPLIES[size] = bytes(size)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", BINARY.encode()), (b"content-length", b"%d" % size)],
        }
    )
    await send({"type": "http.response.body", "body": reply})


def serve_echo(port: int) -> int:
    import uvicorn

    uvicorn.run(echo_app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    return 0


# --- servers as subprocesses -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def children(self) -> list[int]:
        """Pids of uvicorn's worker processes (spawned by multiprocessing)."""
        pids: list[int] = []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return pids
        for pid in map(int, text.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return pids


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc (nan if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def start_server(
    name: str, cmd: list[str], port: int, ready_path: str, workdir: Path
) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, proc, port, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log.read_text()}")
            try:
                with HttpConn(port, timeout=5) as conn:
                    status, _, _ = conn.request("GET", ready_path)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process we started (uvicorn stops its workers), SIGKILL to its
    process group if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


# --- measuring helpers -------------------------------------------------------------------------


@dataclass
class Samples:
    label: str
    times: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3 if self.times else math.nan

    def pct_ms(self, q: float) -> float:
        if not self.times:
            return math.nan
        ts = sorted(self.times)
        return ts[min(len(ts) - 1, round(q * (len(ts) - 1)))] * 1e3

    def min_ms(self) -> float:
        return min(self.times) * 1e3 if self.times else math.nan


def timed(samples: Samples, fn: Callable[[], object], count: int) -> None:
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        samples.times.append(time.perf_counter() - t0)


def create_session(conn: HttpConn, params: np.ndarray, optimizer: dict[str, Any]) -> str:
    """A session of `params` ("w"), created with a binary (safetensors) body."""
    body = tensorfile.encode(
        {"w": params}, {"optimizer": json.dumps(optimizer), "dtype": "float32"}
    )
    status, _, data = conn.request("POST", "/v1/sessions", body, [("Content-Type", BINARY)])
    expect(status, data, 201, "create session")
    sid: str = orjson.loads(data)["id"]
    return sid


def delete_sessions(port: int, sids: Sequence[str]) -> None:
    with HttpConn(port) as conn:
        for sid in sids:
            conn.request("DELETE", f"/v1/sessions/{sid}")


# --- (a) and (b): the 1M step ------------------------------------------------------------------


@dataclass
class BigResult:
    step: Samples
    echo: Samples
    redis: Samples
    core: Samples
    json_step: Samples
    request_bytes: int
    response_bytes: int
    params_blob: int
    state_blob: int
    json_request_bytes: int
    json_response_bytes: int

    @property
    def floor_ms(self) -> float:
        return self.echo.median_ms() + self.redis.median_ms() + self.core.median_ms()


def measure_big(args: argparse.Namespace, api: Server, echo: Server, sids: list[str]) -> BigResult:
    from service.core.optim import get_optimizer, kernels, parse_hyper
    from service.store.redis_store import RedisStore, exchange
    from service.store.redis_wire import connect

    kernels.warm_up()
    rng = np.random.default_rng(0)
    params = rng.standard_normal(BIG_SHAPE, dtype=np.float32)
    grads = (1e-2 * rng.standard_normal(BIG_SHAPE)).astype(np.float32)
    binary_body = tensorfile.encode({"w": grads})
    json_body = orjson.dumps({"grads": {"w": grads}}, option=orjson.OPT_SERIALIZE_NUMPY)
    binary_headers = [("Content-Type", BINARY), ("Accept", BINARY)]
    json_headers = [("Content-Type", JSON), ("Accept", JSON)]

    # the core update alone, on data of the session's size and dtype
    opt = get_optimizer("adam")
    hp = parse_hyper(ADAM)
    flat = params.reshape(-1).copy()
    flat_grads = grads.reshape(-1)
    state = opt.init(hp, flat)
    params_blob = flat.tobytes()
    state_blob = state.to_bytes()

    def core_step() -> None:
        opt.update(hp, flat_grads, state, flat, inplace=True)

    # the Redis SETs, on a connection of RedisStore's own pool (its redis-py config)
    prefix = f"optserve-bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore(args.url, key_prefix=prefix)
    keys = store.keys
    sets = [
        ("SET", keys.params("floor", 0), params_blob),
        ("SET", keys.state("floor", 0), state_blob),
    ]
    conn_box: list[Any] = []

    async def redis_open() -> None:
        await store.open()
        (pool,) = store.pools()  # the pool RedisStore uses (one node)
        conn_box.append(await connect(pool))

    async def redis_set() -> None:
        replies = await exchange(conn_box[0], sets, 60.0)
        assert not any(isinstance(r, Exception) for r in replies), replies

    async def redis_close() -> None:
        if conn_box:
            await exchange(conn_box[0], [("DEL", *(c[1] for c in sets))])
            await store._pool.release(conn_box[0])
        await store.close()

    with (
        HttpConn(api.port) as client,
        HttpConn(echo.port) as echo_client,
        asyncio.Runner() as runner,
    ):
        sid = create_session(client, params, ADAM)
        sids.append(sid)
        path = f"/v1/sessions/{sid}/step"
        last: dict[str, Any] = {}

        def step() -> None:
            status, _, data = client.request("POST", path, binary_body, binary_headers)
            if status != 200:
                expect(status, data, 200, "binary step")
            last["body"] = data

        def json_step() -> None:
            status, _, data = client.request("POST", path, json_body, json_headers)
            if status != 200:
                expect(status, data, 200, "JSON step")
            last["json"] = data

        for _ in range(args.warmup_steps):
            step()
        response_bytes = len(last["body"])
        echo_headers = [("Content-Type", BINARY), ("X-Reply-Bytes", str(response_bytes))]

        def echo_trip() -> None:
            status, _, data = echo_client.request("POST", "/echo", binary_body, echo_headers)
            expect(status, data, 200, "echo")
            assert len(data) == response_bytes

        result = BigResult(
            step=Samples("step, binary (end to end)"),
            echo=Samples("floor: HTTP round trip, same bytes (echo)"),
            redis=Samples(
                f"floor: Redis pipelined SET {len(params_blob) / MB:.1f} + "
                f"{len(state_blob) / MB:.1f} MB"
            ),
            core=Samples("floor: core adam update, inplace"),
            json_step=Samples("step, JSON (end to end)"),
            request_bytes=len(binary_body),
            response_bytes=response_bytes,
            params_blob=len(params_blob),
            state_blob=len(state_blob),
            json_request_bytes=len(json_body),
            json_response_bytes=0,
        )
        try:
            runner.run(redis_open())
            for _ in range(args.warmup_steps):
                echo_trip()
                runner.run(redis_set())
                core_step()
            rounds = max(1, min(args.rounds, args.steps))
            for r in range(rounds):
                count = args.steps // rounds + (1 if r < args.steps % rounds else 0)
                timed(result.step, step, count)
                timed(result.echo, echo_trip, count)
                timed(result.redis, lambda: runner.run(redis_set()), count)
                timed(result.core, core_step, count)
        finally:
            runner.run(redis_close())
        tensors, meta = tensorfile.decode(last["body"])
        assert tensors["w"].shape == BIG_SHAPE, tensors["w"].shape
        assert int(meta["step"]) > args.steps, meta

        for _ in range(max(1, args.warmup_steps // 2)):
            json_step()
        timed(result.json_step, json_step, args.json_steps)
        result.json_response_bytes = len(last["json"])
        doc = orjson.loads(last["json"])
        assert np.asarray(doc["params"]["w"]).shape == BIG_SHAPE, doc.keys()
    return result


# --- (c): small steps under load ------------------------------------------------------------


@dataclass
class LoadResult:
    generator: str
    duration_s: float
    requests: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    generator_cpu_s: float
    worker_cpu_s: list[float]
    redis_cpu_s: float
    machine_busy_s: float

    @property
    def steps_per_s(self) -> float:
        ok = self.requests - sum(self.errors.values())
        return ok / self.duration_s


WRK_SCRIPT = """
-- one wrk thread per connection, each with its own session (set by setup)
local paths = {%(paths)s}
local body_file = %(body_file)s
local count = 0
local req

function setup(thread)
  count = count + 1
  thread:set("path", paths[(count - 1) %% #paths + 1])
end

function init(args)
  local f = assert(io.open(body_file, "rb"))
  local body = f:read("*a")
  f:close()
  local headers = {["Content-Type"] = "%(binary)s", ["Accept"] = "%(binary)s"}
  req = wrk.format("POST", path, headers, body)
end

function request()
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, '
    .. '"status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, '
    .. '"max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores; nan off Linux)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


def redis_cpu(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


class CpuWindow:
    """CPU seconds of the server workers, of Redis and of the whole machine over a window."""

    def __init__(self, api: Server, url: str) -> None:
        self.pids = api.children()
        self.url = url

    def start(self) -> None:
        self.workers0 = [proc_cpu(p) for p in self.pids]
        self.redis0 = redis_cpu(self.url)
        self.busy0 = machine_busy()

    def stop(self) -> None:
        self.workers = [proc_cpu(p) - c for p, c in zip(self.pids, self.workers0, strict=True)]
        self.redis = redis_cpu(self.url) - self.redis0
        self.busy = machine_busy() - self.busy0

    def __enter__(self) -> CpuWindow:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_wrk(
    wrk: str, args: argparse.Namespace, api: Server, sids: list[str], workdir: Path
) -> LoadResult:
    body_file = workdir / "grads.safetensors"
    body_file.write_bytes(tensorfile.encode({"w": np.full(SMALL_SIZE, 1e-2, np.float32)}))
    script = workdir / "step.lua"
    script.write_text(
        WRK_SCRIPT
        % {
            "paths": ", ".join(f'"/v1/sessions/{sid}/step"' for sid in sids),
            "body_file": json.dumps(str(body_file)),
            "binary": BINARY,
        }
    )
    url = f"http://127.0.0.1:{api.port}"

    def wrk_run(seconds: float) -> tuple[dict[str, int], float]:
        n = args.clients
        cmd = [wrk, f"-t{n}", f"-c{n}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [*cmd, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
        line = next((x for x in done.stdout.splitlines() if x.startswith("WRK ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary: {done.stdout}{done.stderr}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        stats: dict[str, int] = json.loads(line[4:])
        return stats, cpu

    wrk_run(args.warmup)
    with CpuWindow(api, args.url) as cpu:
        stats, gen_cpu = wrk_run(args.duration)
    return LoadResult(
        generator=(
            f"wrk -t{args.clients} -c{args.clients}: one thread, keep-alive connection and "
            "session per client (Lua, pre-built binary request)"
        ),
        duration_s=stats["duration_us"] / 1e6,
        requests=stats["requests"],
        errors={k: stats[k] for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=stats["p50_us"] / 1e3,
        p90_ms=stats["p90_us"] / 1e3,
        p99_ms=stats["p99_us"] / 1e3,
        max_ms=stats["max_us"] / 1e3,
        generator_cpu_s=gen_cpu,
        worker_cpu_s=cpu.workers,
        redis_cpu_s=cpu.redis,
        machine_busy_s=cpu.busy,
    )


def run_asyncio(args: argparse.Namespace, api: Server, sids: list[str]) -> LoadResult:
    body = tensorfile.encode({"w": np.full(SMALL_SIZE, 1e-2, np.float32)})
    requests = [
        (
            f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: 127.0.0.1:{api.port}\r\n"
            f"Content-Type: {BINARY}\r\nAccept: {BINARY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for sid in sids
    ]
    latencies: list[float] = []
    errors = {"read": 0, "status": 0}
    window: dict[str, float] = {}

    async def client(i: int, start: float, measure_from: float, end: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        req = requests[i % len(requests)]
        clock = time.perf_counter
        try:
            while True:
                t0 = clock()
                if t0 >= end:
                    return
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                i0 = head.lower().find(b"content-length:")
                n = int(head[i0 + 15 : head.find(b"\r\n", i0)])
                await reader.readexactly(n)
                t1 = clock()
                if measure_from <= t1 < end:
                    if status == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError):
            errors["read"] += 1
        finally:
            writer.close()

    async def main() -> None:
        start = time.perf_counter()
        measure_from = start + args.warmup
        end = measure_from + args.duration
        tasks = [
            asyncio.create_task(client(i, start, measure_from, end)) for i in range(args.clients)
        ]
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        window["cpu0"] = sum(os.times()[:2])
        cpu.start()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        window["cpu1"] = sum(os.times()[:2])
        cpu.stop()
        await asyncio.gather(*tasks)

    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
        name = "asyncio+uvloop"
    except ImportError:
        loop_factory, name = None, "asyncio"
    cpu = CpuWindow(api, args.url)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    ts = sorted(latencies)

    def pct(q: float) -> float:
        return ts[min(len(ts) - 1, round(q * (len(ts) - 1)))] * 1e3 if ts else math.nan

    return LoadResult(
        generator=f"{name} client in-process ({args.clients} keep-alive connections, raw streams)",
        duration_s=args.duration,
        requests=len(ts) + errors["status"],
        errors=errors,
        p50_ms=pct(0.5),
        p90_ms=pct(0.9),
        p99_ms=pct(0.99),
        max_ms=ts[-1] * 1e3 if ts else math.nan,
        generator_cpu_s=window["cpu1"] - window["cpu0"],
        worker_cpu_s=cpu.workers,
        redis_cpu_s=cpu.redis,
        machine_busy_s=cpu.busy,
    )


def measure_small(
    args: argparse.Namespace, api: Server, sids: list[str], workdir: Path
) -> LoadResult:
    rng = np.random.default_rng(1)
    small: list[str] = []
    with HttpConn(api.port) as conn:
        for _ in range(args.sessions):
            params = rng.standard_normal(SMALL_SIZE).astype(np.float32)
            small.append(create_session(conn, params, ADAM))
            sids.append(small[-1])
    wrk = shutil.which("wrk")
    if args.generator == "wrk" and wrk is None:
        raise SystemExit("--generator wrk: wrk is not on PATH")
    if args.generator != "asyncio" and wrk is not None:
        return run_wrk(wrk, args, api, small, workdir)
    return run_asyncio(args, api, small)


# --- the report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, big: BigResult, load: LoadResult, api_cmd: list[str]
) -> dict[str, float]:
    import redis
    import uvicorn

    cores = os.cpu_count() or 1
    print(
        "optserve service benchmark (loopback)\n"
        f"python {platform.python_version()}, uvicorn {uvicorn.__version__}, "
        f"redis-py {redis.__version__}, numpy {np.__version__}; {platform.machine()}, "
        f"{cores} cpus, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
        f"server: {' '.join(['optserve', *api_cmd[3:]])}\n"
        "echo:   uvicorn (uvloop, httptools), 1 worker, bare ASGI app: reads the body, "
        "answers X-Reply-Bytes bytes"
    )
    print(
        f"\n(a) 1M float32 Adam step, binary: request {big.request_bytes / MB:.2f} MB, "
        f"response {big.response_bytes / MB:.2f} MB; {len(big.step.times)} timed per case "
        f"in {max(1, min(args.rounds, args.steps))} alternating rounds, "
        f"{args.warmup_steps} warm-up"
    )
    header = f"{'case':<46} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}"
    print(header)
    print("-" * len(header))
    for s in (big.step, big.echo, big.redis, big.core):
        print(f"{s.label:<46} {s.median_ms():>10.2f} {s.pct_ms(0.9):>8.2f} {s.min_ms():>8.2f}")
    floor = big.floor_ms
    ratio = big.step.median_ms() / floor
    print(f"{'floor (sum of the three medians)':<46} {floor:>10.2f}")
    print(f"{'ratio step / floor':<46} {ratio:>10.2f}   (goal <= 1.5)")
    print(
        f"\n(b) the same step in JSON: request {big.json_request_bytes / MB:.1f} MB, response "
        f"{big.json_response_bytes / MB:.1f} MB; {len(big.json_step.times)} timed"
    )
    s = big.json_step
    print(f"{s.label:<46} {s.median_ms():>10.2f} {s.pct_ms(0.9):>8.2f} {s.min_ms():>8.2f}")
    print(f"{'JSON / binary':<46} {s.median_ms() / big.step.median_ms():>10.1f}   (information)")
    window = load.duration_s
    print(
        f"\n(c) small steps: {args.sessions} sessions of {SMALL_SIZE} float32 Adam params, "
        f"{args.clients} concurrent clients, {window:.1f} s measured after {args.warmup:g} s "
        f"warm-up\ngenerator: {load.generator}"
    )
    header = f"{'steps/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  errors"
    print(header)
    print("-" * (len(header) + 20))
    errors = ", ".join(f"{k} {v}" for k, v in load.errors.items() if v) or "none"
    print(
        f"{load.steps_per_s:>9.0f} {load.p50_ms:>8.2f} {load.p90_ms:>8.2f} "
        f"{load.p99_ms:>8.2f} {load.max_ms:>8.2f}  {errors}"
    )
    print(f"goals: >= 2000 steps/s, p99 <= 50 ms\nCPU over the measured window ({cores} cores):")

    def share(cpu: float) -> str:
        return f"{cpu:6.2f} core-s = {100 * cpu / window:5.1f} % of one core"

    print(f"  {'load generator':<20} {share(load.generator_cpu_s)}")
    for i, c in enumerate(load.worker_cpu_s):
        print(f"  {f'server worker {i + 1}':<20} {share(c)}")
    print(f"  {'redis-server':<20} {share(load.redis_cpu_s)}")
    total = load.generator_cpu_s + sum(load.worker_cpu_s) + load.redis_cpu_s
    print(f"  {'sum of the above':<20} {share(total)}")
    others = load.machine_busy_s - total
    print(f"  {'everything else':<20} {share(others)} (other processes on this machine)")
    print(
        f"  machine busy {100 * load.machine_busy_s / (window * cores):.0f} % of {cores} cores;"
        f" server workers: {1e6 * sum(load.worker_cpu_s) / max(1, load.requests):.0f} "
        "CPU-us per step"
    )
    return {
        "step_1m_binary_ms": round(big.step.median_ms(), 3),
        "floor_1m_ms": round(floor, 3),
        "ratio": round(ratio, 3),
        "step_1m_json_ms": round(big.json_step.median_ms(), 3),
        "small_steps_per_s": round(load.steps_per_s, 1),
        "small_p99_ms": round(load.p99_ms, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url", default=os.environ.get("OPTSERVE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--workers", type=int, default=2, help="optserve workers (default 2)")
    ap.add_argument("--quick", action="store_true", help="few steps and 3 s of load (smoke)")
    ap.add_argument("--steps", type=int, help="timed 1M binary steps (default 60; quick 6)")
    ap.add_argument("--json-steps", type=int, help="timed 1M JSON steps (default 10; quick 2)")
    ap.add_argument("--warmup-steps", type=int, help="warm-up 1M steps (default 5; quick 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds for (a)")
    ap.add_argument("--duration", type=float, help="seconds of measured load (10; quick 3)")
    ap.add_argument("--warmup", type=float, help="seconds of load before it (3; quick 1)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    ap.add_argument("--sessions", type=int, default=64, help="small sessions (64)")
    ap.add_argument(
        "--generator",
        choices=["auto", "wrk", "asyncio"],
        default="auto",
        help="load generator for (c): wrk if on PATH (auto), else the asyncio client",
    )
    ap.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_echo is not None:
        return serve_echo(args.serve_echo)
    defaults = (
        {"steps": 6, "json_steps": 2, "warmup_steps": 2, "duration": 3.0, "warmup": 1.0}
        if args.quick
        else {"steps": 60, "json_steps": 10, "warmup_steps": 5, "duration": 10.0, "warmup": 3.0}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "json_steps", "warmup_steps", "rounds", "clients", "sessions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        ap.error("--duration must be > 0 and --warmup >= 0")

    api_port, echo_port = free_port(), free_port()
    api_cmd = [sys.executable, "-m", "service.cli", "serve", "--workers", str(args.workers)]
    api_cmd += ["--redis-url", args.url, "--port", str(api_port), "--log-level", "warning"]
    echo_cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-echo", str(echo_port)]
    sids: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="optserve-bench-") as tmp,
        start_server("echo", echo_cmd, echo_port, "/ready", Path(tmp)) as echo,
        start_server("optserve", api_cmd, api_port, "/readyz", Path(tmp)) as api,
    ):
        try:
            big = measure_big(args, api, echo, sids)
            load = measure_small(args, api, sids, Path(tmp))
        finally:
            with contextlib.suppress(OSError, HttpError):
                delete_sessions(api.port, sids)
        result = report(args, big, load, api_cmd)
    assert all(math.isfinite(v) and v > 0 for v in result.values()), result
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
