"""Fixtures of the end-to-end tests.

The real servers (`memory_server`, `redis_server` on `shared_redis`) are shared with the
other test packages: see tests/support/live_fixtures.py. Here:

- `live`: each of the two in turn (the contract tests run against both).
- Tests that stop Redis or kill a worker start their own (see their modules).
"""

from __future__ import annotations

import pytest

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
