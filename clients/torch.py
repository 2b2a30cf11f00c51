"""A `torch.optim.Optimizer` whose step runs on an optserve server.

`RemoteOptimizer` is a drop-in optimizer for a PyTorch training loop: it registers the
model's parameters as a session (their current values, binary), and each `step()` sends
the gradients and writes the parameters the server answers back into the model, in
place. The optimizer state and the learning-rate schedule live on the server, so a job
can stop and resume (or move to another machine) against the same session::

    import torch
    from clients.torch import RemoteOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = RemoteOptimizer(
        model.named_parameters(),
        {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        {"name": "cosine", "T_max": 1000, "warmup": {"steps": 100, "start_factor": 0.1}},
    )  # the server from OPTSERVE_URL, the key from OPTSERVE_API_KEY
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss.item())  # the loss is optional (plateau schedules use it)
        print(opt.param_groups[0]["lr"])  # the rate the server used for this step

    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")
    # later, elsewhere: the same session, its params pulled into the model
    opt = RemoteOptimizer(model.named_parameters(), {"name": "adamw"})
    opt.load_state_dict(torch.load("ckpt.pt")["opt"])

How it maps to torch:

* **The schedule runs on the server** (`schedule`, the `torch.optim.lr_scheduler`
  equivalents of docs/api.md). After every step `param_groups[0]["lr"]` is the rate the
  server used for that step (before the first step: the rate the first step will use),
  so LR loggers and progress bars show it. Writing `lr` yourself, or attaching a
  `torch.optim.lr_scheduler` to this optimizer, has no effect (a warning says so).
* **Parameters without a gradient** (`.grad` is None: frozen, or unused in this
  forward) are skipped, as torch skips them: they and their optimizer state stay as
  they were (the step's `skip_missing`). One difference: the server counts steps per
  session, not per parameter, so a parameter skipped at some steps and updated at
  others later gets the bias corrections (Adam, ...) of the session's step count.
* **`step(closure)`** calls the closure with gradients enabled, as torch optimizers do,
  and sends its return value as the step's `loss` (unless `loss=` is given).
* **`zero_grad(set_to_none=True)`** is torch's.
* **`state_dict()`** holds no tensors: torch's `state` (empty) and `param_groups`, plus
  `"optserve": {"session_id", "step", "version"}`. **`load_state_dict()`** switches to
  that session and copies its current params from the server into the model. A session
  this optimizer made and never stepped is deleted when it switches away from it.
* One parameter group (a session has one set of hyperparameters); parameters of any
  device, of one floating dtype: float32 or float64 (the session's `dtype`). Sparse
  gradients are refused.

Distributed training (docs/training.md): several `RemoteOptimizer`s (one per worker,
each with its model replica) may step one session (`session_id=`). Every step sends
`base_version`, the version of the params the gradients were computed on:

* **sync sessions** (`consistency={"mode": "sync", "accumulate": K}`): a push that does
  not complete the accumulation waits for the step, first on the server (`wait`, sent
  with each step of a sync session, default 30 s), then by polling for the version it
  waits for; so `step()` returns once the K gradients were applied, with the new params
  in the model. When the step's rate is unknown (the params of a poll carry none),
  `param_groups[0]["lr"]` keeps its value.
* **stale gradients** (an async session's `max_staleness`, or a sync session that moved
  on): the server refuses the step (nothing applied). `step()` then pulls the session's
  current params into the model, counts the refusal in `stale_refusals` and returns
  without raising (the gradients are dropped: compute the next ones on the fresh
  params); `raise_on_stale=True` raises the `StaleGradientError` instead (after the
  pull).

`averaged_state("ema" | "swa")` reads a session's parameter average (made with `ema=` /
`swa=`) as tensors; `lr_find(model, loss_fn, data)` runs an LR range test of the model
on the server and restores its weights afterwards.

Federated learning (docs/federated.md): `torch_train(model, fit)` is the `train` of a
`clients.FederatedWorker` for a torch model, and `numpy_params(model)` its parameters
as the params of a new session::

    def fit(model, round):  # local epochs on this client's data
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return len(loader.dataset), {"loss": loss.item()}

    worker = FederatedWorker(client, session_id, "c1", torch_train(model, fit))
    worker.run(rounds=10)

The session's tensor names are the model's `state_dict()` names (its parameters', as
`named_parameters()` gives them, and buffers' if the session holds some): each round
copies the global params into those tensors in place (on their device, in their dtype),
calls `fit`, and reads the same tensors back.

This module is the only one of `clients` that imports torch.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from typing import Any, Literal

import numpy as np
import torch

from clients import OptimizerClient
from clients.errors import OptserveError, StaleGradientError
from clients.federated import LocalResult
from clients.lr_finder import lr_find as _lr_find_numpy
from clients.results import LRFinderResult

__all__ = ["RemoteOptimizer", "lr_find", "numpy_params", "torch_train"]

_DTYPES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float64: "float64"}
StateDict = dict[str, Any]


class RemoteOptimizer(torch.optim.Optimizer):
    """`torch.optim.Optimizer` over an optserve session (see the module docstring).

    `named_parameters`: `model.named_parameters()` (or a mapping name -> parameter);
    the names become the session's tensor names. `optimizer`: the optimizer spec,
    `{"name": "adam", "lr": ..., ...}` with torch.optim's names and defaults.
    `schedule`: an optional schedule spec. `client`: an `OptimizerClient` (default:
    one made from `OPTSERVE_URL` / `OPTSERVE_API_KEY`, closed by `close()`). `dtype`:
    the session's dtype (default: the parameters'). `session_id`: resume an existing
    session instead of creating one (its params are copied into the model; `optimizer`
    and `schedule` are then not needed, and not used: the session has its own).
    `transforms` / `nonfinite`: the session's gradient clipping and non-finite policy
    (API extensions), and `consistency`, `ema`, `swa`, `history` (docs/training.md),
    passed to `create_session` (not used with `session_id`). `wait`: the server-side
    wait of each step in a sync session (seconds, at most 60; None: not sent, the
    client polls). `raise_on_stale`: raise `StaleGradientError` on a stale gradient
    (after pulling the current params) instead of counting it in `stale_refusals` and
    returning (see the module docstring).
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        *,
        client: OptimizerClient | None = None,
        dtype: str | None = None,
        session_id: str | None = None,
        transforms: Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
        consistency: str | Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
        swa: Mapping[str, Any] | None = None,
        history: int | None = None,
        wait: float | None = 30.0,
        raise_on_stale: bool = False,
    ) -> None:
        items = list(
            named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters
        )
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(
                    "RemoteOptimizer takes (name, parameter) pairs, such as "
                    "model.named_parameters(), or a mapping of names to parameters"
                )
        if optimizer is None and session_id is None:
            raise ValueError("give an optimizer spec, or the session_id of a session to resume")
        spec = dict(optimizer or {})
        super().__init__([{"params": items}], {"lr": float(spec.get("lr", 0.0))})
        self._params: dict[str, torch.Tensor] = dict(zip(self._names, self._tensors, strict=True))
        dtypes = {p.dtype for p in self._tensors}
        if not dtypes <= set(_DTYPES) or len(dtypes) != 1:
            raise TypeError(
                "the parameters must all be float32 or all float64, not "
                + ", ".join(sorted(str(d) for d in dtypes))
            )
        self._dtype = dtype or _DTYPES[dtypes.pop()]
        self._owns_client = client is None
        self.client = client if client is not None else OptimizerClient()
        self.session_id = ""
        self.server_step = 0
        self.version = 0
        #: steps refused as stale (whose gradients were dropped)
        self.stale_refusals = 0
        self.wait = None if wait is None else float(wait)
        self.raise_on_stale = raise_on_stale
        self._sync = False
        self._owns_session = False
        self._lr_written = math.nan
        if session_id is not None:
            self._attach(session_id)
        else:
            with torch.no_grad():
                values = {n: _to_numpy(p, self._dtype) for n, p in self._params.items()}
            session = self.client.create_session(
                values,
                spec,
                schedule,
                dtype=self._dtype,
                transforms=transforms,
                nonfinite=nonfinite,
                consistency=consistency,
                ema=ema,
                swa=swa,
                history=history,
            )
            self._owns_session = True
            self._sync = session.sync
            self._adopt(session.id, session.step, session.version, session.lr)

    # the parameter group ----------------------------------------------------------------

    @property
    def _group(self) -> dict[str, Any]:
        return self.param_groups[0]

    @property
    def _names(self) -> list[str]:
        names: list[str] = self._group["param_names"]
        return names

    @property
    def _tensors(self) -> list[torch.Tensor]:
        tensors: list[torch.Tensor] = self._group["params"]
        return tensors

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """One group only: a session has one set of hyperparameters."""
        if self.param_groups:
            raise ValueError("RemoteOptimizer has one parameter group (one session)")
        super().add_param_group(param_group)

    # stepping -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | None = None) -> Any:
        """Send the gradients, write the new params into the model, set the group's lr.

        Parameters whose `.grad` is None are skipped (unchanged, their state too).
        `loss` (or the closure's return value) is sent as the step's loss. Returns the
        closure's return value (None without a closure), as torch optimizers do.

        The gradients' `base_version` is `self.version`; in a sync session the call
        returns once the accumulated step happened. A stale gradient pulls the current
        params instead (`stale_refusals`; see the module docstring).
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if loss is None and result is not None:
            loss = float(result.detach() if isinstance(result, torch.Tensor) else result)
        self._warn_if_lr_written()
        grads: dict[str, np.ndarray] = {}
        for name, p in self._params.items():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"RemoteOptimizer does not take sparse gradients ({name!r})")
            grads[name] = _to_numpy(p.grad, self._dtype)
        try:
            answer = self.client.step(
                self.session_id,
                grads,
                loss=loss,
                skip_missing=len(grads) < len(self._params),
                base_version=self.version,
                wait=self.wait if self._sync else None,
            )
        except StaleGradientError:
            self.stale_refusals += 1
            self.pull()
            if self.raise_on_stale:
                raise
            return result
        if answer.params is None:  # pragma: no cover - we ask for params
            raise RuntimeError("the server answered no params")
        self._write(answer.params)
        self.server_step, self.version = answer.step, answer.version
        if not math.isnan(answer.lr):  # a waited-for sync step read by a poll has no rate
            self._set_lr(answer.lr)
        return result

    def pull(self) -> None:
        """Copy the session's current params into the model (and its step and version)."""
        got = self.client.get_params(self.session_id)
        self._write(got.params)
        self.server_step, self.version = got.step, got.version

    def averaged_state(self, kind: Literal["ema", "swa"]) -> dict[str, torch.Tensor]:
        """The session's average of the params (`"ema"` or `"swa"`, the session made
        with `ema=` / `swa=`) as new tensors, by parameter name, each with its
        parameter's shape, dtype and device (`NoAverageError` before any step was
        averaged). Load them with `model.load_state_dict(opt.averaged_state("ema"),
        strict=False)` (its names are the model's parameter names)."""
        got = self.client.get_params(self.session_id, average=kind)
        out: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            value = torch.from_numpy(np.array(got.params[name]))
            out[name] = value.reshape(p.shape).to(device=p.device, dtype=p.dtype)
        return out

    def _write(self, params: Mapping[str, np.ndarray]) -> None:
        """Copy the server's params into the model's tensors, in place."""
        with torch.no_grad():
            for name, p in self._params.items():
                value = np.asarray(params[name])
                if not value.flags.writeable:  # torch.from_numpy wants a writable array
                    value = value.copy()
                p.copy_(torch.from_numpy(value).reshape(p.shape))

    def _set_lr(self, lr: float) -> None:
        self._group["lr"] = float(lr)
        self._lr_written = float(lr)

    def _warn_if_lr_written(self) -> None:
        lr = self._group["lr"]
        if lr != self._lr_written and not (math.isnan(lr) and math.isnan(self._lr_written)):
            warnings.warn(
                f"param_groups[0]['lr'] was set to {lr} outside RemoteOptimizer: the server's "
                "schedule gives the rate; give RemoteOptimizer a schedule instead of using "
                "a torch.optim.lr_scheduler",
                RuntimeWarning,
                stacklevel=3,
            )
            self._lr_written = lr

    # checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> StateDict:
        """torch's layout (`state`, `param_groups`) without tensors, plus the session:
        `{"optserve": {"session_id", "step", "version"}}`."""
        group = {k: v for k, v in self._group.items() if k != "params"}
        group["params"] = list(range(len(self._tensors)))
        return {
            "state": {},
            "param_groups": [group],
            "optserve": {
                "session_id": self.session_id,
                "step": self.server_step,
                "version": self.version,
            },
        }

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Continue the session of `state_dict` (from `state_dict()`): its current params
        are copied from the server into the model, and the group's lr is the rate its
        next step will use. Warns when the server's session has moved on since the
        checkpoint (its step is not the saved one)."""
        saved = state_dict.get("optserve")
        if not isinstance(saved, Mapping) or not isinstance(saved.get("session_id"), str):
            raise ValueError("not a RemoteOptimizer state_dict: no optserve.session_id")
        previous, owned, stepped = self.session_id, self._owns_session, self.server_step > 0
        self._attach(saved["session_id"])
        if "step" in saved and int(saved["step"]) != self.server_step:
            warnings.warn(
                f"session {self.session_id} is at step {self.server_step}, the checkpoint at "
                f"step {saved['step']}: continuing from the server's step",
                RuntimeWarning,
                stacklevel=2,
            )
        if owned and not stepped and previous and previous != self.session_id:
            with suppress(OptserveError):  # made by __init__, replaced before any step
                self.client.delete_session(previous)

    def _attach(self, session_id: str) -> None:
        """Use the existing session `session_id`; its params go into the model."""
        session = self.client.get_session(session_id)
        shapes = {n: tuple(int(d) for d in s) for n, s in session.shapes.items()}
        mine = {n: tuple(p.shape) for n, p in self._params.items()}
        if shapes != mine:
            raise ValueError(
                f"session {session_id} holds tensors {shapes}, the model {mine}: "
                "not the same parameters"
            )
        got = self.client.get_params(session_id)
        self._write(got.params)
        self._dtype = session.dtype
        self._sync = session.sync
        self._owns_session = False
        self._adopt(session.id, got.step, got.version, session.lr)

    def _adopt(self, session_id: str, step: int, version: int, lr: float) -> None:
        self.session_id, self.server_step, self.version = session_id, step, version
        self._set_lr(lr)

    # lifetime -----------------------------------------------------------------------------

    def delete_session(self) -> None:
        """Delete the session on the server (the end of a job that will not resume)."""
        self.client.delete_session(self.session_id)

    def close(self) -> None:
        """Close the client if this optimizer made it."""
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return (
            f"RemoteOptimizer(session={self.session_id!r}, step={self.server_step}, "
            f"lr={self._group['lr']}, tensors={len(self._tensors)})"
        )


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor's values as a NumPy array of the session's dtype (on the CPU)."""
    array: np.ndarray = t.detach().to("cpu").numpy()
    return array.astype(dtype, copy=False)


# --- the LR range test ---------------------------------------------------------------------

Batch = tuple[Any, Any]


def lr_find(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Iterable[Batch],
    *,
    client: OptimizerClient | None = None,
    optimizer: Mapping[str, Any] | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: Literal["exp", "linear"] = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    progress: bool = False,
    keep_session: bool = False,
) -> LRFinderResult:
    """An LR range test of `model` on the server (`clients.lr_find`, whose arguments
    these are; see clients/lr_finder.py), as pytorch-lr-finder's `range_test`.

    `data`: `(inputs, targets)` batches, cycled when the test needs more of them than
    one pass gives (a `DataLoader`, a list, ...: it is iterated again; a one-shot
    iterator that runs out is an error); tensors are moved to the device of the
    model's parameters. Each step computes `loss_fn(model(inputs), targets)` in train
    mode and its gradients of the parameters that require them (the session holds
    those; the others stay as they are). At the end, the model's weights (its whole
    `state_dict`) and mode are restored to what they were before and its gradients
    zeroed (`zero_grad(set_to_none=True)`), as pytorch-lr-finder's `reset()` does. The
    session's dtype is the parameters' (float32 or float64).
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no parameter that requires a gradient")
    dtypes = {p.dtype for p in named.values()}
    if not dtypes <= set(_DTYPES) or len(dtypes) != 1:
        raise TypeError(
            "lr_find needs parameters all float32 or all float64, not "
            + ", ".join(sorted(str(d) for d in dtypes))
        )
    dtype = _DTYPES[dtypes.pop()]
    device = next(iter(named.values())).device
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    batches = _cycle(data)

    def loss_and_grads(params: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        inputs, targets = next(batches)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(torch.from_numpy(np.array(params[name])).reshape(p.shape))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(model(_to_device(inputs, device)), _to_device(targets, device))
            torch.autograd.backward(loss)
        grads = {n: _to_numpy(p.grad, dtype) for n, p in named.items() if p.grad is not None}
        return float(loss.detach()), grads

    with torch.no_grad():
        initial = {n: _to_numpy(p, dtype) for n, p in named.items()}
    try:
        model.train()
        return _lr_find_numpy(
            client,
            initial,
            loss_and_grads,
            optimizer=optimizer,
            start_lr=start_lr,
            end_lr=end_lr,
            num_steps=num_steps,
            mode=mode,
            smooth_f=smooth_f,
            diverge_th=diverge_th,
            dtype=dtype,
            progress=progress,
            keep_session=keep_session,
        )
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def _cycle(data: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of `data` again and again (a new pass when one ends)."""
    for epoch in itertools.count():
        served = False
        for batch in data:
            served = True
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"lr_find takes (inputs, targets) batches, not {type(batch).__name__}"
                )
            yield batch[0], batch[1]
        if not served:
            raise ValueError(
                "lr_find: the data gave no batch"
                + (
                    " in its second pass (an iterator that runs out cannot be cycled: "
                    "pass a DataLoader or a list)"
                    if epoch
                    else ""
                )
            )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


# --- federated learning --------------------------------------------------------------------

#: `fit(model, round)` of `torch_train`: the examples trained on, and optional metrics
FitResult = int | tuple[int, Mapping[str, float] | None]


def numpy_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters (`named_parameters()`) as NumPy arrays (copies, on the
    CPU): the params of a federated session for `torch_train`."""
    with torch.no_grad():
        return {name: _numpy_copy(p) for name, p in model.named_parameters()}


def torch_train(
    model: torch.nn.Module, fit: Callable[[torch.nn.Module, int], FitResult]
) -> Callable[[dict[str, np.ndarray], int], LocalResult]:
    """The `train(global_params, round)` of a `clients.FederatedWorker` for `model`:
    copies the round's global params into the model's tensors of the same names (its
    `state_dict()` names, in place), runs `fit(model, round)`, which trains it and
    returns the number of examples (or `(num_examples, metrics)`), and returns those
    tensors' new values as NumPy arrays (see the module docstring)."""

    def train(params: dict[str, np.ndarray], round: int) -> LocalResult:
        state = model.state_dict()
        unknown = [name for name in params if name not in state]
        if unknown:
            raise ValueError(
                f"the session holds tensors the model has not: {unknown} (the session's "
                "names must be the model's state_dict names, as numpy_params gives them)"
            )
        with torch.no_grad():
            for name, value in params.items():
                target = state[name]
                target.copy_(torch.from_numpy(np.array(value)).reshape(target.shape))
        done = fit(model, round)
        num_examples, metrics = done if isinstance(done, tuple) else (done, None)
        with torch.no_grad():
            state = model.state_dict()
            weights = {name: _numpy_copy(state[name]) for name in params}
        return LocalResult(weights, int(num_examples), metrics)

    return train


def _numpy_copy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a new NumPy array on the CPU (bfloat16 as float32)."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        t = t.float()
    array: np.ndarray = t.numpy().copy()
    return array
