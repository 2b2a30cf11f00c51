"""Schedule specs that stress the caps on a schedule (nesting, schedules in all), shared
by the in-process and the live hostile-input tests."""

from __future__ import annotations

from typing import Any


def nested(depth: int, leaf: dict[str, Any] | None = None) -> dict[str, Any]:
    """`depth` sequential schedules one inside the other (2 * depth + 1 schedules): each
    runs the one inside for 2 steps, then a decay; `leaf` (a cosine) innermost."""
    spec: dict[str, Any] = leaf or {"name": "cosine", "T_max": 10}
    for _ in range(depth):
        spec = {
            "name": "sequential",
            "schedulers": [spec, {"name": "exponential", "gamma": 0.9}],
            "milestones": [2],
        }
    return spec


def flat(nodes: int) -> dict[str, Any]:
    """One sequential schedule of `nodes - 1` decays (`nodes` schedules in all)."""
    return {
        "name": "sequential",
        "schedulers": [{"name": "exponential", "gamma": 0.9}] * (nodes - 1),
        "milestones": list(range(1, nodes - 1)),
    }
