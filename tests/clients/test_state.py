"""State files in the clients (docs/state.md) against scripted transports: what
`export_state`, `import_state` and `replace_state` send, how their answers are read,
which failures are retried (an import is not, once it may have reached the server), in
both clients; and `clients.state_file.StateFile`, which reads and writes the files."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from clients import (
    AsyncOptimizerClient,
    ConnectionError,
    OptimizerClient,
    OptserveError,
    Session,
    ValidationError,
    tensorfile,
)
from clients.state_file import StateFile
from tests.clients.support import FakeSleep, Script, problem_response, session_doc

BINARY = "application/octet-stream"
SPEC = {
    "format": 1,
    "optimizer": {"name": "adam", "lr": 0.01},
    "dtype": "float64",
    "layout": [["w", [2, 2]], ["b", [3]]],
}


def state_file() -> bytes:
    """A state file as the server writes one."""
    w, b = np.arange(4.0).reshape(2, 2), np.array([0.5, -1.0, 2.0])
    tensors = {
        "params/w": w,
        "params/b": b,
        "state/exp_avg/w": w / 10,
        "state/exp_avg/b": b / 10,
        "state/exp_avg_sq/w": w / 100,
        "state/exp_avg_sq/b": b / 100,
        "scalar/step": np.array(3, dtype=np.int64),
    }
    meta = {
        "format": "optserve.session/1",
        "spec": json.dumps(SPEC, separators=(",", ":")),
        "step": "3",
        "version": "3",
        "skipped": "0",
        "schedule_state": "null",
        "extra": "{}",
        "id": "s1",
        "created_at": "1.5",
        "updated_at": "2.5",
        "lr": "0.01",
    }
    return tensorfile.encode(tensors, meta)


DATA = state_file()


def file_answer(data: bytes = DATA) -> httpx.Response:
    return httpx.Response(200, content=data, headers={"Content-Type": BINARY})


def doc_answer(status: int = 200, **overrides: Any) -> httpx.Response:
    return httpx.Response(status, json=session_doc(**{"step": 3, "version": 3, **overrides}))


def sync_client(script: Script) -> OptimizerClient:
    return OptimizerClient("http://optserve.test", transport=script.sync(), sleep=FakeSleep().sync)


def async_client(script: Script) -> AsyncOptimizerClient:
    return AsyncOptimizerClient(
        "http://optserve.test", transport=httpx.MockTransport(script), sleep=FakeSleep()
    )


# --- the calls ---------------------------------------------------------------------------------


def test_export_state_answers_the_files_bytes() -> None:
    script = Script([httpx.ReadError, file_answer()])  # a read: retried
    with sync_client(script) as client:
        assert client.export_state("s 1") == DATA
    request = script.requests[-1]
    assert (request.method, request.url.raw_path) == ("GET", b"/v1/sessions/s%201/state")
    assert request.headers["accept"] == BINARY
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, json={"not": "a file"}),
        httpx.Response(200, content=b"xx", headers={"Content-Type": BINARY}),
    ],
)
def test_an_answer_that_is_no_state_file(answer: httpx.Response) -> None:
    with (
        sync_client(Script([answer])) as client,
        pytest.raises(OptserveError, match="could not be read"),
    ):
        client.export_state("s1")


def test_import_state_posts_the_file_once() -> None:
    script = Script([doc_answer(201, sid="s2")])
    with sync_client(script) as client:
        session = client.import_state(DATA)
    assert isinstance(session, Session)
    assert (session.id, session.step, session.version) == ("s2", 3, 3)
    request = script.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/sessions/import")
    assert request.headers["content-type"] == BINARY
    assert request.content == DATA
    # lost after sending: not sent again (a second session could be made)
    script = Script([httpx.ReadError, doc_answer(201)])
    with sync_client(script) as client, pytest.raises(ConnectionError):
        client.import_state(DATA)
    assert len(script.requests) == 1
    # not sent at all, or 503: sent again
    script = Script([httpx.ConnectError, problem_response(503), doc_answer(201)])
    with sync_client(script) as client:
        client.import_state(bytearray(DATA))
    assert len(script.requests) == 3
    assert all(r.content == DATA for r in script.requests)


def test_replace_state_puts_the_file_and_is_retried() -> None:
    script = Script([httpx.ReadError, httpx.ReadTimeout, doc_answer(version=9)])
    with sync_client(script) as client:
        session = client.replace_state("s1", memoryview(DATA))
    assert session.version == 9
    assert [(r.method, r.url.path) for r in script.requests] == [
        ("PUT", "/v1/sessions/s1/state")
    ] * 3
    assert all(r.content == DATA and r.headers["content-type"] == BINARY for r in script.requests)


def test_refusals_name_the_tensor() -> None:
    refusal = problem_response(
        422, "validation-error", "missing tensor", [(["body", "params/b"], "missing tensor")]
    )
    with sync_client(Script([refusal])) as client, pytest.raises(ValidationError) as info:
        client.replace_state("s1", DATA)
    assert info.value.errors[0].loc == ("body", "params/b")


def test_a_state_file_is_bytes() -> None:
    with sync_client(Script([doc_answer()])) as client:
        with pytest.raises(TypeError, match="a state file is bytes"):
            client.import_state({"w": np.zeros(2)})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="a state file is bytes"):
            client.replace_state("s1", "text")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_async_client_does_the_same() -> None:
    script = Script([file_answer(), doc_answer(201, sid="s2"), httpx.ReadError, doc_answer()])
    async with async_client(script) as client:
        assert await client.export_state("s1") == DATA
        assert (await client.import_state(DATA)).id == "s2"
        assert (await client.replace_state("s2", DATA)).version == 3
    assert [(r.method, r.url.path) for r in script.requests] == [
        ("GET", "/v1/sessions/s1/state"),
        ("POST", "/v1/sessions/import"),
        ("PUT", "/v1/sessions/s2/state"),
        ("PUT", "/v1/sessions/s2/state"),
    ]
    script = Script([httpx.ReadError, doc_answer(201)])
    async with async_client(script) as client:
        with pytest.raises(ConnectionError):
            await client.import_state(DATA)
    assert len(script.requests) == 1


# --- StateFile -------------------------------------------------------------------------------


def test_a_state_file_reads_and_writes_back_the_same_bytes() -> None:
    file = StateFile.from_bytes(DATA)
    assert file.names == ["w", "b"]
    assert list(file.arrays) == ["exp_avg", "exp_avg_sq"]
    assert list(file.arrays["exp_avg"]) == ["w", "b"]
    assert file.scalars == {"step": 3}
    assert type(file.scalars["step"]) is int
    assert (file.step, file.version, file.lr, file.dtype) == (3, 3, 0.01, np.dtype("float64"))
    assert file.optimizer == {"name": "adam", "lr": 0.01}
    assert (file.schedule_state, file.extra) == (None, {})
    assert file.to_bytes() == DATA


def test_build_makes_a_file_as_the_server_writes_it() -> None:
    file = StateFile.from_bytes(DATA)
    built = StateFile.build(
        {"optimizer": SPEC["optimizer"], "dtype": "float64"},
        file.params,
        file.arrays,
        file.scalars,
        step=3,
        lr=0.01,
    )
    tensors, meta = tensorfile.decode(built.to_bytes())
    want_tensors, want_meta = tensorfile.decode(DATA)
    assert list(tensors) == list(want_tensors)
    assert all(tensors[k].tobytes() == want_tensors[k].tobytes() for k in tensors)
    informational = {"id", "created_at", "updated_at"}
    assert meta == {k: v for k, v in want_meta.items() if k not in informational}
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        StateFile.build(SPEC, file.params, {}, {}, step=-1)


@pytest.mark.parametrize(
    ("tensors", "meta", "match"),
    [
        ({}, {"format": "optserve.state/1"}, "not a session state file"),
        ({}, {"format": "optserve.session/1", "spec": "{}"}, "no readable layout"),
        (
            {"params/w": np.zeros((2, 2))},
            {"format": "optserve.session/1", "spec": json.dumps(SPEC)},
            r"params: tensors \['w'\], the layout \['b', 'w'\]",
        ),
        (
            {"weights/w": np.zeros((2, 2))},
            {"format": "optserve.session/1", "spec": json.dumps(SPEC)},
            "not a state file's tensor: 'weights/w'",
        ),
    ],
)
def test_what_is_no_state_file(tensors: dict[str, Any], meta: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StateFile.from_bytes(tensorfile.encode(tensors, meta))
