"""A 3-master Redis Cluster private to a test run: three redis-servers on free ports of
127.0.0.1 (`--cluster-enabled yes`, no persistence, no replicas) joined by
`redis-cli --cluster create`, stopped by their pids.

`PrivateCluster.start()` returns once every node says `cluster_state:ok`; `url` is the
`redis+cluster://` url of the store (all three nodes as seeds).
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def cluster_port(taken: set[int]) -> int:
    """A port P of 127.0.0.1 free a moment ago, with P + 10000 (the cluster bus) free too
    (so P <= 55535), and not in `taken`."""
    rnd = random.Random()
    for _ in range(1000):
        port = rnd.randint(20000, 55000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cluster_missing() -> str | None:
    """Why no private cluster can be started (None: it can)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install -y redis-server redis-tools)"
    return None


@dataclass
class PrivateCluster:
    """Three masters on free ports, their cluster config files under `data_dir`."""

    data_dir: Path
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> redis.Redis:
        """A plain client of the node on `port` (no redirections followed)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self, timeout: float = 30.0) -> None:
        assert not self.procs, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        for _ in range(self.masters):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            self.ports.append(port)
        try:
            for port in self.ports:
                argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
                argv += ["--cluster-enabled", "yes"]
                argv += ["--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf")]
                argv += ["--dir", str(self.data_dir), "--save", "", "--appendonly", "no"]
                argv += ["--logfile", str(self.data_dir / f"redis-{port}.log")]
                self.procs.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self._wait(lambda c: bool(c.ping()), port, deadline, "answer PING")
            create = ["redis-cli", "--cluster", "create"]
            create += [f"127.0.0.1:{p}" for p in self.ports]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout!r}\n{done.stderr!r}"
                )
            for port in self.ports:
                self._wait(
                    lambda c: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO"),
                    port,
                    deadline,
                    "say cluster_state:ok",
                )
        except BaseException:
            self.stop()
            raise

    def _wait(self, ok: object, port: int, deadline: float, what: str) -> None:
        assert callable(ok)
        while True:
            client = self.client(port)
            try:
                if ok(client):
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node {port} did not {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL every node, by its pid."""
        procs, self.procs = self.procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)

    def delete_prefix(self, prefix: str) -> None:
        """Delete the keys under `prefix` on every node."""
        for port in self.ports:
            client = self.client(port)
            try:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for key in keys:  # one by one: they are in different slots
                    client.delete(key)
            finally:
                client.close()
