"""The FastAPI application: `create_app(settings, store)`, and `app_factory` for uvicorn.

The lifespan opens the state store (the Redis store when `settings.redis_url` is set,
else the in-process store, the embedded default whose state is lost on exit), logs which
one as its first line, and warms the numba kernels in a worker thread (in each worker
process, after uvicorn forked it: GNU OpenMP is not fork-safe). Routers: sessions and
schedules under `/v1`, health and metrics outside. Every refusal is problem+json
(`service.api.errors`), JSON is rendered by orjson. Request bodies are held to
`max_body_bytes` (`BodyLimit`), and JSON bodies, which cost many times their size once
parsed, to `max_json_body_bytes` (both in `BodyLimit`), before anything reads them.

`optserve serve` runs `uvicorn service.app:app_factory --factory`: each worker builds
its app from the `OPTSERVE_*` environment, which the command sets from its flags.
"""

from __future__ import annotations

import gc
import logging
import logging.config
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import anyio.to_thread
from fastapi import FastAPI

from service.api import (
    metrics,
    openapi,
    routes_federated,
    routes_health,
    routes_schedules,
    routes_sessions,
    routes_state,
    routes_training,
    routes_ui,
)
from service.api.errors import BodyLimit, install_handlers
from service.api.responses import FastJSONResponse
from service.config import Settings, get_settings
from service.logs import RequestId, log_config
from service.sessions.engine import Engine
from service.store.base import StateStore, StoreUnavailable

log = logging.getLogger("optserve")

DESCRIPTION = (
    "An optimizer as a service: register params, send gradients, get the new params "
    "and the learning rate used. Tensors travel as JSON nested lists or as safetensors "
    "(`application/octet-stream`). Errors are RFC 9457 problem+json."
)


def make_store(settings: Settings) -> StateStore:
    """The store the settings ask for (imported lazily: only the one in use is loaded)."""
    if settings.redis_url:
        from service.store.redis_store import RedisStore

        return RedisStore(settings.redis_url, chunk_bytes=settings.chunk_bytes)
    from service.store.memory import MemoryStore

    return MemoryStore()


def describe_store(settings: Settings, store: StateStore) -> str:
    """The log line naming the store in use (a Redis password is never printed)."""
    kind = type(store).__name__
    if kind == "MemoryStore":
        return "store: in-process (embedded default; state is lost on exit)"
    url = getattr(store, "url", None) or settings.redis_url
    if kind == "RedisStore" and isinstance(url, str):
        return f"store: redis at {redact_url(url)}"
    return f"store: {getattr(store, 'name', kind)}"


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`."""
    if "," in url.split("?", 1)[0]:  # redis+cluster://h1:p1,h2:p2: not one netloc
        scheme, sep, rest = url.partition("://")
        end = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0] or [len(rest)])
        userinfo, at, hosts = rest[:end].rpartition("@")
        if not sep or not at or ":" not in userinfo:
            return url
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}{rest[end:]}"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def create_app(settings: Settings | None = None, store: StateStore | None = None) -> FastAPI:
    """The application. `store` (if given) is used instead of the one the settings name;
    either way the app opens it on startup and closes it on shutdown."""
    settings = settings or get_settings()
    the_store = store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal the_store
        if the_store is None:
            the_store = make_store(settings)
        log.info(describe_store(settings, the_store))
        try:
            await the_store.open()
        except StoreUnavailable as exc:
            log.warning("the store does not answer yet (%s): /readyz says 503 until it does", exc)
        app.state.engine = Engine(settings, the_store)
        from service.core.optim import kernels

        seconds = await anyio.to_thread.run_sync(kernels.warm_up)
        log.info("optimizer kernels ready in %.2f s (pid %d)", seconds, os.getpid())
        # start-up objects (modules, schemas, compiled kernels) never die: keep them out
        # of the collector's scans, and collect the young generation less often; cyclic
        # GC was ~85 us of a ~750 us small step and set the p99 (benchmarks/service.py)
        gc.freeze()
        gc.set_threshold(20_000, 50, 1_000)
        try:
            yield
        finally:
            await the_store.close()
            metrics.mark_process_dead(os.getpid())

    app = FastAPI(
        title="optserve",
        version="1",
        summary="An optimizer as a service",
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
    )
    app.state.settings = settings
    install_handlers(app, settings)
    app.include_router(routes_state.router)
    app.include_router(routes_sessions.router)
    app.include_router(routes_training.router)
    app.include_router(routes_federated.router)
    app.include_router(routes_schedules.router)
    app.include_router(routes_health.router)
    app.include_router(routes_ui.router)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, json_limit=settings.max_json_body_bytes
    )
    app.add_middleware(metrics.RequestMetrics)
    app.add_middleware(RequestId)  # outermost: every answer and log line has the id
    openapi.install(app)
    return app


def app_factory() -> FastAPI:
    """For uvicorn (`factory=True`): settings from the `OPTSERVE_*` environment."""
    settings = get_settings()
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    return create_app(settings)
