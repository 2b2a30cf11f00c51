"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import PrivateRedis, free_port, redis_server_missing

#: the live `optserve serve` fixtures (memory_server, redis_server), shared by every package
pytest_plugins = ["tests.support.live_fixtures"]


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A private redis-server without persistence (skipped when `redis-server` is not
    installed); stopped by its pid at the end."""
    reason = redis_server_missing()
    if reason:
        pytest.skip(reason)
    server = PrivateRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
