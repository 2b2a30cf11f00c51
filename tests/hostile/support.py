"""What the hostile-input tests share: sending a hostile request to a live server while
`/healthz` is probed, the checks every refusal must pass, snapshots of a session (to
show that a refusal changed nothing), safetensors files built byte by byte, and raw
HTTP for what httpx will not send.

The contract (issue 12, "Done when"): every hostile request is answered (never a hang)
with a 4xx `application/problem+json` (never a 5xx); a refused request changes nothing;
`/healthz` answers within 1 s while the hostile request runs; after the worst accepted
input the session, its params, its state export, its schedule plot and the tenant's
listing still read, and the session's own export imports back.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from tests.support.live_server import LiveServer
from tests.support.safetensors_files import split_file, st_file

T = TypeVar("T")

BINARY = "application/octet-stream"
JSON = "application/json"
PROBLEM = "application/problem+json"
PNG = b"\x89PNG\r\n\x1a\n"
#: seconds a hostile request may take before it counts as a hang
HANG_TIMEOUT = 30.0
#: seconds /healthz has to answer while a hostile request is in flight
HEALTH_TIMEOUT = 1.0

PARAMS = {"w": [[0.5, -1.0], [1.5, 2.0]], "b": [0.25]}
GRADS = {"w": [[0.1, 0.2], [-0.3, 0.4]], "b": [-0.5]}
SGD = {"name": "sgd", "lr": 0.1}


# --- the checks ------------------------------------------------------------------------------


def describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:600]!r}"


def assert_problem(r: httpx.Response) -> dict[str, Any]:
    """`r` is a refusal: a 4xx answered as RFC 9457 problem+json, consistent with itself."""
    assert 400 <= r.status_code < 500, describe(r)
    assert r.headers.get("content-type") == PROBLEM, (r.headers.get("content-type"), describe(r))
    body: dict[str, Any] = r.json()
    assert body["status"] == r.status_code, body
    assert str(body["type"]).startswith("urn:optserve:problem:"), body
    assert isinstance(body.get("errors"), list), body
    return body


def assert_not_5xx(r: httpx.Response) -> None:
    """`r` is an answer (2xx) or a proper refusal (4xx problem+json), never a 5xx."""
    assert r.status_code < 500, describe(r)
    if r.status_code >= 400:
        assert_problem(r)


def all_finite(value: Any) -> bool:
    """Whether a JSON value holds numbers only where numbers go: no null, no non-finite."""
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- hostile requests, with /healthz probed while they run ----------------------------------


#: one client per (server, role), kept for the run: an httpx.Client costs ~50 ms to make
_CLIENTS: dict[tuple[str, str], httpx.Client] = {}


def shared_client(server: LiveServer, role: str) -> httpx.Client:
    """The run's client of `server` for `role`: "hostile" (timeout HANG_TIMEOUT: a hang
    fails the test) or "health" (timeout 1 s)."""
    key = (server.base_url, role)
    if key not in _CLIENTS:
        timeout = HEALTH_TIMEOUT if role == "health" else HANG_TIMEOUT
        _CLIENTS[key] = httpx.Client(base_url=server.base_url, timeout=timeout)
    return _CLIENTS[key]


def while_probing_health(server: LiveServer, send: Callable[[httpx.Client], T]) -> T:
    """`send` run from a thread (on a client with timeout HANG_TIMEOUT: a hang fails it),
    while this thread asks `GET /healthz` (timeout 1 s) again and again until it is done:
    every probe must answer 200 within the second, at least one probe is made."""
    outcome: dict[str, Any] = {}
    hostile = shared_client(server, "hostile")

    def run() -> None:
        try:
            outcome["response"] = send(hostile)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="hostile-request", daemon=True)
    health = shared_client(server, "health")
    probes = 0
    thread.start()
    while True:
        r = health.get("/healthz")  # ReadTimeout: the hostile request froze the worker
        assert r.status_code == 200, r.text
        probes += 1
        if not thread.is_alive():
            break
        time.sleep(0.01)
    thread.join(HANG_TIMEOUT)
    assert not thread.is_alive(), "the hostile request never finished"
    assert probes >= 1
    if "error" in outcome:
        raise AssertionError(f"the hostile request got no answer: {outcome['error']!r}")
    response: T = outcome["response"]
    return response


def refused(server: LiveServer, send: Callable[[httpx.Client], httpx.Response]) -> dict[str, Any]:
    """`send` is refused with a 4xx problem+json while /healthz keeps answering."""
    return assert_problem(while_probing_health(server, send))


# --- snapshots -------------------------------------------------------------------------------


def create(client: httpx.Client, body: Mapping[str, Any] | None = None) -> str:
    """A session (by default SGD on PARAMS, float32); its id."""
    r = client.post("/v1/sessions", json=dict(body or {"optimizer": SGD, "params": PARAMS}))
    assert r.status_code == 201, describe(r)
    return str(r.json()["id"])


@dataclass(frozen=True)
class Snapshot:
    """What a refusal must leave as it was: the document's counters, the params (JSON and
    binary, bit for bit)."""

    version: int
    step: int
    doc: str
    params_json: str
    params_binary: tuple[tuple[str, bytes], ...]


def snapshot(client: httpx.Client, sid: str) -> Snapshot:
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, describe(r)
    doc = r.json()
    doc.pop("updated_at", None)
    p = client.get(f"/v1/sessions/{sid}/params")
    assert p.status_code == 200, describe(p)
    pb = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert pb.status_code == 200, describe(pb)
    tensors, _ = decode_file(pb.content)
    return Snapshot(
        version=int(doc["version"]),
        step=int(doc["step"]),
        doc=json.dumps(doc, sort_keys=True),
        params_json=json.dumps(p.json(), sort_keys=True),
        params_binary=tuple(sorted((k, v.tobytes()) for k, v in tensors.items())),
    )


@dataclass(frozen=True)
class ListingMark:
    """The head of the tenant's listing at some moment (see `listing_head`)."""

    ids: frozenset[str]
    since: float


def listing_head(client: httpx.Client) -> ListingMark:
    """The ids at the head of the tenant's listing (most recently updated first), and
    when: compared with `assert_no_new_session` after a refused create or import."""
    since = time.time()
    r = client.get("/v1/sessions", params={"limit": 20})
    assert r.status_code == 200, describe(r)
    return ListingMark(frozenset(s["id"] for s in r.json()["sessions"]), since)


def assert_no_new_session(client: httpx.Client, mark: ListingMark) -> None:
    """No session was created since `mark`: a new one would head the listing. (Sessions
    that moved up because something updated them meanwhile are not new: their
    `created_at` is older than the mark.)"""
    r = client.get("/v1/sessions", params={"limit": 20})
    assert r.status_code == 200, describe(r)
    for entry in r.json()["sessions"]:
        if entry["id"] in mark.ids:
            continue
        doc = client.get(f"/v1/sessions/{entry['id']}")
        assert doc.status_code == 200, describe(doc)
        assert doc.json()["created_at"] < mark.since, ("a session was made", doc.json())


def assert_unchanged(client: httpx.Client, sid: str, before: Snapshot) -> None:
    after = snapshot(client, sid)
    assert (after.version, after.step) == (before.version, before.step)
    assert after.params_json == before.params_json
    assert after.params_binary == before.params_binary
    assert after.doc == before.doc


def assert_readable(client: httpx.Client, sid: str) -> dict[str, Any]:
    """Everything one reads of a session answers 200 with finite numbers, and its own
    export imports back (as a new session, and over itself). Answers the document."""
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, describe(r)
    doc: dict[str, Any] = r.json()
    assert all_finite(doc["lr"]), doc
    assert doc["lr"] >= 0, doc
    r = client.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200, describe(r)
    for name, value in r.json()["params"].items():
        assert all_finite(value), (name, value)
    r = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, describe(r)
    for name, array in decode_file(r.content)[0].items():
        assert np.isfinite(array).all(), (name, array)
    r = client.get(f"/v1/sessions/{sid}/schedule.png")
    assert r.status_code == 200, describe(r)
    assert r.content.startswith(PNG)
    r = client.get(f"/v1/sessions/{sid}/history")
    assert r.status_code == 200, describe(r)
    r = client.get("/v1/sessions", params={"limit": 1000})
    assert r.status_code == 200, describe(r)
    r = client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, describe(r)
    assert r.headers["content-type"] == BINARY
    exported = r.content
    r = client.post("/v1/sessions/import", content=exported, headers={"Content-Type": BINARY})
    assert r.status_code == 201, describe(r)
    copy = str(r.json()["id"])
    r = client.get(f"/v1/sessions/{copy}/state")
    assert r.status_code == 200, describe(r)
    r = client.put(f"/v1/sessions/{sid}/state", content=exported, headers={"Content-Type": BINARY})
    assert r.status_code == 200, describe(r)
    r = client.delete(f"/v1/sessions/{copy}")
    assert r.status_code == 204, describe(r)
    return doc


# --- safetensors, byte by byte ---------------------------------------------------------------

DTYPES = {"F32": np.float32, "F64": np.float64}


def st_encode(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, dtype: str = "F32"
) -> tuple[dict[str, Any], bytes]:
    """The header (a dict) and data of a well-formed file of `tensors` in `dtype`."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(np.asarray(value, DTYPES[dtype]))
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def encode_file(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, dtype: str = "F32"
) -> bytes:
    header, data = st_encode(tensors, metadata, dtype)
    return st_file(header, data)


def decode_file(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A well-formed file's tensors (copies) and metadata."""
    header, body = split_file(data)
    metadata = header.pop("__metadata__", {})
    codes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "BOOL": "?"}
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        array = np.frombuffer(body[begin:end], dtype=codes[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"]).copy()
    return tensors, metadata


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- raw HTTP --------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int | None  # None: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes


def raw_request(
    server: LiveServer,
    head: bytes,
    body: bytes = b"",
    *,
    hold: float = 0.0,
    on_hold: Callable[[], None] | None = None,
    timeout: float = HANG_TIMEOUT,
) -> RawAnswer:
    """Send `head` (request line and headers, without the blank line) and `body` on a
    fresh connection and read one answer (socket.timeout after `timeout`: a hang). With
    `hold`, the connection is kept open that many seconds first (calling `on_hold`
    meanwhile), then its sending side is closed: a client that gives up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        if hold:
            if on_hold is not None:
                on_hold()
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                time.sleep(0.05)
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            if b"\r\n\r\n" in data:
                head_part, _, payload = data.partition(b"\r\n\r\n")
                length = _content_length(head_part)
                if length is not None and len(payload) >= length:
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        return RawAnswer(None, {}, b"")
    head_part, _, payload = data.partition(b"\r\n\r\n")
    lines = head_part.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return RawAnswer(status, headers, payload)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def assert_raw_problem(answer: RawAnswer) -> dict[str, Any]:
    assert answer.status is not None, "no answer"
    assert 400 <= answer.status < 500, (answer.status, answer.body[:600])
    assert answer.headers.get("content-type") == PROBLEM, (answer.headers, answer.body[:600])
    body: dict[str, Any] = json.loads(answer.body)
    assert body["status"] == answer.status, body
    return body


def health_answers(server: LiveServer) -> None:
    r = shared_client(server, "health").get("/healthz")
    assert r.status_code == 200, r.text
