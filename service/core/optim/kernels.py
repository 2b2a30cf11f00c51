"""Fused single-pass optimizer kernels (numba: nopython, parallel, cached).

What is fused: a whole optimizer step. `adam_step` is Adam and AdamW with every option
(betas, eps, amsgrad, maximize, L2 or decoupled weight decay); `sgd_step` is SGD with
momentum, dampening, Nesterov, weight decay, maximize and torch's lazy momentum buffer.
Each reads every element of the gradient, the params and the state arrays once, does
the step's arithmetic in registers and writes params and state back once.

Why: the NumPy reference (`step_numpy`) makes one pass over memory per operation (Adam:
about ten, several of them through a temporary array), so on a large session it is
bound by memory traffic and allocation: about 3x torch's fused kernels. One pass moves
the minimum (Adam: read 4 arrays, write 3), as `torch.optim.Adam(fused=True)` does. The
loop is a `prange`, which numba splits into one contiguous block per thread and LLVM
vectorizes (AVX2/AVX-512). Steps on fewer than `PARALLEL_MIN_SIZE` elements run on the
calling thread only: waking the others costs more than the work.

Same numbers: the kernels do the operations of the NumPy references (and of torch's
single-tensor loops) in the same order and in the array's dtype. Every scalar
coefficient is passed as `params.dtype.type(x)`, since numba would promote a float32
element times a float64 scalar to float64 (torch computes float32 in float32), and
there is no `fastmath`, which lets LLVM reorder and contract (FMA) operations. The
result is bit for bit that of `step_numpy`. Options that change the data flow
(amsgrad's extra array, SGD's momentum buffer: none, first step, later steps) get their
own specialised kernel; the others are loop-invariant values (maximize multiplies by
-1, which is exact; decoupled decay is a factor that is exactly 1 when off; L2 decay,
Nesterov and torch's large-weight lerp are selects on a flag), so the hot loop has no
data-dependent branch and vectorizes.

Tested: tests/core/test_torch_parity.py runs every option combination with
`impl="fused"` against torch.optim (200 steps, float64 to 1e-10, float32 to 1e-5), as it
does the NumPy references; benchmarks/core.py times them against torch's fused kernels.

Compiling: importing this module compiles nothing. Kernels are compiled on first use
(one per specialisation and dtype) and cached on disk (`cache=True`); `warm_up()`
compiles or loads all of them for float32 and float64, so that a server pays at start-up.
`AVAILABLE` (computed on first access) is True when numba imports and compiles a tiny
parallel loop; otherwise `impl="auto"` uses the NumPy path.

Threads: numba's default (one per core) unless the environment variable
`OPTSERVE_NUM_THREADS` or `set_num_threads()` says otherwise. numba's default threading
layer here is GNU OpenMP, which is not fork-safe: a pre-forking server should warm up
in each worker, not in the parent.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.core.errors import CoreError
from service.core.state import OptState


class AdamOptions(Protocol):
    """What `adam_step` reads of a hyperparameter set (`adam.AdamHyper` has it all): the
    kernels are defined here, beside the type they take, and import no optimizer."""

    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def decoupled_weight_decay(self) -> bool: ...
    @property
    def amsgrad(self) -> bool: ...
    @property
    def maximize(self) -> bool: ...


class SGDOptions(Protocol):
    """What `sgd_step` reads of a hyperparameter set (`sgd.SGDHyper` has it all)."""

    @property
    def momentum(self) -> float: ...
    @property
    def dampening(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def nesterov(self) -> bool: ...
    @property
    def maximize(self) -> bool: ...


@dataclass(frozen=True)
class _Adam:
    """torch.optim.Adam's defaults, for `warm_up`."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False


@dataclass(frozen=True)
class _SGD:
    """torch.optim.SGD's defaults, for `warm_up`."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False


THREADS_ENV = "OPTSERVE_NUM_THREADS"

_lock = threading.RLock()
#: the thread count asked for (OPTSERVE_NUM_THREADS or set_num_threads); None: numba's
_threads: int | None = None
_threads_read = False
#: compiled-on-demand kernels by (family, specialisation)
_kernels: dict[tuple[str, int], Any] = {}

#: steps on fewer elements than this run on one thread (measured: two threads start to
#: pay off between 16k and 32k float32 elements for both Adam and SGD)
PARALLEL_MIN_SIZE = 32768

# SGD kernel specialisations
_SGD_PLAIN, _SGD_FIRST, _SGD_MOMENTUM = 0, 1, 2


def __getattr__(name: str) -> bool:
    """`AVAILABLE`, computed on first access (it compiles a tiny kernel)."""
    if name == "AVAILABLE":
        return _check_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_available() -> bool:
    with _lock:
        if "AVAILABLE" not in globals():  # set once probed (or by a test's monkeypatch)
            globals()["AVAILABLE"] = _probe()
        return bool(globals()["AVAILABLE"])


def _probe() -> bool:
    try:
        import numba

        def tiny(x: Any) -> Any:
            total = 0.0
            for i in numba.prange(x.shape[0]):
                total += x[i]
            return total

        return bool(numba.njit(parallel=True)(tiny)(np.ones(4)) == 4.0)
    except Exception:
        return False


def _max_threads() -> int:
    import numba

    config: Any = numba.config
    return int(config.NUMBA_NUM_THREADS)


def set_num_threads(count: int | None) -> None:
    """Run the kernels on `count` threads (None: numba's setting for the calling thread).

    Values above numba's maximum (`NUMBA_NUM_THREADS`, the core count by default) are
    clamped to it. Numba's own setting is per thread; this one holds for every thread
    that calls the kernels (it is applied per call). Overrides `OPTSERVE_NUM_THREADS`.
    """
    global _threads, _threads_read
    import numba

    if count is not None and count < 1:
        raise ValueError(f"thread count must be >= 1: got {count}")
    _threads = None if count is None else min(int(count), _max_threads())
    _threads_read = True
    if _threads is not None:
        numba.set_num_threads(_threads)


def _apply_threads() -> None:
    global _threads_read
    if not _threads_read:
        value = os.environ.get(THREADS_ENV, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                count = 0
            if count < 1:
                raise ValueError(f"{THREADS_ENV} must be a positive integer: got {value!r}")
            set_num_threads(count)
        _threads_read = True
    if _threads is not None:
        import numba

        if numba.get_num_threads() != _threads:
            numba.set_num_threads(_threads)


def _jit(func: Callable[..., None]) -> Any:
    import numba

    try:
        return numba.njit(parallel=True, cache=True, nogil=True)(func)
    except RuntimeError:  # no writable cache location: compile without one
        return numba.njit(parallel=True, nogil=True)(func)


# --- Adam / AdamW -----------------------------------------------------------------------


def _make_adam(amsgrad: int) -> Any:
    import numba

    def adam(p: Any, g: Any, m: Any, v: Any, vmax: Any, flags: Any, coeffs: Any) -> None:
        # flags: (l2, small); coeffs, all in the params' dtype: (sign, wd, decay, weight,
        # beta2, 1 - beta2, -step size, sqrt of the second bias correction, eps)
        l2, small = flags
        sign, wd, decay, weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps = coeffs
        for i in numba.prange(p.shape[0]):
            gi = sign * g[i]  # maximize: sign = -1, an exact negation
            pi = p[i]
            if l2:
                gi = gi + wd * pi
            pi = pi * decay  # decoupled weight decay (decay = 1 when off, exact)
            mi = m[i]
            # torch lerp_: m + w * (g - m) for w < 0.5, else g - (g - m) * (1 - w);
            # weight is w or -(1 - w), and adding the negated product is the same
            base = mi if small else gi
            mi = base + weight * (gi - mi)
            m[i] = mi
            vi = beta2 * v[i] + one_minus_beta2 * gi * gi
            v[i] = vi
            if amsgrad:
                vi = np.maximum(vmax[i], vi)
                vmax[i] = vi
            denom = np.sqrt(vi) / bc2_sqrt + eps
            p[i] = pi + neg_step_size * mi / denom

    return _jit(adam)


def adam_step(
    hp: AdamOptions, grads: np.ndarray, state: OptState, params: np.ndarray, lr: float
) -> None:
    """One Adam/AdamW step in place on `params` and `state` (see `Adam.step_numpy`)."""
    beta1, beta2 = hp.betas
    step = state.step + 1
    lr = float(lr)
    decoupled = hp.weight_decay != 0 and hp.decoupled_weight_decay
    weight = 1.0 - beta1
    small = abs(weight) < 0.5
    dt = params.dtype.type
    arrays = [params, state.arrays["exp_avg"], state.arrays["exp_avg_sq"]]
    if hp.amsgrad:
        arrays.append(state.arrays["max_exp_avg_sq"])
    outs = [_writable(a) for a in arrays]
    p, m, v = outs[:3]
    vmax = outs[3] if hp.amsgrad else v
    _run(
        _kernel("adam", int(hp.amsgrad)),
        p.size,
        p,
        _readonly(grads),
        m,
        v,
        vmax,
        (bool(hp.weight_decay != 0 and not decoupled), small),
        (
            dt(-1.0 if hp.maximize else 1.0),
            dt(hp.weight_decay),
            dt(1.0 - lr * hp.weight_decay if decoupled else 1.0),
            dt(weight if small else -(1.0 - weight)),
            dt(beta2),
            dt(1.0 - beta2),
            dt(-(lr / (1.0 - beta1**step))),
            dt((1.0 - beta2**step) ** 0.5),
            dt(hp.eps),
        ),
    )
    _copy_back(arrays, outs)
    state.scalars["step"] = step


# --- SGD --------------------------------------------------------------------------------


def _make_sgd(mode: int) -> Any:
    import numba

    def sgd(p: Any, g: Any, buf: Any, flags: Any, coeffs: Any) -> None:
        # flags: (l2, nesterov); coeffs, all in the params' dtype: (sign, wd, momentum,
        # 1 - dampening, -lr)
        l2, nesterov = flags
        sign, wd, momentum, one_minus_dampening, neg_lr = coeffs
        for i in numba.prange(p.shape[0]):
            gi = sign * g[i]  # maximize: sign = -1, an exact negation
            pi = p[i]
            if l2:
                gi = gi + wd * pi
            if mode == _SGD_FIRST:  # torch's buffer starts as a copy of the gradient
                bi = gi
                buf[i] = bi
                gi = gi + momentum * bi if nesterov else bi
            elif mode == _SGD_MOMENTUM:
                bi = momentum * buf[i] + one_minus_dampening * gi
                buf[i] = bi
                gi = gi + momentum * bi if nesterov else bi
            p[i] = pi + neg_lr * gi

    return _jit(sgd)


def sgd_step(
    hp: SGDOptions, grads: np.ndarray, state: OptState, params: np.ndarray, lr: float
) -> None:
    """One SGD step in place on `params` and `state` (see `SGD.step_numpy`)."""
    lr = float(lr)
    dt = params.dtype.type
    arrays = [params]
    if hp.momentum == 0:
        mode = _SGD_PLAIN
    elif "momentum_buffer" in state.arrays:
        mode = _SGD_MOMENTUM
        arrays.append(state.arrays["momentum_buffer"])
    else:
        mode = _SGD_FIRST
        arrays.append(np.empty(params.shape, params.dtype))
    outs = [_writable(a) for a in arrays]
    p = outs[0]
    buf = outs[1] if mode != _SGD_PLAIN else p
    _run(
        _kernel("sgd", mode),
        p.size,
        p,
        _readonly(grads),
        buf,
        (bool(hp.weight_decay != 0), bool(hp.nesterov)),
        (
            dt(-1.0 if hp.maximize else 1.0),
            dt(hp.weight_decay),
            dt(hp.momentum),
            dt(1.0 - hp.dampening),
            dt(-lr),
        ),
    )
    _copy_back(arrays, outs)
    if mode == _SGD_FIRST:
        state.arrays["momentum_buffer"] = arrays[1]
    state.scalars["step"] = state.step + 1


# --- plumbing ---------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[[int], Any]] = {"adam": _make_adam, "sgd": _make_sgd}


def _kernel(family: str, variant: int) -> Any:
    key = (family, variant)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                if not _check_available():
                    raise CoreError(
                        "the fused kernels are unavailable here (numba): use impl='numpy'"
                    )
                kernel = _kernels[key] = _FACTORIES[family](variant)
    return kernel


def _run(kernel: Any, size: int, *args: Any) -> None:
    _apply_threads()
    if size >= PARALLEL_MIN_SIZE:
        kernel(*args)
        return
    # a small step runs on the calling thread alone: waking the other threads costs
    # more than the work (and contends with other OpenMP pools, e.g. torch's)
    import numba

    before = numba.get_num_threads()
    if before == 1:
        kernel(*args)
        return
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(before)


def _writable(a: np.ndarray) -> np.ndarray:
    """`a` itself if the kernels can write it (C-contiguous, aligned), else a copy."""
    if a.flags.c_contiguous and a.flags.aligned and a.flags.writeable:
        return a
    return np.require(a, requirements=["C", "A", "W", "O"])


def _copy_back(arrays: list[np.ndarray], outs: list[np.ndarray]) -> None:
    for a, out in zip(arrays, outs, strict=True):
        if out is not a:
            a[...] = out


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous view of `a` (a copy only if `a` is strided/unaligned).

    The kernels take the gradient read-only: numba refuses to compile a write to it,
    and every caller's gradient (writable or not, e.g. decoded from request bytes) has
    the same numba type, so one compiled kernel serves all.
    """
    a = np.require(a, requirements=["C", "A"])
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def warm_up() -> float:
    """Compile (or load from the cache) every kernel for float32 and float64.

    Returns the seconds it took. A no-op returning 0.0 when the kernels are unavailable.
    """
    import time

    start = time.perf_counter()
    if not _check_available():
        return 0.0
    adams = [_Adam(amsgrad=False), _Adam(amsgrad=True)]
    for dtype in (np.float32, np.float64):
        params = np.zeros(8, dtype)
        grads = np.ones(8, dtype)
        for hp in adams:
            arrays = {k: np.zeros(8, dtype) for k in ("exp_avg", "exp_avg_sq")}
            if hp.amsgrad:
                arrays["max_exp_avg_sq"] = np.zeros(8, dtype)
            adam_step(hp, grads, OptState(arrays, {"step": 0}), params, 1e-3)
        sgd = _SGD(momentum=0.9)
        state = OptState({}, {"step": 0})
        sgd_step(_SGD(), grads, state, params, 1e-3)  # plain
        sgd_step(sgd, grads, state, params, 1e-3)  # first momentum step
        sgd_step(sgd, grads, state, params, 1e-3)  # momentum
    return time.perf_counter() - start
