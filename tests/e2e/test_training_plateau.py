"""ReduceLROnPlateau over HTTP equals torch's, across a restart of the server AND of Redis.

A session with the `plateau` schedule (SGD, momentum 0.9) on a private redis-server that
keeps its data (append-only file, fsync always) is fed a fixed sequence of losses: half
with steps (`loss` of the params the step produced), half through `POST .../metrics`,
plus a few steps without a loss (which must not move the schedule). Halfway, with two bad
losses counted and the third next, the optserve process is stopped, Redis is stopped and
started again on the same data, and a new optserve process takes over.

Alongside, torch: `torch.optim.SGD` with `ReduceLROnPlateau`, driven as a training loop
drives them (`optimizer.step(); scheduler.step(loss)`; a reported loss alone is
`scheduler.step(loss)`). After every request: the step's `lr` is the rate torch's step
used, the metrics' `lr` is torch's rate after `scheduler.step`, the session document's
`lr` is torch's current rate, all to 1e-12 (relative); the params equal torch's too, and
the history read at the end replays the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.e2e.conftest import need_redis_server
from tests.e2e.support import LiveServer, session_doc, start_server
from tests.e2e.training_support import check_png, create_session, push, rel_err, step_answer
from tests.support.redis_server import PrivateRedis, free_port

LR = 0.1
MOMENTUM = 0.9
PLATEAU: dict[str, Any] = {
    "name": "plateau",
    "mode": "min",
    "factor": 0.5,
    "patience": 2,
    "threshold": 1e-4,
    "cooldown": 1,
    "min_lr": 1e-3,
}
SHAPES = {"w": (3, 4), "b": (4,)}
SEED = 20251121
TOL = 1e-12
#: the restart comes before this request: a step whose loss is the third bad one in a row
#: (patience 2), so the reduction it makes depends on the count kept across the restart
RESTART_AT = 31


@dataclass(frozen=True)
class Event:
    kind: str  # "step" (with `loss`, or without: None) or "metrics"
    loss: float | None


def losses() -> list[float]:
    """60 losses: improvements, flat stretches of 1 to 7 (exact repeats, changes inside
    the 1e-4 relative threshold, small rises), and a long flat end that drives the rate
    down to `min_lr`."""
    rng = np.random.default_rng(SEED)
    out: list[float] = []
    level = 2.0
    for improve, flat in [(3, 4), (2, 1), (1, 5), (2, 3), (1, 7), (3, 2), (1, 6), (1, 18)]:
        for _ in range(improve):
            level *= 0.8 + 0.1 * rng.random()
            out.append(level)
        for j in range(flat):
            kind = j % 3
            if kind == 0:
                out.append(level)  # the same loss again: not better
            elif kind == 1:
                out.append(level * (1 - 5e-5))  # better by less than the threshold
            else:
                out.append(level * (1 + 0.05 * rng.random()))  # worse
    assert len(out) == 60
    return out


def events() -> list[Event]:
    """Losses alternately with a step and through metrics; a step without a loss before
    every tenth."""
    out: list[Event] = []
    for i, loss in enumerate(losses()):
        if i % 10 == 5:
            out.append(Event("step", None))
        out.append(Event("step" if i % 2 == 0 else "metrics", loss))
    return out


def grads_of(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([SEED, i])
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


class Reference:
    """torch's SGD and ReduceLROnPlateau on the same params, fed what the server is fed."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = {n: torch.tensor(v, dtype=torch.float64) for n, v in params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(list(self.params.values()), lr=LR, momentum=MOMENTUM)
        spec = {k: v for k, v in PLATEAU.items() if k != "name"}
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, **spec)

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def step(self, grads: dict[str, np.ndarray], loss: float | None) -> float:
        """`optimizer.step()` then, with a loss, `scheduler.step(loss)`; the rate used."""
        used = self.lr
        for name, p in self.params.items():
            p.grad = torch.tensor(grads[name], dtype=torch.float64)
        self.opt.step()
        if loss is not None:
            self.sched.step(loss)
        return used

    def metrics(self, loss: float) -> float:
        """`scheduler.step(loss)`; the rate after it."""
        self.sched.step(loss)
        return self.lr

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}


def _close(got: float, want: float, what: str) -> float:
    err = abs(got - want) / abs(want)
    assert err <= TOL, f"{what}: server {got!r}, torch {want!r}"
    return err


def test_plateau_equals_torch_across_restarts(tmp_path: Path) -> None:
    need_redis_server()
    redis = PrivateRedis(free_port(), data_dir=tmp_path / "redis")
    redis.start()
    server: LiveServer | None = None
    try:
        server = start_server("plateau-1", tmp_path, workers=1, redis=redis)
        initial = grads_of(10_000)  # any fixed numbers
        ref = Reference(initial)
        with server.client() as c:
            doc = create_session(
                c,
                initial,
                optimizer={"name": "sgd", "lr": LR, "momentum": MOMENTUM},
                schedule=PLATEAU,
                dtype="float64",
            )
        sid = doc["id"]
        assert doc["lr"] == LR

        plan = events()
        restart_at = RESTART_AT
        max_lr_err = max_param_err = 0.0
        used: list[tuple[str, float, float | None]] = []  # (kind, lr, loss) as history has them
        steps = version = 0
        restarted = False
        for i, event in enumerate(plan):
            if i == restart_at:
                assert ref.sched.num_bad_epochs == PLATEAU["patience"], "RESTART_AT moved"
                with server.client() as c:
                    before = session_doc(c, sid)
                server.stop()
                old_redis = redis.pid
                redis.stop(graceful=True)
                redis.start()
                assert redis.pid != old_redis
                server = start_server("plateau-2", tmp_path, workers=1, redis=redis)
                with server.client() as c:
                    after = session_doc(c, sid)
                assert after == before, "the session changed across the restart"
                restarted = True
            with server.client() as c:
                if event.kind == "step":
                    grads = grads_of(i)
                    r = push(c, sid, grads, loss=event.loss)
                    tensors, meta = step_answer(r)
                    want = ref.step(grads, event.loss)
                    max_lr_err = max(max_lr_err, _close(float(meta["lr"]), want, f"step {i} lr"))
                    steps, version = steps + 1, version + 1
                    assert (int(meta["step"]), int(meta["version"])) == (steps, version)
                    for name, value in ref.numpy_params().items():
                        err = rel_err(tensors[name], value)
                        assert err <= TOL, f"event {i}: {name} off by {err:.3g}"
                        max_param_err = max(max_param_err, err)
                    used.append(("step", want, event.loss))
                else:
                    assert event.loss is not None
                    r = c.post(f"/v1/sessions/{sid}/metrics", json={"loss": event.loss})
                    assert r.status_code == 200, r.text
                    answer = r.json()
                    want = ref.metrics(event.loss)
                    max_lr_err = max(max_lr_err, _close(answer["lr"], want, f"metrics {i} lr"))
                    assert answer["observed"] is True
                    assert (answer["step"], answer["version"]) == (steps, version)
                    used.append(("metrics", want, event.loss))
                doc = session_doc(c, sid)
                max_lr_err = max(max_lr_err, _close(doc["lr"], ref.lr, f"document lr after {i}"))
                assert (doc["step"], doc["version"]) == (steps, version)
        assert restarted

        with server.client() as c:
            r = c.get(f"/v1/sessions/{sid}/history", params={"limit": 1000})
            assert r.status_code == 200, r.text
            history = r.json()["entries"][::-1]  # oldest first
            png = check_png(c.get(f"/v1/sessions/{sid}/schedule.png"))
        assert [(e["kind"], e["loss"]) for e in history] == [(k, loss) for k, _, loss in used]
        for entry, (_, lr, _) in zip(history, used, strict=True):
            max_lr_err = max(max_lr_err, _close(entry["lr"], lr, f"history {entry}"))
    finally:
        if server is not None:
            server.stop()
        redis.stop()

    rates = sorted({lr for _, lr, _ in used}, reverse=True)
    reductions = len(rates) - 1
    print(
        f"\nplateau over HTTP vs torch ReduceLROnPlateau: {len(plan)} requests "
        f"({steps} steps, {sum(1 for e in plan if e.kind == 'metrics')} metrics), "
        f"optserve and Redis restarted after {restart_at} requests"
        f"\nrates: {' -> '.join(f'{lr:g}' for lr in rates)} ({reductions} reductions)"
        f"\nmax relative difference: lr {max_lr_err:.3g}, params {max_param_err:.3g}; "
        f"schedule.png {png} B"
    )
    assert rates[-1] == pytest.approx(PLATEAU["min_lr"], rel=1e-12)  # reached the floor
    assert reductions >= 5
