"""What the end-to-end tests share: the live servers (tests/support/live_server.py,
re-exported here) and helpers for talking to them over raw httpx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np

from service.core import tensorfile
from tests.support.live_server import (
    MAX_BODY_BYTES,
    RUNNING,
    STARTUP_TIMEOUT,
    LiveServer,
    start_server,
)

BINARY = "application/octet-stream"
PROBLEM = "application/problem+json"

# --- the wire ----------------------------------------------------------------------------


def encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    return tensorfile.encode({k: np.asarray(v) for k, v in tensors.items()}, metadata)


def decode(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, metadata = tensorfile.decode(data)
    return {k: np.array(v) for k, v in tensors.items()}, metadata


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """The RFC 9457 body of `r`, checked: status, media type, members."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM, r.headers
    body: dict[str, Any] = r.json()
    assert set(body) == {"type", "title", "status", "detail", "errors"}, body
    assert body["status"] == status
    assert body["type"].startswith("urn:optserve:problem:")
    for e in body["errors"]:
        assert set(e) == {"loc", "msg"}
    return body


def store_down(r: httpx.Response) -> None:
    """`r` is the 503 of an unreachable store: problem+json with a Retry-After."""
    body = problem(r, 503)
    assert body["type"].endswith("store-unavailable"), body
    assert int(r.headers["retry-after"]) >= 1, r.headers


def session_doc(client: httpx.Client, sid: str) -> dict[str, Any]:
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def read_params(client: httpx.Client, sid: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The session's params as the binary tensor set (exact), and its metadata."""
    r = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == BINARY
    return decode(r.content)


def assert_close(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float
) -> None:
    """Every tensor of `got` equals `want`'s to `rtol`, relative to the tensor's norm."""
    assert set(got) == set(want)
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        scale = max(float(np.linalg.norm(w)), 1e-300)
        err = float(np.linalg.norm(g - w)) / scale
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale / np.sqrt(max(w.size, 1)))


__all__ = [
    "BINARY",
    "MAX_BODY_BYTES",
    "PROBLEM",
    "RUNNING",
    "STARTUP_TIMEOUT",
    "LiveServer",
    "assert_close",
    "decode",
    "encode",
    "problem",
    "read_params",
    "session_doc",
    "start_server",
    "store_down",
]
