"""Domain errors raised by the core. The API maps them to HTTP problems."""

from __future__ import annotations


class CoreError(ValueError):
    """Base of every error the core raises for bad input."""


class LayoutError(CoreError):
    """A tensor set does not match a session's layout (unknown, missing, wrong shape)."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class SpecError(CoreError):
    """A spec (optimizer, schedule, ...) is invalid; `errors` lists each field at fault.

    Each error is `{"loc": (field, index, ...), "msg": "..."}`; `str()` joins them as
    `betas[0] must be in [0, 1): got 1.2`.
    """

    def __init__(self, errors: list[dict[str, object]]) -> None:
        self.errors = errors
        super().__init__("; ".join(_describe(e) for e in errors))


class HyperparameterError(SpecError):
    """An optimizer's hyperparameters are invalid."""


class ScheduleError(SpecError):
    """A learning-rate schedule's spec is invalid, or it was asked for what it lacks."""


class StateError(CoreError):
    """Optimizer state that does not fit its optimizer or cannot be decoded."""


def _describe(error: dict[str, object]) -> str:
    loc = error.get("loc", ())
    path = ""
    for part in loc if isinstance(loc, (list, tuple)) else ():
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    msg = str(error.get("msg", "invalid"))
    last = loc[-1] if isinstance(loc, (list, tuple)) and loc else None
    if isinstance(last, str) and msg.startswith(f"{last} "):  # the message names it
        path = path[: -len(last)].rstrip(".")
    return f"{path} {msg}" if path else msg
