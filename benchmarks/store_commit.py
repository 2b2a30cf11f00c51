"""Time one session commit against a real Redis: which atomic mechanism, which client setup.

A step commits a small meta document plus two blobs (by default a 4 MB params blob and an
8 MB state blob, as for 1M float32 parameters under Adam) only if the stored version is
still the one the step read (docs/design.md, decision 3). This benchmark times, in one run
against one Redis server, the ways to do that with redis-py's asyncio client:

- `watch`: WATCH meta + HGET version (one round trip), then MULTI / HSET meta / SET
  blob chunks / EXEC (one round trip): the optimistic transaction.
- `lua`: one EVALSHA of a script that compares the version and, if it matches, HSETs
  meta and SETs the blob chunks (the blobs travel through Lua strings).
- `plain`: HSET + SETs in one pipeline, no check and no atomicity: the floor.

each with every client setup redis-py offers for the two halves of the wire format:

- reply parser: `hiredis` (redis-py's default when hiredis is installed) or `python`
  (redis-py's pure-Python RESP parser), chosen by the connection's `parser_class`;
- command packer: `python` (the asyncio connection's own `pack_command`, its only one,
  which hands large values to the socket as separate buffers) or `hiredis`
  (`hiredis.pack_command`, the sync client's default packer, which copies the whole
  command into one new bytes object; used here through a connection subclass).

For information it also times reading the blobs back (`read`: GET of every chunk, the
parser's big job), reading the small meta hash (`meta`: one HGETALL, the parser's many
small jobs), and a full commit through `RedisStore` itself (`transaction` + `load` of a
cached version + `commit`, with the configuration the store uses).

Each case runs warm-up commits, then timed commits in rounds that alternate between the
cases (so a change in machine load hits them all); the table reports the median and the
90th percentile. The last line printed is a JSON object with every median (ms), the
ratio of each atomic mechanism to the plain floor, and the fastest atomic case.

    python benchmarks/store_commit.py
    python benchmarks/store_commit.py --url redis://127.0.0.1:6379/0 --repeat 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.store.base import SessionBlobs, SessionMeta  # noqa: E402
from service.store.keys import Keys  # noqa: E402
from service.store.redis_store import (  # noqa: E402
    HiredisPackerConnection,
    RedisStore,
    exchange,
)

MB = 1_000_000
MiB = 1 << 20
WARMUP = 3

LUA_COMMIT = """
local v = redis.call('HGET', KEYS[1], 'version')
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'json', ARGV[3])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 2])
end
return 1
"""


class Case:
    """One mechanism with one client setup, on its own connection."""

    def __init__(
        self,
        mechanism: str,
        parser: str,
        packer: str,
        url: str,
        keys: Keys,
        sid: str,
        chunk_bytes: int,
    ) -> None:
        self.mechanism = mechanism
        self.parser = parser
        self.packer = packer
        self.label = f"{mechanism} parser={parser} packer={packer}"
        self.keys = keys
        self.sid = sid
        self.chunk_bytes = chunk_bytes
        self.pool = aioredis.ConnectionPool.from_url(
            url,
            connection_class=HiredisPackerConnection
            if packer == "hiredis"
            else aioredis.Connection,
            parser_class=_AsyncHiredisParser if parser == "hiredis" else _AsyncRESP3Parser,
            socket_timeout=60,
        )
        self.conn: aioredis.Connection | None = None
        self.sha = ""
        self.version = 0
        self.times: list[float] = []

    async def open(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        conn = await self.pool.get_connection()
        assert isinstance(conn, aioredis.Connection)
        self.conn = conn
        (self.sha,) = await exchange(conn, [("SCRIPT", "LOAD", LUA_COMMIT)])
        self.version = 0
        await self.plain(meta_json, params, state, check=False)

    async def close(self) -> None:
        if self.conn is not None:
            await self.pool.release(self.conn)
        await self.pool.aclose()

    def chunks(self, blob: bytes, kind: str) -> list[tuple[str, memoryview]]:
        view = memoryview(blob)
        key = self.keys.params if kind == "params" else self.keys.state
        return [
            (key(self.sid, i), view[off : off + self.chunk_bytes])
            for i, off in enumerate(range(0, len(blob), self.chunk_bytes))
        ]

    def blob_sets(self, params: bytes, state: bytes) -> list[tuple[Any, ...]]:
        return [
            ("SET", k, v) for k, v in self.chunks(params, "params") + self.chunks(state, "state")
        ]

    async def plain(
        self, meta_json: bytes, params: bytes, state: bytes, check: bool = True
    ) -> None:
        assert self.conn is not None
        new = self.version + 1
        cmds = [("HSET", self.keys.meta(self.sid), "version", new, "json", meta_json)]
        replies = await exchange(self.conn, cmds + self.blob_sets(params, state))
        assert not any(isinstance(r, Exception) for r in replies), replies
        self.version = new

    async def watch(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        assert self.conn is not None
        meta_key = self.keys.meta(self.sid)
        _, stored = await exchange(self.conn, [("WATCH", meta_key), ("HGET", meta_key, "version")])
        assert int(stored) == self.version
        new = self.version + 1
        cmds: list[tuple[Any, ...]] = [
            ("MULTI",),
            ("HSET", meta_key, "version", new, "json", meta_json),
            *self.blob_sets(params, state),
            ("EXEC",),
        ]
        replies = await exchange(self.conn, cmds)
        assert isinstance(replies[-1], list), replies[-1]
        self.version = new

    async def lua(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        assert self.conn is not None
        chunks = self.chunks(params, "params") + self.chunks(state, "state")
        new = self.version + 1
        cmd = (
            "EVALSHA",
            self.sha,
            1 + len(chunks),
            self.keys.meta(self.sid),
            *(k for k, _ in chunks),
            self.version,
            new,
            meta_json,
            *(v for _, v in chunks),
        )
        (ok,) = await exchange(self.conn, [cmd])
        assert ok == 1, ok
        self.version = new

    async def read(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        assert self.conn is not None
        cmds = [("GET", k) for k, _ in self.chunks(params, "params") + self.chunks(state, "state")]
        replies = await exchange(self.conn, cmds)
        assert sum(len(r) for r in replies) == len(params) + len(state)

    async def meta(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        assert self.conn is not None
        (raw,) = await exchange(self.conn, [("HGETALL", self.keys.meta(self.sid))])
        assert raw

    def run(self) -> Callable[[bytes, bytes, bytes], Awaitable[None]]:
        fn: Callable[[bytes, bytes, bytes], Awaitable[None]] = getattr(self, self.mechanism)
        return fn


class StoreCase:
    """`RedisStore` itself: transaction, load (cached version current: no blob read), commit."""

    def __init__(self, url: str, prefix: str, sid: str, chunk_bytes: int) -> None:
        self.label = "store (RedisStore transaction)"
        self.mechanism = "store"
        self.store = RedisStore(url, chunk_bytes=chunk_bytes, key_prefix=prefix)
        self.sid = sid
        self.times: list[float] = []

    async def open(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        await self.store.open()
        meta = SessionMeta(id=self.sid, tenant="bench", version=0, step=0, spec={"n": 1})
        await self.store.create(meta, SessionBlobs(params, state), ttl=3600)
        self.blobs = SessionBlobs(params, state)
        self.version = 0

    async def close(self) -> None:
        await self.store.delete(self.sid)
        await self.store.close()

    async def commit(self, meta_json: bytes, params: bytes, state: bytes) -> None:
        async with self.store.transaction(self.sid, ttl=3600) as tx:
            loaded = await tx.load(have_version=self.version)
            assert loaded is not None
            assert loaded[1] is None  # the cached blobs are current: not read again
            meta = loaded[0]
            ok = await tx.commit(meta.evolve(version=meta.version + 1), self.blobs)
            assert ok
            self.version = meta.version + 1

    def run(self) -> Callable[[bytes, bytes, bytes], Awaitable[None]]:
        return self.commit


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = os.urandom
    params = rng(int(args.params_mb * MB))
    state = rng(int(args.state_mb * MB))
    meta = SessionMeta(
        id="bench",
        tenant="bench",
        version=0,
        step=0,
        spec={"optimizer": {"name": "adam", "lr": 1e-3}, "layout": [["w", [1000, 1000]]]},
    )
    meta_json = meta.to_json()
    prefix = f"optserve-bench-{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    chunk_bytes = int(args.chunk_mib * MiB)
    cases: list[Case | StoreCase] = []
    for mechanism in ("watch", "lua", "plain", "read", "meta"):
        for parser in ("hiredis", "python"):
            for packer in ("python", "hiredis"):
                if mechanism in ("read", "meta") and packer == "hiredis":
                    continue  # a GET or HGETALL is a few bytes to pack
                sid = f"{mechanism}-{parser}-{packer}"
                cases.append(Case(mechanism, parser, packer, args.url, keys, sid, chunk_bytes))
    cases.append(StoreCase(args.url, prefix, "store", chunk_bytes))
    try:
        for case in cases:
            await case.open(meta_json, params, state)
            for _ in range(WARMUP):
                await case.run()(meta_json, params, state)
        for _ in range(args.rounds):
            for case in cases:
                fn = case.run()
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    await fn(meta_json, params, state)
                    case.times.append(time.perf_counter() - t0)
    finally:
        for case in cases:
            await case.close()
        cleanup = aioredis.Redis.from_url(args.url)
        async for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
            await cleanup.delete(key)
        await cleanup.aclose()

    payload = len(params) + len(state)
    print(
        f"commit of meta + {len(params) / MB:g} MB params + {len(state) / MB:g} MB state"
        f" (chunks of {chunk_bytes / MiB:g} MiB) to {args.url};"
        f" {args.rounds} rounds x {args.repeat} per case;"
        f" Python {platform.python_version()}, redis-py {redis.__version__},"
        f" hiredis {hiredis.__version__}"
    )
    header = f"{'case':<40} {'median ms':>10} {'p90 ms':>8} {'MB/s':>7} {'x plain':>8}"
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    p90s: dict[str, float] = {}
    for case in cases:
        ts = sorted(case.times)
        medians[case.label] = statistics.median(ts) * 1e3
        p90s[case.label] = ts[min(len(ts) - 1, int(0.9 * len(ts)))] * 1e3
    floor = min(v for k, v in medians.items() if k.startswith("plain "))
    for case in cases:
        med = medians[case.label]
        rate = "-" if case.mechanism == "meta" else f"{payload / MB / (med / 1e3):.0f}"
        print(
            f"{case.label:<40} {med:>10.3f} {p90s[case.label]:>8.3f} {rate:>7} {med / floor:>8.2f}"
        )
    atomic = {k: v for k, v in medians.items() if k.startswith(("watch ", "lua "))}
    best = min(atomic, key=atomic.__getitem__)
    best_lua = min((v for k, v in atomic.items() if k.startswith("lua ")), default=float("nan"))
    best_watch = min((v for k, v in atomic.items() if k.startswith("watch ")), default=float("nan"))
    print(
        f"fastest atomic: {best} ({atomic[best]:.2f} ms); best lua / best watch = "
        f"{best_lua / best_watch:.2f}"
    )
    return {
        "payload_bytes": payload,
        "chunk_bytes": chunk_bytes,
        "median_ms": {k: round(v, 3) for k, v in medians.items()},
        "p90_ms": {k: round(v, 3) for k, v in p90s.items()},
        "ratio_to_plain": {k: round(v / floor, 3) for k, v in medians.items()},
        "fastest_atomic": best,
        "lua_over_watch": round(best_lua / best_watch, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url", default=os.environ.get("OPTSERVE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--params-mb", type=float, default=4.0)
    ap.add_argument("--state-mb", type=float, default=8.0)
    ap.add_argument("--chunk-mib", type=float, default=64.0, help="largest value written (MiB)")
    ap.add_argument("--repeat", type=int, default=10, help="timed commits per case per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    result = asyncio.run(bench(args))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
