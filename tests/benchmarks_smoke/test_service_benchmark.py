"""benchmarks/service.py --quick runs end to end and ends with its JSON line (no timing checks).

It starts its own optserve (2 workers) and echo server, so it needs a Redis: the one at
`OPTSERVE_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0), skipped when none answers.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("OPTSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEYS = {
    "step_1m_binary_ms",
    "floor_1m_ms",
    "ratio",
    "step_1m_json_ms",
    "small_steps_per_s",
    "small_p99_ms",
}


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@pytest.mark.slow
def test_service_benchmark_smoke() -> None:
    if not _redis_answers(REDIS_URL):
        pytest.skip(f"no Redis answers at {REDIS_URL}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "service.py"), "--quick", "--url", REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == KEYS, result
    for key, value in result.items():
        assert isinstance(value, (int, float)), key
        assert not isinstance(value, bool), key
        assert math.isfinite(value), key
        assert value > 0, key
    assert any("(c) small steps" in line for line in lines), done.stdout
