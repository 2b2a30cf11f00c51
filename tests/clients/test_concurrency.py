"""One `AsyncOptimizerClient`, many tasks: 32 workers on one event loop, each stepping a
session of its own 20 times, against each live server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clients import AsyncOptimizerClient, StepResult
from tests.api.support import core_run
from tests.support.live_server import LiveServer

WORKERS = 32
STEPS = 20
OPTIMIZER = {"name": "adam", "lr": 0.01}


def grads_of(worker: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([3, worker])
    return [{"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)} for _ in range(STEPS)]


def params_of(worker: int) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 5), float(worker)), "b": np.zeros(5)}


@pytest.mark.asyncio
@pytest.mark.parametrize("server_name", ["memory_server", "redis_server"])
async def test_concurrent_workers_on_one_loop(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    server: LiveServer = request.getfixturevalue(server_name)

    async def worker(client: AsyncOptimizerClient, i: int) -> tuple[str, list[StepResult]]:
        session = await client.create_session(params_of(i), OPTIMIZER, dtype="float64")
        results = [await client.step(session.id, g) for g in grads_of(i)]
        return session.id, results

    async with AsyncOptimizerClient(server.base_url) as client:
        done = await asyncio.gather(*(worker(client, i) for i in range(WORKERS)))
        finals = await asyncio.gather(*(client.get_params(sid) for sid, _ in done))
    assert len({sid for sid, _ in done}) == WORKERS
    for i, ((_, results), final) in enumerate(zip(done, finals, strict=True)):
        expected, _ = core_run(OPTIMIZER, params_of(i), grads_of(i), "float64")
        assert [r.step for r in results] == list(range(1, STEPS + 1))
        assert (final.step, final.version) == (STEPS, STEPS)
        for name in ("w", "b"):
            np.testing.assert_array_equal(final.params[name], expected[-1][name])
