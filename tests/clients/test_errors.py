"""The error tree: each status raises its class, with the problem's members; the real
server's refusals (422 naming the field, 404, 401 with keys, 413) come through."""

from __future__ import annotations

import builtins
import pickle

import httpx
import numpy as np
import pytest

from clients import (
    AsyncOptimizerClient,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    OptimizerClient,
    OptserveError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    TimeoutError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from tests.clients.conftest import KEYS
from tests.clients.support import FakeSleep, Script, problem_response
from tests.support.live_server import MAX_BODY_BYTES, LiveServer
from tests.support.redis_server import free_port

STATUSES: list[tuple[int, type[OptserveError]]] = [
    (400, BadRequestError),
    (401, AuthenticationError),
    (404, NotFoundError),
    (409, ConflictError),
    (413, PayloadTooLargeError),
    (415, UnsupportedMediaTypeError),
    (422, ValidationError),
    (429, RateLimitError),
    (500, InternalServerError),
    (502, BadGatewayError),
    (503, ServiceUnavailableError),
    (504, GatewayTimeoutError),
    (507, InternalServerError),
    (418, OptserveError),
]


def sync_client(script: Script, **kwargs: object) -> OptimizerClient:
    return OptimizerClient(
        "http://optserve.test", transport=script.sync(), sleep=FakeSleep().sync, **kwargs
    )


@pytest.mark.parametrize(("status", "cls"), STATUSES, ids=[str(s) for s, _ in STATUSES])
def test_each_status_raises_its_class(status: int, cls: type[OptserveError]) -> None:
    errors = [(["body", "optimizer", "betas", 0], "must be in [0, 1): got 1.2")]
    answer = problem_response(
        status, "the-slug", "betas[0] must be in [0, 1)", errors, {"Retry-After": "3"}
    )
    script = Script([answer])
    with sync_client(script, max_retries=0) as client, pytest.raises(cls) as info:
        client.get_session("abc")
    exc = info.value
    assert type(exc) is cls
    assert (exc.status, exc.type) == (status, "urn:optserve:problem:the-slug")
    assert (exc.title, exc.detail) == ("The slug", "betas[0] must be in [0, 1)")
    assert [(e.loc, e.msg) for e in exc.errors] == [
        (("body", "optimizer", "betas", 0), "must be in [0, 1): got 1.2")
    ]
    assert exc.errors[0].path == "body.optimizer.betas[0]"
    assert exc.headers["retry-after"] == "3"
    text = str(exc)
    assert text.startswith(f"{status} The slug: betas[0] must be in [0, 1)")
    assert "body.optimizer.betas[0]: must be in [0, 1): got 1.2" in text
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls
    assert again.errors == exc.errors
    assert again.status == status


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "cls"), STATUSES[:8], ids=[str(s) for s, _ in STATUSES[:8]])
async def test_each_status_raises_its_class_async(status: int, cls: type[OptserveError]) -> None:
    script = Script([problem_response(status, detail="no")])
    async with AsyncOptimizerClient(
        "http://optserve.test", transport=httpx.MockTransport(script), max_retries=0
    ) as client:
        with pytest.raises(cls) as info:
            await client.step("abc", {"x": np.zeros(3)})
    assert info.value.status == status
    assert info.value.detail == "no"


def test_hierarchy() -> None:
    assert issubclass(ServiceUnavailableError, InternalServerError)
    assert issubclass(BadGatewayError, ServiceUnavailableError)
    assert issubclass(GatewayTimeoutError, ServiceUnavailableError)
    assert issubclass(ConnectionError, OptserveError)
    assert issubclass(ConnectionError, builtins.ConnectionError)
    assert issubclass(TimeoutError, OptserveError)
    assert issubclass(TimeoutError, builtins.TimeoutError)
    for _, cls in STATUSES:
        assert issubclass(cls, OptserveError)


def test_an_answer_that_is_not_a_problem() -> None:
    html = httpx.Response(502, text="<html>Bad Gateway</html>", headers={"Server": "nginx"})
    with sync_client(Script([html]), max_retries=0) as client, pytest.raises(BadGatewayError) as e:
        client.get_params("abc")
    assert e.value.detail == "<html>Bad Gateway</html>"
    assert e.value.errors == []
    assert str(e.value) == "502 Bad Gateway: <html>Bad Gateway</html>"


def test_an_unreadable_success_is_an_error() -> None:
    garbage = httpx.Response(200, content=b"\x01\x00", headers={"Content-Type": "application/json"})
    with sync_client(Script([garbage])) as client, pytest.raises(OptserveError) as info:
        client.get_session("abc")
    assert "could not be read" in info.value.detail
    binary = httpx.Response(
        200, content=b"\x05\x00\x00\x00\x00\x00\x00\x00{}", headers={"Content-Type": "x"}
    )
    bad_safetensors = httpx.Response(
        200, content=binary.content, headers={"Content-Type": "application/octet-stream"}
    )
    with sync_client(Script([bad_safetensors])) as client, pytest.raises(OptserveError) as info:
        client.get_params("abc")
    assert "could not be read" in info.value.detail
    assert "TensorFileError" in info.value.detail


def test_connection_refused_is_a_connection_error() -> None:
    sleep = FakeSleep()
    port = free_port()  # nothing listens there
    with (
        OptimizerClient(f"http://127.0.0.1:{port}", max_retries=2, sleep=sleep.sync) as client,
        pytest.raises(ConnectionError) as info,
    ):
        client.create_session({"x": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
    assert isinstance(info.value, builtins.ConnectionError)
    assert info.value.status is None
    assert "POST /v1/sessions" in str(info.value)
    assert "after 2 retries" in str(info.value)
    assert len(sleep.waits) == 2  # never sent: even a create is retried
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_timeout_is_a_timeout_error() -> None:
    script = Script([httpx.ReadTimeout])
    with sync_client(script, max_retries=3) as client, pytest.raises(TimeoutError) as info:
        client.get_session("abc")
    assert isinstance(info.value, builtins.TimeoutError)
    assert len(script.requests) == 4


# --- the real server's refusals ------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_422_names_the_field(memory_server: LiveServer, binary: bool) -> None:
    with OptimizerClient(memory_server.base_url, binary=binary) as client:
        with pytest.raises(ValidationError) as info:
            client.create_session({"w": np.zeros(2)}, {"name": "adam", "betas": [1.2, 0.999]})
        exc = info.value
        assert exc.status == 422
        assert exc.type == "urn:optserve:problem:validation-error"
        assert "betas[0]" in exc.detail
        assert exc.errors[0].loc == ("body", "optimizer", "betas", 0)
        assert "body.optimizer.betas[0]: " in str(exc)

        session = client.create_session({"w": np.zeros((2, 2))}, {"name": "sgd", "lr": 0.1})
        with pytest.raises(ValidationError) as info:
            client.step(session.id, {"w": np.zeros(3)})
        assert info.value.errors[0].loc == ("body", "grads", "w")
        assert "shape" in str(info.value)
        with pytest.raises(ValidationError) as info:
            client.step(session.id, {"v": np.zeros((2, 2))})
        assert info.value.errors[0].loc == ("body", "grads", "v")  # unknown tensor
        with pytest.raises(ValidationError) as info:
            client.create_session({"w": np.zeros(2)}, {"name": "nope"})
        assert info.value.errors[0].loc[:2] == ("body", "optimizer")
        assert client.get_session(session.id).version == 0  # refused: nothing changed


def test_422_for_a_reused_idempotency_key(memory_server: LiveServer) -> None:
    with OptimizerClient(memory_server.base_url) as client:
        session = client.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
        first = client.step(session.id, {"w": np.ones(2)}, idempotency_key="k-1")
        again = client.step(session.id, {"w": np.ones(2)}, idempotency_key="k-1")
        assert again.replayed
        assert not first.replayed
        assert again.version == first.version == 1
        with pytest.raises(ValidationError) as info:
            client.step(session.id, {"w": np.full(2, 2.0)}, idempotency_key="k-1")
        assert info.value.errors[0].loc == ("header", "Idempotency-Key")


def test_404(memory_server: LiveServer) -> None:
    with OptimizerClient(memory_server.base_url) as client:
        for call in (
            lambda: client.get_session("no-such-session"),
            lambda: client.get_params("no-such-session"),
            lambda: client.step("no-such-session", {"w": np.zeros(2)}),
            lambda: client.delete_session("no-such-session"),
        ):
            with pytest.raises(NotFoundError) as info:
                call()
            assert info.value.status == 404
            assert info.value.detail == "no session with this id"
        with pytest.raises(NotFoundError):  # quoted: it cannot leave /v1/sessions/
            client.get_session("../../healthz")
        with pytest.raises(ValueError, match="not a session id"):
            client.get_session("..")


def test_401_and_tenants(auth_server: LiveServer) -> None:
    key_a, key_b = list(KEYS)
    with OptimizerClient(auth_server.base_url) as anonymous:
        with pytest.raises(AuthenticationError) as info:
            anonymous.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
        assert info.value.status == 401
        assert info.value.errors[0].loc == ("header", "Authorization")
        assert info.value.headers["www-authenticate"].startswith("Bearer")
    with (
        OptimizerClient(auth_server.base_url, "wrong-key") as wrong,
        pytest.raises(AuthenticationError),
    ):
        wrong.preview_schedule({"name": "constant"}, lr=0.1, steps=2)
    with (
        OptimizerClient(auth_server.base_url, key_a) as alpha,
        OptimizerClient(auth_server.base_url, key_b) as beta,
    ):
        session = alpha.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
        assert alpha.step(session.id, {"w": np.ones(2)}).version == 1
        with pytest.raises(NotFoundError):  # another tenant's: as if it did not exist
            beta.get_session(session.id)
        with pytest.raises(NotFoundError):
            beta.step(session.id, {"w": np.ones(2)})
        assert alpha.get_session(session.id).version == 1


def test_413(memory_server: LiveServer) -> None:
    big = {"w": np.zeros(MAX_BODY_BYTES // 4 + 1024, dtype=np.float32)}
    with OptimizerClient(memory_server.base_url) as client:
        with pytest.raises(PayloadTooLargeError) as info:
            client.create_session(big, {"name": "sgd", "lr": 0.1})
        assert info.value.status == 413
        assert str(MAX_BODY_BYTES) in info.value.detail
