"""The HTTP API (docs/api.md): routers, response schemas, problem+json, the OpenAPI
document. No session logic: each route reads HTTP (path, headers, body, Accept, the
tenant from its Bearer key), calls the sessions layer (`service.sessions.Engine`) and
sends its answer.

`service.app.create_app` assembles it. Modules: `auth` (Bearer keys -> tenant, shared
dependencies), `errors` (the one problem+json handler, the HTTP-only refusals, the body
limits), `responses` (orjson rendering), `schemas` (answers; the request models are
`service.sessions.requests`), `metrics` (Prometheus), `openapi` / `openapi_route` /
`openapi_examples` (each route declares its binary bodies, answers and refusals beside
itself; `openapi` finishes the document), and one router per resource:
`routes_sessions`, `routes_training`, `routes_state`, `routes_federated`,
`routes_schedules`, `routes_health`, `routes_ui`.
"""
