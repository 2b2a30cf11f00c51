"""Settings, read once from `OPTSERVE_*` environment variables (pydantic-settings).

The `optserve serve` flags set the same fields; tests override `get_settings` (FastAPI
dependency) or build `Settings(...)` directly and pass it to `create_app`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every setting of the server; env var `OPTSERVE_<NAME>` (e.g. OPTSERVE_REDIS_URL)."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1)] = 1
    #: Redis URL (redis://host:port/db, or redis+cluster://host:port[,host:port...] for a
    #: Redis Cluster); None: the in-process store (embedded default)
    redis_url: str | None = None
    #: API key -> tenant (env: a JSON object); empty: no authentication
    api_keys: dict[str, str] = Field(default_factory=dict)
    #: serving on a non-loopback address with no API keys needs this
    allow_unauthenticated: bool = False
    #: largest request body accepted (413 above)
    max_body_bytes: Annotated[int, Field(ge=1024)] = 512 * MiB
    #: largest JSON (any body but safetensors) request body accepted (413 above); at most
    #: `max_body_bytes` (a larger value is lowered to it). Parsed JSON costs many times its
    #: size in memory (a Python object per number), so large tensors travel as safetensors
    max_json_body_bytes: Annotated[int, Field(ge=1024)] = 64 * MiB
    #: most parameters (elements over all tensors) one session may hold
    max_params: Annotated[int, Field(ge=1)] = 200_000_000
    #: most tensors one session may hold (every step and export costs a little per tensor)
    max_tensors: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    #: idle seconds before a session expires (refreshed on use); None: never
    session_ttl: Annotated[int, Field(ge=1)] | None = 7 * 24 * 3600
    #: seconds an Idempotency-Key's recorded response is kept
    idempotency_ttl: Annotated[int, Field(ge=1)] = 24 * 3600
    #: seconds of lease on an in-flight Idempotency-Key: the request holding it renews it
    #: every third of this while it works, so a claim outlives a killed holder by at most
    #: this long (a retry meanwhile gets 409 with Retry-After)
    idempotency_lock_ttl: Annotated[int, Field(ge=1, le=3600)] = 10
    #: sessions whose latest state a replica keeps in memory (LRU), and their byte budget
    cache_sessions: Annotated[int, Field(ge=0)] = 256
    cache_bytes: Annotated[int, Field(ge=0)] = 2048 * MiB
    #: largest single Redis value written (blobs are split into chunks of this size)
    chunk_bytes: Annotated[int, Field(ge=1024, le=256 * MiB)] = 64 * MiB
    #: Retry-After seconds sent with 503 when the store is unreachable
    retry_after: Annotated[int, Field(ge=1)] = 1
    #: how often a step recomputes after a version conflict before answering 409
    max_commit_retries: Annotated[int, Field(ge=1)] = 100
    #: most history entries a session may keep (`"history": N` at creation)
    max_history: Annotated[int, Field(ge=0)] = 10_000
    #: longest wait a request may ask for (a sync push's `wait`, a `min_version` timeout)
    max_wait: Annotated[float, Field(gt=0, le=600)] = 60.0
    log_level: str = "info"
    #: "json": one JSON object per log line, with the request id (service/logs.py);
    #: "text": plain lines
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _json_body_within_body(self) -> Settings:
        self.max_json_body_bytes = min(self.max_json_body_bytes, self.max_body_bytes)
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once (override this dependency in tests)."""
    return Settings()
