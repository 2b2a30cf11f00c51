"""Fixtures of the hostile-input suite (issue 12).

The real servers (`memory_server`, `redis_server` on `shared_redis`) are shared with the
other test packages: see tests/support/live_fixtures.py. Here `live` is each of the two
in turn: `optserve serve --workers 2` on Redis, and the in-process store with one
worker (where /healthz is answered by the very worker that runs the hostile request).
"""

from __future__ import annotations

import httpx
import pytest

from tests.hostile.support import shared_client
from tests.support.live_fixtures import need_redis_server
from tests.support.live_server import LiveServer

__all__ = ["need_redis_server"]


@pytest.fixture(params=["redis-2-workers", "memory"])
def live(request: pytest.FixtureRequest) -> LiveServer:
    """Each live server in turn."""
    name = "redis_server" if request.param == "redis-2-workers" else "memory_server"
    server: LiveServer = request.getfixturevalue(name)
    assert server.proc.poll() is None, f"{server.name} is not running:\n{server.log_tail()}"
    return server


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    """The run's client of `live` for the checks (timeout 30 s: a hang fails the test)."""
    return shared_client(live, "checks")
