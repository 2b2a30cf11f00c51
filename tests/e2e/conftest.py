"""Fixtures of the end-to-end tests.

The real servers (`memory_server`, `redis_server` on `shared_redis`) are shared with the
other test packages: see tests/support/live_fixtures.py. Here:

- `live`: each of the two in turn (the contract tests run against both).
- `persistent_redis`: a private Redis on an AOF (survives a kill and restart), for the
  tests that stop Redis; tests that kill a worker start their own server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live_fixtures import need_redis_server
from tests.support.live_server import LiveServer
from tests.support.redis_server import PrivateRedis, free_port

__all__ = ["need_redis_server"]


@pytest.fixture(params=["redis-2-workers", "memory"])
def live(request: pytest.FixtureRequest) -> LiveServer:
    """Each live server in turn."""
    name = "redis_server" if request.param == "redis-2-workers" else "memory_server"
    server: LiveServer = request.getfixturevalue(name)
    assert server.proc.poll() is None, f"{server.name} is not running:\n{server.log_tail()}"
    return server


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server whose data survives a kill and restart (`--appendonly yes
    --appendfsync always` in tmp_path), for the outage and durability tests."""
    need_redis_server()
    server = PrivateRedis(free_port(), data_dir=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
