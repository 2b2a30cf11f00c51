"""The OpenAPI document: `openapi.yaml` is what the app says, it describes docs/api.md, and
its examples are right (valid against their own schemas, accepted by the server)."""

from __future__ import annotations

import difflib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from fastapi.routing import APIRoute
from jsonschema import Draft202012Validator

from service.api import (
    routes_federated,
    routes_health,
    routes_schedules,
    routes_sessions,
    routes_state,
    routes_training,
)
from service.api.openapi import to_yaml
from service.api.openapi_route import VERBATIM
from service.app import create_app
from service.cli import main
from service.store.memory import MemoryStore
from tests.api.support import Api, make_settings, open_api

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_YAML = ROOT / "openapi.yaml"
REGENERATE = "optserve openapi -o openapi.yaml"
JSON = "application/json"
BINARY = "application/octet-stream"
PROBLEM = "application/problem+json"

#: every operation of docs/api.md: (path, method) -> statuses it can answer
API_MD: dict[tuple[str, str], set[str]] = {
    ("/v1/sessions", "post"): {"201", "400", "401", "413", "415", "422", "503"},
    ("/v1/sessions", "get"): {"200", "401", "422", "503"},
    ("/v1/sessions/{session_id}", "get"): {"200", "401", "404", "503"},
    ("/v1/sessions/{session_id}", "delete"): {"204", "401", "404", "503"},
    ("/v1/sessions/{session_id}/params", "get"): {
        *("200", "401", "404", "503"),
        *("408", "409", "422"),  # average / min_version (docs/training.md)
    },
    ("/v1/sessions/{session_id}/step", "post"): {
        "200",
        "202",
        "400",
        "401",
        "404",
        "406",  # a replay that cannot be given in the asked format (docs/training.md)
        "409",
        "413",
        "415",
        "422",
        "503",
    },
    ("/v1/schedules/preview", "post"): {"200", "400", "401", "413", "415", "422"},
    # docs/training.md
    ("/v1/schedules/preview.png", "post"): {"200", "400", "401", "413", "415", "422"},
    ("/v1/sessions/{session_id}/metrics", "post"): {
        *("200", "400", "401", "404", "409", "413", "415", "422", "503"),
    },
    ("/v1/sessions/{session_id}/history", "get"): {"200", "401", "404", "422", "503"},
    ("/v1/sessions/{session_id}/lr-finder", "get"): {"200", "401", "404", "409", "503"},
    ("/v1/sessions/{session_id}/lr-finder.png", "get"): {"200", "401", "404", "409", "503"},
    ("/v1/sessions/{session_id}/schedule.png", "get"): {"200", "401", "404", "422", "503"},
    # docs/federated.md
    ("/v1/sessions/{session_id}/round", "get"): {"200", "401", "404", "409", "503"},
    ("/v1/sessions/{session_id}/rounds/{round}/updates", "post"): {
        *("200", "400", "401", "404", "409", "413", "415", "422", "503"),
    },
    # docs/state.md
    ("/v1/sessions/import", "post"): {"201", "400", "401", "413", "415", "422", "503"},
    ("/v1/sessions/{session_id}/state", "get"): {"200", "401", "404", "503"},
    ("/v1/sessions/{session_id}/state", "put"): {
        *("200", "400", "401", "404", "409", "413", "415", "422", "503"),
    },
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
}
TENSOR_BODIES = {("/v1/sessions", "post"), ("/v1/sessions/{session_id}/step", "post")}
TENSOR_RESPONSES = {
    ("/v1/sessions/{session_id}/params", "get"),
    ("/v1/sessions/{session_id}/step", "post"),
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    """The document of `create_app(...)`, as JSON serves it."""
    served: dict[str, Any] = json.loads(json.dumps(create_app(make_settings()).openapi()))
    return served


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


# --- openapi.yaml ------------------------------------------------------------------------


def test_openapi_yaml_is_the_apps_document(doc: dict[str, Any]) -> None:
    assert OPENAPI_YAML.exists(), f"openapi.yaml is missing: run `{REGENERATE}`"
    committed = OPENAPI_YAML.read_text(encoding="utf-8")
    expected = to_yaml(doc)
    if committed != expected:
        diff = difflib.unified_diff(
            committed.splitlines(), expected.splitlines(), "openapi.yaml", "app.openapi()", n=1
        )
        shown = "\n".join(list(diff)[:60])
        pytest.fail(
            f"openapi.yaml differs from create_app().openapi(): regenerate it with "
            f"`{REGENERATE}` (and commit it)\n{shown}"
        )
    assert yaml.safe_load(committed) == doc


def test_the_command_reproduces_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "openapi.yaml"
    assert main(["openapi", "-o", str(out)]) == 0
    assert out.read_bytes() == OPENAPI_YAML.read_bytes(), f"run `{REGENERATE}`"
    capsys.readouterr()
    assert main(["openapi"]) == 0
    assert capsys.readouterr().out == OPENAPI_YAML.read_text(encoding="utf-8")


def test_the_yaml_is_deterministic(doc: dict[str, Any]) -> None:
    again = json.loads(json.dumps(create_app(make_settings(api_keys={"k": "t"})).openapi()))
    assert to_yaml(again) == to_yaml(doc)
    assert "&id" not in to_yaml(doc)  # no YAML anchors: plain data


# --- what it describes -------------------------------------------------------------------


def test_every_operation_of_api_md(doc: dict[str, Any]) -> None:
    found = {(path, method) for path, method, _ in operations(doc)}
    assert set(API_MD) <= found, f"missing: {sorted(set(API_MD) - found)}"
    assert found == set(API_MD), f"undocumented in this test: {sorted(found - set(API_MD))}"
    for (path, method), statuses in API_MD.items():
        op = doc["paths"][path][method]
        assert set(op["responses"]) == statuses, (path, method)
        assert op["operationId"], (path, method)


def test_refusals_are_problems(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert {"Problem", "ProblemField"} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 is never sent
    for path, method, op in operations(doc):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            content = response["content"]
            assert set(content) == {PROBLEM}, (path, method, status)
            assert content[PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert content[PROBLEM]["examples"], (path, method, status)
            if status == "503":
                assert "Retry-After" in response["headers"]
            if status == "401":
                assert "WWW-Authenticate" in response["headers"]


def test_request_bodies_in_both_media_types(doc: dict[str, Any]) -> None:
    for path, method in TENSOR_BODIES:
        body = doc["paths"][path][method]["requestBody"]
        assert body["required"] is True
        content = body["content"]
        assert set(content) == {JSON, BINARY}
        assert content[JSON]["schema"]["$ref"].startswith("#/components/schemas/")
        assert content[JSON]["examples"]
        binary = content[BINARY]["schema"]
        assert binary["type"] == "string"
        assert binary["format"] == "binary"
        assert "safetensors" in binary["description"]
        assert "__metadata__" in binary["description"]
    preview = doc["paths"]["/v1/schedules/preview"]["post"]["requestBody"]["content"]
    assert set(preview) == {JSON}
    assert preview[JSON]["examples"]


def test_tensor_responses_negotiate_accept(doc: dict[str, Any]) -> None:
    for path, method in TENSOR_RESPONSES:
        op = doc["paths"][path][method]
        content = op["responses"]["200"]["content"]
        assert set(content) == {JSON, BINARY}
        assert "__metadata__" in content[BINARY]["schema"]["description"]
        assert "Accept: application/octet-stream" in op["description"]
    assert "Accept" in doc["info"]["description"]


def test_idempotency_key_on_step(doc: dict[str, Any]) -> None:
    step = doc["paths"]["/v1/sessions/{session_id}/step"]["post"]
    (key,) = [p for p in step["parameters"] if p["in"] == "header"]
    assert key["name"] == "Idempotency-Key"
    assert key["required"] is False
    assert key["schema"]["type"] == "string"
    assert key["schema"]["maxLength"] == 255
    assert "Idempotent-Replayed" in step["responses"]["200"]["headers"]


def test_bearer_security(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    (name,) = [n for n, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"]
    for path, _, op in operations(doc):
        if path.startswith("/v1/"):
            assert op["security"] == [{name: []}], path
        else:
            assert "security" not in op, path


def test_links_from_a_created_session(doc: dict[str, Any]) -> None:
    links = doc["paths"]["/v1/sessions"]["post"]["responses"]["201"]["links"]
    ids = {op["operationId"] for _, _, op in operations(doc)}
    assert {link["operationId"] for link in links.values()} <= ids
    assert all(
        link["parameters"] == {"session_id": "$response.body#/id"} for link in links.values()
    )


def _api_routes() -> Iterator[APIRoute]:
    """The routes of the document, as their routers declare them."""
    for module in (
        routes_sessions,
        routes_state,
        routes_training,
        routes_federated,
        routes_schedules,
        routes_health,
    ):
        for route in module.router.routes:
            if isinstance(route, APIRoute) and route.include_in_schema:
                yield route


def test_the_answers_are_the_routes_response_models(doc: dict[str, Any]) -> None:
    """A route's `response_model` is the schema of its success answer in the document (and
    a second success status, the 202 of a step, its `model`)."""
    checked = 0
    for route in _api_routes():
        for method in route.methods:
            responses = doc["paths"][route.path_format][method.lower()]["responses"]
            declared = {str(route.status_code or 200): route.response_model}
            declared |= {str(s): r["model"] for s, r in route.responses.items() if "model" in r}
            for status, model in declared.items():
                if model is None:
                    continue
                schema = responses[status]["content"][JSON]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{model.__name__}"}, route.path
                checked += 1
    assert checked >= 15


def test_declarations_arrive_verbatim(doc: dict[str, Any]) -> None:
    """What a route declares past FastAPI's encoder (examples and headers) is unpacked,
    nulls and integers as written."""
    assert VERBATIM not in json.dumps(doc)
    step = doc["paths"]["/v1/sessions/{session_id}/step"]["post"]["responses"]
    assert step["200"]["content"][JSON]["examples"]["none"]["value"]["staleness"] is None
    assert step["503"]["headers"]["Retry-After"]["schema"]["minimum"] == 1
    assert isinstance(step["503"]["headers"]["Retry-After"]["schema"]["minimum"], int)
    assert step["202"]["description"].startswith("a sync push accumulated")


# --- examples ----------------------------------------------------------------------------


def _pointer(parts: list[str]) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _collect_examples(node: Any, at: list[str], out: list[tuple[str, str, Any]]) -> None:
    """(schema pointer, where, example) for every example in the document: the JSON
    Schema keyword `examples` (a list, checked against the schema holding it) and the
    OpenAPI `examples` (a map of Example Objects) and `example` of media types and
    parameters (checked against their `schema`)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _collect_examples(item, [*at, str(i)], out)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = _pointer([*at, key])
        if key == "examples" and isinstance(value, list):
            out.extend((_pointer(at), f"{where}/{i}", v) for i, v in enumerate(value))
        elif key == "examples" and isinstance(value, dict) and "schema" in node:
            schema = _pointer([*at, "schema"])
            out.extend((schema, f"{where}/{k}", v["value"]) for k, v in value.items())
        elif key == "example":
            schema = _pointer([*at, "schema"] if "schema" in node else at)
            out.append((schema, where, value))
        else:
            _collect_examples(value, [*at, key], out)


def test_every_example_matches_its_schema(doc: dict[str, Any]) -> None:
    examples: list[tuple[str, str, Any]] = []
    _collect_examples(doc, [], examples)
    wheres = {where for _, where, _ in examples}
    # the examples of docs/api.md are there, and more
    for op_path in (
        "/paths/~1v1~1sessions/post/requestBody/content/application~1json/examples/adam_cosine",
        "/paths/~1v1~1sessions~1{session_id}~1step/post/requestBody/content/application~1json"
        "/examples/params",
        "/paths/~1v1~1schedules~1preview/post/requestBody/content/application~1json/examples/step",
        "/paths/~1v1~1sessions/post/responses/201/content/application~1json/examples/created",
        "/paths/~1v1~1sessions~1{session_id}~1params/get/responses/200/content/application~1json"
        "/examples/params",
    ):
        assert f"#{op_path}" in wheres, op_path
    assert len(examples) > 50
    checked = 0
    for schema_at, where, example in examples:
        # the whole document is the root resource, so that "#/components/..." resolves
        validator = Draft202012Validator({**doc, "$ref": schema_at})
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(example)
        ]
        assert not errors, f"{where} does not match {schema_at}: {errors}"
        checked += 1
    assert checked == len(examples)


def test_a_wrong_example_is_caught(doc: dict[str, Any]) -> None:
    """The check above can fail: a step response without `version` does not validate."""
    validator = Draft202012Validator({**doc, "$ref": "#/components/schemas/StepResponse"})
    assert not validator.is_valid({"step": 1, "lr": 0.1})


@pytest_asyncio.fixture
async def api() -> AsyncIterator[Api]:
    async with open_api(MemoryStore()) as a:
        yield a


def _content(doc: dict[str, Any], path: str, method: str, status: str | None = None) -> Any:
    op = doc["paths"][path][method]
    if status is None:
        return op["requestBody"]["content"][JSON]["examples"]
    return op["responses"][status]["content"][JSON]["examples"]


def _same(got: Any, want: Any, ignore: frozenset[str] = frozenset()) -> None:
    """`got` is `want` (floats to 1e-6, keys in `ignore` left out at the top)."""
    if isinstance(want, dict):
        assert isinstance(got, dict)
        assert set(got) - ignore == set(want) - ignore
        for k in set(want) - ignore:
            _same(got[k], want[k])
    elif isinstance(want, list):
        assert isinstance(got, list)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    else:
        assert got == want


@pytest.mark.asyncio
async def test_request_examples_are_accepted(api: Api, doc: dict[str, Any]) -> None:
    create = _content(doc, "/v1/sessions", "post")
    step = _content(doc, "/v1/sessions/{session_id}/step", "post")
    preview = _content(doc, "/v1/schedules/preview", "post")
    step_schema = Draft202012Validator({**doc, "$ref": "#/components/schemas/StepResponse"})
    for example in create.values():
        r = await api.client.post("/v1/sessions", json=example["value"])
        assert r.status_code == 201, r.text
        sid, names = r.json()["id"], set(r.json()["params"])
        for body in step.values():
            if set(body["value"]["grads"]) != names:
                continue  # the step examples are for the params of docs/api.md
            r = await api.step(sid, body["value"])
            assert r.status_code == 200, r.text
            assert step_schema.is_valid(r.json())
    for example in preview.values():
        r = await api.client.post("/v1/schedules/preview", json=example["value"])
        assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_response_examples_are_real_answers(api: Api, doc: dict[str, Any]) -> None:
    """The answers documented are those of the docs/api.md session after its docs/api.md steps."""
    sessions, one = "/v1/sessions", "/v1/sessions/{session_id}"
    created = await api.client.post(
        sessions, json=_content(doc, sessions, "post")["adam_cosine"]["value"]
    )
    moments = frozenset({"id", "created_at", "updated_at"})
    _same(created.json(), _content(doc, sessions, "post", "201")["created"]["value"], moments)
    sid = created.json()["id"]
    step_body = _content(doc, f"{one}/step", "post")["params"]["value"]
    steps = _content(doc, f"{one}/step", "post", "200")
    for _ in range(2):
        assert (await api.step(sid, step_body)).status_code == 200
    third = (await api.step(sid, step_body)).json()
    _same(third, steps["params"]["value"])
    params = (await api.client.get(f"/v1/sessions/{sid}/params")).json()
    _same(params, _content(doc, f"{one}/params", "get", "200")["params"]["value"])
    fourth = await api.step(sid, {**step_body, "return": "updates"})
    _same(fourth.json(), steps["updates"]["value"])
    got = (await api.client.get(f"/v1/sessions/{sid}")).json()
    _same(got, _content(doc, one, "get", "200")["after_4_steps"]["value"], moments)
    previews = _content(doc, "/v1/schedules/preview", "post", "200")
    for name, example in previews.items():
        body = _content(doc, "/v1/schedules/preview", "post")[name]["value"]
        r = await api.client.post("/v1/schedules/preview", json=body)
        _same(r.json(), example["value"])
