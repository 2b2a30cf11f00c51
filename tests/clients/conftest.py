"""Fixtures of the client tests.

The live servers come from tests/support/live_fixtures.py (`memory_server`, one worker
on the in-process store; `redis_server`, two workers on a private Redis). Here:

- `clean_env`: no `OPTSERVE_*` variable is set (the clients read OPTSERVE_URL and
  OPTSERVE_API_KEY), unless a test sets one;
- `auth_server`: `optserve serve` with API keys (`KEYS`: key -> tenant).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live_server import LiveServer, start_server

#: the API keys of `auth_server`: key -> tenant
KEYS = {"key-alpha": "alpha", "key-beta": "beta"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OPTSERVE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def auth_server(e2e_dir: Path) -> Iterator[LiveServer]:
    """`optserve serve` (in-process store) with the API keys of `KEYS`."""
    server = start_server("auth", e2e_dir, env={"OPTSERVE_API_KEYS": json.dumps(KEYS)})
    try:
        yield server
    finally:
        server.stop()
