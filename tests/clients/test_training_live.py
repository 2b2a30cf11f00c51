"""The training extensions (docs/training.md) through the clients, against real servers
(`optserve serve` on the in-process store, and two workers on Redis): `lr_find` on a
least-squares problem, `RemoteOptimizer` on a sync session driven by two threads and on
an async session that refuses stale gradients, a pending push waited for by polling,
and averages, metrics, history, waits for a version and the plots."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from clients import (
    AsyncOptimizerClient,
    NoAverageError,
    NotFoundError,
    OptimizerClient,
    RangeTestOverError,
    StaleGradientError,
    ValidationError,
    WaitTimeoutError,
    lr_find,
)
from tests.support.live_server import LiveServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(params=["memory", "redis-2-workers"])
def server(request: pytest.FixtureRequest) -> LiveServer:
    name = "redis_server" if request.param == "redis-2-workers" else "memory_server"
    live: LiveServer = request.getfixturevalue(name)
    assert live.proc.poll() is None, live.log_tail()
    return live


# --- lr_find -------------------------------------------------------------------------------


class LeastSquares:
    """`mean((X w - y)^2)` and its gradient on a fixed problem (64 x 8, a little noise);
    counts its calls."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.x = rng.standard_normal((64, 8))
        self.y = self.x @ rng.standard_normal(8) + 0.1 * rng.standard_normal(64)
        self.calls = 0

    def __call__(self, p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        self.calls += 1
        r = self.x @ np.asarray(p["w"], dtype=np.float64) - self.y
        return float(r @ r / len(r)), {"w": 2.0 * self.x.T @ r / len(r)}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_lr_find_on_least_squares(server: LiveServer, binary: bool) -> None:
    f = LeastSquares()
    with OptimizerClient(server.base_url, binary=binary) as client:
        result = lr_find(client, {"w": np.zeros(8)}, f, dtype="float64", keep_session=True)
        sid = result.session_id
        assert sid is not None
        try:
            assert result.done
            assert result.stop_reason in ("completed", "diverged")
            assert result.next_lr is None
            assert result.nonfinite_lr is None  # this problem diverges with finite losses
            # no step wasted: every loss computed was recorded (a non-finite one ends it)
            assert f.calls == len(result.lrs)
            assert len(result.lrs) >= 17
            for i, lr in enumerate(result.lrs):  # pytorch-lr-finder's exponential ramp
                assert lr == pytest.approx(1e-7 * (10.0 / 1e-7) ** (i / 99), rel=1e-12)
            assert result.config == {
                "start_lr": 1e-7, "end_lr": 10.0, "num_steps": 100, "mode": "exp",
                "smooth_f": 0.05, "diverge_th": 5.0,
            }  # fmt: skip
            again = client.lr_finder(sid)
            assert again.suggestions == result.suggestions
            assert (again.lrs, again.losses, again.smoothed) == (
                result.lrs, result.losses, result.smoothed,
            )  # fmt: skip
            assert set(result.suggestions) == {"steepest", "minimum", "steep", "valley"}
            steepest = result.suggestions["steepest"]
            assert steepest.lr is not None
            assert steepest.index is not None
            assert steepest.lr == result.lrs[steepest.index]
            assert client.lr_finder_png(sid).startswith(PNG_SIGNATURE)
            assert client.schedule_png(sid).startswith(PNG_SIGNATURE)  # its ramp
            session = client.get_session(sid)
            assert session.lr_finder is not None
            assert session.lr_finder["num_steps"] == 100
            with pytest.raises(RangeTestOverError):
                client.step(sid, {"w": np.zeros(8)}, loss=1.0)
        finally:
            client.delete_session(sid)
        # without keep_session, the session is gone afterwards
        short = lr_find(client, {"w": np.zeros(8)}, LeastSquares(), num_steps=17, end_lr=1e-3)
        assert (short.done, short.stop_reason, len(short.lrs)) == (True, "completed", 17)
        assert short.session_id is not None
        with pytest.raises(NotFoundError):
            client.get_session(short.session_id)


# --- RemoteOptimizer: a sync session, two threads ------------------------------------------

SYNC_STEPS = 6
LR = 0.1


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in a thread; re-raise the first error."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a worker hangs"
    if errors:
        raise errors[0]


def test_remote_optimizer_sync_session_with_two_threads(server: LiveServer) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from clients.torch import RemoteOptimizer

    def make() -> Any:
        torch.manual_seed(0)
        return nn.Linear(4, 1).double()

    g = torch.Generator().manual_seed(3)
    shards = [(torch.randn(16, 4, generator=g, dtype=torch.float64),
               torch.randn(16, 1, generator=g, dtype=torch.float64)) for _ in range(2)]  # fmt: skip

    with (
        OptimizerClient(server.base_url) as c0,
        OptimizerClient(server.base_url) as c1,
    ):
        m0, m1 = make(), make()
        opt0 = RemoteOptimizer(
            m0.named_parameters(),
            {"name": "sgd", "lr": LR},
            client=c0,
            consistency={"mode": "sync", "accumulate": 2},
            history=100,
        )
        opt1 = RemoteOptimizer(m1.named_parameters(), session_id=opt0.session_id, client=c1)
        assert c0.get_session(opt0.session_id).sync

        def worker(m: Any, opt: RemoteOptimizer, x: Any, y: Any) -> Callable[[], None]:
            def run() -> None:
                for _ in range(SYNC_STEPS):
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(m(x), y)
                    loss.backward()
                    opt.step(loss=loss.item())

            return run

        run_threads(worker(m0, opt0, *shards[0]), worker(m1, opt1, *shards[1]))

        # the reference: plain SGD on the mean of the two shards' gradients
        ref = make()
        for _ in range(SYNC_STEPS):
            ref.zero_grad()
            losses = [nn.functional.mse_loss(ref(x), y) for x, y in shards]
            (sum(losses) / 2).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= LR * p.grad
        for (name, p0), p1, pr in zip(
            m0.named_parameters(), m1.parameters(), ref.parameters(), strict=True
        ):
            assert torch.equal(p0, p1), name  # both hold the session's params
            torch.testing.assert_close(p0, pr, rtol=1e-12, atol=1e-12)
        assert opt0.version == opt1.version == SYNC_STEPS
        assert opt0.param_groups[0]["lr"] == opt1.param_groups[0]["lr"] == LR
        assert opt0.stale_refusals == opt1.stale_refusals == 0
        session = c0.get_session(opt0.session_id)
        assert (session.step, session.version) == (SYNC_STEPS, SYNC_STEPS)
        assert session.pending is not None
        assert session.pending["count"] == 0
        steps = [e for e in c0.history(opt0.session_id) if e.kind == "step"]
        assert [e.version for e in steps] == list(range(SYNC_STEPS, 0, -1))
        assert all(e.contributors == 2 and e.staleness == 0 for e in steps)
        assert all(e.loss is not None for e in steps)  # the mean of both losses
        opt0.delete_session()


@pytest.mark.asyncio
async def test_a_pending_push_is_waited_for_by_polling(server: LiveServer) -> None:
    params = {"w": np.zeros(3)}
    g0, g1 = {"w": np.array([1.0, 2.0, 3.0])}, {"w": np.array([3.0, 2.0, 1.0])}
    async with AsyncOptimizerClient(server.base_url) as client:
        session = await client.create_session(
            params, {"name": "sgd", "lr": 0.5}, dtype="float64", consistency="sync"
        )
        pending = await client.step(session.id, g0, base_version=0, block=False)
        assert pending.status == "pending"
        assert (pending.version, pending.wait_for, pending.pending, pending.accumulate) == (
            0, 1, 1, 2,
        )  # fmt: skip

        async def second() -> Any:
            await asyncio.sleep(0.5)
            return await client.step(session.id, g1, base_version=0)

        # someone waits for the step (the version the 202 names) while the second arrives
        waited, completing = await asyncio.gather(
            client.get_params(session.id, min_version=1, timeout=10), second()
        )
        assert completing.status == "applied"
        assert (completing.version, completing.contributors, completing.staleness) == (1, 2, 0)
        np.testing.assert_allclose(completing.params["w"], [-1.0, -1.0, -1.0])
        assert waited.version == 1
        np.testing.assert_array_equal(waited.params["w"], completing.params["w"])
        # a push that waits by polling (no server-side wait): 202, then polls
        third = asyncio.ensure_future(client.step(session.id, g0, base_version=1))
        await asyncio.sleep(0.5)
        fourth = await client.step(session.id, g1, base_version=1, wait=5)
        applied = await third
        assert applied.status == "applied"
        assert applied.version == fourth.version == 2
        np.testing.assert_array_equal(applied.params["w"], fourth.params["w"])
        np.testing.assert_allclose(applied.params["w"], [-2.0, -2.0, -2.0])
        with pytest.raises(StaleGradientError) as info:
            await client.step(session.id, g0, base_version=1)
        assert (info.value.current_version, info.value.base_version) == (2, 1)
        await client.delete_session(session.id)


# --- RemoteOptimizer: stale gradients ------------------------------------------------------


def test_stale_gradients_are_pulled(server: LiveServer) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from clients.torch import RemoteOptimizer

    def make() -> Any:
        torch.manual_seed(1)
        return nn.Linear(3, 2)

    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def backward(m: Any) -> None:
        m.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()

    with OptimizerClient(server.base_url) as client:
        ma, mb = make(), make()
        a = RemoteOptimizer(
            ma.named_parameters(),
            {"name": "sgd", "lr": 0.1},
            client=client,
            consistency={"mode": "async", "max_staleness": 0},
        )
        b = RemoteOptimizer(mb.named_parameters(), session_id=a.session_id, client=client)
        backward(ma)
        backward(mb)
        a.step()
        assert a.version == 1
        b.step()  # computed on version 0: refused, the current params pulled instead
        assert (b.stale_refusals, b.version) == (1, 1)
        for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
            assert torch.equal(pa, pb)
        backward(mb)
        b.step()
        assert (b.version, b.stale_refusals) == (2, 1)
        backward(ma)  # on version 1, now stale
        a.step()
        assert (a.version, a.stale_refusals) == (2, 1)
        for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
            assert torch.equal(pa, pb)
        ms = make()
        strict = RemoteOptimizer(
            ms.named_parameters(), session_id=a.session_id, client=client, raise_on_stale=True
        )
        backward(ms)
        strict.version = 0  # pretend its gradients are old
        with pytest.raises(StaleGradientError) as info:
            strict.step()
        assert (info.value.current_version, info.value.base_version) == (2, 0)
        assert strict.version == 2
        grads = {n: np.zeros(tuple(s)) for n, s in client.get_session(a.session_id).shapes.items()}
        with pytest.raises(ValidationError):  # max_staleness needs base_version
            client.step(a.session_id, grads)
        answer = client.step(a.session_id, grads, base_version=2)
        assert (answer.staleness, answer.contributors) == (0, 1)
        a.delete_session()


# --- averages, metrics, history, waits, plots ----------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_averages_metrics_history_and_plots(server: LiveServer, binary: bool) -> None:
    p0 = np.array([1.0, -1.0, 0.5])
    grads = [np.array([0.5, 0.25, -1.0]) * (t + 1) for t in range(3)]
    plateau = {"name": "plateau", "factor": 0.5, "patience": 0}
    with OptimizerClient(server.base_url, binary=binary) as client:
        session = client.create_session(
            {"p": p0},
            {"name": "sgd", "lr": 0.1},
            plateau,
            dtype="float64",
            ema={"decay": 0.5, "bias_correction": False},
            swa={"start": 1, "every": 1},
            history=10,
        )
        assert session.ema == {"decay": 0.5, "bias_correction": False}
        assert session.swa == {"start": 1, "every": 1}
        assert session.history == 10
        with pytest.raises(NoAverageError):
            client.get_params(session.id, average="ema")
        ps = [p0]
        for t, g in enumerate(grads):
            result = client.step(session.id, {"p": g}, base_version=t)
            assert (result.staleness, result.contributors) == (0, 1)
            ps.append(ps[-1] - 0.1 * g)
        ema = ps[1]  # PyTorch's AveragedModel EMA: the first is a copy
        for p in ps[2:]:
            ema = ema + 0.5 * (p - ema)
        got = client.get_params(session.id, average="ema")
        assert (got.average, got.version) == ("ema", 3)
        np.testing.assert_allclose(got.params["p"], ema, rtol=1e-12)
        swa = client.get_params(session.id, average="swa")
        assert (swa.average, swa.averaged_steps) == ("swa", 3)
        np.testing.assert_allclose(swa.params["p"], np.mean(ps[1:], axis=0), rtol=1e-12)
        assert client.get_params(session.id).average is None

        first = client.post_metrics(session.id, 1.0)
        assert (first.version, first.lr, first.observed) == (3, 0.1, True)
        second = client.post_metrics(session.id, 2.0, idempotency_key="metrics-2")
        assert second.lr == pytest.approx(0.05)  # plateau, patience 0: halved
        assert client.post_metrics(session.id, 2.0, idempotency_key="metrics-2") == second
        with pytest.raises(ValueError, match="finite"):
            client.post_metrics(session.id, float("nan"))
        entries = client.history(session.id)
        assert [e.kind for e in entries] == ["metrics", "metrics", "step", "step", "step"]
        assert [e.loss for e in entries[:2]] == [2.0, 1.0]
        assert [e.version for e in entries[2:]] == [3, 2, 1]
        assert entries[2].grad_norm == pytest.approx(float(np.linalg.norm(grads[2])))
        assert entries[2].update_norm == pytest.approx(0.1 * float(np.linalg.norm(grads[2])))
        assert len(client.history(session.id, limit=2)) == 2

        assert client.get_params(session.id, min_version=3).version == 3
        with pytest.raises(WaitTimeoutError) as info:
            client.get_params(session.id, min_version=4, timeout=0.5)
        assert info.value.current_version == 3

        assert client.schedule_png(session.id).startswith(PNG_SIGNATURE)
        assert client.schedule_png(session.id, steps=50).startswith(PNG_SIGNATURE)
        preview = client.preview_schedule_png(
            {"name": "one_cycle", "max_lr": 0.1, "total_steps": 20}, 0.01, 20, current_step=5
        )
        assert preview.startswith(PNG_SIGNATURE)
        client.delete_session(session.id)

        plain = client.create_session({"p": p0}, {"name": "sgd", "lr": 0.1}, dtype="float64")
        with pytest.raises(ValidationError):  # keeps no average
            client.get_params(plain.id, average="swa")
        client.delete_session(plain.id)
