"""The optional tqdm progress bars of the clients' helpers (`lr_find`, `FederatedWorker`).

tqdm is not a dependency of the clients: it is imported (by name, it has no type stubs)
only when a bar is asked for, and its absence is then an `ImportError` that says how to
install it or turn the bar off.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Bar(Protocol):
    """What the helpers use of a `tqdm` bar."""

    def update(self, n: int = 1) -> object: ...
    def set_postfix(self, **kwargs: Any) -> object: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> object: ...


class NoBar:
    """The bar when none is asked for: does nothing."""

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs: Any) -> None:
        return None

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        return None


@contextmanager
def progress_bar(
    enabled: bool, total: int | None, *, desc: str, unit: str, caller: str
) -> Iterator[Bar]:
    """A tqdm bar (`tqdm.auto`) of `total` units (None: unknown), closed at the end; a
    `NoBar` unless `enabled`. `caller` names the call in the message when tqdm is
    missing (`"lr_find(progress=True)"`)."""
    if not enabled:
        yield NoBar()
        return
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        raise ImportError(
            f"{caller} draws its progress bar with tqdm, which is not installed: "
            "pip install tqdm (or pass progress=False)"
        ) from None
    bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()


__all__ = ["Bar", "NoBar", "progress_bar"]
