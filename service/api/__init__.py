"""The HTTP API (docs/api.md): routers, request/response schemas, wire codecs, errors.

`service.app.create_app` assembles it. Modules: `engine` (the domain flow: validation,
the step transaction, idempotency, the replica cache; no FastAPI), `codecs` (JSON via
orjson, safetensors), `schemas` (pydantic models), `errors` (problem+json), `auth`
(Bearer keys -> tenant, shared dependencies), `metrics` (Prometheus), and one router per
resource: `routes_sessions`, `routes_schedules`, `routes_health`.
"""
