"""benchmarks/core.py runs end to end and ends with its JSON ratios (no timing checks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_core_benchmark_smoke() -> None:
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "core.py"), "--sizes", "1e4", "--repeat", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"adam", "adamw", "sgd"}
    for name, by_size in result.items():
        assert set(by_size) == {"1e4"}, name
        for ratio in by_size.values():
            assert isinstance(ratio, float), name
            assert math.isfinite(ratio), name
            assert ratio > 0, name
