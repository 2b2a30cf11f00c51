"""Fixtures of real `optserve serve` processes, shared by every test package (a pytest
plugin, registered in tests/conftest.py, so that one pytest run starts each at most once).

- `shared_redis` / `redis_server`: a private redis-server and `optserve serve --workers
  2 --redis-url ...` on it, shared by the tests of a pytest process (they make their
  own sessions and never stop either).
- `memory_server`: `optserve serve` with the in-process store (one worker).
- Tests that stop Redis or kill a worker start their own (`start_server`).

Every server's output goes to a log file; when a test fails, the tail of each running
server's log is added to its report.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.live_server import RUNNING, LiveServer, start_server
from tests.support.redis_server import PrivateRedis, free_port, redis_server_missing


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for server in list(RUNNING):
            report.sections.append((f"optserve log ({server.name}, tail)", server.log_tail()))
    return report


def need_redis_server() -> None:
    reason = redis_server_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[PrivateRedis]:
    """A private redis-server (no persistence) for the shared 2-worker server."""
    need_redis_server()
    server = PrivateRedis(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(shared_redis: PrivateRedis, e2e_dir: Path) -> Iterator[LiveServer]:
    """`optserve serve --workers 2` on the shared private Redis."""
    server = start_server("redis-2-workers", e2e_dir, workers=2, redis=shared_redis)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def memory_server(e2e_dir: Path) -> Iterator[LiveServer]:
    """`optserve serve` with the in-process store (one worker)."""
    server = start_server("memory", e2e_dir, workers=1)
    try:
        yield server
    finally:
        server.stop()
