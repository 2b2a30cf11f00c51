"""Fixtures of the API tests: the app in process, over each store.

`store_kind` runs a test against the in-process store and against the Redis store on
the local Redis (`OPTSERVE_TEST_REDIS_URL`, default redis://127.0.0.1:6379/0, under a
key prefix private to the test); the Redis parameter is skipped, saying why, when
service/store/redis_store.py cannot be imported or no Redis answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from service.store.base import StateStore
from tests.api.support import Api, base_store, open_api


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest_asyncio.fixture
async def store(store_kind: str) -> AsyncIterator[StateStore]:
    """A fresh, unopened store of each kind (the app opens and closes it)."""
    async with base_store(store_kind) as s:
        yield s


@pytest_asyncio.fixture
async def api(store: StateStore) -> AsyncIterator[Api]:
    """A client of `create_app(settings, store)` with the default test settings."""
    async with open_api(store) as a:
        yield a
