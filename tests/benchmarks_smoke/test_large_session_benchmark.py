"""benchmarks/large_session.py --quick runs end to end (issue 8, scaled down).

2M float32 params with SGD momentum, 1 MiB chunks (so each 8 MB blob is cut into 8),
two binary steps, a binary read checked against the closed form by the script itself.
It starts its own redis-server (skipped when none is installed) and optserve.

Checked here: exit 0, the JSON fields, no Redis value over the chunk limit, and the
server's peak RSS (process tree) bounded. The bound: measured on a 2-core VM (Python
3.11, numpy 2.4), the idle server is about 225 MB and the peak about 320 MB for 16 MB of
session state (peak - baseline about 6x the state bytes); 300 MB + 8 x state bytes (428
MB here) leaves room for other platforms' baselines without accepting a state copied
many more times than today.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000
KEYS = {
    "params",
    "optimizer",
    "steps",
    "chunk_bytes",
    "state_bytes",
    "largest_value_bytes",
    "largest_memory_usage_bytes",
    "chunks",
    "params_chunks",
    "state_chunks",
    "baseline_rss_bytes",
    "peak_rss_bytes",
    "peak_rss_ratio",
    "peak_rss_over_baseline_ratio",
    "peak_rss_by_phase",
    "create_s",
    "step_s",
    "read_s",
    "redis_used_memory_peak_bytes",
    "max_abs_error",
}


@pytest.mark.slow
def test_large_session_benchmark_smoke() -> None:
    pytest.importorskip("psutil")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "large_session.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS, result

    assert result["params"] == 2_000_000
    assert result["optimizer"] == "sgd"
    assert result["steps"] == 2
    # params and momentum_buffer: 4 bytes per element each, plus their headers
    assert 2 * 4 * result["params"] <= result["state_bytes"] < 2 * 4 * result["params"] + 4096
    # no value over the limit, and the blobs really were cut into several chunks
    assert 0 < result["largest_value_bytes"] <= result["chunk_bytes"]
    assert result["params_chunks"] >= 2
    assert result["state_chunks"] >= 2
    assert result["chunks"] == result["params_chunks"] + result["state_chunks"]

    assert len(result["step_s"]) == 2
    for value in [result["create_s"], result["read_s"], *result["step_s"]]:
        assert math.isfinite(value)
        assert value > 0
    assert result["max_abs_error"] <= 2e-5

    peak = result["peak_rss_bytes"]
    assert result["baseline_rss_bytes"] > 0
    assert peak >= result["baseline_rss_bytes"]
    assert set(result["peak_rss_by_phase"]) >= {"create", "step_1", "step_2", "read"}
    assert peak <= 300 * MB + 8 * result["state_bytes"], (
        f"server peak RSS {peak / MB:.0f} MB for {result['state_bytes'] / MB:.0f} MB of state"
    )
