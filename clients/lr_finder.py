"""`lr_find`: an LR range test (Smith 2017; pytorch-lr-finder's ramp, smoothing and
divergence rule) run on an optserve server, with the loss and gradients computed here by
a NumPy function. `clients.torch.lr_find` is the same for a torch model.

    from clients import OptimizerClient, lr_find

    def loss_and_grads(p):  # least squares
        r = X @ p["w"] - y
        return float(r @ r / len(y)), {"w": 2 * X.T @ r / len(y)}

    with OptimizerClient() as client:
        result = lr_find(client, {"w": np.zeros(8)}, loss_and_grads, num_steps=100)
    print(result.stop_reason, result.suggestions["steepest"].lr)

The server runs the test: a session made with `lr_finder` steps at the ramp's rate `lr_i`
(whatever the optimizer's `lr`), each step carries the loss of the params it started
from, and the test ends when `num_steps` losses are in or the smoothed loss passes
`diverge_th` times the best. The loop here: the loss and gradients of the current
params, a step with that loss, the params it answers; so every loss the function
computes is one the test records (no step is wasted). To know when to stop without
asking the server after every step, the loop follows the divergence rule on the losses
it sent (the same float arithmetic as the server's) and asks the server
(`GET .../lr-finder`) only when that says the test is over; the server's answer is the
result (and, should the two ever disagree, the loop goes on until the server says it is
over, or refuses a step with `RangeTestOverError`).

A non-finite loss ends the test as diverged: a binary client sends it (as `"nan"` /
`"inf"`, with zero gradients: the step is not applied), so the server records it; JSON
cannot carry it, so with a `binary=False` client the loop stops there without telling
the server and returns the server's result marked as the server would have marked it
(`done`, `stop_reason="diverged"`, `nonfinite_lr` the rate of that step), with a
warning. The session is deleted at the end unless `keep_session`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from clients._progress import Bar, progress_bar
from clients.errors import OptserveError, RangeTestOverError
from clients.results import LRFinderResult
from clients.sync import OptimizerClient

__all__ = ["LossAndGrads", "lr_find"]

#: the params (name -> array) to their loss and gradients (name -> array)
LossAndGrads = Callable[[dict[str, np.ndarray]], tuple[float, Mapping[str, npt.ArrayLike]]]


class _Divergence:
    """The server's stopping rule (service.core.lr_finder.observe) on the losses sent:
    `s_0 = loss_0`, `s_i = f * loss_i + (1 - f) * s_{i-1}` (`f = smooth_f`, 0: none);
    over when `s_i > diverge_th * min(s)`, a loss is not finite, or `num_steps` are in."""

    def __init__(self, num_steps: int, smooth_f: float, diverge_th: float) -> None:
        self.num_steps, self.smooth_f, self.diverge_th = num_steps, smooth_f, diverge_th
        self.count = 0
        self.smoothed = math.nan
        self.best = math.inf

    def over_after(self, loss: float) -> bool:
        """Fold in the loss of the next step; whether the test is over after it."""
        f = self.smooth_f
        smoothed = loss if self.count == 0 or f == 0 else f * loss + (1 - f) * self.smoothed
        if not (math.isfinite(loss) and math.isfinite(smoothed)):
            return True
        self.count += 1
        self.smoothed = smoothed
        self.best = min(self.best, smoothed)
        return smoothed > self.diverge_th * self.best or self.count >= self.num_steps


def lr_find(
    client: OptimizerClient | None,
    params: Mapping[str, npt.ArrayLike],
    loss_and_grads: LossAndGrads,
    *,
    optimizer: Mapping[str, Any] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: Literal["exp", "linear"] = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    dtype: str = "float32",
    progress: bool = False,
    keep_session: bool = False,
) -> LRFinderResult:
    """Run an LR range test on the server from `params` (name -> array), with
    `loss_and_grads(params) -> (loss, grads)` (see the module docstring); the result is
    the server's `GET .../lr-finder` at the end (its `suggestions` by method), with
    `session_id` set.

    `client`: an `OptimizerClient` (None: one from `OPTSERVE_URL` / `OPTSERVE_API_KEY`,
    closed at the end). `optimizer`: the session's optimizer spec (default
    `{"name": "sgd"}`; its `lr` is not used: each step runs at the ramp's rate).
    `start_lr`, `end_lr`, `num_steps` (17 to 10000), `mode` ("exp" or "linear"),
    `smooth_f`, `diverge_th`: the range test's (pytorch-lr-finder's names and defaults,
    fastai's `start_lr`). `dtype`: the session's. `progress`: a tqdm progress bar (tqdm
    is not a dependency of the clients: installed separately). `keep_session`: leave
    the session on the server (for `lr_finder_png`, ...) instead of deleting it.
    Gradients may leave out tensors (sent with `skip_missing`).
    """
    config: dict[str, Any] = {
        "start_lr": float(start_lr),
        "end_lr": float(end_lr),
        "num_steps": int(num_steps),
        "mode": mode,
        "smooth_f": float(smooth_f),
        "diverge_th": float(diverge_th),
    }
    current = {str(n): np.asarray(v, dtype=dtype) for n, v in params.items()}
    own_client = client is None
    http = OptimizerClient() if client is None else client
    try:
        with progress_bar(
            progress, int(num_steps), desc="lr_find", unit="step", caller="lr_find(progress=True)"
        ) as bar:
            session = http.create_session(
                current, dict(optimizer or {"name": "sgd"}), dtype=dtype, lr_finder=config
            )
            try:
                result = _run(http, session.id, current, loss_and_grads, config, bar)
            except BaseException:
                if not keep_session:
                    with suppress(OptserveError):  # best effort: the first error is the one
                        http.delete_session(session.id)
                raise
            if not keep_session:
                http.delete_session(session.id)
            return replace(result, session_id=session.id)
    finally:
        if own_client:
            http.close()


def _run(
    client: OptimizerClient,
    session_id: str,
    params: dict[str, np.ndarray],
    loss_and_grads: LossAndGrads,
    config: Mapping[str, Any],
    bar: Bar,
) -> LRFinderResult:
    rule = _Divergence(config["num_steps"], config["smooth_f"], config["diverge_th"])
    while True:
        value, grads = loss_and_grads(params)
        loss = float(value)
        if not math.isfinite(loss):
            return _nonfinite(client, session_id, params, loss)
        skip_missing = not set(params) <= set(grads)
        try:
            answer = client.step(session_id, grads, loss=loss, skip_missing=skip_missing)
        except RangeTestOverError:  # the server's rule stopped it before ours did
            return client.lr_finder(session_id)
        if answer.params is None:  # pragma: no cover - we ask for params
            raise OptserveError("the server answered a range-test step without params")
        params = answer.params
        bar.update(1)
        bar.set_postfix(lr=f"{answer.lr:.3g}", loss=f"{loss:.4g}")
        if rule.over_after(loss):
            result = client.lr_finder(session_id)
            if result.done:
                return result


def _nonfinite(
    client: OptimizerClient, session_id: str, params: Mapping[str, np.ndarray], loss: float
) -> LRFinderResult:
    """The end of a test on a non-finite loss (see the module docstring)."""
    if client.binary:
        zeros = {n: np.zeros_like(a) for n, a in params.items()}  # the step is not applied
        with suppress(RangeTestOverError):
            client.step(session_id, zeros, loss=loss, return_="none")
        return client.lr_finder(session_id)
    result = client.lr_finder(session_id)
    warnings.warn(
        f"lr_find: a non-finite loss ({loss}) at rate {result.next_lr}: the range test "
        "diverged; a JSON client (binary=False) cannot send it, so the server's session "
        "was not told (its test is still open)",
        RuntimeWarning,
        stacklevel=3,
    )
    return replace(
        result, done=True, stop_reason="diverged", nonfinite_lr=result.next_lr, next_lr=None
    )
