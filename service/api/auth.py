"""Bearer API keys: key -> tenant (settings.api_keys); the shared route dependencies.

With no keys configured, authentication is off and every request is tenant `public`.
With keys, every `/v1` request needs `Authorization: Bearer <key>` (401 otherwise).
The key is compared with every configured key by `hmac.compare_digest`, and the loop
never stops early, so the time taken does not tell how much of a key was right nor
which key matched. A session belongs to the tenant that created it; another tenant
gets 404 for it, exactly as for an id that does not exist (the engine checks).

The `Annotated[..., Depends(...)]` aliases every router shares live here too: `Tenant`,
`SettingsDep` and `EngineDep`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import Unauthorized
from service.config import Settings
from service.sessions.engine import Engine

PUBLIC_TENANT = "public"


def tenant_for(authorization: str | None, api_keys: Mapping[str, str]) -> str:
    """The tenant a request acts for; raises `Unauthorized` (401)."""
    if not api_keys:
        return PUBLIC_TENANT
    if not authorization:
        raise Unauthorized()
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    given = token.encode()
    found: str | None = None
    for key, tenant in api_keys.items():
        if hmac.compare_digest(given, key.encode()) and found is None:
            found = tenant
    if found is None:
        raise Unauthorized("unknown API key")
    return found


# --- FastAPI dependencies ----------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from the server's OPTSERVE_API_KEYS (when authentication is on).",
)


async def app_settings(request: Request) -> Settings:
    """The settings the application was made with (`create_app` keeps them in app.state).

    An `async def` reading app.state, not a `dependency_overrides` entry: FastAPI
    re-analyses every sub-dependency per request when overrides are set, and runs a
    plain `def` dependency in the thread pool; together that was a third of a small
    step's CPU (measured with py-spy under wrk, benchmarks/service.py)."""
    settings: Settings = request.app.state.settings
    return settings


async def get_tenant(
    settings: Annotated[Settings, Depends(app_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The requesting tenant (401 when keys are configured and none valid was sent)."""
    if not settings.api_keys:
        return PUBLIC_TENANT
    token = credentials.credentials if credentials is not None else None
    return tenant_for(f"Bearer {token}" if token else None, settings.api_keys)


async def get_engine(request: Request) -> Engine:
    """The application's engine (made by `create_app`)."""
    engine: Engine = request.app.state.engine
    return engine


#: the tenant a request acts for
Tenant = Annotated[str, Depends(get_tenant)]
#: the application's settings (pass them to create_app)
SettingsDep = Annotated[Settings, Depends(app_settings)]
#: the domain engine (store, cache, metrics)
EngineDep = Annotated[Engine, Depends(get_engine)]
