"""The sessions layer: what a session is and what can be done to it, without HTTP.

Between the routes (`service.api`, which own status codes, headers, content
negotiation and authentication) and the store and core below: create, read, list,
delete, import and export sessions; the step transaction (parse and check before
anything is written, idempotency claims, a version-checked commit with retries, the
per-replica cache); training modes (async staleness, sync accumulation with its
deadline, LR range test, averages); federated rounds; schedule previews and plots.

`Engine` (engine.py) is its entry point. Refusals are `SessionError`s (errors.py), plain
exceptions carrying the problem the API renders. Request bodies are the pydantic
models of requests.py. Nothing here imports FastAPI, Starlette or `service.api`
(tests/test_import_rules.py).

What a session keeps beside params and state (`meta.extra`) is typed in model.py:
`Pending`, `LastStep` and `RoundRecord` are read and written through their models
(and state files are checked with them).

A push reads one way: `steps.compute_step` -> `accumulation.accumulate` (sync) ->
`stepping.apply_step`, inside `transactions.Transactions._transact`.

Still to come (issue 17): typed outcomes instead of encoded replies (`codecs.Reply` is
built here, inside the commit, for idempotent replays; an `encode` callback from the
API would keep codecs out).
"""
