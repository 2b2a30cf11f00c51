"""A redis-server private to a test: on a free port of 127.0.0.1, stopped by its pid.

The `private_redis` fixture (tests/conftest.py) hands out a `PrivateRedis` without
persistence; `PrivateRedis(port, data_dir=...)` keeps its data in an append-only file
there, fsynced at every write (`--appendonly yes --appendfsync always`), so that a
`stop()` and a `start()` on the same port and directory bring the same data back.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_missing() -> str | None:
    """Why no private redis-server can be started (None: it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install -y redis-server)"
    return None


@dataclass
class PrivateRedis:
    """A redis-server of this test alone, on `port`; `stop()`/`start()` it at will.

    Without `data_dir` it keeps nothing (`--save "" --appendonly no`): a restart comes
    back empty. With `data_dir` it writes an append-only file there, fsynced before every
    reply, and logs to `data_dir/redis.log`: a restart comes back with every acknowledged
    write.
    """

    port: int
    data_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def log_path(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / "redis.log"

    def command(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is None:
            return [*argv, "--appendonly", "no"]
        return [
            *argv,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.log_path),
        ]

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            client = redis.Redis(
                host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=1
            )
            try:
                client.ping()  # BusyLoadingError (a ConnectionError) while it reads the AOF
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not start{self._log_hint()}"
                    ) from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: SIGKILL, or with `graceful` SIGTERM (SIGKILL after
        `timeout` s). Only this process, by its pid."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def _log_hint(self) -> str:
        log = self.log_path
        if log is None or not log.exists():
            return ""
        return f"; its log:\n{log.read_text(errors='replace')[-4000:]}"
