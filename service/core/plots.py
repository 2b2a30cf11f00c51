"""PNG plots of an LR range test and of a learning-rate schedule.

matplotlib is an optional dependency (the `server` extra); it is imported inside the
functions, so importing this module costs nothing and the core runs without it.

The figures are made with `matplotlib.figure.Figure` and drawn by the Agg canvas directly,
never through `pyplot`: no global backend switch, no figure registry to leak into (so there
is nothing for `plt.close` to do; the figure is cleared before returning), and safe to call
from the server's worker threads. Each plot has a fixed size and dpi (800 x 500 pixels), and
the PNG is written without the `Software` text chunk, so the same input gives the same
bytes for a given matplotlib version.

Any values are drawn without raising: non-finite ones (inf, NaN) are left out (gaps in
a curve, a marker not drawn), and an axis whose values reach past `MAX_PLOTTED` in
magnitude (up to the float range, where matplotlib's limits and ticks overflow:
"arange: cannot compute length") is drawn in units of a power of ten named in its label
(`learning rate (x 1e308)`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from service.core.errors import CoreError
from service.core.lr_finder import LRFinderConfig, LRFinderState, Suggestion
from service.core.schedules.base import Schedule

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: inches and dots per inch of every plot (800 x 500 pixels)
FIGSIZE = (8.0, 5.0)
DPI = 100

#: the largest magnitude drawn as it is; beyond it an axis is drawn in units of 10**k
MAX_PLOTTED = 1e100

_COLORS = {
    "steepest": "tab:red",
    "minimum": "tab:green",
    "steep": "tab:purple",
    "valley": "tab:orange",
}


def _new_figure() -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CoreError(
            "plots need matplotlib: pip install 'optserve[server]' (or matplotlib)"
        ) from exc
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def _finite(values: object) -> np.ndarray:
    """`values` as float64, every non-finite value (or one too large for a float) NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(values, dtype=np.float64, ndmin=1)
    array[~np.isfinite(array)] = math.nan
    return array


def _unit(*arrays: np.ndarray) -> tuple[float, str]:
    """A power of ten to divide the (finite, NaN elsewhere) `arrays` by so that none is
    past `MAX_PLOTTED` in magnitude, and its note for the axis label: `(1.0, "")` when
    they are drawn as they are."""
    top = 0.0
    for a in arrays:
        if np.isfinite(a).any():
            top = max(top, float(np.nanmax(np.abs(a))))
    if not top > MAX_PLOTTED:
        return 1.0, ""
    k = math.floor(math.log10(top))
    return 10.0**k, f" (x 1e{k})"


def _text(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "not finite"


def _title(config: LRFinderConfig, state: LRFinderState) -> str:
    n = len(state.lrs)
    if state.stop_reason == "diverged":
        why = (
            "non-finite loss"
            if state.nonfinite_lr is not None
            else f"smoothed loss > {config.diverge_th:g} x best"
        )
        status = f"stopped: diverged after {n} of {config.num_steps} steps ({why})"
    elif state.stop_reason == "completed":
        status = f"stopped: completed, {n} steps"
    else:
        status = f"running: {n} of {config.num_steps} steps"
    return f"LR range test ({config.mode} ramp) - {status}"


def lr_finder_png(
    config: LRFinderConfig,
    state: LRFinderState,
    suggestions: Mapping[str, Suggestion] | None = None,
) -> bytes:
    """Loss against rate: the smoothed loss, the raw loss faint behind it (log rate axis for
    the exp ramp), each suggestion marked at the point it picked and drawn as a vertical
    line at its rate, labelled with that rate, and the stop reason in the title."""
    fig = _new_figure()
    ax = fig.add_subplot()
    lrs, raw, smoothed = _finite(state.lrs), _finite(state.losses), _finite(state.smoothed)
    lr_unit, lr_note = _unit(lrs)
    loss_unit, loss_note = _unit(raw, smoothed)
    lrs, raw, smoothed = lrs / lr_unit, raw / loss_unit, smoothed / loss_unit
    if len(lrs):
        ax.plot(lrs, raw, color="tab:blue", alpha=0.3, linewidth=1.0, label="loss")
        ax.plot(lrs, smoothed, color="tab:blue", linewidth=2.0, label="smoothed loss")
    if np.isfinite(raw).any() and np.isfinite(smoothed).any():
        lo = float(min(np.nanmin(raw), np.nanmin(smoothed)))
        # the top of the smoothed curve, or of the raw one bar its highest tenth (the
        # explosion at the end of a diverged test would squash the rest of the curve)
        hi = float(max(np.nanmax(smoothed), np.nanquantile(raw, 0.9)))
        margin = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
        ax.set_ylim(lo - margin, hi + margin)
    elif not len(lrs):
        ax.text(0.5, 0.5, "no losses yet", transform=ax.transAxes, ha="center", va="center")
    for order, (name, s) in enumerate((suggestions or {}).items()):
        color = _COLORS.get(name, "tab:gray")
        if s.lr is None or s.index is None:
            ax.plot([], [], " ", label=f"{name}: none")
            continue
        at = float(_finite(s.lr)[0]) / lr_unit
        if math.isfinite(at):
            ax.axvline(at, color=color, linestyle="--", linewidth=1.0)
        ax.scatter(
            [lrs[s.index]],
            [smoothed[s.index]],
            s=max(130 - 30 * order, 30),  # later markers smaller: coinciding ones stay visible
            color=color,
            zorder=3 + order,
            label=f"{'minimum / 10' if name == 'minimum' else name}: {_text(s.lr)}",
        )
    if state.nonfinite_lr is not None:
        at = float(_finite(state.nonfinite_lr)[0]) / lr_unit
        label = f"non-finite loss at {_text(state.nonfinite_lr)}"
        if math.isfinite(at):
            ax.axvline(at, color="black", linestyle=":", label=label)
        else:
            ax.plot([], [], color="black", linestyle=":", label=label)
    if config.mode == "exp":
        ax.set_xscale("log")
    ax.set_xlabel(f"learning rate{lr_note}")
    ax.set_ylabel(f"loss{loss_note}")
    ax.set_title(_title(config, state), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    return _png(fig)


def _schedule_rates(
    schedule: Schedule | None,
    base_lr: float,
    steps: int,
    current_step: int | None,
    rates: np.ndarray | None,
) -> np.ndarray:
    """The rates `schedule_png` draws, after checking its arguments (CoreError)."""
    if steps < 1:
        raise CoreError(f"steps must be >= 1: got {steps}")
    if current_step is not None and not 0 <= current_step < steps:
        raise CoreError(f"current_step must be in [0, {steps}): got {current_step}")
    if rates is None:
        return np.full(steps, base_lr) if schedule is None else schedule.lrs(steps, base_lr)
    if len(rates) != steps:
        raise CoreError(f"rates must hold {steps} values: got {len(rates)}")
    return rates


def _mark_step(ax: Axes, current_step: int, rate: float, drawn: float) -> None:
    """A dashed vertical line at `current_step` and a marker at its (drawn) rate."""
    shown = f"{rate:.4g}" if math.isfinite(rate) else "not finite"
    ax.axvline(current_step, color="tab:red", linestyle="--", linewidth=1.0)
    ax.scatter(
        [current_step],
        [drawn],
        s=60,
        color="tab:red",
        zorder=3,
        label=f"step {current_step}: lr {shown}",
    )


def _momentum_axis(ax: Axes, t: np.ndarray, momenta: np.ndarray, marker: str | None) -> Axes:
    """The momentum curve on a second y axis of `ax`, returned."""
    ax2 = ax.twinx()
    ax2.plot(
        t,
        _finite(momenta),
        color="tab:orange",
        linestyle="--",
        marker=marker,
        drawstyle="steps-post",
        label="momentum",
    )
    ax2.set_ylabel("momentum / beta1")
    return ax2


def schedule_png(
    schedule: Schedule | None,
    base_lr: float,
    steps: int,
    current_step: int | None = None,
    *,
    rates: np.ndarray | None = None,
    title: str | None = None,
) -> bytes:
    """The schedule's rate for steps `0 .. steps - 1`, its cycled momentum (beta1) on a
    second axis when it cycles one, and `current_step` marked when given.

    `rates` replaces the schedule's own (a session's rates that depend on reported
    losses, or a range test's ramp; NaN where unknown); `schedule=None` is a constant
    `base_lr`."""
    rates = _schedule_rates(schedule, base_lr, steps, current_step, rates)
    momenta = None if schedule is None else schedule.momenta(steps)
    values = _finite(rates)
    unit, note = _unit(values)
    drawn = values / unit
    t = np.arange(steps)
    fig = _new_figure()
    ax = fig.add_subplot()
    marker = "o" if steps == 1 else None
    # a rate holds for a whole step: draw steps, not slopes between them
    ax.plot(
        t, drawn, color="tab:blue", marker=marker, drawstyle="steps-post", label="learning rate"
    )
    ax.set_xlabel("step")
    ax.set_ylabel(f"learning rate{note}")
    ax.grid(True, alpha=0.3)
    if current_step is not None:
        _mark_step(ax, current_step, float(rates[current_step]), drawn[current_step])
    handles, labels = ax.get_legend_handles_labels()
    if momenta is not None:
        h2, l2 = _momentum_axis(ax, t, momenta, marker).get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=9)
    name = "constant" if schedule is None else schedule.name
    ax.set_title(title or f"{name} schedule, base lr {base_lr:g}, {steps} steps", fontsize=10)
    return _png(fig)


__all__ = ["DPI", "FIGSIZE", "MAX_PLOTTED", "lr_finder_png", "schedule_png"]
