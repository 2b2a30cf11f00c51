"""Property-based tests of a real server against `openapi.yaml` (schemathesis).

A real `optserve serve` process (in-process store, API keys on, a free port) is fuzzed
through the `schemathesis run` command, from the committed `openapi.yaml`: its examples,
the coverage and fuzzing phases (valid and invalid data), and stateful sequences along
the document's links (create, then step / read / delete the session). Every response
must be no 5xx, have a declared status and content type, declared headers and a body
matching its schema; unsupported methods get 405 with the right `Allow`; a request
without the key gets 401; a deleted session is gone.

Two checks are left out on purpose: `positive_data_acceptance` (a body can match the
schema and still be refused with 422: gradients must match the session's tensors, and
random bytes are no safetensors file) and `negative_data_rejection` (the core parses
specs in pydantic's lax mode: `"per_tensor": 0` in `transforms` is taken as false).

`OPTSERVE_SCHEMATHESIS_SEED` picks the seed (fixed by default: the same run each time);
`OPTSERVE_SCHEMATHESIS_EXAMPLES` the examples per operation (default 25).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_YAML = ROOT / "openapi.yaml"
API_KEY = "e2e-schema-key"
SEED = os.environ.get("OPTSERVE_SCHEMATHESIS_SEED", "20240601")
EXAMPLES = os.environ.get("OPTSERVE_SCHEMATHESIS_EXAMPLES", "25")
#: seconds one schemathesis run may take before the test fails
DEADLINE = 150
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "missing_required_header",
]


def _operation_count() -> int:
    """How many operations openapi.yaml describes (each method of each path)."""
    doc = yaml.safe_load(OPENAPI_YAML.read_text())
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return sum(len(methods & set(item)) for item in doc["paths"].values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real `optserve serve` (in-process store, one API key)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env["OPTSERVE_API_KEYS"] = json.dumps({API_KEY: "e2e"})
    # generated `min_version`s and sync `wait`s would each hold a request for up to a
    # minute: the conformance of a wait's answers does not depend on its length
    env["OPTSERVE_MAX_WAIT"] = "0.2"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready in 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _schemathesis(base: str, cwd: Path, *extra: str) -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(OPENAPI_YAML),
        "--url",
        base,
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        EXAMPLES,
        "--seed",
        SEED,
        "--generation-database",
        "none",
        "--request-timeout",
        "20",
        "--no-color",
        *extra,
    ]
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        pytest.fail(f"schemathesis took over {DEADLINE} s:\n{out[-6000:]}")
    return done.returncode, done.stdout + done.stderr


def _report(output: str) -> str:
    """The failures and the summary of a run (the progress lines above are noise)."""
    start = output.find("=== FAILURES ===")
    if start < 0:
        start = output.find("=== SUMMARY ===")
    return output[max(start - 40, 0) :][-12000:]


def test_the_server_serves_openapi_yaml(server: str) -> None:
    """The running server describes itself exactly as the committed file does."""
    served = httpx.get(f"{server}/openapi.json", timeout=10).json()
    committed = yaml.safe_load(OPENAPI_YAML.read_text(encoding="utf-8"))
    assert served == committed, "openapi.yaml is stale: run `optserve openapi -o openapi.yaml`"


@pytest.mark.slow
def test_the_server_conforms_to_openapi_yaml(server: str, tmp_path: Path) -> None:
    rc, output = _schemathesis(server, tmp_path)
    print(output)
    assert rc == 0, f"schemathesis found failures (seed {SEED}):\n{_report(output)}"
    operations = _operation_count()
    assert f"Tested: {operations}" in output, _report(output)  # every operation of it
    assert "✅ Stateful" in output, _report(output)  # the links were followed


@pytest.mark.slow
def test_binary_responses_conform(server: str, tmp_path: Path) -> None:
    """The same, asking for safetensors: the tensor-bearing operations answer
    `application/octet-stream`, which the document declares."""
    rc, output = _schemathesis(
        server,
        tmp_path,
        "--header",
        "Accept: application/octet-stream",
        "--include-operation-id",
        "getParams",
        "--include-operation-id",
        "stepSession",
        "--include-operation-id",
        "createSession",
        "--phases",
        "examples,stateful",
    )
    print(output)
    assert rc == 0, f"schemathesis found failures (seed {SEED}):\n{_report(output)}"
