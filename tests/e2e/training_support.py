"""What the training demonstrations (tests/e2e/test_training_*.py) share: sessions made,
stepped and read over raw httpx in the binary (safetensors) form, problem checks with
the extension members of docs/training.md, and PNG checks.

Binary on the wire keeps float64 exact both ways and bodies small (the digits MLP is
4,810 numbers: 38 KB, against ~100 KB of JSON).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import psutil

from tests.e2e.support import BINARY, PROBLEM, LiveServer, decode, encode

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: every plot of the server is 800 x 500 pixels (service/core/plots.py)
PLOT_SIZE = (800, 500)

#: creation fields written as plain strings in binary metadata; the rest are JSON
_PLAIN = ("dtype", "nonfinite")


def create_session(
    client: httpx.Client, params: Mapping[str, np.ndarray], **fields: Any
) -> dict[str, Any]:
    """Create a session with `params` (binary, exact) and the creation `fields`
    (`optimizer`, `schedule`, `dtype`, `lr_finder`, `consistency`, ...): its document."""
    metadata = {
        name: value if name in _PLAIN else json.dumps(value) for name, value in fields.items()
    }
    r = client.post(
        "/v1/sessions", content=encode(params, metadata), headers={"Content-Type": BINARY}
    )
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def push(
    client: httpx.Client,
    sid: str,
    grads: Mapping[str, np.ndarray],
    *,
    loss: float | None = None,
    base_version: int | None = None,
    wait: float | None = None,
    ret: str = "params",
) -> httpx.Response:
    """`POST .../step` in the binary form (gradients and answer); `loss` is written with
    `repr`, so a float64 arrives exact (and NaN or inf as `nan` / `inf`)."""
    metadata = {"return": ret}
    if loss is not None:
        metadata["loss"] = repr(float(loss))
    if base_version is not None:
        metadata["base_version"] = str(base_version)
    if wait is not None:
        metadata["wait"] = repr(float(wait))
    return client.post(
        f"/v1/sessions/{sid}/step",
        content=encode(grads, metadata),
        headers={"Content-Type": BINARY, "Accept": BINARY},
    )


def step_answer(r: httpx.Response) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A 200 binary step answer: its tensors and its metadata (counters as strings)."""
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"] == BINARY, r.headers
    return decode(r.content)


def get_params(
    client: httpx.Client, sid: str, min_version: int | None = None
) -> tuple[dict[str, np.ndarray], int]:
    """The session's params (binary, exact) and their `version`; with `min_version`, once
    the session has reached it (the 408 of a wait that timed out is asked again)."""
    query = {} if min_version is None else {"min_version": min_version, "timeout": 30}
    while True:
        r = client.get(f"/v1/sessions/{sid}/params", params=query, headers={"Accept": BINARY})
        if r.status_code != 408:
            break
    assert r.status_code == 200, (r.status_code, r.text)
    tensors, metadata = decode(r.content)
    version = int(metadata["version"])
    assert min_version is None or version >= min_version, (version, min_version)
    return tensors, version


def problem_of(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """The problem+json body of `r`, checked: status and type
    `urn:optserve:problem:<kind>` (extension members allowed)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM, r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status, body
    assert body["type"] == f"urn:optserve:problem:{kind}", body
    return body


def check_png(r: httpx.Response, min_bytes: int = 5_000) -> int:
    """`r` is a 200 PNG of the server's plot size with a real drawing in it (not a few
    hundred bytes of blank); its size in bytes."""
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"] == "image/png", r.headers
    png = r.content
    assert png[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", png[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == PLOT_SIZE
    assert png[-8:-4] == b"IEND", "truncated PNG"
    assert min_bytes <= len(png) <= 2_000_000, len(png)
    return len(png)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """`|got - want| / |want|` (L2 norms, float64)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-300))


def worker_cpu(server: LiveServer) -> dict[int, float]:
    """CPU seconds (user + system) each of the server's worker processes has used so far,
    by pid: the difference over a test shows which of them served it."""
    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in server.worker_pids()}


def assert_all_busy(server: LiveServer, before: dict[int, float], least: float = 0.05) -> None:
    """Every worker process of `server` used at least `least` CPU seconds since `before`."""
    after = worker_cpu(server)
    assert set(after) == set(before), "a worker process was replaced"
    busy = {pid: after[pid] - before[pid] for pid in before}
    assert all(b >= least for b in busy.values()), f"a worker process took no requests: {busy}"
