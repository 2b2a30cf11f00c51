"""The replica's cache of session state: an LRU bounded by entry count and bytes.

A step that finds the version it holds here still current in the store does not read
the session's blobs again (see `engine`); the cache is refreshed only after a commit
succeeded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from service.core.state import OptState


@dataclass(frozen=True, slots=True)
class Cached:
    """A session's state at `version`, as this replica last committed or read it.

    The arrays are never written (steps run with `inplace=False`), so an entry can be
    shared by concurrent requests.
    """

    version: int
    params: np.ndarray
    state: OptState

    @property
    def nbytes(self) -> int:
        return int(self.params.nbytes + sum(a.nbytes for a in self.state.arrays.values()))


class SessionCache:
    """An LRU of session id -> `Cached`, bounded by entry count and total bytes."""

    def __init__(self, max_sessions: int, max_bytes: int) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Cached, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str) -> Cached | None:
        item = self._entries.get(session_id)
        if item is None:
            return None
        self._entries.move_to_end(session_id)
        return item[0]

    def put(self, session_id: str, entry: Cached) -> None:
        self.pop(session_id)
        size = entry.nbytes
        if self.max_sessions <= 0 or size > self.max_bytes:
            return
        self._entries[session_id] = (entry, size)
        self.nbytes += size
        while len(self._entries) > self.max_sessions or self.nbytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted

    def pop(self, session_id: str) -> None:
        item = self._entries.pop(session_id, None)
        if item is not None:
            self.nbytes -= item[1]
