"""Hostile headers against a live server (issue 12, items 6 and 8).

* `Idempotency-Key` of 256 characters and more, empty, or holding control characters,
  non-ASCII bytes or UTF-8: 422 problem+json (the key is 1 to 255 printable ASCII
  characters), nothing applied.
* `Content-Type` that is neither JSON nor safetensors, or that does not match the body:
  415 / 400 problem+json, nothing applied.
* `Content-Length` far over the body limit with a small body: 413 at once, without
  waiting for the body; one within the limit whose body never comes: the worker keeps
  answering (/healthz within 1 s) and the session is unchanged when the client gives up;
  a chunked body over the limit: 413.
* `Accept` that is garbage: answered in a format the server speaks (JSON or binary) or
  refused (406 problem+json), never a 5xx; a replay answers in the asked format (or
  says it cannot), and is not applied twice.

Bytes that uvicorn's HTTP parser refuses before the application sees the request (NUL,
ESC, DEL in a header value; a Content-Length of 2**64 or -1) are answered by uvicorn
itself: `400 Invalid HTTP request received.` as text/plain. Those are checked to be a
400 that changes nothing; they cannot be problem+json without replacing uvicorn's parser.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.hostile.support import (
    BINARY,
    GRADS,
    JSON,
    PROBLEM,
    assert_not_5xx,
    assert_problem,
    assert_raw_problem,
    assert_unchanged,
    create,
    decode_file,
    encode_file,
    health_answers,
    raw_request,
    refused,
    snapshot,
    while_probing_health,
)
from tests.support.live_server import MAX_BODY_BYTES, LiveServer

STEP_BODY = json.dumps({"grads": GRADS}).encode()


def step_with(
    sid: str, headers: dict[str, str], content: bytes = STEP_BODY
) -> Callable[[httpx.Client], httpx.Response]:
    def go(client: httpx.Client) -> httpx.Response:
        return client.post(f"/v1/sessions/{sid}/step", content=content, headers=headers)

    return go


def raw_step(sid: str, extra: bytes, body: bytes = STEP_BODY, content_type: bytes = b"") -> bytes:
    ct = content_type or JSON.encode()
    return (
        f"POST /v1/sessions/{sid}/step HTTP/1.1\r\n".encode()
        + b"Host: 127.0.0.1\r\nConnection: close\r\n"
        + b"Content-Type: "
        + ct
        + b"\r\n"
        + extra
        + f"\r\nContent-Length: {len(body)}".encode()
    )


# --- Idempotency-Key -------------------------------------------------------------------------

LONG_KEYS = {
    "256 chars": "k" * 256,
    "1000 chars": "k" * 1000,
    "8000 chars": "k" * 8000,
    "empty": "",
}
#: bytes uvicorn passes to the application in a header value
ODD_KEY_BYTES = {
    "tab": b"a\tb",
    "byte 0x80": b"a\x80b",
    "byte 0xff": b"a\xffb",
    "UTF-8": "clé".encode(),
    "UTF-8 RTL override": "a\u202eb".encode(),
}
#: bytes uvicorn's parser refuses (the application never sees the request)
PARSER_REFUSED = {
    "NUL": b"a\x00b",
    "SOH": b"a\x01b",
    "ESC": b"a\x1bb",
    "DEL": b"a\x7fb",
}


@pytest.mark.parametrize("key", list(LONG_KEYS))
def test_idempotency_keys_too_long_or_empty_are_refused(
    live: LiveServer, client: httpx.Client, key: str
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    problem = refused(
        live, step_with(sid, {"Content-Type": JSON, "Idempotency-Key": LONG_KEYS[key]})
    )
    assert problem["status"] == 422, problem
    assert ["header", "Idempotency-Key"] in [e["loc"] for e in problem["errors"]], problem
    assert len(problem["detail"]) < 1000  # a long key is not echoed
    assert_unchanged(client, sid, before)


@pytest.mark.parametrize("what", list(ODD_KEY_BYTES))
def test_idempotency_keys_with_odd_bytes_are_refused(
    live: LiveServer, client: httpx.Client, what: str
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    head = raw_step(sid, b"Idempotency-Key: " + ODD_KEY_BYTES[what])
    answer = while_probing_health(live, lambda _: raw_request(live, head, STEP_BODY))
    problem = assert_raw_problem(answer)
    assert problem["status"] == 422, problem
    assert_unchanged(client, sid, before)


@pytest.mark.parametrize("what", list(PARSER_REFUSED))
def test_header_bytes_the_http_parser_refuses_are_400(
    live: LiveServer, client: httpx.Client, what: str
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    for header in (b"Idempotency-Key: ", b"Accept: application/", b"X-Request-ID: "):
        head = raw_step(sid, header + PARSER_REFUSED[what])
        answer = while_probing_health(live, lambda _, head=head: raw_request(live, head, STEP_BODY))
        assert answer.status == 400, (answer.status, answer.body[:300])
    assert_unchanged(client, sid, before)


# --- Content-Type ----------------------------------------------------------------------------

BAD_CONTENT_TYPES: dict[str, tuple[str, bytes]] = {
    "text/plain": ("text/plain", STEP_BODY),
    "form": ("application/x-www-form-urlencoded", b"grads=1"),
    "multipart": ("multipart/form-data; boundary=x", b"--x\r\n\r\n" + STEP_BODY + b"\r\n--x--"),
    "json-like": ("application/jsonx", STEP_BODY),
    "image": ("image/png", b"\x89PNG\r\n\x1a\n"),
    "garbage": (";;;=,,", STEP_BODY),
    "long": ("application/" + "x" * 4000, STEP_BODY),
    "binary declared, JSON sent": (BINARY, STEP_BODY),
    "JSON declared, binary sent": (JSON, encode_file(GRADS)),
    "JSON in UTF-16": ("application/json; charset=utf-16", STEP_BODY.decode().encode("utf-16")),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT_TYPES))
def test_bad_content_types_are_refused(live: LiveServer, client: httpx.Client, case: str) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    content_type, body = BAD_CONTENT_TYPES[case]
    problem = refused(live, step_with(sid, {"Content-Type": content_type}, body))
    assert problem["status"] in (400, 415, 422), problem
    assert_unchanged(client, sid, before)


def test_content_types_the_endpoint_does_not_take_are_415(
    live: LiveServer, client: httpx.Client
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    export = client.get(f"/v1/sessions/{sid}/state").content
    preview = json.dumps({"lr": 0.1, "schedule": {"name": "constant"}, "steps": 5}).encode()
    for path, content, content_type in [
        ("/v1/sessions/import", export, JSON),
        ("/v1/sessions/import", export, "text/plain"),
        ("/v1/schedules/preview", preview, BINARY),
        ("/v1/schedules/preview.png", preview, BINARY),
    ]:

        def go(c: httpx.Client, path: str = path, content: bytes = content, ct: str = content_type):
            return c.post(path, content=content, headers={"Content-Type": ct})

        assert refused(live, go)["status"] == 415
    r = client.put(f"/v1/sessions/{sid}/state", content=export, headers={"Content-Type": JSON})
    assert assert_problem(r)["status"] == 415
    assert_unchanged(client, sid, before)


# --- Content-Length and body size ------------------------------------------------------------


@pytest.mark.parametrize("declared", [MAX_BODY_BYTES + 1, 10**12, 2**63 - 1])
def test_a_content_length_over_the_limit_is_413_at_once(
    live: LiveServer, client: httpx.Client, declared: int
) -> None:
    """413 without waiting for the body: the connection is held open and not closed
    by the client, and the answer comes anyway."""
    sid = create(client)
    before = snapshot(client, sid)
    head = raw_step(sid, b"X-Test: big", body=b"").replace(
        b"Content-Length: 0", f"Content-Length: {declared}".encode()
    )
    answer = while_probing_health(
        live, lambda _: raw_request(live, head, b'{"grads": ', timeout=10.0)
    )
    assert assert_raw_problem(answer)["status"] == 413
    assert_unchanged(client, sid, before)


def test_a_body_that_never_comes_blocks_nothing(live: LiveServer, client: httpx.Client) -> None:
    """Content-Length 200,000 (within the limit), 10 bytes sent, the rest never: for 1.5 s
    /healthz answers; when the client gives up, nothing was applied and whatever the server
    answers (if anything) is a 4xx problem+json."""
    sid = create(client)
    before = snapshot(client, sid)
    head = raw_step(sid, b"X-Test: slow", body=b"").replace(
        b"Content-Length: 0", b"Content-Length: 200000"
    )
    answer = raw_request(live, head, b'{"grads": ', hold=1.5, on_hold=lambda: probe(live, 1.5))
    if answer.status is not None:
        assert_raw_problem(answer)
    health_answers(live)
    assert_unchanged(client, sid, before)


def probe(live: LiveServer, seconds: float) -> None:
    """/healthz asked every 0.1 s for `seconds`, each answering within 1 s."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        health_answers(live)
        time.sleep(0.1)


@pytest.mark.parametrize("value", [str(2**64), "-1", "1e3", "12, 13", "0x10"])
def test_content_lengths_the_http_parser_refuses_are_400(
    live: LiveServer, client: httpx.Client, value: str
) -> None:
    sid = create(client)
    before = snapshot(client, sid)
    head = raw_step(sid, b"X-Test: cl", body=b"").replace(
        b"Content-Length: 0", f"Content-Length: {value}".encode()
    )
    answer = while_probing_health(live, lambda _: raw_request(live, head, STEP_BODY))
    assert answer.status is not None, "no answer"
    assert 400 <= answer.status < 500, answer
    assert_unchanged(client, sid, before)


def test_a_chunked_body_over_the_limit_is_413(live: LiveServer, client: httpx.Client) -> None:
    sid = create(client)
    before = snapshot(client, sid)

    def chunks() -> Iterator[bytes]:
        yield b'{"grads": {"w": [[0.1, 0.2], [0.3, 0.4]], "b": [0.5]}, "pad": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    problem = refused(
        live,
        lambda c: c.post(
            f"/v1/sessions/{sid}/step", content=chunks(), headers={"Content-Type": JSON}
        ),
    )
    assert problem["status"] == 413, problem
    assert_unchanged(client, sid, before)


# --- Accept ----------------------------------------------------------------------------------

BAD_ACCEPTS = [
    "text/html",
    "image/png",
    "application/octet-stream;q=abc",
    "application/octet-stream;q=nan",
    "application/octet-stream;q=1e400",
    "application/octet-stream;q=-1",
    "*/*;q=nan",
    ",,,;;;===",
    "application/" + "x" * 8000,
    ", ".join(["application/octet-stream;q=0.5"] * 500),
]


@pytest.mark.parametrize("accept", BAD_ACCEPTS, ids=lambda a: a[:40])
def test_garbage_accept_is_answered_in_a_known_format_or_406(
    live: LiveServer, client: httpx.Client, accept: str
) -> None:
    sid = create(client)
    for method, path, content in [
        ("GET", f"/v1/sessions/{sid}/params", None),
        ("POST", f"/v1/sessions/{sid}/step", STEP_BODY),
    ]:
        before = snapshot(client, sid)

        def go(c: httpx.Client, method: str = method, path: str = path, content=content):
            headers = {"Accept": accept, "Content-Type": JSON}
            return c.request(method, path, content=content, headers=headers)

        r = while_probing_health(live, go)
        assert_not_5xx(r)
        if r.status_code >= 400:
            assert r.status_code == 406, r.text
            assert_unchanged(client, sid, before)
        else:
            assert r.headers["content-type"] in (JSON, BINARY), r.headers
            if r.headers["content-type"] == BINARY:
                decode_file(r.content)
            else:
                r.json()


@pytest.mark.parametrize(("first", "replay"), [(JSON, BINARY), (BINARY, JSON)])
def test_a_replay_answers_in_the_asked_format_or_says_so(
    live: LiveServer, client: httpx.Client, first: str, replay: str
) -> None:
    sid = create(client)
    headers = {"Content-Type": JSON, "Idempotency-Key": f"replay-{first}-{sid}"}
    r = client.post(
        f"/v1/sessions/{sid}/step", content=STEP_BODY, headers={**headers, "Accept": first}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == first
    after_first = snapshot(client, sid)
    r = client.post(
        f"/v1/sessions/{sid}/step", content=STEP_BODY, headers={**headers, "Accept": replay}
    )
    assert_not_5xx(r)
    if r.status_code >= 400:
        assert r.status_code == 406, r.text
        assert r.headers["content-type"] == PROBLEM
    else:
        assert r.status_code == 200, r.text
        assert r.headers.get("idempotent-replayed") == "true", r.headers
        assert r.headers["content-type"] == replay, (r.headers, r.content[:200])
        if replay == BINARY:
            _, metadata = decode_file(r.content)
            assert metadata["step"] == "1", metadata
        else:
            assert r.json()["step"] == 1
    assert_unchanged(client, sid, after_first)  # applied once
